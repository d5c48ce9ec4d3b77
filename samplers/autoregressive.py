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
        ids, am = ids.to(device), am.to(device)
        B, P = ids.shape
        n_max = cfg.max_new_tokens
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        cache = new_cache(model) if self._use_cache else None
        gens = row_generators(cfg, B, device) if cfg.temperature > 0 else None
        stop_t = torch.tensor(stop_ids, dtype=torch.long, device=device)
        text_fn = (lambda t: tok.decode(t, skip_special_tokens=True)) if tok is not None else None

        seq, attn = ids, am
        active = torch.ones(B, dtype=torch.bool, device=device)
        produced = [0] * B
        hit_stop = [False] * B
        prompt_mask = am.bool()
        # One block: the max_new_tokens positions after the prompt, one token per step (the prefill is step 0).
        state = StepState(kind="ar", model=model, config=cfg, batch_size=B, prompt_length=P, num_steps=n_max,
                          geometry=Geometry(gen_length=n_max, block_length=n_max, num_blocks=1, steps=n_max,
                                            steps_per_block=n_max),
                          block_slice=slice(P, P + n_max), canvas=seq, attention_mask=attn,
                          prompt_mask=prompt_mask, forward_batch=B)
        cbs = CallbackList(callbacks, model=model)
        trace: list[StepInfo] = []
        nfe, stopped = 0, False
        x_in, pos_in = ids, pos
        timer = Timer(device)
        try:
            cbs.generation_begin(state)
            for t in range(n_max):
                S = seq.shape[1]
                if t == 0:
                    groups = {"prompt": prompt_mask}
                else:
                    decoded = torch.zeros((B, S), dtype=torch.bool, device=device)
                    decoded[:, P:] = attn[:, P:].bool()
                    groups = {"decoded": decoded}
                state.step, state.block, state.step_in_block = t, 0, t
                state.first_step_of_block, state.last_step_of_block = t == 0, t == n_max - 1
                state.tag = "prefill" if t == 0 else t
                state.canvas, state.attention_mask, state.groups = seq, attn, groups
                state.masked = torch.zeros((B, S), dtype=torch.bool, device=device)
                state.prompt_mask = torch.nn.functional.pad(prompt_mask, (0, S - P))
                state.committed, state.new_tokens = None, None
                cbs.step_begin(state)

                if self._use_cache:
                    logits = self._forward(x_in, attn, pos_in, cache)
                    check_cache_length(cache, S, model)  # python ints from tensor shapes: no host sync
                else:
                    full_pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)
                    logits = self._forward(seq, attn, full_pos, None)
                nfe += 1
                if cfg.temperature == 0:
                    nxt = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
                    nxt = torch.cat([torch.multinomial(probs[r], 1, generator=gens[r]) for r in range(B)])
                nxt = torch.where(active, nxt, torch.full_like(nxt, pad_id))
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                attn = torch.cat([attn, active.long()[:, None]], dim=1)
                committed = torch.zeros(seq.shape, dtype=torch.bool, device=device)
                committed[:, -1] = active

                act = active.tolist()
                new = nxt.tolist()
                finished = (active & torch.isin(nxt, stop_t)).tolist()
                for r in range(B):
                    if not act[r]:
                        continue
                    produced[r] += 1
                    if not finished[r] and cfg.stop_strings and text_fn is not None:
                        text = text_fn(seq[r, P:].tolist())
                        finished[r] = any(s in text for s in cfg.stop_strings if s)
                    hit_stop[r] = finished[r]
                active = active & ~torch.tensor(finished, dtype=torch.bool, device=device)

                elapsed = timer.elapsed()
                state.canvas, state.attention_mask = seq, attn
                state.committed, state.new_tokens, state.nfe, state.elapsed = committed, nxt, nfe, elapsed
                all_done = not bool(active.any())
                state.last_step_of_block = t == n_max - 1 or all_done
                trace.append(StepInfo(t, 0, state.tag, nfe, elapsed,
                                      [[t] if act[r] else [] for r in range(B)],
                                      [[new[r]] if act[r] else [] for r in range(B)]))
                if cbs.step_end(state):
                    stopped = True
                    break
                if all_done:
                    break
                x_in = nxt[:, None]
                pos_in = pos_in[:, -1:] + 1
        finally:
            cbs.generation_end(state)
        wall = timer.elapsed()

        seq_cpu = seq.cpu()
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
        return GenerationResult(sequences=seq_cpu, prompt_length=P, ids=out_ids, texts=texts, nfe=nfe,
                                wall_time=wall, num_tokens=sum(produced), trace=trace, finish_reasons=reasons,
                                kind=self.kind, config=cfg, kv_cache=self._use_cache)
