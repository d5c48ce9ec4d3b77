"""Family profiles: everything the project knows about one architecture family, in one frozen record.

A :class:`FamilyProfile` says where the family keeps its FFNs and which module is gate / up / down /
activation (or one fused ``gate_up`` projection), and, for masked-diffusion families, the facts the samplers
and scorers need: the mask token id, Dream's logit shift, the end-of-sequence / end-of-turn ids and where
the LM head lives. This table is the only place in the project holding such facts; everything else asks
:func:`detect_family` / :func:`family_named` for a profile and :func:`find_ffns` for the FFN modules.

Adding a family takes one call::

    from dllm_sparse import FamilyProfile, register_family
    register_family(FamilyProfile(family="myarch", model_types=("myarch",), layers="model.layers", ffn="mlp",
                                  gate="gate_proj", up="up_proj", down="down_proj", act="act_fn"))

Phi-3 style FFNs compute gate and up in one ``nn.Linear`` whose output is ``[gate; up]`` (first half gate,
second half up); name it with ``gate_up=`` instead of ``gate=`` and ``up=``::

    register_family(FamilyProfile(family="phi3", model_types=("phi3",), layers="model.layers", ffn="mlp",
                                  gate_up="gate_up_proj", down="down_proj", act="activation_fn"))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn as nn

__all__ = [
    "FamilyProfile",
    "FFNModules",
    "PROFILES",
    "register_family",
    "detect_family",
    "family_named",
    "find_ffns",
    "ExpertsModules",
    "find_experts",
    "count_layers",
    "without_lm_head",
]

KINDS = ("ar", "diffusion")
NOISES = ("mask", "uniform")


@dataclass(frozen=True)
class FamilyProfile:
    """One architecture family. Module names are dotted paths (see the field comments)."""

    family: str
    model_types: tuple[str, ...]  # values of config.model_type that select this family
    layers: str  # dotted suffix of the nn.ModuleList of blocks ("model.layers", "transformer.blocks")
    ffn: str  # path inside a block to the module owning the projections ("mlp"; "" = the block itself)
    gate: str = ""  # the projections, relative to the FFN owner; "" for gate and up when gate_up is set
    up: str = ""
    down: str = ""
    act: str = ""  # a per-layer activation *module* (hooks attach to it for the gate site)
    activation: str = "silu"  # the activation's name ("silu", "gelu_tanh"); hooks and kernels call act itself
    kind: str = "ar"  # "ar" (causal LM) or "diffusion" (masked-diffusion LM)
    gate_up: str = ""  # one fused nn.Linear whose output is [gate; up] (Phi-3's gate_up_proj)
    mask_id: int | None = None  # diffusion: the mask token id when neither config nor tokenizer names one
    logit_shift: bool = False  # diffusion: logits at position i predict token i + 1 (Dream), shift them back
    end_ids: tuple[int, ...] = ()  # end-of-sequence / end-of-turn ids added to the stop ids (when in the vocab)
    # The LM head as a dotted path from the top model (LLaDA: "model.transformer.ff_out"), set only where the
    # family's forward ends with that module, so a scorer can swap it out and project masked positions alone.
    head: str = ""
    head_unless: tuple[str, ...] = ()  # config flags that add work after the head (then the head stays)
    # diffusion: "mask" (a mask token marks the noised positions) or "uniform" (noised positions hold random
    # tokens and there is no mask id: DiffusionGemma, generated and scored by dllm_sparse's block-diffusion code)
    noise: str = "mask"
    loader: str = ""  # the transformers class that loads the family when the Auto classes would pick another
    # Mixture-of-experts: the routed experts module, a path inside a block ("experts" for Gemma 4, "mlp.experts"
    # for Qwen3-MoE / Mixtral). Its class must dispatch through transformers' ExpertsInterface (3D gate_up_proj /
    # down_proj weights); the sparsifier runs its experts as FFNs (docs/moe.md). Blocks whose dense FFN is missing
    # (a Qwen3-MoE layer is either a dense MLP or a sparse MoE block) are then allowed.
    experts: str = ""

    def __post_init__(self):
        # Normalise what is easy to get wrong by hand: a bare string for a tuple, mixed case, lists.
        for name in ("model_types", "end_ids", "head_unless"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int)) else tuple(value))
        object.__setattr__(self, "family", self.family.lower())  # looked up case-insensitively, like model types
        object.__setattr__(self, "model_types", tuple(t.lower() for t in self.model_types))
        object.__setattr__(self, "end_ids", tuple(int(i) for i in self.end_ids))
        where = f"FamilyProfile {self.family!r}"
        if not self.family:
            raise ValueError("FamilyProfile needs a family name, e.g. family='phi3'")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.down or not self.act:
            raise ValueError(f"{where}: name the down projection and the activation module (down=..., act=...)")
        if self.gate_up and (self.gate or self.up):
            raise ValueError(f"{where}: gives gate_up={self.gate_up!r} and gate/up as well; a fused projection "
                             "replaces both, so leave gate and up empty")
        if not self.gate_up and not (self.gate and self.up):
            raise ValueError(f"{where}: name the gate and up projections (gate=..., up=...) or one fused "
                             "projection (gate_up=...)")
        if self.noise not in NOISES:
            raise ValueError(f"{where}: noise must be one of {NOISES}, got {self.noise!r}")
        if self.kind == "ar" and (self.mask_id is not None or self.logit_shift or self.noise != "mask"):
            raise ValueError(f"{where}: mask_id, logit_shift and noise describe diffusion models; set "
                             "kind='diffusion' or leave them out")

    @property
    def fused(self) -> bool:
        """True when gate and up are one ``gate_up`` projection."""
        return bool(self.gate_up)


@dataclass
class FFNModules:
    """One FFN, resolved on a live model. ``gate`` and ``up`` are None when ``gate_up`` holds both."""

    layer: int
    block: nn.Module
    gate: nn.Module | None
    up: nn.Module | None
    down: nn.Module
    act: nn.Module
    profile: FamilyProfile
    owner: nn.Module  # module that owns gate/up/down/act as attributes (for module swaps)
    gate_up: nn.Module | None = None


@dataclass
class ExpertsModules:
    """One layer's routed experts, resolved on a live model (the module holding the 3D expert weights)."""

    layer: int
    block: nn.Module
    experts: nn.Module
    profile: FamilyProfile


_LLAMA_NAMES = dict(layers="model.layers", ffn="mlp", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")

# The registry, searched front to back (families registered later come first).
# Llama, Qwen2 and Mistral's *ForCausalLM forward ends with ``logits = self.lm_head(hidden_states)`` (checked in
# transformers 5.23-5.24), so their head can be split off; Gemma 3's is followed by logit soft-capping and its
# multimodal class nests the flag in a sub-config, so it keeps its head.
PROFILES: list[FamilyProfile] = [
    FamilyProfile("llama", ("llama",), **_LLAMA_NAMES, head="lm_head"),  # Llama 2/3.x, SmolLM2
    FamilyProfile("qwen2", ("qwen2",), **_LLAMA_NAMES, head="lm_head"),  # Qwen2, Qwen2.5
    FamilyProfile("mistral", ("mistral",), **_LLAMA_NAMES, head="lm_head"),
    FamilyProfile("gemma3", ("gemma3", "gemma3_text"), **_LLAMA_NAMES, activation="gelu_tanh"),
    # Gemma 4: every block has the dense MLP; with enable_moe_block it also runs routed experts beside it
    # (block.experts, fed the pre-FFN hidden state through their own norm). The multimodal class keeps its text
    # layers in model.language_model.layers, a text-only one in model.layers.
    FamilyProfile("gemma4", ("gemma4",), **{**_LLAMA_NAMES, "layers": "language_model.layers"},
                  activation="gelu_tanh", experts="experts"),
    FamilyProfile("gemma4_text", ("gemma4_text",), **_LLAMA_NAMES, activation="gelu_tanh", experts="experts"),
    # DiffusionGemma (dllm_sparse.models.diffusion_gemma): the decoder's MLPs and experts; the encoder runs through
    # the same modules once share_encoder_ffns has run (load_model does it). Its head is followed by soft-capping.
    FamilyProfile("diffusion_gemma", ("diffusion_gemma",), **{**_LLAMA_NAMES, "layers": "decoder.layers"},
                  activation="gelu_tanh", kind="diffusion", noise="uniform",
                  loader="DiffusionGemmaForBlockDiffusion", experts="experts"),
    # Qwen3-MoE / Mixtral: block.mlp is a sparse MoE block (router + experts), or a dense MLP in Qwen3-MoE's
    # mlp_only_layers.
    FamilyProfile("qwen3_moe", ("qwen3_moe",), **_LLAMA_NAMES, experts="mlp.experts", head="lm_head"),
    FamilyProfile("mixtral", ("mixtral",), **_LLAMA_NAMES, experts="mlp.experts", head="lm_head"),
    # Dream-7B: Qwen2.5 names; predicts token i + 1 at position i like its AR parent.
    FamilyProfile("dream", ("dream",), **_LLAMA_NAMES, kind="diffusion", mask_id=151666, logit_shift=True),
    FamilyProfile(
        "llada", ("llada",), layers="transformer.blocks", ffn="", gate="ff_proj", up="up_proj", down="ff_out",
        act="act", kind="diffusion", mask_id=126336,
        end_ids=(126081, 126348),  # LLaDA-8B end-of-sequence and end-of-turn (docs/generation.md)
        head="model.transformer.ff_out", head_unless=("scale_logits",),
    ),
]


def register_family(profile: FamilyProfile) -> FamilyProfile:
    """Teach the project a new architecture family (or replace the one with the same family name)."""
    if not isinstance(profile, FamilyProfile):
        raise TypeError(f"register_family takes a FamilyProfile, got {type(profile).__name__}")
    PROFILES[:] = [p for p in PROFILES if p.family != profile.family]
    PROFILES.insert(0, profile)
    return profile


def family_named(name: str | None) -> FamilyProfile | None:
    """The registered profile called ``name``, else the one listing ``name`` as a model type, else None."""
    if not name:
        return None
    name = name.lower()
    for profile in PROFILES:
        if profile.family == name:
            return profile
    for profile in PROFILES:
        if name in profile.model_types:
            return profile
    return None


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


def _candidate_blocks(model: nn.Module, profile: FamilyProfile) -> list[nn.ModuleList]:
    return [
        m for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and (name == profile.layers or name.endswith("." + profile.layers)
             or profile.layers.endswith("." + name))  # a base model (LlamaModel: "layers" of "model.layers")
    ]


def _resolve_blocks(model: nn.Module, profile: FamilyProfile) -> tuple[nn.ModuleList, list[FFNModules]] | None:
    """The profile's blocks and dense FFNs on this model, or None when its names do not fit. A block may lack the
    dense FFN only when the profile has experts and the block holds them."""
    names = (profile.gate_up,) if profile.fused else (profile.gate, profile.up)
    for blocks in _candidate_blocks(model, profile):
        ffns = []
        for i, block in enumerate(blocks):
            owner = _get(block, profile.ffn)
            parts = [_get(owner, n) if owner is not None else None for n in (*names, profile.down)]
            act = getattr(owner, profile.act, None) if owner is not None else None
            if any(p is None for p in parts) or not isinstance(act, nn.Module):
                if profile.experts and _get(block, profile.experts) is not None:
                    continue  # an MoE block without a dense FFN
                break
            if profile.fused:
                gate_up, down = parts
                ffns.append(FFNModules(i, block, None, None, down, act, profile, owner, gate_up))
            else:
                gate, up, down = parts
                ffns.append(FFNModules(i, block, gate, up, down, act, profile, owner))
        else:
            if ffns or (profile.experts and len(blocks)):
                return blocks, ffns
    return None


def _resolve(model: nn.Module, profile: FamilyProfile) -> list[FFNModules] | None:
    """The profile's dense FFNs on this model, or None when its names do not fit."""
    found = _resolve_blocks(model, profile)
    return None if found is None else found[1]


def _supported() -> str:
    return ", ".join(f"{p.family} (model_type {'/'.join(p.model_types)})" for p in PROFILES)


def detect_family(model: nn.Module) -> FamilyProfile:
    """The profile of a loaded model: by ``config.model_type`` first, then by matching module names."""
    model_type = _config_model_type(model)
    by_type = [p for p in PROFILES if model_type in p.model_types]
    for profile in by_type + [p for p in PROFILES if p not in by_type]:
        if _resolve(model, profile) is not None:
            return profile
    raise ValueError(
        f"unknown architecture (model_type={model_type!r}, class {type(model).__name__}): no family profile "
        f"matches its module names. Supported families: {_supported()}.\n"
        "Register one for a new family with dllm_sparse.register_family(FamilyProfile(family=..., "
        "model_types=(...), layers='model.layers', ffn='mlp', gate='gate_proj', up='up_proj', "
        "down='down_proj', act='act_fn'))."
    )


def find_ffns(model: nn.Module, profile: FamilyProfile | None = None) -> list[FFNModules]:
    """Every FFN of the model, in layer order."""
    profile = profile or detect_family(model)
    ffns = _resolve(model, profile)
    if ffns is None:
        names = profile.gate_up if profile.fused else f"{profile.gate}/{profile.up}"
        raise ValueError(f"family {profile.family!r} does not fit {type(model).__name__}: no "
                         f"'{profile.layers}' blocks with {names}/{profile.down}/{profile.act}")
    return ffns


def find_experts(model: nn.Module, profile: FamilyProfile | None = None) -> list[ExpertsModules]:
    """Every layer's routed experts module, in layer order ([] for a model without routed experts)."""
    profile = profile or detect_family(model)
    found = _resolve_blocks(model, profile) if profile.experts else None
    if found is None:
        return []
    return [ExpertsModules(i, block, _unwrap_adapters(experts), profile) for i, block in enumerate(found[0])
            if (experts := _get(block, profile.experts)) is not None]


def _unwrap_adapters(module: nn.Module) -> nn.Module:
    """The module under peft's wrappers: a LoRA on the expert weights (``ParamWrapper``) holds the experts module as
    ``base_layer`` and runs it with the adapted weights in place."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def count_layers(model: nn.Module, profile: FamilyProfile | None = None) -> int:
    """The number of blocks (layer indices run 0..count-1 over dense FFNs and experts alike)."""
    profile = profile or detect_family(model)
    found = _resolve_blocks(model, profile)
    if found is None:
        find_ffns(model, profile)  # raises the error that names what does not fit
    return len(found[0])


def _splittable_head(model: nn.Module, profile: FamilyProfile | None) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, attribute, head) when the LM head can be split off the forward, else None."""
    from dllm_sparse.models.wrappers import unwrap_model

    # The head lives in the wrapped model (torch.compile, peft): swapping an attribute of the wrapper would
    # add a module beside the real head instead of replacing it.
    model = unwrap_model(model)
    if profile is None:
        try:
            profile = detect_family(model)
        except ValueError:
            return None
    if not profile.head:
        return None
    # A checkpoint's own modelling code (trust_remote_code) may do more after the head than the profile
    # knows (the original LLaDA code, for one, projects with the embedding when tied), so it keeps its head.
    if type(model).__module__.startswith("transformers_modules"):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, flag, False) for flag in profile.head_unless):
        return None
    head = _get(model, profile.head)
    if not isinstance(head, nn.Linear) or head.weight.device.type == "meta":  # meta: offloaded by accelerate
        return None
    prefix, _, leaf = profile.head.rpartition(".")
    return _get(model, prefix), leaf, head


@contextmanager
def without_lm_head(model: nn.Module, profile: FamilyProfile | None = None) -> Iterator[nn.Linear | None]:
    """Swap the LM head for Identity inside the block, so the forward returns the final hidden states (shifted
    when the model shifts its own logits); yields the head, to apply to the positions that need logits only.

    Yields None, changing nothing, when the family names no head or the head cannot be split off safely
    (remote code, a config flag in ``head_unless``, an offloaded head): then the forward's logits are used
    as they are. ``profile`` defaults to the detected one."""
    found = _splittable_head(model, profile)
    if found is None:
        yield None
        return
    parent, name, head = found
    setattr(parent, name, nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, name, head)
