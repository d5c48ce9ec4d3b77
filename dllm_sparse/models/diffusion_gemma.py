"""DiffusionGemma (transformers' ``diffusion_gemma``): the load-side facts the rest of the project needs.

DiffusionGemma is a block-diffusion LM built from Gemma 4 layers: a causal *encoder* writes the prompt (and each
finished canvas) into a KV cache, and a bidirectional *decoder* denoises a canvas of ``config.canvas_length``
tokens that attends to that cache. Every layer is a dense GELU MLP (``mlp``: gate / up / down) plus routed
experts (``router`` + ``experts``). The released checkpoint ties the encoder's text weights to the decoder's, so
layer i of the encoder and layer i of the decoder are one set of weights in two module trees.

Its noise is *uniform*, not a mask token: a canvas starts as random vocabulary tokens and the positions a step
does not accept are re-drawn at random (transformers' ``EntropyBoundSampler``). It has no mask id.

The family profile (``dllm_sparse.models.families``, ``diffusion_gemma``) names the decoder's MLPs.
:func:`share_encoder_ffns` makes the encoder run through those same MLP (and expert) modules, so one set of FFN
hooks sparsifies both stacks; which stack ran is told apart by the statistics' tag (the samplers tag encoder
forwards ``"prefill"``, decoder forwards by their step).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch.nn as nn

__all__ = ["FAMILY", "LOADER", "share_encoder_ffns", "is_diffusion_gemma", "check_vision_config", "text_stacks"]

FAMILY = "diffusion_gemma"
LOADER = "DiffusionGemmaForBlockDiffusion"  # the Auto classes pick the headless DiffusionGemmaModel
VISION_PREFIX = "model.encoder.vision_tower."


def is_diffusion_gemma(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) is a DiffusionGemma block-diffusion model."""
    from dllm_sparse.models.wrappers import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "model_type", None) == FAMILY


def text_stacks(model: nn.Module) -> tuple[nn.ModuleList, nn.ModuleList]:
    """(encoder layers, decoder layers) of a DiffusionGemma model (``ForBlockDiffusion`` or ``DiffusionGemmaModel``)."""
    from dllm_sparse.models.wrappers import unwrap_model

    model = unwrap_model(model)
    inner = model.model if hasattr(model, "lm_head") else model
    return inner.encoder.language_model.layers, inner.decoder.layers


def share_encoder_ffns(model: nn.Module) -> nn.Module:
    """Make encoder layer i run through decoder layer i's ``mlp`` and ``experts`` modules (idempotent).

    The released checkpoint ties these weights (the same ``Parameter`` objects), so nothing numeric changes; the
    FFN hooks that the family profile attaches to the decoder then also see every encoder forward. A model
    whose encoder and decoder weights are not tied (``tie_word_embeddings=False``) is refused: it has two FFNs
    per layer, which the project's one-FFN-per-layer statistics cannot describe."""
    encoder, decoder = text_stacks(model)
    for i, (enc, dec) in enumerate(zip(encoder, decoder, strict=True)):
        for name in ("mlp", "experts"):
            e, d = getattr(enc, name, None), getattr(dec, name, None)
            if e is None or d is None or e is d:
                continue
            pe, pd = dict(e.named_parameters()), dict(d.named_parameters())
            if pe.keys() != pd.keys() or any(pe[k] is not pd[k] for k in pe):
                raise ValueError(
                    f"DiffusionGemma layer {i}: the encoder's {name} weights are not tied to the decoder's (the "
                    "config sets tie_word_embeddings=False?), so each layer has two FFNs; dllm_sparse sparsifies one "
                    "FFN per layer. Load a checkpoint with tied encoder/decoder weights (the released layout)")
            setattr(enc, name, d)
    return model


def _safetensors_keys(directory: Path) -> list[str]:
    keys: list[str] = []
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            keys += [k for k in json.loads(f.read(n)) if k != "__metadata__"]
    return keys


def check_vision_config(directory: Path, name: str) -> None:
    """Refuse a local DiffusionGemma directory whose weights hold a vision tower while its ``config.json`` has no
    ``vision_config``: transformers would build its default vision tower (Gemma 4's 16 layers) and fail on, or
    silently keep, weights of another shape."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        return  # transformers names a damaged config.json itself
    if config.get("model_type") != FAMILY or config.get("vision_config"):
        return
    vision = [k for k in _safetensors_keys(directory) if k.startswith(VISION_PREFIX)]
    if vision:
        raise ValueError(
            f"{name!r}: a DiffusionGemma checkpoint whose weights hold a vision tower ({len(vision)} tensors under "
            f"{VISION_PREFIX}*, e.g. {vision[0]}) but whose config.json has no vision_config. Add the checkpoint's "
            "vision_config (a gemma4_vision config of the tower's sizes) to config.json")
