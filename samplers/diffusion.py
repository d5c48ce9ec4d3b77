"""LLaDA's masked-diffusion sampler (definitions: ``docs/generation.md``), with per-step callbacks.

    gen = MaskedDiffusionGenerator(model, tokenizer)
    out = gen.generate(["Hello"], GenerationConfig(gen_length=128, steps=128, block_length=32))

The loop, per block and per step:

1. canvas = left-padded prompt + ``gen_length`` mask tokens; prompt positions never change.
2. At a block's start, n = its masked positions (per row); step i of the block commits n // s tokens, plus one
   on the first n % s steps (s = steps per block). The block ends when its s steps are spent or none of its
   positions is masked any more (the same step under this schedule); callbacks read the boundaries from the step
   state (``StepState.block``, ``block_slice``, ``first_step_of_block``, ``last_step_of_block``). Parallel
   decoding (``GenerationConfig(confidence_threshold=t)`` / ``confidence_factor=f``, Fast-dLLM) reads each step's
   count off its confidences instead (:func:`~dllm_sparse.samplers.step_rule.parallel_count`), so blocks take a
   varying number of steps, at most ``block_length`` (``steps`` = ``gen_length``, an upper bound).
3. One forward pass over the whole canvas (default; with ``GenerationConfig(block_cache="prefix" | "dual")`` a
   block's later steps compute only some rows and read the others' keys and values from the block's first step:
   :mod:`.block_cache`); the LM head runs on the rows the step reads only (the
   current block, shifted one left under Dream's convention) where the family profile names a splittable head
   (:func:`~dllm_sparse.models.families.without_lm_head`). With ``cfg_scale`` w > 0 the canvas with every real
   prompt token replaced by the mask id is batched with it (conditional rows first) and
   logits = uncond + (w + 1)(cond - uncond).
4. The step rule (:mod:`.step_rule`): x0 = argmax(logits) at temperature 0; at T > 0 float64 Gumbel-max:
   argmax(exp(logits) / (-log u)^T).
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
remasking, ``torch.rand((block_length,), dtype=float64)`` for the confidences; a row with no masked position left
in the current block draws nothing (only parallel decoding has such steps: the row waits for the batch's other
rows to finish the block). Nothing else is drawn. Noise
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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dllm_sparse.models.families import detect_family, family_named, without_lm_head
from dllm_sparse.models.llada import CanvasKVCache
from dllm_sparse.models.loading import model_device
from dllm_sparse.steps import CallbackList, Geometry, StepState

from .block_cache import check_block_cache, rows_to_compute
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
from .step_rule import commit_step, forced_commit, forced_steps, num_transfer_tokens

__all__ = ["MaskedDiffusionGenerator", "validate_geometry", "resolve_geometry", "check_parallel", "fit_geometry",
           "num_transfer_tokens", "resolve_mask_id"]

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


def resolve_geometry(config: GenerationConfig) -> Geometry:
    """The block schedule of ``config`` (``steps`` and ``block_length`` default to ``gen_length``), checked by
    :func:`validate_geometry`. The sampler resolves it once per generation and hands it to every callback in
    ``StepState.geometry``."""
    gen_length = config.gen_length
    steps = config.steps if config.steps is not None else gen_length
    block_length = config.block_length if config.block_length is not None else gen_length
    num_blocks, steps_per_block = validate_geometry(gen_length, steps, block_length)
    check_parallel(config, steps, steps_per_block, block_length)
    return Geometry(gen_length=gen_length, block_length=block_length, num_blocks=num_blocks, steps=steps,
                    steps_per_block=steps_per_block)


def check_parallel(config: GenerationConfig, steps: int, steps_per_block: int, block_length: int) -> None:
    """Parallel decoding (``confidence_threshold`` / ``confidence_factor``) ends a block when it has no mask left,
    and a step may commit a single token, so a block may need ``block_length`` steps: ``steps`` is an upper bound
    only when it gives every block that many (``steps = gen_length``, the default). ``ValueError`` otherwise, and
    for both rules at once."""
    if config.confidence_threshold is None and config.confidence_factor is None:
        return
    if config.confidence_threshold is not None and config.confidence_factor is not None:
        raise ValueError(f"confidence_threshold={config.confidence_threshold} and confidence_factor="
                         f"{config.confidence_factor} are two parallel-decoding rules; give one of them")
    if steps_per_block < block_length:
        rule = "confidence_threshold" if config.confidence_threshold is not None else "confidence_factor"
        raise ValueError(f"steps ({steps}) gives {steps_per_block} steps per block, fewer than the block's "
                         f"{block_length} positions: with {rule} a step may commit a single token, so steps cannot "
                         f"be an upper bound of the steps a block takes. Fix: steps={config.gen_length} (= gen_length) "
                         "or leave steps at None")


def fit_geometry(gen_length: int, steps: int | None, block_length: int | None) -> tuple[int, int]:
    """(steps, block_length) the sampler accepts for a request, as close to the asked ones as the schedule allows
    (the lm-eval adapter asks per task): a block_length that does not divide gen_length becomes gen_length; steps
    (default gen_length) are capped at one token per step and rounded down to a multiple of the number of blocks
    (at least one step per block)."""
    block = int(block_length or gen_length)
    block = block if gen_length % block == 0 else gen_length
    steps = min(int(steps or gen_length), gen_length)
    num_blocks = gen_length // block
    return max(num_blocks, steps // num_blocks * num_blocks), block


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
    def _forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, read: slice,
                 head: torch.nn.Linear | None = None, cache: CanvasKVCache | None = None,
                 rows: slice | None = None) -> torch.Tensor:
        """Logits of the canvas positions ``read`` [B_fwd, len(read), V]. ``x`` holds the canvas rows ``rows`` (all
        of them without a block cache; with ``cache`` the model reads the other rows' keys and values from it).
        With ``head`` (the LM head split off the forward by :func:`~dllm_sparse.models.families.without_lm_head`)
        the forward returns final hidden states and the head projects only the rows the step reads (the current
        block, shifted one left under Dream's convention): the other positions' logits are never read, so this
        is exact and skips most of the head."""
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        first = 0 if rows is None else rows.start
        if cache is not None:
            kwargs.update(canvas_cache=cache, canvas_start=first)
        out = self.model(input_ids=x, **kwargs)
        out = out.logits if hasattr(out, "logits") else out[0]
        out = out[:, read.start - first:read.stop - first]
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

    # ---- generation ----------------------------------------------------------------------------------------
    def _setup(self, prompts: Any, cfg: GenerationConfig, attention_mask: torch.Tensor | None,
               apply_chat_template: bool, forced_commits: Sequence[Any] | None) -> _Canvas:
        """Check the request and build the canvas (every refusal happens here, before any forward)."""
        model, tok = self.model, self.tokenizer
        mask_id = resolve_mask_id(model, tok, cfg.mask_id if cfg.mask_id is not None else self.mask_id, self.family)
        geometry = resolve_geometry(cfg)
        gen_length = geometry.gen_length
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
        check_block_cache(cfg.block_cache, model, _is_native_llada(model), shift)
        forced = forced_steps(forced_commits, B=len(ids), gen_length=gen_length, steps=geometry.steps)
        device = model_device(model)
        B, P = ids.shape
        S = P + gen_length
        canvas = torch.cat([ids, torch.full((B, gen_length), mask_id, dtype=torch.long)], dim=1).to(device)
        attn = torch.cat([am, torch.ones((B, gen_length), dtype=torch.long)], dim=1).to(device)
        prompt_mask = torch.zeros((B, S), dtype=torch.bool, device=device)
        prompt_mask[:, :P] = am.bool().to(device)
        use_cfg = cfg.cfg_scale > 0
        return _Canvas(
            canvas=canvas, attn=attn, prompt_mask=prompt_mask, prompt_length=P, mask_id=mask_id, stop_ids=stop_ids,
            geometry=geometry,
            shift=shift, model_shifts=_shifts_itself(model), use_cfg=use_cfg, forced=forced, device=device,
            fwd_attn=(torch.cat([attn, attn]) if use_cfg else attn) if padded else None,
            gens=row_generators(cfg, B, device) if (cfg.temperature > 0 or cfg.remasking == "random") else None)

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
        run = self._setup(prompts, cfg, attention_mask, apply_chat_template, forced_commits)
        canvas, mask_id, device = run.canvas, run.mask_id, run.device
        B, S = canvas.shape
        P = S - cfg.gen_length
        geo = run.geometry
        state = StepState(kind="diffusion", model=self.model, config=cfg, batch_size=B, prompt_length=P,
                          num_steps=geo.steps, geometry=geo, canvas=canvas, attention_mask=run.attn,
                          prompt_mask=run.prompt_mask, forward_batch=2 * B if run.use_cfg else B)
        cbs = CallbackList(callbacks, model=self.model)
        trace: list[StepInfo] = []
        nfe, step, stopped = 0, 0, False
        kv = CanvasKVCache() if cfg.block_cache else None
        timer = Timer(device)
        # The LM head runs on the rows each step reads only (see _forward); families whose profile names no
        # splittable head (or remote code) keep the full forward. Swapped once per generation, not per step, so
        # a compiled model recompiles once. confidence="official" keeps the full forward, as the official code
        # computes it: a BLAS may round a product of fewer rows differently, and those bits must match.
        head_split = ExitStack()
        head = head_split.enter_context(nullcontext(None) if cfg.confidence == "official"
                                        else without_lm_head(self.model))
        try:
            cbs.generation_begin(state)
            for blk in range(geo.num_blocks):
                block = slice(P + blk * geo.block_length, P + (blk + 1) * geo.block_length)
                schedule = num_transfer_tokens((canvas[:, block] == mask_id).sum(dim=1), geo.steps_per_block)
                # A block ends when its step budget is spent or no position of it is masked any more (the fixed
                # schedule reaches both together: every step commits at least one of its >= steps_per_block
                # masked positions; parallel decoding often ends it early); callbacks read the boundaries from
                # the state.
                i, block_done = 0, False
                while not block_done:
                    rows = rows_to_compute(cfg.block_cache, block, S, i, run.model_shifts)
                    state.step, state.block, state.step_in_block, state.tag = step, blk, i, step
                    state.block_slice, state.first_step_of_block = block, i == 0
                    state.last_step_of_block = i == geo.steps_per_block - 1
                    x_in = run.forward_input(canvas, state, rows)
                    state.committed, state.logits = None, None
                    cbs.step_begin(state)

                    read = slice(block.start - 1, block.stop - 1) if run.shift else block  # canvas rows the step reads
                    block_logits = self._forward(x_in, run.rows_of(run.fwd_attn, rows), read, head, kv, rows)
                    nfe += 2 if run.use_cfg else 1
                    if run.use_cfg:
                        cond, unc = torch.chunk(block_logits, 2, dim=0)
                        block_logits = unc + (cfg.cfg_scale + 1) * (cond - unc)
                    block_masked = state.masked[:, block]
                    if run.forced is not None:
                        commit, x0 = forced_commit(run.forced[step], step, block.start - P, block_masked, mask_id)
                    else:
                        commit, x0 = commit_step(block_logits, block_masked, schedule[:, i], cfg, run.gens,
                                                 start=block.start, canvas_length=S)
                    canvas = canvas.clone()
                    canvas[:, block] = torch.where(commit, x0, canvas[:, block])
                    committed = torch.zeros((B, S), dtype=torch.bool, device=device)
                    committed[:, block] = commit
                    block_done = i == geo.steps_per_block - 1 or not bool((block_masked & ~commit).any())

                    elapsed = timer.elapsed()
                    state.canvas, state.committed, state.nfe, state.elapsed = canvas, committed, nfe, elapsed
                    state.logits, state.last_step_of_block = block_logits, block_done
                    trace.append(_trace_step(step, blk, nfe, elapsed, commit, canvas[:, block], block.start - P))
                    if cbs.step_end(state) or (run.forced is not None and step == len(run.forced) - 1):
                        stopped = True
                        break
                    i, step = i + 1, step + 1
                if stopped:
                    break
        finally:
            try:
                cbs.generation_end(state)
            finally:
                head_split.close()
                if kv is not None:
                    kv.clear()
        return self._result(canvas, P, stopped, run, cfg, nfe, timer.elapsed(), trace)

    def _result(self, canvas: torch.Tensor, P: int, stopped: bool, run: _Canvas, cfg: GenerationConfig, nfe: int,
                wall: float, trace: list[StepInfo]) -> GenerationResult:
        tok, mask_id = self.tokenizer, run.mask_id
        generated = canvas[:, P:].cpu()
        num_tokens = int((generated != mask_id).sum())
        text_fn = (lambda t: tok.decode(t, skip_special_tokens=True)) if tok is not None else None
        out_ids, texts, reasons = [], [], []
        for r in range(canvas.shape[0]):
            row = generated[r].tolist()
            if stopped and mask_id in row:  # stopped by a callback: the canvas still has masks
                row = row[:row.index(mask_id)]
            row, text, hit = cut_output(row, run.stop_ids, text_fn, cfg.stop_strings)
            out_ids.append(row)
            texts.append(text)
            reasons.append("stop" if hit else ("callback" if stopped else "length"))
        return GenerationResult(sequences=canvas.cpu(), prompt_length=P, ids=out_ids, texts=texts, nfe=nfe,
                                wall_time=wall, num_tokens=num_tokens, trace=trace, finish_reasons=reasons,
                                kind=self.kind, config=cfg)


def _trace_step(step: int, blk: int, nfe: int, elapsed: float, commit: torch.Tensor, block_tokens: torch.Tensor,
                start: int) -> StepInfo:
    """The trace entry of one step: per row, the generated indices written and their tokens."""
    B = commit.shape[0]
    pos: list[list[int]] = [[] for _ in range(B)]
    toks: list[list[int]] = [[] for _ in range(B)]
    rows, cols = commit.nonzero(as_tuple=True)
    for r, c, t in zip(rows.tolist(), cols.tolist(), block_tokens[commit].tolist(), strict=True):
        pos[r].append(start + c)
        toks[r].append(t)
    return StepInfo(step, blk, step, nfe, elapsed, pos, toks)


@dataclass
class _Canvas:
    """One generation's fixed inputs, built by :meth:`MaskedDiffusionGenerator._setup`."""

    canvas: torch.Tensor  # [B, S] prompt + gen_length mask tokens
    attn: torch.Tensor  # [B, S] real tokens
    prompt_mask: torch.Tensor  # [B, S] real prompt tokens
    prompt_length: int  # P, the padded prompt length
    mask_id: int
    stop_ids: Any
    geometry: Geometry
    shift: bool  # the sampler shifts the logits (Dream's convention)
    model_shifts: bool  # the model shifts inside its forward (native LLaDA, config.logit_shift)
    use_cfg: bool
    forced: list | None
    device: torch.device
    fwd_attn: torch.Tensor | None  # the forward's attention mask ([B_fwd, S]), None without padding
    gens: list[torch.Generator] | None

    def forward_input(self, canvas: torch.Tensor, state: StepState, rows: slice) -> torch.Tensor:
        """The forward input of one step (with guidance: the canvas, then the canvas with the prompt masked), and
        the step state's masks: ``masked`` on the canvas, ``groups`` and ``rows`` for the rows computed."""
        P = self.prompt_length
        masked = canvas == self.mask_id
        masked[:, :P] = False  # the prompt never changes (a prompt token equal to the mask id is refused)
        decoded = ~masked
        decoded[:, :P] = False
        x_in = canvas
        groups = {"prompt": self.prompt_mask, "masked": masked, "decoded": decoded}
        if self.use_cfg:
            x_in = torch.cat([canvas, canvas.masked_fill(self.prompt_mask, self.mask_id)])
        full = rows == slice(0, canvas.shape[1])
        state.canvas, state.masked = canvas, masked
        state.rows = None if full else rows
        state.groups = {k: state.for_forward(v, computed_rows=True) for k, v in groups.items()}
        return x_in if full else x_in[:, rows]

    @staticmethod
    def rows_of(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
        return mask if mask is None or rows == slice(0, mask.shape[1]) else mask[:, rows]
