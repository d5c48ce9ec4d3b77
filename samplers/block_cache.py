"""What a denoising step recomputes: the whole canvas, or (Fast-dLLM's approximate block caches) some rows.

``GenerationConfig(block_cache=...)``:

* ``None`` (default, the exact sampler): every step is one forward over the whole canvas;
* ``"prefix"``: the first step of a block runs over the whole canvas and stores every layer's keys and values
  (:class:`~dllm_sparse.models.llada.CanvasKVCache`); the block's later steps recompute the current block and
  everything after it, and read the keys and values of the positions before the block from the store;
* ``"dual"``: the same, but the later steps recompute the current block only; the positions before *and after*
  it are read from the store.

What makes both approximate: the stored keys and values are those of the block's first step, so a later step
does not see how the canvas changed in the rows it does not recompute (prefix: the prompt and the decoded
blocks, which hold the same tokens but whose hidden states would move with the block's new tokens; dual: also
the still-masked later blocks). Fast-dLLM (Wu et al., 2025) measures this as a small loss for a large saving.

For a model that shifts its logits inside its forward (a native LLaDA with ``config.logit_shift``, such as an AR
model converted to diffusion: position i is read from the output at i - 1), the recomputed rows start one
position earlier, at the block's first position minus one, so that the block's first logit is computed too.

Only the native LLaDA (:class:`dllm_sparse.models.llada.LLaDAModelLM`) implements the store; other diffusion models
are refused with the reason, and an autoregressive generation refuses ``block_cache`` as it refuses every
diffusion-only setting (:data:`~dllm_sparse.samplers.config.DIFFUSION_ONLY`).
"""

from __future__ import annotations

from typing import Any

from .config import BLOCK_CACHES

__all__ = ["BLOCK_CACHES", "check_block_cache", "rows_to_compute"]


def check_block_cache(mode: str | None, model: Any, native_llada: bool, sampler_shift: bool) -> None:
    """Refuse a block cache the model cannot run (``ValueError`` naming why and the fix)."""
    if mode is None:
        return
    if not native_llada:
        raise ValueError(f"block_cache={mode!r} needs dllm_sparse's native LLaDA (LLaDAModelLM), whose forward "
                         f"keeps a CanvasKVCache; this model is {type(model).__name__}. Load it with "
                         "load_model(path) (without trust_remote_code), or leave block_cache=None")
    if bool(getattr(getattr(model, "config", None), "causal", False)):
        raise ValueError("block_cache needs bidirectional attention; this LLaDA's config has causal=True")
    if sampler_shift:
        raise ValueError("block_cache with GenerationConfig.logit_shift=True: the native LLaDA shifts inside its "
                         "forward (config.logit_shift); leave GenerationConfig.logit_shift at None")


def rows_to_compute(mode: str | None, block: slice, canvas_length: int, step_in_block: int,
                    model_shifts: bool) -> slice:
    """The canvas rows a step's forward computes: every row without a cache and at a block's first step (which
    writes the store), else from the block's start (one earlier when the model shifts its logits) to the canvas'
    end (prefix) or the block's end (dual)."""
    if mode is None or step_in_block == 0:
        return slice(0, canvas_length)
    first = max(block.start - 1, 0) if model_shifts else block.start
    return slice(first, canvas_length if mode == "prefix" else block.stop)
