"""KV-cached autoregressive decoding for ``transformers`` causal LMs, with the same per-step callbacks.

    gen = AutoregressiveGenerator(model, tokenizer)
    out = gen.generate(["Hello", "Hi there"], GenerationConfig(max_new_tokens=32))

The loop does not call ``model.generate``. Step 0 is the prefill (tag ``"prefill"``): one forward over the
left-padded prompts that yields the first token; step t >= 1 (tag ``t``) feeds the token of step t - 1 with
the KV cache and yields token t. So NFE = number of tokens decoded (prefill included).

The cache keyword is asked from transformers (:mod:`.kv_cache`: ``past_key_values`` up to 5.23, ``cache``
from 5.24), and after every forward the cache must hold exactly the positions fed so far, else
:class:`~.kv_cache.KVCacheError` is raised: a silent fall-back to re-running the whole sequence is
impossible. ``kv_cache=False`` asks for that fall-back explicitly (for a model without a cache); the result
records it (``GenerationResult.kv_cache``).

Batching follows ``transformers``: left padding, ``position_ids = cumsum(attention_mask) - 1`` (0 at
padding), then +1 per decoded token. A row that has stopped is fed the pad id with attention 0, so it stays
out of the statistics (the ``"all"`` token group is the attention mask) and cannot affect other rows.
Greedy at temperature 0, else sampling from softmax(logits / T) with the row's own ``torch.Generator``
(seeded ``seed + r``). Rows stop at a stop id (kept in ``sequences``, cut from ``ids``) or once their decoded
text contains a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dllm_sparse.models.loading import model_device
from dllm_sparse.models.wrappers import forward_parameters
from dllm_sparse.steps import CallbackList, Geometry, StepState

from .common import (
    Timer,
    check_ids_fit,
    cut_output,
    encode_prompts,
    resolve_pad_id,
    resolve_stop_ids,
    row_generators,
)
from .config import DIFFUSION_ONLY, GenerationConfig, GenerationResult, StepInfo
from .kv_cache import cache_keyword, check_cache_length, new_cache

__all__ = ["AutoregressiveGenerator"]


def _family(model: Any) -> str:
    try:
        from dllm_sparse.models.families import detect_family

        return detect_family(model).family
    except Exception:  # noqa: BLE001 - any causal LM works
        return ""


def _refuse_diffusion_settings(cfg: GenerationConfig, model: Any) -> None:
    """A setting only the masked-diffusion sampler reads (``steps``, ``block_length``, ``cfg_scale``, ``block_cache``,
    ...) changed from its default would be ignored by this loop: ``ValueError`` naming it and its default."""
    given = cfg.diffusion_settings()
    if given:
        names = ", ".join(f"{k}={v!r}" for k, v in given.items())
        reset = ", ".join(f"{k}={DIFFUSION_ONLY[k]!r}" for k in given)
        raise ValueError(f"{names}: diffusion-only setting(s) of GenerationConfig, which autoregressive generation "
                         f"({type(model).__name__}) would ignore. Leave them at their defaults for an autoregressive "
                         f"model (config.replace({reset})), or generate with a masked-diffusion model")


class AutoregressiveGenerator:
    """KV-cached decoding loop for one causal LM."""

    kind = "ar"

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, family: str | None = None,
                 kv_cache: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family if family is not None else _family(model)
        params = forward_parameters(model)  # a wrapper's forward takes **kwargs: ask the model it wraps
        # Raises KVCacheError (naming kv_cache=False) when the model takes no cache keyword.
        self._cache_keyword = cache_keyword(model) if kv_cache else None
        self._use_cache = bool(kv_cache)
        self._keep_last = "logits_to_keep" in params
        self._positions = "position_ids" in params

    def _forward(self, x, attention_mask, position_ids, cache):
        kwargs: dict[str, Any] = {"input_ids": x, "attention_mask": attention_mask}
        if self._positions:
            kwargs["position_ids"] = position_ids
        if self._use_cache:
            kwargs.update({self._cache_keyword: cache, "use_cache": True})
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :].to(x.device)  # no-op unless accelerate put the head on another device

    @torch.no_grad()
    def generate(
        self,
        prompts: Any,
        config: GenerationConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        callbacks: Iterable[Any] = (),
        apply_chat_template: bool = False,
        **overrides,
    ) -> GenerationResult:
        """Generate for ``prompts`` (text, id lists, or a left-padded id tensor with ``attention_mask``)."""
        cfg = config if config is not None else GenerationConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        _refuse_diffusion_settings(cfg, self.model)
        model, tok = self.model, self.tokenizer
        stop_ids = resolve_stop_ids(cfg, model, tok, self.family)
        pad_id = resolve_pad_id(cfg, model, tok, stop_ids)
        ids, am = encode_prompts(prompts, tok, pad_id, attention_mask, apply_chat_template)
        check_ids_fit(model, ids, am, ids.shape[1] + cfg.max_new_tokens, pad_id=pad_id)
        device = model_device(model)
        d = _Decoding.start(ids.to(device), am.to(device), new_cache(model) if self._use_cache else None)
        B, P = ids.shape
        n_max = cfg.max_new_tokens
        text_fn = (lambda t: tok.decode(t, skip_special_tokens=True)) if tok is not None else None
        pick = _TokenChoice(cfg, B, device, pad_id, stop_ids)
        state = _step_state(model, cfg, d, B, P, n_max)
        cbs = CallbackList(callbacks, model=model)
        # When nothing observes the steps, whether every row has stopped is read every STOP_CHECK_EVERY steps
        # (one host sync each, not one per step); the steps run past the last stop are cut from the result below.
        # Callbacks see every step's state (last_step_of_block included), module hooks (sparsify, statistics) see
        # every forward, and stop strings are read on the host: then it is read after every step.
        check_every = 1 if (cbs.items or cfg.stop_strings or _has_forward_hooks(model)) else STOP_CHECK_EVERY
        steps: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # per step: token, row was active, time
        all_done_at: list[torch.Tensor] = []  # per step, on the device: no row is active after it
        n_steps, stopped, checked = n_max, False, 0
        timer = Timer(device)
        try:
            cbs.generation_begin(state)
            for t in range(n_max):
                _begin_step(state, d, t, P, n_max)
                cbs.step_begin(state)
                nxt, was_active = self._decode_step(d, pick)
                if cfg.stop_strings and text_fn is not None:
                    _stop_at_strings(d, P, text_fn, cfg.stop_strings)
                elapsed = timer.elapsed()
                steps.append((nxt, was_active, elapsed))
                all_done_at.append(~d.active.any())
                done = None
                if len(all_done_at) - checked == check_every or t == n_max - 1:
                    done, checked = _first_done(all_done_at, checked), len(all_done_at)
                all_done = done is not None
                _end_step(state, d, nxt, was_active, t + 1, elapsed, last=t == n_max - 1 or all_done)
                if cbs.step_end(state):
                    n_steps, stopped = t + 1, True
                    break
                if all_done:
                    n_steps = done + 1  # steps after it (at most check_every - 1) fed padding only: not part of it
                    break
        finally:
            cbs.generation_end(state)
        wall = timer.elapsed()
        return self._result(cfg, d.seq[:, :P + n_steps], P, steps[:n_steps], d, stop_ids, text_fn, stopped, wall)

    def _decode_step(self, d: _Decoding, pick: _TokenChoice) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward and its tokens, with the stop-id bookkeeping on the device (no host sync: at temperature 0
        a traceable function of the loop's tensors). Returns the tokens and which rows were active."""
        S = d.seq.shape[1]
        if self._use_cache:
            logits = self._forward(d.x_in, d.attn, d.pos_in, d.cache)
            check_cache_length(d.cache, S, self.model)  # python ints from tensor shapes: no host sync
        else:
            full_pos = (d.attn.cumsum(-1) - 1).masked_fill(d.attn == 0, 0)
            logits = self._forward(d.seq, d.attn, full_pos, None)
        was_active = d.active
        nxt = torch.where(was_active, pick(logits), pick.pad)
        d.seq = torch.cat([d.seq, nxt[:, None]], dim=1)
        d.attn = torch.cat([d.attn, was_active.long()[:, None]], dim=1)
        finished = was_active & torch.isin(nxt, pick.stop)
        d.produced += was_active
        d.hit_stop |= finished
        d.active = was_active & ~finished
        d.x_in, d.pos_in = nxt[:, None], d.pos_in[:, -1:] + 1
        return nxt, was_active

    def _result(self, cfg: GenerationConfig, seq: torch.Tensor, P: int, steps: list, d: _Decoding,
                stop_ids: list[int], text_fn: Any, stopped: bool, wall: float) -> GenerationResult:
        """The result of the steps that ran: ids cut at stop ids / strings, texts, reasons, the per-step trace
        (read from the device once)."""
        B, n_max = seq.shape[0], cfg.max_new_tokens
        seq_cpu, produced, hit_stop = seq.cpu(), d.produced.tolist(), d.hit_stop.tolist()
        tokens = torch.stack([s[0] for s in steps], 1).tolist() if steps else [[] for _ in range(B)]
        active = torch.stack([s[1] for s in steps], 1).tolist() if steps else [[] for _ in range(B)]
        trace = [StepInfo(t, 0, "prefill" if t == 0 else t, t + 1, elapsed,
                          [[t] if active[r][t] else [] for r in range(B)],
                          [[tokens[r][t]] if active[r][t] else [] for r in range(B)])
                 for t, (_, _, elapsed) in enumerate(steps)]
        out_ids, texts, reasons = [], [], []
        for r in range(B):
            row = seq_cpu[r, P:P + produced[r]].tolist()
            row, text, hit = cut_output(row, stop_ids, text_fn, cfg.stop_strings)
            out_ids.append(row)
            texts.append(text)
            if hit_stop[r] or hit:
                reasons.append("stop")
            else:
                reasons.append("callback" if stopped and produced[r] < n_max else "length")
        return GenerationResult(sequences=seq_cpu, prompt_length=P, ids=out_ids, texts=texts, nfe=len(steps),
                                wall_time=wall, num_tokens=sum(produced), trace=trace, finish_reasons=reasons,
                                kind=self.kind, config=cfg, kv_cache=self._use_cache)


#: Without callbacks or stop strings, every how many steps the loop reads whether every row has stopped.
STOP_CHECK_EVERY = 8


@dataclass
class _Decoding:
    """The loop's tensors between steps, on the model's device."""

    seq: torch.Tensor  # [B, S] prompts and the tokens so far
    attn: torch.Tensor  # [B, S] attention mask (0 at padding and after a row stopped)
    x_in: torch.Tensor  # what the next forward is fed: the prompts, then the last token
    pos_in: torch.Tensor  # their positions
    cache: Any
    prompt_mask: torch.Tensor  # [B, P]
    active: torch.Tensor  # [B] bool: the row has not stopped
    produced: torch.Tensor  # [B] long: tokens decoded (stop token included)
    hit_stop: torch.Tensor  # [B] bool: the row stopped at a stop id or string

    @classmethod
    def start(cls, ids: torch.Tensor, am: torch.Tensor, cache: Any) -> _Decoding:
        B, device = ids.shape[0], ids.device
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        return cls(ids, am, ids, pos, cache, am.bool(), torch.ones(B, dtype=torch.bool, device=device),
                   torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, dtype=torch.bool, device=device))


class _TokenChoice:
    """The next token from the last position's logits: greedy at temperature 0, else sampled from
    softmax(logits / T) with each row's own generator; plus the pad and stop ids as device tensors."""

    def __init__(self, cfg: GenerationConfig, B: int, device: torch.device, pad_id: int, stop_ids: list[int]):
        self.temperature = cfg.temperature
        self.gens = row_generators(cfg, B, device) if cfg.temperature > 0 else None
        self.pad = torch.tensor(pad_id, device=device)
        self.stop = torch.tensor(stop_ids, dtype=torch.long, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        return torch.cat([torch.multinomial(probs[r], 1, generator=self.gens[r]) for r in range(len(self.gens))])


def _step_state(model: Any, cfg: GenerationConfig, d: _Decoding, B: int, P: int, n_max: int) -> StepState:
    """The state callbacks see. One block: the max_new_tokens positions after the prompt, one token per step
    (the prefill is step 0)."""
    return StepState(kind="ar", model=model, config=cfg, batch_size=B, prompt_length=P, num_steps=n_max,
                     geometry=Geometry(gen_length=n_max, block_length=n_max, num_blocks=1, steps=n_max,
                                       steps_per_block=n_max),
                     block_slice=slice(P, P + n_max), canvas=d.seq, attention_mask=d.attn,
                     prompt_mask=d.prompt_mask, forward_batch=B)


def _begin_step(state: StepState, d: _Decoding, t: int, P: int, n_max: int) -> None:
    """The state before step t's forward: its tag and token groups (the prompt at the prefill, then the decoded
    tokens)."""
    B, S = d.seq.shape
    device = d.seq.device
    if t == 0:
        groups = {"prompt": d.prompt_mask}
    else:
        decoded = torch.zeros((B, S), dtype=torch.bool, device=device)
        decoded[:, P:] = d.attn[:, P:].bool()
        groups = {"decoded": decoded}
    state.step, state.block, state.step_in_block = t, 0, t
    state.first_step_of_block, state.last_step_of_block = t == 0, t == n_max - 1
    state.tag = "prefill" if t == 0 else t
    state.canvas, state.attention_mask, state.groups = d.seq, d.attn, groups
    state.masked = torch.zeros((B, S), dtype=torch.bool, device=device)
    state.prompt_mask = torch.nn.functional.pad(d.prompt_mask, (0, S - P))
    state.committed, state.new_tokens = None, None


def _end_step(state: StepState, d: _Decoding, nxt: torch.Tensor, was_active: torch.Tensor, nfe: int,
              elapsed: float, last: bool) -> None:
    """The state after a step's forward: the token each active row committed at the new last position."""
    committed = torch.zeros(d.seq.shape, dtype=torch.bool, device=d.seq.device)
    committed[:, -1] = was_active
    state.canvas, state.attention_mask = d.seq, d.attn
    state.committed, state.new_tokens, state.nfe, state.elapsed = committed, nxt, nfe, elapsed
    state.last_step_of_block = last


def _stop_at_strings(d: _Decoding, P: int, text_fn: Any, stop_strings: Any) -> None:
    """Stop the active rows whose decoded text now contains a stop string (read on the host: the text is)."""
    for r, is_active in enumerate(d.active.tolist()):
        if is_active and any(s in text_fn(d.seq[r, P:].tolist()) for s in stop_strings if s):
            d.hit_stop[r] = True
            d.active[r] = False


def _has_forward_hooks(model: torch.nn.Module) -> bool:
    """Whether a forward hook could see a step's forward (a padding-only step past the last stop included)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _first_done(all_done_at: list[torch.Tensor], first_step: int) -> int | None:
    """The first step from ``first_step`` on (the steps not read yet) after which no row was active, or None
    (``all_done_at``: one device flag per step). One host sync."""
    flags = torch.stack(all_done_at[first_step:]).tolist()
    return next((first_step + i for i, done in enumerate(flags) if done), None)
