"""One entry point for both kinds of model.

    from dllm_sparse.samplers import generate, GenerationConfig, StepSparsity
    out = generate(lm, prompts=["Hello"], config=GenerationConfig(max_new_tokens=64))       # a LoadedModel
    out = generate(model, tok, ["Hello"], GenerationConfig(gen_length=64, steps=64, block_length=16),
                   sparsity=StepSparsity("input", TopP(0.9)))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dllm_sparse.models.diffusion_gemma import is_diffusion_gemma

from .autoregressive import AutoregressiveGenerator
from .block_diffusion import BlockDiffusionGenerator
from .config import GenerationConfig, GenerationResult
from .diffusion import MaskedDiffusionGenerator

__all__ = ["generate", "detect_kind", "make_generator", "KINDS"]

KINDS = ("ar", "diffusion")


def detect_kind(model: Any) -> str:
    """``"ar"`` or ``"diffusion"``: a LoadedModel's kind, else the family profile's, else guessed from the class."""
    kind = getattr(model, "kind", None)
    if kind in KINDS and not isinstance(model, torch.nn.Module):
        return kind
    from dllm_sparse.models.families import detect_family

    try:
        return detect_family(model).kind
    except ValueError:
        name = type(model).__name__
        if name.endswith("ForCausalLM") or getattr(getattr(model, "config", None), "is_decoder", False):
            return "ar"
        if name.endswith("ForMaskedLM"):
            return "diffusion"
        raise ValueError(f"cannot tell whether {name} is autoregressive or a masked-diffusion model; pass "
                         "kind='ar' or kind='diffusion'") from None


def make_generator(model: Any, tokenizer: Any = None, kind: str | None = None, mask_id: int | None = None):
    """The generator for ``model`` (an ``nn.Module`` or a ``LoadedModel``)."""
    if not isinstance(model, torch.nn.Module) and hasattr(model, "model"):  # LoadedModel
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        mask_id = mask_id if mask_id is not None else getattr(model, "mask_id", None)
        kind = kind or model.kind
        family = getattr(model, "family", None) or None
        model = model.model
    else:
        family = None
    kind = kind or detect_kind(model)
    if kind == "diffusion" and is_diffusion_gemma(model):  # uniform-noise block diffusion: its own sampler
        return BlockDiffusionGenerator(model, tokenizer)
    if kind == "diffusion":
        return MaskedDiffusionGenerator(model, tokenizer, mask_id=mask_id, family=family)
    if kind == "ar":
        return AutoregressiveGenerator(model, tokenizer, family=family)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def generate(
    model: Any,
    tokenizer: Any = None,
    prompts: Any = None,
    config: GenerationConfig | None = None,
    *,
    callbacks: Iterable[Any] = (),
    sparsity: Any = None,
    kind: str | None = None,
    attention_mask: torch.Tensor | None = None,
    apply_chat_template: bool = False,
    **overrides,
) -> GenerationResult:
    """Generate with the right sampler for ``model``.

    ``model``: an ``nn.Module`` or a :class:`dllm_sparse.models.loading.LoadedModel` (its tokenizer, kind and mask
    id are used). ``prompts``: a string, a list of strings, a list of id lists, or a left-padded id tensor
    (with ``attention_mask``). ``config`` (default :class:`GenerationConfig`) with keyword ``overrides``
    (e.g. ``gen_length=64``). ``callbacks``: :class:`GenerationCallback` objects or plain ``fn(state)``
    (run at step end). ``sparsity``: a callback such as :class:`StepSparsity` (or a list of them), run first
    so its step tag is set before the other callbacks; its statistics land in ``result.stats``. ``kind``:
    ``"ar"`` / ``"diffusion"`` (detected when omitted).
    """
    if prompts is None:
        raise ValueError("no prompts given")
    gen = make_generator(model, tokenizer, kind)
    sparsity_cbs = [] if sparsity is None else (list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity])
    result = gen.generate(prompts, config, attention_mask=attention_mask,
                          callbacks=[*sparsity_cbs, *(callbacks or ())], apply_chat_template=apply_chat_template,
                          **overrides)
    if sparsity_cbs:
        stats = [getattr(s, "stats", None) for s in sparsity_cbs]
        result.stats = stats[0] if len(stats) == 1 else stats
    return result
