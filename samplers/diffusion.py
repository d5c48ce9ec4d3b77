"""LLaDA's masked-diffusion sampler (definitions: ``docs/generation.md``), with per-step callbacks.

    gen = MaskedDiffusionGenerator(model, tokenizer)
    out = gen.generate(["Hello"], GenerationConfig(gen_length=128, steps=128, block_length=32))

The loop, per block and per step:

1. canvas = left-padded prompt + ``gen_length`` mask tokens; prompt positions never change.
2. At a block's start, n = its masked positions (per row); step i of the block commits n // s tokens, plus one
   on the first n % s steps (s = steps per block).
3. One forward pass over the whole canvas (no cache); the LM head runs on the rows the step reads only (the
   current block, shifted one left under Dream's convention) where the family profile names a splittable head
   (:func:`~dllm_sparse.models.families.without_lm_head`). With ``cfg_scale`` w > 0 the canvas with every real
   prompt token replaced by the mask id is batched with it (conditional rows first) and
   logits = uncond + (w + 1)(cond - uncond).
4. x0 = argmax(logits) at temperature 0; at T > 0 float64 Gumbel-max: argmax(exp(logits) / (-log u)^T).
   Confidence: softmax probability of x0 (``low_confidence``) or u ~ U(0, 1) (``random``); -inf outside the
   current block and at positions that are not masked. The k most confident masked positions of the block
   take x0 (ties: lowest position first, a stable sort); committed tokens are never remasked. With
   ``GenerationConfig(confidence="official")`` the softmax runs in the model's dtype and the k positions are
   taken in ``torch.topk`` order over the whole canvas row, as the official code does (bit-for-bit parity in bf16;
   the LM head then runs over the whole canvas, as there).

Random numbers (documented so that a reference implementation can draw the very same ones): row r owns a
``torch.Generator`` on the model's device seeded with ``seed + r`` (``GenerationConfig.seed``). At every step
and for every row, in this order: if T > 0, ``torch.rand((block_length, V), dtype=float64)`` for the
Gumbel-max of the current block's positions (position-major, V = logits width); then, with ``random``
remasking, ``torch.rand((block_length,), dtype=float64)`` for the confidences. Nothing else is drawn. Noise
is only drawn for the current block (the only positions that can be committed), so it does not depend on the
prompt length or on padding: a row of a batch draws what the same prompt draws alone with that row's seed.

Teacher forcing: ``generate(..., forced_commits=trace)`` runs the same loop but writes a recorded trajectory's
tokens instead of its own choices (:func:`dllm_sparse.samplers.replay.replay` builds on it); callbacks see
the block's logits in ``StepState.logits`` at step end.

Works with the native :class:`dllm_sparse.models.llada.LLaDAModelLM`, a LLaDA loaded with its own remote code (no
padded batches: that code ignores ``attention_mask``, so padded keys would be attended and a padded row would
differ from the same prompt alone; refused with an error), and any
bidirectional masked LM whose output has ``.logits``. ``logit_shift`` applies Dream's convention:
logits = cat([logits[:, :1], logits[:, :-1]], dim=1) (on by default for families whose profile says
``logit_shift=True``, such as Dream; a native LLaDA whose config has ``logit_shift=True``, such as a converted
AR model, shifts inside its forward and needs nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from dllm_sparse.models.families import detect_family, family_named, without_lm_head
from dllm_sparse.models.loading import model_device
from dllm_sparse.steps import CallbackList, StepState

from .common import (
    Timer,
    check_ids_fit,
    cut_output,
    encode_prompts,
    resolve_pad_id,
    resolve_stop_ids,
    row_generators,
)
from .config import GenerationConfig, GenerationResult, StepInfo

__all__ = ["MaskedDiffusionGenerator", "validate_geometry", "num_transfer_tokens", "resolve_mask_id"]

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(values: list[int], target: int, count: int = 4) -> list[int]:
    return sorted(sorted(values, key=lambda v: (abs(v - target), v))[:count])


def validate_geometry(gen_length: int, steps: int, block_length: int) -> tuple[int, int]:
    """Check the block schedule; returns (num_blocks, steps_per_block). Raises ``ValueError`` naming a fix."""
    for name, v in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if block_length > gen_length:
        raise ValueError(f"block_length ({block_length}) is larger than gen_length ({gen_length}). Fix: set "
                         f"block_length={gen_length} (pure diffusion) or a divisor of {gen_length}.")
    if gen_length % block_length:
        divs = _nearest(_divisors(gen_length), block_length)
        lower = gen_length - gen_length % block_length
        mults = [m for m in (lower, lower + block_length) if m > 0]
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length}). Fix: use a "
            f"block_length that divides {gen_length} (e.g. {', '.join(map(str, divs))}) or a gen_length that is "
            f"a multiple of {block_length} (e.g. {', '.join(map(str, mults))})."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        lower = steps - steps % num_blocks
        mults = [m for m in (lower, lower + num_blocks) if m > 0]
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks} = gen_length {gen_length} "
            f"/ block_length {block_length}). Fix: steps={' or steps='.join(map(str, mults))}, or a block_length "
            f"giving a number of blocks that divides {steps}."
        )
    steps_per_block = steps // num_blocks
    if steps_per_block > block_length:
        # Each step commits n // s tokens of the block's n = block_length masked positions (+1 on the first
        # n % s steps), so steps past block_length commit nothing: forward passes that change no token.
        most = num_blocks * block_length
        raise ValueError(
            f"steps ({steps}) gives {steps_per_block} steps per block ({steps} / {num_blocks} blocks), more than "
            f"the block's {block_length} positions: each step commits at least one token, so "
            f"{steps_per_block - block_length} steps of every block would be forward passes that change nothing. "
            f"Fix: steps <= {most} (= gen_length {gen_length}; steps={most} commits one token per step), or a "
            f"longer gen_length.")
    return num_blocks, steps_per_block


def _refuse_mask_in_prompt(ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int) -> None:
    """A real prompt token equal to the mask id would be read as a masked position (the model is asked to fill
    it, and the step's "masked" group counts it): refuse it, naming the positions."""
    hits = ((ids == mask_id) & attention_mask.bool()).nonzero().tolist()
    if hits:
        P = ids.shape[1]
        shown = ", ".join(f"row {r} position {c - (P - int(attention_mask[r].sum()))}" for r, c in hits[:5])
        more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
        raise ValueError(f"the prompt holds the mask id {mask_id} at {shown}{more} (positions count from the row's "
                         "first real token); the sampler would treat it as a masked position. Remove it from the "
                         "prompt (was it encoded with this model's tokenizer?), or pass another "
                         "GenerationConfig(mask_id=...)")


def num_transfer_tokens(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B] masked counts -> [B, steps] tokens to commit per step: n // s each, +1 on the first n % s steps."""
    n = n_masked.reshape(-1, 1).long()
    extra = torch.arange(steps, device=n.device)[None, :] < (n % steps)
    return n // steps + extra.long()


def resolve_mask_id(model: Any, tokenizer: Any = None, mask_id: int | None = None, family: str = "") -> int:
    """Mask id from the argument, model config ``mask_token_id``, tokenizer ``mask_token_id``, or the
    ``mask_id`` of the family profile named ``family``."""
    if mask_id is not None:
        return int(mask_id)
    for source in (getattr(model, "config", None), tokenizer):
        mid = getattr(source, "mask_token_id", None) if source is not None else None
        if isinstance(mid, int):
            return mid
    profile = family_named(family)
    if profile is not None and profile.mask_id is not None:
        return profile.mask_id
    raise ValueError("no mask token id: the model config has no mask_token_id and the family is unknown; pass "
                     "GenerationConfig(mask_id=...) or MaskedDiffusionGenerator(model, mask_id=...)")


def _forced_steps(forced: Sequence[Any] | None, B: int, gen_length: int, steps: int) -> list[tuple] | None:
    """Teacher-forcing entries -> per step (committed, tokens), both per row; checks the shape of the plan."""
    if forced is None:
        return None
    out = []
    for t, entry in enumerate(forced):
        cols, toks = (entry["committed"], entry["tokens"]) if isinstance(entry, dict) else (entry.committed,
                                                                                        entry.tokens)
        if len(cols) != B or len(toks) != B:
            raise ValueError(f"forced_commits[{t}] has {len(cols)} rows of positions and {len(toks)} of tokens for "
                             f"a batch of {B} prompts; record the trajectory with the same prompts")
        for r, (c, k) in enumerate(zip(cols, toks, strict=True)):
            if len(c) != len(k):
                raise ValueError(f"forced_commits[{t}], row {r}: {len(c)} positions but {len(k)} tokens")
            if any(not 0 <= int(x) < gen_length for x in c):
                raise ValueError(f"forced_commits[{t}], row {r}: positions {list(c)} outside the generated region "
                                 f"0..{gen_length - 1} (indices count from the first generated token)")
        out.append(([[int(x) for x in c] for c in cols], [[int(x) for x in k] for k in toks]))
    if not out or len(out) > steps:
        raise ValueError(f"forced_commits has {len(out)} steps; give between 1 and steps ({steps}) entries "
                         "(the trace of a generation with the same steps / block_length / gen_length)")
    return out


def _forced_commit(entry: tuple, step: int, start: int, block_masked: torch.Tensor,
                   mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forced step -> (commit [B, b] bool, tokens [B, b]) for the block starting at generated index
    ``start``. Every forced position must lie in the current block and still hold the mask token."""
    B, b = block_masked.shape
    commit = torch.zeros((B, b), dtype=torch.bool, device=block_masked.device)
    x0 = torch.full((B, b), mask_id, dtype=torch.long, device=block_masked.device)
    for r, (cols, toks) in enumerate(zip(*entry, strict=True)):
        for c, t in zip(cols, toks, strict=True):
            j = c - start
            if not 0 <= j < b:
                raise ValueError(f"forced step {step}, row {r}: position {c} is outside the current block "
                                 f"{start}..{start + b - 1}; the sampler only commits inside the current block "
                                 "(replay with the block_length / steps the trajectory was recorded with)")
            if not bool(block_masked[r, j]) or bool(commit[r, j]):
                raise ValueError(f"forced step {step}, row {r}: position {c} was already written; each position "
                                 "is committed once")
            if t == mask_id:
                raise ValueError(f"forced step {step}, row {r}: token at position {c} is the mask id {mask_id}")
            commit[r, j] = True
            x0[r, j] = t
    return commit, x0


def _family(model: Any) -> str:
    try:
        return detect_family(model).family
    except Exception:  # noqa: BLE001 - any masked LM with .logits is accepted
        mt = getattr(getattr(model, "config", None), "model_type", "")
        return mt if isinstance(mt, str) else ""


def _is_remote_llada(model: Any, family: str) -> bool:
    """A LLaDA whose code ignores attention_mask: the released remote code (not the native class, nor a saved
    copy of it loaded as remote code)."""
    if family != "llada":
        return False
    return not _is_native_llada(model)


def _is_native_llada(model: Any) -> bool:
    """dllm_sparse's LLaDAModelLM, imported from the package or loaded from a saved copy with
    ``trust_remote_code=True`` (another class object, same code: it carries ``dllm_sparse_native_llada``)."""
    from dllm_sparse.models.wrappers import unwrap_model  # the class inside torch.compile / peft

    return bool(getattr(type(unwrap_model(model)), "dllm_sparse_native_llada", False))


def _shifts_itself(model: Any) -> bool:
    return _is_native_llada(model) and bool(getattr(model.config, "logit_shift", False))


def _official_topk(conf: torch.Tensor, k: torch.Tensor, start: int, S: int) -> torch.Tensor:
    """The official selection: per row, ``torch.topk`` over the whole canvas row (confidence -inf outside the
    block's masked positions), so equal confidences are taken in topk's order. Returns the block's commit mask."""
    B, b = conf.shape
    full = torch.full((B, S), -torch.inf, dtype=conf.dtype, device=conf.device)
    full[:, start:start + b] = conf
    commit = torch.zeros((B, S), dtype=torch.bool, device=conf.device)
    for r in range(B):
        commit[r, torch.topk(full[r], k=int(k[r])).indices] = True
    return commit[:, start:start + b]


class MaskedDiffusionGenerator:
    """LLaDA's sampler for one model. ``mask_id`` overrides the model's; ``family`` the detected family."""

    kind = "diffusion"

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, mask_id: int | None = None,
                 family: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.family = family if family is not None else _family(model)

    # ---- the model call ---------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, rows: slice,
                 head: torch.nn.Linear | None = None) -> torch.Tensor:
        """Logits of the canvas positions ``rows`` [B_fwd, len(rows), V]. With ``head`` (the LM head split off the
        forward by :func:`~dllm_sparse.models.families.without_lm_head`) the forward returns final hidden states
        and the head projects only the rows the step reads (the current block, shifted one left under Dream's
        convention): the other positions' logits are never read, so this is exact and skips most of the head."""
        out = self.model(input_ids=x) if attention_mask is None else self.model(input_ids=x,
                                                                                attention_mask=attention_mask)
        out = out.logits if hasattr(out, "logits") else out[0]
        out = out[:, rows]
        if head is not None:
            out = F.linear(out.to(head.weight.device), head.weight, head.bias)
        return out.to(x.device)  # no-op unless accelerate put the head on another device

    def logit_shift(self, config: GenerationConfig) -> bool:
        """Whether this generator shifts the logits (Dream's convention) under ``config``: ``logit_shift``, or
        when None, the family profile's ``logit_shift``. The sampler and :func:`dllm_sparse.samplers.replay.replay` both
        decide here. A model that shifts inside its own forward must not be shifted again (``ValueError``)."""
        profile = family_named(self.family)
        shift = config.logit_shift if config.logit_shift is not None else (profile is not None and profile.logit_shift)
        if shift and _shifts_itself(self.model):
            raise ValueError("this model already shifts its logits (config.logit_shift=True in the native LLaDA "
                             "class); leave GenerationConfig.logit_shift at None/False to avoid shifting twice")
        return bool(shift)

    @staticmethod
    def _propose(logits: torch.Tensor, config: GenerationConfig, gens: list[torch.Generator] | None):
        """Block logits [B, b, V] -> (x0 [B, b], confidence [B, b] float64)."""
        B, b, V = logits.shape
        if config.temperature == 0:
            x0 = logits.argmax(dim=-1)
        else:
            u = torch.stack([torch.rand((b, V), generator=g, dtype=torch.float64, device=logits.device)
                             for g in gens])
            x0 = (logits.to(torch.float64).exp() / (-torch.log(u)) ** config.temperature).argmax(dim=-1)
        if config.remasking == "low_confidence":
            # official: the softmax in the model's dtype, as the official generate.py computes it
            p = F.softmax(logits if config.confidence == "official" else logits.to(torch.float64), dim=-1)
            conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
        else:
            conf = torch.stack([torch.rand((b,), generator=g, dtype=torch.float64, device=logits.device)
                                for g in gens])
        return x0, conf

    # ---- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Any,
        config: GenerationConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        callbacks: Iterable[Any] = (),
        apply_chat_template: bool = False,
        forced_commits: Sequence[Any] | None = None,
        **overrides,
    ) -> GenerationResult:
        """Generate for ``prompts`` (text, id lists, or a left-padded id tensor with ``attention_mask``).

        ``forced_commits`` (teacher forcing, used by :func:`dllm_sparse.samplers.replay.replay`): one entry per
        step, ``{"committed": per row the generated indices, "tokens": the ids}`` (or a :class:`StepInfo`); each
        step writes exactly these instead of its own top-k choice. Everything else (forward passes, guidance,
        logit shift, callbacks, trace) is the sampler's own; a trajectory shorter than ``steps`` stops after its
        last step (finish reason "callback")."""
        cfg = config if config is not None else GenerationConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        model, tok = self.model, self.tokenizer
        mask_id = resolve_mask_id(model, tok, cfg.mask_id if cfg.mask_id is not None else self.mask_id, self.family)
        gen_length = cfg.gen_length
        steps = cfg.steps if cfg.steps is not None else gen_length
        block_length = cfg.block_length if cfg.block_length is not None else gen_length
        num_blocks, steps_per_block = validate_geometry(gen_length, steps, block_length)
        stop_ids = resolve_stop_ids(cfg, model, tok, self.family)
        pad_id = resolve_pad_id(cfg, model, tok, stop_ids)

        ids, am = encode_prompts(prompts, tok, pad_id, attention_mask, apply_chat_template)
        check_ids_fit(model, ids, am, ids.shape[1] + gen_length, pad_id=pad_id, mask_id=mask_id)
        _refuse_mask_in_prompt(ids, am, mask_id)
        padded = not bool(am.bool().all())
        if padded:
            if pad_id == mask_id and attention_mask is None:
                raise ValueError(f"the padding id equals the mask id ({mask_id}): padded positions would read as "
                                 "masked. Fix: GenerationConfig(pad_id=<another id, e.g. the eos id>).")
            if bool((ids[am == 0] == mask_id).any()):
                raise ValueError(f"padded positions hold the mask id ({mask_id}); pad with another id "
                                 "(e.g. the eos id) and keep attention_mask 0 there")
            if _is_remote_llada(model, self.family):
                raise ValueError("this LLaDA runs the checkpoint's own modeling code, which ignores attention_mask "
                                 "(attention over every key, padding included), so each left-padded row would "
                                 "differ from the same prompt generated alone. Fix: load it with dllm_sparse's "
                                 "native LLaDA (load_model(path) without trust_remote_code), which masks padded "
                                 "keys, or generate prompts of equal length (one at a time).")
        shift = self.logit_shift(cfg)
        forced = _forced_steps(forced_commits, B=len(ids), gen_length=gen_length, steps=steps)
        device = model_device(model)
        B, P = ids.shape
        S = P + gen_length
        canvas = torch.cat([ids, torch.full((B, gen_length), mask_id, dtype=torch.long)], dim=1).to(device)
        attn = torch.cat([am, torch.ones((B, gen_length), dtype=torch.long)], dim=1).to(device)
        prompt_mask = torch.zeros((B, S), dtype=torch.bool, device=device)
        prompt_mask[:, :P] = am.bool().to(device)
        gen_region = torch.zeros((B, S), dtype=torch.bool, device=device)
        gen_region[:, P:] = True
        use_cfg = cfg.cfg_scale > 0
        gens = row_generators(cfg, B, device) if (cfg.temperature > 0 or cfg.remasking == "random") else None
        fwd_attn = (torch.cat([attn, attn]) if use_cfg else attn) if padded else None

        state = StepState(kind="diffusion", model=model, config=cfg, batch_size=B, prompt_length=P,
                          num_steps=steps, canvas=canvas, attention_mask=attn, prompt_mask=prompt_mask,
                          forward_batch=2 * B if use_cfg else B)
        cbs = CallbackList(callbacks)
        trace: list[StepInfo] = []
        nfe, stopped = 0, False
        timer = Timer(device)
        # The LM head runs on the rows each step reads only (see _forward); families whose profile names no
        # splittable head (or remote code) keep the full forward. Swapped once per generation, not per step, so
        # a compiled model recompiles once. confidence="official" keeps the full forward, as the official code
        # computes it: a BLAS may round a product of fewer rows differently, and those bits must match.
        head_split = ExitStack()
        head = head_split.enter_context(nullcontext(None) if cfg.confidence == "official" else without_lm_head(model))
        try:
            cbs.generation_begin(state)
            for blk in range(num_blocks):
                s, e = P + blk * block_length, P + (blk + 1) * block_length
                schedule = num_transfer_tokens((canvas[:, s:e] == mask_id).sum(dim=1), steps_per_block)
                for i in range(steps_per_block):
                    step = blk * steps_per_block + i
                    masked = (canvas == mask_id) & gen_region
                    decoded = gen_region & ~masked
                    x_in = canvas
                    groups = {"prompt": prompt_mask, "masked": masked, "decoded": decoded}
                    if use_cfg:
                        uncond = canvas.masked_fill(prompt_mask, mask_id)
                        x_in = torch.cat([canvas, uncond])
                        groups = {k: torch.cat([v, v]) for k, v in groups.items()}
                    state.step, state.block, state.step_in_block, state.tag = step, blk, i, step
                    state.canvas, state.masked, state.groups = canvas, masked, groups
                    state.committed, state.logits = None, None
                    cbs.step_begin(state)

                    block_logits = self._forward(x_in, fwd_attn, slice(s - 1, e - 1) if shift else slice(s, e), head)
                    nfe += 2 if use_cfg else 1
                    if use_cfg:
                        cond, unc = torch.chunk(block_logits, 2, dim=0)
                        block_logits = unc + (cfg.cfg_scale + 1) * (cond - unc)
                    block_masked = masked[:, s:e]
                    if forced is not None:
                        commit, x0 = _forced_commit(forced[step], step, s - P, block_masked, mask_id)
                    else:
                        x0, conf = self._propose(block_logits, cfg, gens)
                        conf = conf.masked_fill(~block_masked, -torch.inf)
                        if cfg.confidence == "official" and cfg.remasking == "low_confidence":
                            commit = _official_topk(conf, schedule[:, i], s, S)
                        else:
                            # Top-k per row with k from the schedule, vectorised: rank of each position in a
                            # stable descending sort (ties: lowest position first), commit the ranks below k.
                            order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
                            ranks = torch.empty_like(order).scatter_(
                                -1, order, torch.arange(order.shape[-1], device=device).expand_as(order))
                            commit = (ranks < schedule[:, i:i + 1]) & block_masked
                    canvas = canvas.clone()
                    canvas[:, s:e] = torch.where(commit, x0, canvas[:, s:e])
                    committed = torch.zeros((B, S), dtype=torch.bool, device=device)
                    committed[:, s:e] = commit

                    elapsed = timer.elapsed()
                    state.canvas, state.committed, state.nfe, state.elapsed = canvas, committed, nfe, elapsed
                    state.logits = block_logits
                    rows, cols = commit.nonzero(as_tuple=True)
                    pos = [[] for _ in range(B)]
                    toks = [[] for _ in range(B)]
                    for r, c, t in zip(rows.tolist(), cols.tolist(), canvas[:, s:e][commit].tolist(), strict=True):
                        pos[r].append(s - P + c)
                        toks[r].append(t)
                    trace.append(StepInfo(step, blk, step, nfe, elapsed, pos, toks))
                    if cbs.step_end(state) or (forced is not None and step == len(forced) - 1):
                        stopped = True
                        break
                if stopped:
                    break
        finally:
            try:
                cbs.generation_end(state)
            finally:
                head_split.close()
        wall = timer.elapsed()

        generated = canvas[:, P:].cpu()
        num_tokens = int((generated != mask_id).sum())
        text_fn = (lambda t: tok.decode(t, skip_special_tokens=True)) if tok is not None else None
        out_ids, texts, reasons = [], [], []
        for r in range(B):
            row = generated[r].tolist()
            if stopped and mask_id in row:  # stopped by a callback: the canvas still has masks
                row = row[:row.index(mask_id)]
            row, text, hit = cut_output(row, stop_ids, text_fn, cfg.stop_strings)
            out_ids.append(row)
            texts.append(text)
            reasons.append("stop" if hit else ("callback" if stopped else "length"))
        return GenerationResult(sequences=canvas.cpu(), prompt_length=P, ids=out_ids, texts=texts, nfe=nfe,
                                wall_time=wall, num_tokens=num_tokens, trace=trace, finish_reasons=reasons,
                                kind=self.kind, config=cfg)
