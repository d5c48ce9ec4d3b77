"""Weight degradations of a model that leave the FFN activation rule alone: the matched-weakness controls of the
advantage study (docs/advantage.md).

    d = Degradation("noise", {"sigma": 0.05}, seed=0)
    weak = degraded_copy(lm, d)             # a LoadedModel named "smollm2-135m+noise:sigma=0.05:seed=0"

Methods (each acts on the weight matrices of the decoder blocks: the attention projections and the FFN's gate, up
and down projections; never on embeddings, the LM head or norms, and never on the activation function, so the
sparsification rule sees an ordinary FFN):

* ``noise``: W ← W + σ·rms(W)·ε, ε ~ N(0, 1) from a generator seeded with ``seed``, drawn matrix by matrix in the
  model's module order (the same seed gives the same ε). ``{"sigma": σ}``, σ >= 0.
* ``quant``: group-wise symmetric round-to-nearest quantisation along the input dimension: per group of ``group``
  consecutive weights, scale = max|w| / (2^(b−1) − 1), w ← round(w / scale)·scale. The first ``k`` blocks take
  ``bits`` bits, the others ``bits + 1`` (a knob finer than the bit width alone; ``k`` = the number of blocks
  means every block at ``bits``). ``{"bits": b, "k": k, "group": g}``, 2 <= b <= 16.

A degradation's :attr:`Degradation.id` holds every setting, and the degraded model's name carries it, so rows of
a sweep are keyed by it (and their weights hash differs from the parent's).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dllm_sparse.models.families import find_ffns

__all__ = ["Degradation", "METHODS", "block_linears", "apply_degradation", "degraded_copy", "quantize_groupwise"]

METHODS = ("noise", "quant")
_PARAMS = {"noise": {"sigma"}, "quant": {"bits", "k", "group"}}


@dataclass(frozen=True)
class Degradation:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"degradation method {self.method!r} is not one of {METHODS}")
        missing, extra = _PARAMS[self.method] - set(self.params), set(self.params) - _PARAMS[self.method]
        if missing or extra:
            raise ValueError(f"degradation {self.method!r} takes exactly {sorted(_PARAMS[self.method])}; "
                             f"got {sorted(self.params)}")
        if self.method == "noise":
            s = self.params["sigma"]
            if not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise ValueError(f"noise sigma must be a finite number >= 0, got {s!r}")
        else:
            b, k, g = self.params["bits"], self.params["k"], self.params["group"]
            for name, v, lo in (("bits", b, 2), ("k", k, 0), ("group", g, 1)):
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise ValueError(f"quant {name} must be a whole number >= {lo}, got {v!r}")
            if b > 16:
                raise ValueError(f"quant bits must be <= 16, got {b}")

    @property
    def id(self) -> str:
        """Every setting at full precision: ``noise:sigma=0.0123:seed=0``, ``quant:bits=3:group=32:k=12``."""
        parts = [f"{k}={self.params[k]!r}" for k in sorted(self.params)]
        if self.method == "noise":
            parts.append(f"seed={self.seed}")
        return ":".join([self.method, *parts])

    def to_dict(self) -> dict:
        return {"method": self.method, "params": dict(self.params), "seed": self.seed, "id": self.id}


def block_linears(model: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
    """Per decoder block (in order), its ``nn.Linear`` modules with their names inside the block: what a
    degradation touches. Blocks are found through the model's family profile (the FFN's block)."""
    blocks = [f.block for f in find_ffns(model)]
    return [[(n, m) for n, m in b.named_modules() if isinstance(m, nn.Linear)] for b in blocks]


def quantize_groupwise(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest quantisation of ``w`` [out, in] in groups of ``group`` along ``in`` (the last
    group may be shorter), dequantised back to ``w``'s dtype. A group of zeros stays zero."""
    qmax = 2 ** (bits - 1) - 1
    out_f, in_f = w.shape
    pad = (-in_f) % group
    x = torch.nn.functional.pad(w.detach().double(), (0, pad)).reshape(out_f, -1, group)
    scale = x.abs().amax(dim=-1, keepdim=True) / qmax
    q = torch.where(scale > 0, torch.round(x / torch.where(scale > 0, scale, 1.0)).clamp(-qmax, qmax) * scale, 0.0)
    return q.reshape(out_f, -1)[:, :in_f].to(w.dtype)


@torch.no_grad()
def apply_degradation(model: nn.Module, degradation: Degradation, noise: dict | None = None) -> nn.Module:
    """Degrade ``model``'s block weights in place (module docstring) and return it. ``noise``: the ε tensors of
    :func:`noise_tensors` for this model and seed, to reuse across calibration steps."""
    blocks = block_linears(model)
    if degradation.method == "noise":
        sigma = float(degradation.params["sigma"])
        eps = noise if noise is not None else noise_tensors(model, degradation.seed)
        for i, linears in enumerate(blocks):
            for name, lin in linears:
                w = lin.weight
                rms = w.double().pow(2).mean().sqrt()
                w.add_((sigma * rms * eps[(i, name)].double()).to(w.dtype))
        return model
    bits, k, group = (degradation.params[n] for n in ("bits", "k", "group"))
    if k > len(blocks):
        raise ValueError(f"quant k={k} exceeds the model's {len(blocks)} blocks")
    for i, linears in enumerate(blocks):
        b = bits if i < k else bits + 1
        for _, lin in linears:
            lin.weight.copy_(quantize_groupwise(lin.weight, b, group))
    return model


def noise_tensors(model: nn.Module, seed: int) -> dict[tuple[int, str], torch.Tensor]:
    """The ε ~ N(0, 1) of the ``noise`` degradation, one per block linear, drawn in module order from one
    generator seeded with ``seed`` (float32, on the CPU)."""
    g = torch.Generator().manual_seed(int(seed))
    return {(i, name): torch.randn(lin.weight.shape, generator=g, dtype=torch.float32)
            for i, linears in enumerate(block_linears(model)) for name, lin in linears}


def degraded_copy(lm, degradation: Degradation, noise: dict | None = None):
    """A :class:`~dllm_sparse.models.loading.LoadedModel` with a degraded deep copy of ``lm.model`` (``lm`` is
    untouched), named ``<lm.name>+<degradation.id>``."""
    from dllm_sparse.models.loading import LoadedModel

    if "+" in lm.name:
        raise ValueError(f"{lm.name!r} is already a degraded model; degrade the parent instead")
    model = apply_degradation(copy.deepcopy(lm.model), degradation, noise)
    return LoadedModel(model, lm.tokenizer, lm.kind, f"{lm.name}+{degradation.id}", lm.mask_id, lm.family)
