"""Architecture adapters: where each family keeps its FFNs, and which module is gate / up / down / activation.

This table is the only place in the project that knows module names. Everything else asks
:func:`find_ffns` for a list of :class:`FFNModules`.

Adding a family takes one call::

    from dllm_sparse import FFNAdapter, register_adapter
    register_adapter(FFNAdapter(family="phi3ish", model_types=("myarch",), layers="model.layers",
                                ffn="mlp", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn"))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["FFNAdapter", "FFNModules", "register_adapter", "detect_adapter", "find_ffns", "ADAPTERS"]


@dataclass(frozen=True)
class FFNAdapter:
    family: str
    model_types: tuple[str, ...]  # values of config.model_type that select this adapter
    layers: str  # dotted suffix of the nn.ModuleList of blocks ("model.layers", "transformer.blocks")
    ffn: str  # path inside a block to the module owning the projections ("mlp"; "" = the block itself)
    gate: str
    up: str
    down: str
    act: str  # a per-layer activation *module* (hooks attach to it for the gate site)
    activation: str = "silu"  # "silu" or "gelu_tanh"; used by the accelerated FFN
    kind: str = "ar"  # "ar" (causal LM) or "diffusion" (masked-diffusion LM)


@dataclass
class FFNModules:
    """One FFN, resolved on a live model."""

    layer: int
    block: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    act: nn.Module
    adapter: FFNAdapter
    owner: nn.Module  # module that owns gate/up/down/act as attributes (for module swaps)


_LLAMA_NAMES = dict(layers="model.layers", ffn="mlp", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")

ADAPTERS: list[FFNAdapter] = [
    FFNAdapter("llama", ("llama",), **_LLAMA_NAMES),  # Llama 2/3.x, SmolLM2
    FFNAdapter("qwen2", ("qwen2",), **_LLAMA_NAMES),  # Qwen2, Qwen2.5
    FFNAdapter("mistral", ("mistral",), **_LLAMA_NAMES),
    FFNAdapter("gemma3", ("gemma3", "gemma3_text"), **_LLAMA_NAMES, activation="gelu_tanh"),
    FFNAdapter("dream", ("dream",), **_LLAMA_NAMES, kind="diffusion"),  # Dream-7B: Qwen2.5 names
    FFNAdapter(
        "llada", ("llada",), layers="transformer.blocks", ffn="", gate="ff_proj", up="up_proj",
        down="ff_out", act="act", kind="diffusion",
    ),
]


def register_adapter(adapter: FFNAdapter) -> FFNAdapter:
    """Teach the project a new architecture family (or override one with the same family name)."""
    ADAPTERS[:] = [a for a in ADAPTERS if a.family != adapter.family]
    ADAPTERS.insert(0, adapter)
    return adapter


def _config_model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type.lower() if isinstance(model_type, str) else None


def _get(module: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return module
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _resolve(model: nn.Module, adapter: FFNAdapter) -> list[FFNModules] | None:
    """The adapter's FFNs on this model, or None when its names do not fit."""
    candidates = [
        m for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and (name == adapter.layers or name.endswith("." + adapter.layers)
             or adapter.layers.endswith("." + name))  # a base model (LlamaModel: "layers" of "model.layers")
    ]
    for blocks in candidates:
        ffns = []
        for i, block in enumerate(blocks):
            owner = _get(block, adapter.ffn)
            parts = [_get(owner, n) if owner is not None else None for n in (adapter.gate, adapter.up, adapter.down)]
            act = getattr(owner, adapter.act, None) if owner is not None else None
            if any(p is None for p in parts) or not isinstance(act, nn.Module):
                break
            ffns.append(FFNModules(i, block, *parts, act, adapter, owner))
        else:
            if ffns:
                return ffns
    return None


def _supported() -> str:
    return ", ".join(f"{a.family} (model_type {'/'.join(a.model_types)})" for a in ADAPTERS)


def detect_adapter(model: nn.Module) -> FFNAdapter:
    """The adapter for a loaded model: by ``config.model_type`` first, then by matching module names."""
    model_type = _config_model_type(model)
    by_type = [a for a in ADAPTERS if model_type in a.model_types]
    for adapter in by_type + [a for a in ADAPTERS if a not in by_type]:
        if _resolve(model, adapter) is not None:
            return adapter
    raise ValueError(
        f"unknown architecture (model_type={model_type!r}, class {type(model).__name__}): no FFN adapter "
        f"matches its module names. Supported families: {_supported()}.\n"
        "Register one for a new family with dllm_sparse.register_adapter(FFNAdapter(family=..., "
        "model_types=(...), layers='model.layers', ffn='mlp', gate='gate_proj', up='up_proj', "
        "down='down_proj', act='act_fn'))."
    )


def find_ffns(model: nn.Module, adapter: FFNAdapter | None = None) -> list[FFNModules]:
    """Every FFN of the model, in layer order."""
    adapter = adapter or detect_adapter(model)
    ffns = _resolve(model, adapter)
    if ffns is None:
        raise ValueError(f"adapter {adapter.family!r} does not fit {type(model).__name__}: no "
                         f"'{adapter.layers}' blocks with {adapter.gate}/{adapter.up}/{adapter.down}/{adapter.act}")
    return ffns
