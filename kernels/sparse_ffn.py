"""Swap a model's FFNs for sparse ones built on the kernels: ``accelerate_ffn`` and its inverse.

    accelerate_ffn(model, SparsityConfig("input", TopP(0.5)))   # in place; returns the model
    ...decode...
    restore_ffn(model)                                           # the original modules, exactly

    with accelerated_ffn(model, site="intermediate", rule=TopP(0.9)):   # keyword form: builds the config
        ...

How the swap works. Every family calls its FFN as ``down(act(gate(x)) * up(x))`` from an *owner* module
(LLaMA's ``mlp``; for LLaDA the block itself, whose FFN is not a separate module). Rather than re-implement
each owner, the swap replaces only the projections whose work changes with a :class:`SparsePart`, a thin
module that forwards its call to one :class:`SparseFFN` per layer. The SparseFFN holds the whole sparse
computation of that FFN for the chosen site in one place, and the parts' ``original`` attribute keeps the
replaced module for :func:`restore_ffn`. What each site replaces (definitions: docs/sparsification.md):

| site           | gate                         | up                          | act        | down               |
| -------------- | ---------------------------- | --------------------------- | ---------- | ------------------ |
| `input`        | rule on x, then gate and up as one column-sparse launch (shared kept columns) | | dense | dense   |
| `intermediate` | dense                        | dense                       | dense      | rule, column-sparse |
| `gate`         | dense                        | row-sparse (gate's kept rows) | act, rule | column-sparse      |
| `up`           | row-sparse (up's kept rows)  | dense, rule                 | dense      | column-sparse      |

For `gate` and `up` the mask depends on a projection's dense output, so that projection runs in full;
what the mask makes exact to skip is the other projection's rows (the product zeroes them anyway) and
the down projection's columns. For `up`, ``act(0) = 0`` (SiLU, tanh-GELU) keeps skipped rows zero.

A family with one fused ``gate_up`` projection (Phi-3: output ``[gate; up]``, split by the owner) gets the
same computation with ``gate_up`` swapped in place of gate and up: at `input` one column-sparse launch
over its weight; at `up` the up half runs dense and the gate half row-sparse; at `gate` the gate half runs
dense, the activation and the rule run inside the swapped ``gate_up`` (the owner applies the activation only
after splitting), the up half row-sparse, and the swapped activation hands the masked activation back.

The outputs equal the masking path (:func:`dllm_sparse.sparsity.hooks`, same site and rule) up to the dtype's
rounding. The swap is for inference: the kernels have no backward. Call it after the model has its final
device and dtype (the transposed weight copies are made at swap time; ``model.to()`` moves them along,
but weights loaded into the model afterwards would not reach the copies).

torch.compile: the swap works before and after compiling (``accelerate_ffn(torch.compile(model))`` swaps inside
the compiled model's original module; dynamo guards on the module objects, so a compiled model recompiles after
a swap and after :func:`restore_ffn`). The kernels are ``torch.library`` custom ops, traced as such.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from dllm_sparse.models.families import FFNModules, count_layers, find_experts, find_ffns
from dllm_sparse.sparsity.config import SparsityConfig, as_config
from dllm_sparse.sparsity.experts import check_every_experts_module_found
from dllm_sparse.sparsity.hooks import column_norms, select_layers
from dllm_sparse.sparsity.rules import SHARED_SCOPES, SparsityRule, TopP
from dllm_sparse.sparsity.sites import FFNSite
from dllm_sparse.sparsity.stats import SparsityStats

from .dispatch import backend as choose_backend
from .sparse_experts import accelerate_experts, experts_accelerated, restore_experts
from .ops import column_sparse_matmul, row_sparse_matmul, topp_threshold

__all__ = ["SparseFFN", "SparsePart", "PackedKeepSet", "accelerate_ffn", "restore_ffn", "accelerated_ffn",
           "is_accelerated"]

DEFAULT_RULE = TopP(0.5)
DEFAULT_SITE = FFNSite.INPUT

# Which of the owner's four modules each site replaces (the others keep running as they are).
_SWAPPED = {
    FFNSite.INPUT: ("gate", "up"),
    FFNSite.INTERMEDIATE: ("down",),
    FFNSite.GATE: ("up", "act", "down"),
    FFNSite.UP: ("gate", "up", "down"),
}
# The same for a fused gate_up projection.
_SWAPPED_FUSED = {
    FFNSite.INPUT: ("gate_up",),
    FFNSite.INTERMEDIATE: ("down",),
    FFNSite.GATE: ("gate_up", "act", "down"),
    FFNSite.UP: ("gate_up", "down"),
}
# A reused intermediate keep-set is known before the step: gate and up compute only its rows as well.
_SWAPPED_REUSED_INTERMEDIATE = ("gate", "up", "down")
_SWAPPED_REUSED_INTERMEDIATE_FUSED = ("gate_up", "down")


class PackedKeepSet:
    """A shared keep-set laid out for plain dense matmuls (the fast path of the shared scopes).

    ``keep_set`` bool [..., 1, d]: one set per sample. ``idx`` [k]: the union of the samples' sets (the one set
    when the batch holds one sample); ``row_keep`` [..., 1, k]: each sample's set over ``idx``, or None when every
    sample keeps the whole union. ``weights``: the kept rows of each matrix, made contiguous once (a kept feature
    is one contiguous row), so a step is ``x[..., idx] @ W_kept`` with no gather of weights; a mask reused
    across steps reuses them (packed at the refresh only).
    """

    __slots__ = ("keep_set", "idx", "row_keep", "weights")

    def __init__(self, keep_set: torch.Tensor, weights: dict[str, torch.Tensor | None]):
        d = keep_set.shape[-1]
        sets = keep_set.reshape(-1, d)
        self.keep_set = keep_set
        self.idx = sets.any(dim=0).nonzero().squeeze(1)
        row_keep = keep_set.index_select(-1, self.idx)
        self.row_keep = None if bool(row_keep.all()) else row_keep
        with torch.no_grad():
            self.weights = {name: (None if w is None else w.index_select(0, self.idx).contiguous())
                            for name, w in weights.items()}

    @property
    def kept(self) -> int:
        return int(self.idx.numel())

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        """The kept features of v [..., T, d] -> [..., T, k], zero where a sample's own set excludes them."""
        vk = v.index_select(-1, self.idx)
        return vk if self.row_keep is None else vk.masked_fill(~self.row_keep, 0)

    def scatter(self, vk: torch.Tensor, d: int) -> torch.Tensor:
        """The inverse of gather: [..., T, k] -> [..., T, d] with zeros outside the kept features."""
        out = vk.new_zeros(*vk.shape[:-1], d)
        out[..., self.idx] = vk
        return out


class SparseFFN(nn.Module):
    """The sparse computation of one FFN for one site; its :class:`SparsePart` modules call :meth:`run`.

    ``gate`` and ``up`` at the `input` and `up` sites are computed together by whichever of the two is
    called first, and handed to the second through a one-entry stash keyed by the input tensor itself
    (the same trick as the masking path's input cache). At the `gate` site the activation leaves the kept
    set for the up projection in the stash.
    """

    def __init__(self, ffn: FFNModules, site: FFNSite, rule: SparsityRule,
                 stats: SparsityStats | None = None, backend: str | None = None, reuse=None):
        super().__init__()
        self.layer = ffn.layer
        self.site = site
        self.rule = rule
        self.shared = rule.scope in SHARED_SCOPES
        self.reuse = reuse  # a mask-reuse policy (dllm_sparse.samplers.reuse) or None
        self._pack_down = self.shared and site is FFNSite.INTERMEDIATE
        # Python counters stay out of a compiled graph (they count as without compile). Bound here rather than as
        # a decorator: torch.compiler.disable imports dynamo, seconds that every package import would pay.
        self._count = torch.compiler.disable(self._count_now)
        self.stats = stats
        self.backend = backend
        # A plain dict, not submodules: the originals' parameters are registered in the owner (or in the
        # SparsePart that replaced them), so nothing is listed twice.
        self._orig = {"gate": ffn.gate, "up": ffn.up, "act": ffn.act, "down": ffn.down, "gate_up": ffn.gate_up}
        self.fused = ffn.gate_up is not None
        self._stash: dict[str, tuple] = {}
        self.d_ff = ffn.down.weight.shape[1]
        with torch.no_grad():
            # Column-sparse matrices are stored transposed once, so a kept input reads one contiguous row.
            # Non-persistent buffers: state_dict stays the original one, model.to() still moves them.
            if site is FFNSite.INPUT and self.shared:
                # One matrix per projection: on CPU two packed matmuls of width d_ff ran faster than one of width
                # 2 d_ff, and packing the kept rows of a contiguous [d, d_ff] is one copy.
                for role in ("gate", "up"):  # (the biases are read from the projections at call time)
                    self.register_buffer(f"{role}_t", self._projection(role)[0].t().contiguous(), persistent=False)
            elif site is FFNSite.INPUT:
                if self.fused:  # already one [gate; up] matrix
                    gate_up_t, gate_up_bias = ffn.gate_up.weight.t().contiguous(), ffn.gate_up.bias
                else:
                    gate_up_t = torch.cat([ffn.gate.weight, ffn.up.weight]).t().contiguous()
                    biases = (ffn.gate.bias, ffn.up.bias)
                    gate_up_bias = None if biases == (None, None) else torch.cat(
                        [b if b is not None else ffn.gate.weight.new_zeros(self.d_ff) for b in biases])
                self.register_buffer("gate_up_t", gate_up_t, persistent=False)
                self.register_buffer("gate_up_bias", gate_up_bias, persistent=False)
            else:
                self.register_buffer("down_t", ffn.down.weight.t().contiguous(), persistent=False)
            cn = column_norms(ffn, site).to(ffn.down.weight.device) if rule.scope == "step_wina" else None
            self.register_buffer("column_norm", cn, persistent=False)

    def _projection(self, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the gate or up projection; for a fused one, its half of gate_up (views, read at
        call time so that model.to() is followed)."""
        if not self.fused:
            m = self._orig[role]
            return m.weight, m.bias
        m = self._orig["gate_up"]
        half = slice(0, self.d_ff) if role == "gate" else slice(self.d_ff, 2 * self.d_ff)
        return m.weight[half], (m.bias[half] if m.bias is not None else None)

    # ---- selection -------------------------------------------------------------------------------------
    def _select(self, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(keep-mask, threshold) of v by the rule. A per-token top-p gets its threshold from the kernel
        (no sort on GPU) and no mask, so a one-token GEMV can apply it inside the kernel."""
        if isinstance(self.rule, TopP) and self.rule.scope == "token":
            return None, topp_threshold(v, self.rule.p, backend=self.backend)
        if self.shared:
            return self.rule.mask(v, column_norm=self.column_norm), None
        return self.rule.mask(v), None

    # ---- shared keep-sets: packed weights, plain matmuls ----------------------------------------------------
    def _packed(self, v: torch.Tensor, weights, lookup: bool = True) -> PackedKeepSet | None:
        """The packed keep-set of v: the reuse policy's cached one when it reuses at this call, else a fresh
        selection (every token of the call votes: the swapped modules do not see the attention mask), packed and
        handed to the policy. ``lookup=False``: the policy was already asked at this call (and said refresh).
        None when a token holds a NaN: its row is kept whole (the rules' convention), which a packed set cannot
        express, so the caller takes the general masked path (the masking path's result)."""
        entry = self.reuse.lookup_shared(self.layer, self.site, v) if self.reuse is not None and lookup else None
        if entry is not None and isinstance(entry.payload, PackedKeepSet):
            return entry.payload
        score = self.rule.shared_score(v, column_norm=self.column_norm)
        if bool(torch.isnan(score).any()):  # every token votes here: the score is NaN iff some token holds a NaN
            return None
        keep_set = self.rule.keep_from_score(score)
        packed = PackedKeepSet(keep_set, weights())
        if self.reuse is not None:
            self.reuse.store_shared(self.layer, self.site, v, keep_set, packed)
        return packed

    def _input_weights(self):
        return {"gate_t": self.gate_t, "up_t": self.up_t}

    def _intermediate_weights(self):
        w = {"down_t": self.down_t}
        if self.reuse is not None:  # the next steps compute only the kept rows of gate and up
            for role in ("gate", "up"):
                weight, bias = self._projection(role)
                w[role], w[role + "_bias"] = weight, bias
        return w

    def _gathered(self, v: torch.Tensor) -> bool:
        """Whether a fresh shared selection runs the gathered Triton GEMM (``tl.dot`` over the kept rows, read in
        place: no packed copy and no host sync) instead of packing. With a reuse policy the packed copy pays for
        itself over the reusing steps, and plain matmuls over it are the fastest path on every device."""
        return self.reuse is None and choose_backend(v, self.backend) == "triton"

    def _shared_input_pair(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) of x restricted to the shared keep-set: two dense matmuls over the packed kept rows, or the
        gathered kernel (see :meth:`_gathered`), or the masked path when a token holds a NaN."""
        pk = None if self._gathered(x) else self._packed(x, self._input_weights)
        if pk is None:
            keep = self.rule.mask(x, column_norm=self.column_norm)
            if self.stats is not None:
                self._record(x, keep)
            return tuple(column_sparse_matmul(x, getattr(self, f"{role}_t"), keep=keep,
                                              bias=self._projection(role)[1], backend=self.backend)
                         for role in ("gate", "up"))
        if self.stats is not None:
            self._record(x, pk.keep_set.expand(x.shape) & (x != 0))
        xk = pk.gather(x)
        out = []
        for role in ("gate", "up"):
            y, bias = xk @ pk.weights[f"{role}_t"], self._projection(role)[1]
            out.append(y if bias is None else y + bias)
        return out[0], out[1]

    def _shared_down(self, h, pk: PackedKeepSet | None = None):
        """h @ W_down^T over the kept features of the shared keep-set (h compact [.., k] when pk is given)."""
        down = self._orig["down"]
        if pk is None:
            # With a reuse policy the gate projection already asked it at this call (swapped there too).
            pk = None if self._gathered(h) else self._packed(h, self._intermediate_weights,
                                                               lookup=self.reuse is None)
            if pk is None:
                return self._masked_down(h)
            hk = pk.gather(h)
        else:
            hk = h if pk.row_keep is None else h.masked_fill(~pk.row_keep, 0)
        if self.stats is not None:
            full = pk.scatter(hk, self.d_ff) if hk.shape[-1] != self.d_ff or pk.row_keep is not None else hk
            self._record(full, full != 0)
        y = hk @ pk.weights["down_t"]
        return y if down.bias is None else y + down.bias

    def _reused_rows(self, x):
        """(gate, up) of x for the kept rows only, [..., k] each, when the reuse policy reuses this layer's
        intermediate keep-set at this step; else None (a refresh: the dense projections run)."""
        entry = self.reuse.lookup_shared(self.layer, self.site, x[..., :1].expand(*x.shape[:-1], self.d_ff))
        if entry is None or not isinstance(entry.payload, PackedKeepSet) or "gate" not in entry.payload.weights:
            return None
        pk = entry.payload
        w = pk.weights
        g = x @ w["gate"].t()
        u = x @ w["up"].t()
        if w["gate_bias"] is not None:
            g = g + w["gate_bias"]
        if w["up_bias"] is not None:
            u = u + w["up_bias"]
        self._stash["compact"] = (pk,)
        return g, u

    @staticmethod
    def _kept(v: torch.Tensor, keep: torch.Tensor | None, tau: torch.Tensor | None) -> torch.Tensor:
        return keep if keep is not None else ~(v.abs().float() < tau) & (v != 0)

    def _record(self, v: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        v = v.masked_fill(~kept, 0)
        if self.stats is not None:
            self._count(v)
        return v

    def _count_now(self, v: torch.Tensor) -> None:
        self.stats.add(self.layer, self.site, v, None)

    # ---- the four roles ----------------------------------------------------------------------------------
    def run(self, role: str, v: torch.Tensor) -> torch.Tensor:
        if role == "gate_up":  # called once per forward, so nothing goes through the stash
            if self.site is FFNSite.INPUT:
                return self._input_matmul(v)
            if self.site is FFNSite.INTERMEDIATE:  # a reused intermediate keep-set: [gate_k; up_k]
                rows = self._reused_rows(v)
                return torch.cat(rows, dim=-1) if rows is not None else self._orig["gate_up"](v)
            return torch.cat(self._fused_gate_site(v) if self.site is FFNSite.GATE else self._up_site(v), dim=-1)
        if role == "gate":
            return self._gate_and_up(v)[0]
        if role == "up":
            return self._gate_and_up(v)[1] if self.site is not FFNSite.GATE else self._up_rows(v)
        if role == "act":
            return self._fused_act() if self.fused else self._act(v)
        return self._down(v)

    def _gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._stash.pop("gate_up", None)
        if hit is not None and hit[0] is x:  # the second of the pair: computed by the first
            return hit[1]
        if self.site is FFNSite.INTERMEDIATE:  # swapped only with a reuse policy
            out = self._reused_rows(x)
            if out is None:
                out = (self._orig["gate"](x), self._orig["up"](x))
        else:
            out = self._input_site(x) if self.site is FFNSite.INPUT else self._up_site(x)
        self._stash["gate_up"] = (x, out)
        return out

    def _input_matmul(self, x):
        """[gate; up] of the sparse x, one column-sparse launch over both matrices (a shared keep-set: one
        dense matmul per projection over the packed kept rows)."""
        if self.shared:
            return torch.cat(self._shared_input_pair(x), dim=-1)
        return self._masked_input_matmul(x)

    def _masked_input_matmul(self, x):
        keep, tau = self._select(x)
        if self.stats is not None:
            self._record(x, self._kept(x, keep, tau))
        return column_sparse_matmul(x, self.gate_up_t, threshold=tau, keep=keep, bias=self.gate_up_bias,
                                    backend=self.backend)

    def _input_site(self, x):
        if self.shared:
            return self._shared_input_pair(x)
        y = self._masked_input_matmul(x)
        return y[..., : self.d_ff], y[..., self.d_ff:]

    def _up_site(self, x):
        u = self._orig["up"](x) if not self.fused else F.linear(x, *self._projection("up"))
        keep, tau = self._select(u)
        kept = self._kept(u, keep, tau)
        u = self._record(u, kept)
        gate_w, gate_b = self._projection("gate")
        g = row_sparse_matmul(x, gate_w, kept, bias=gate_b, backend=self.backend)
        return g, u

    def _act(self, g):
        a = self._orig["act"](g)
        keep, tau = self._select(a)
        kept = self._kept(a, keep, tau)
        self._stash["gate_keep"] = (kept,)
        return self._record(a, kept)

    def _fused_gate_site(self, x):
        """gate site, fused: the owner splits [gate; up] before the activation, so the rule runs here."""
        g = F.linear(x, *self._projection("gate"))
        a = self._orig["act"](g)
        keep, tau = self._select(a)
        kept = self._kept(a, keep, tau)
        self._stash["gate_act"] = (self._record(a, kept),)
        up_w, up_b = self._projection("up")
        return g, row_sparse_matmul(x, up_w, kept, bias=up_b, backend=self.backend)

    def _fused_act(self):
        hit = self._stash.pop("gate_act", None)
        if hit is None:
            raise RuntimeError("site 'gate': the activation ran before the fused gate_up projection. accelerate_ffn "
                               "expects the FFN to compute down(act(gate) * up) from [gate; up] = gate_up(x); use "
                               "dllm_sparse.sparsity.hooks for this model instead.")
        return hit[0]

    def _up_rows(self, x):
        hit = self._stash.pop("gate_keep", None)
        if hit is None:
            raise RuntimeError("site 'gate': the up projection ran before the activation, so its kept rows are "
                               "unknown. accelerate_ffn expects the FFN to compute down(act(gate(x)) * up(x)) "
                               "in that order; use dllm_sparse.sparsity.hooks for this model instead.")
        up = self._orig["up"]
        return row_sparse_matmul(x, up.weight, hit[0], bias=up.bias, backend=self.backend)

    def _down(self, h):
        hit = self._stash.pop("compact", None)
        if hit is not None:  # gate and up computed the reused keep-set's rows only: h is compact
            return self._shared_down(h, hit[0])
        if self._pack_down:
            return self._shared_down(h)
        return self._masked_down(h)

    def _masked_down(self, h):
        down = self._orig["down"]
        if self.site is FFNSite.INTERMEDIATE:
            keep, tau = self._select(h)
            if self.stats is not None:
                self._record(h, self._kept(h, keep, tau))
            return column_sparse_matmul(h, self.down_t, threshold=tau, keep=keep, bias=down.bias,
                                        backend=self.backend)
        # gate / up sites: h is already zero outside the kept set; zero entries are skipped.
        return column_sparse_matmul(h, self.down_t, bias=down.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, site={self.site.value}, rule={self.rule}"


class SparsePart(nn.Module):
    """Stands in for one of the owner's gate / up / act / down modules; ``original`` is what it replaced."""

    def __init__(self, ffn: SparseFFN, role: str, original: nn.Module):
        super().__init__()
        self.ffn = ffn
        self.role = role
        # The replaced module is kept for restore_ffn but not registered as a child; its own parameters and
        # buffers (the very same tensors) are registered here under their names instead, so state_dict(),
        # named_parameters() and load_state_dict() read exactly as before the swap, and model.to() still
        # reaches them.
        self.__dict__["original"] = original
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn.run(self.role, x)

    def extra_repr(self) -> str:
        return f"role={self.role}"


# --------------------------------------------------------------------------------------------------------
# The verbs
# --------------------------------------------------------------------------------------------------------


def _check_ffn(ffn: FFNModules) -> None:
    where = f"layer {ffn.layer} ({ffn.profile.family})"
    roles = ("gate_up", "down") if ffn.gate_up is not None else ("gate", "up", "down")
    for role in roles:
        m = getattr(ffn, role)
        if hasattr(m, "base_layer") and hasattr(m, "lora_A"):  # peft's LoRA layer: W x + B A x
            raise ValueError(f"{where}: the {role} projection carries an unmerged peft LoRA adapter "
                             f"({type(m).__module__}.{type(m).__name__}); the sparse kernels read one weight "
                             "matrix and would drop the adapter's B·A·x. Merge it first (model = "
                             "peft_model.merge_and_unload()), or sparsify with the masking path "
                             "(dllm_sparse.sparsify), which works on the unmerged model")
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{where}: the {role} projection is a {type(m).__name__}, not nn.Linear; the sparse "
                             "kernels need plain weights (dequantise the model, or use dllm_sparse.sparsity.hooks)")
        if m.weight.is_meta:
            raise ValueError(f"{where}: the {role} weights are on the meta device (offloaded?); load the model "
                             "onto one device before accelerate_ffn")
    shapes = {role: tuple(getattr(ffn, role).weight.shape) for role in roles}
    d, d_ff = shapes["down"]
    glu = shapes == ({"gate_up": (2 * d_ff, d), "down": (d, d_ff)} if ffn.gate_up is not None else
                     {"gate": (d_ff, d), "up": (d_ff, d), "down": (d, d_ff)})
    if not glu:
        raise ValueError(f"{where}: projection shapes do not form a GLU FFN: "
                         + ", ".join(f"{role} {shape}" for role, shape in shapes.items()))


def _role_path(ffn: FFNModules, role: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of a role inside the owner, from the family profile's names."""
    path = getattr(ffn.profile, role)
    prefix, _, leaf = path.rpartition(".")
    return (ffn.owner.get_submodule(prefix) if prefix else ffn.owner), leaf


def is_accelerated(model: nn.Module) -> bool:
    return any(isinstance(m, SparsePart) for m in model.modules()) or experts_accelerated(model)


def _kernel_config(config, rule, layers, site, caller: str) -> SparsityConfig:
    """``as_config`` with the kernels' defaults: site ``input`` and ``TopP(0.5)`` for whatever is not given."""
    if rule is not None and not isinstance(rule, SparsityRule):  # a ValueError here, as this entry point always had
        raise ValueError(f"rule must be a SparsityRule such as TopP(0.5), got {rule!r}")
    if not isinstance(config, SparsityConfig):
        if config is None and site is None:
            site = DEFAULT_SITE
        if rule is None:
            rule = DEFAULT_RULE
    return as_config(config, rule, layers, site=site, caller=caller)


def accelerate_ffn(
    model: nn.Module,
    config: SparsityConfig | FFNSite | str | None = None,
    rule: SparsityRule | None = None,
    layers: Iterable[int] | None = None,
    *,
    site: FFNSite | str | None = None,
    stats: SparsityStats | None = None,
    backend: str | None = None,
    reuse=None,
) -> nn.Module:
    """Swap every selected FFN of ``model`` (in place) for a sparse one that skips the weights the config's
    rule masks out at its site; returns the model. Undo with :func:`restore_ffn`.

    ``accelerate_ffn(model, SparsityConfig("input", TopP(0.5)))``, or the convenience form
    ``accelerate_ffn(model, site="input", rule=TopP(0.5), layers=None)`` (defaults: site ``input``, rule
    ``TopP(0.5)``, every layer), which builds the config. Site: input, intermediate, gate or up (see the
    module docstring for what each one skips). Rule: any :class:`SparsityRule`; a per-token :class:`TopP`
    takes the kernel threshold path. ``stats``: a :class:`SparsityStats` to record the measured sparsity
    into, as the masking path does (costs one masked copy per call; every token is counted, as the swapped
    modules do not see the attention mask). ``backend``: "triton", "torch" or None/"auto" (see
    :func:`dllm_sparse.kernels.backend`).

    Shared scopes (``TopP(p, scope="step")`` / ``"step_wina"``): every token of a call votes (the swapped modules
    do not see the attention mask; use equal-length rows, or the masking path for padded batches) and the FFN
    runs plain dense matmuls over the packed kept rows (:class:`PackedKeepSet`). ``reuse``: a mask-reuse policy
    (``Every(k)``, ``BlockStart()``, ``Fresh()`` from :mod:`dllm_sparse.samplers.reuse`, also passed to the
    sampler in ``callbacks=``) that keeps each layer's keep-set and packed weights between refreshes; at the
    ``intermediate`` site a reused set also restricts W_gate and W_up to its rows, so all three matrices shrink.
    """
    config = _kernel_config(config, rule, layers, site, "accelerate_ffn")
    site, rule = config.site, config.rule
    if reuse is not None:
        if not getattr(reuse, "fast_path", False) or not hasattr(reuse, "lookup_shared"):
            raise ValueError(f"reuse={reuse!r} cannot drive the fast path: use Fresh(), Every(k) or BlockStart() "
                             "(Adaptive's probe needs a fresh mask of a layer at every step: use it with the masking "
                             "path, StepSparsity(select_mask=policy))")
        if rule.scope not in SHARED_SCOPES:
            raise ValueError(f"reuse on the fast path needs a shared scope (TopP(p, scope='step') or 'step_wina'), "
                             f"got scope {rule.scope!r}: a per-token mask cached per position keeps the union of "
                             "the positions' sets, almost every feature on a denoising step, so nothing is skipped")
        if site not in (FFNSite.INPUT, FFNSite.INTERMEDIATE):
            raise ValueError(f"reuse on the fast path is for the input and intermediate sites, got {site.value!r}")
    if is_accelerated(model):
        raise ValueError("this model's FFNs are already accelerated; call restore_ffn(model) before swapping again")
    n_layers = count_layers(model)
    ffns = select_layers(find_ffns(model), config.layers, n_layers)
    all_experts = find_experts(model)
    check_every_experts_module_found(model, all_experts)
    experts = select_layers(all_experts, config.layers, n_layers)  # routed experts: sparse_experts.py
    if experts and reuse is not None:
        raise ValueError(f"reuse is not defined for routed experts (layers {[e.layer for e in experts]}): the tokens "
                         "routed to an expert change between steps; drop reuse, or select layers without experts")
    for ffn in ffns:  # validate everything before touching the model
        _check_ffn(ffn)
        choose_backend(ffn.down.weight, backend)  # a bad backend name fails here, not at the first forward
    for found in experts:
        choose_backend(found.experts.down_proj, backend)
    swaps = []
    for ffn in ffns:
        sparse = SparseFFN(ffn, site, rule, stats, backend, reuse)
        roles = (_SWAPPED_FUSED if sparse.fused else _SWAPPED)[site]
        if reuse is not None and site is FFNSite.INTERMEDIATE:
            roles = _SWAPPED_REUSED_INTERMEDIATE_FUSED if sparse.fused else _SWAPPED_REUSED_INTERMEDIATE
        for role in roles:
            parent, name = _role_path(ffn, role)
            swaps.append((parent, name, SparsePart(sparse, role, getattr(parent, name))))
    if experts:  # validates every experts module before attaching any
        accelerate_experts(experts, site, rule, stats, backend)
    for parent, name, part in swaps:
        setattr(parent, name, part)
    return model


def restore_ffn(model: nn.Module) -> nn.Module:
    """Put back every module that :func:`accelerate_ffn` replaced (the very same objects); returns the model.
    A model that is not accelerated is returned unchanged."""
    restore_experts(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SparsePart):
                setattr(parent, name, child.original)
    return model


@contextmanager
def accelerated_ffn(
    model: nn.Module,
    config: SparsityConfig | FFNSite | str | None = None,
    rule: SparsityRule | None = None,
    layers: Iterable[int] | None = None,
    *,
    site: FFNSite | str | None = None,
    stats: SparsityStats | None = None,
    backend: str | None = None,
    reuse=None,
) -> Iterator[nn.Module]:
    """``with accelerated_ffn(model, config): ...`` (or ``accelerated_ffn(model, "input", TopP(0.5))``) -
    accelerate inside, restore on exit (also when the body raises). Yields the model."""
    config = _kernel_config(config, rule, layers, site, "accelerated_ffn")
    accelerate_ffn(model, config, stats=stats, backend=backend, reuse=reuse)
    try:
        yield model
    finally:
        restore_ffn(model)
