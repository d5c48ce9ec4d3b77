"""Routed experts on the sparse kernels: what :func:`accelerate_ffn` does for a mixture-of-experts layer.

Each expert runs on the tokens routed to it (gathered: x_e = the rows of the hidden states the router sent to
expert e) with the same products a dense FFN gets at each site (table in :mod:`dllm_sparse.kernels.sparse_ffn`),
on that expert's slice of the 3D expert weights:

| site           | gate / up (one [gate; up] weight per expert)                        | down                 |
| -------------- | ------------------------------------------------------------------ | -------------------- |
| `input`        | rule on x_e, then one column-sparse launch over [gate; up]_e^T      | dense                |
| `intermediate` | dense                                                              | rule, column-sparse  |
| `gate`         | gate dense, rule on act(gate); up row-sparse over the kept rows     | column-sparse        |
| `up`           | up dense, rule; gate row-sparse over the kept rows                  | column-sparse        |

The kernels are the dense FFN's (:func:`column_sparse_matmul`, :func:`row_sparse_matmul`, :func:`topp_threshold`):
an expert's products are ordinary 2D products over its gathered tokens, so no new kernel is compiled and the
sm_90 AOT build of those kernels (experiments/kernels_aot.py) covers the experts too. Several tokens of one expert
share the union of their kept columns, as several tokens of a dense FFN do.

It plugs in through the same ``dllm_sparse`` experts implementation as the masking path
(:mod:`dllm_sparse.sparsity.experts`): the experts module is not replaced, its config names the implementation
while accelerated, and :func:`restore_ffn` puts the previous name back. Per-token scope only (a shared keep-set
over the tokens routed to one expert is not defined, see docs/moe.md); no mask reuse. The outputs equal the
masking path up to the dtype's rounding (tests/test_experts_kernels.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dllm_sparse.models.families import ExpertsModules
from dllm_sparse.sparsity.experts import attach_experts, check_experts, run_experts
from dllm_sparse.sparsity.rules import SparsityRule, TopP
from dllm_sparse.sparsity.sites import FFNSite
from dllm_sparse.sparsity.stats import SparsityStats

from .ops import column_sparse_matmul, row_sparse_matmul, topp_threshold

__all__ = ["SparseExperts", "accelerate_experts", "restore_experts", "experts_accelerated"]

# id(experts module) -> the detach of its accelerated run (restore_experts calls it)
_ATTACHED: dict[int, Callable[[], None]] = {}


class SparseExperts:
    """The sparse computation of one layer's experts for one site (token scope)."""

    def __init__(self, found: ExpertsModules, site: FFNSite, rule: SparsityRule, stats: SparsityStats | None = None,
                 backend: str | None = None):
        self.layer, self.site, self.rule, self.stats, self.backend = found.layer, site, rule, stats, backend
        self.module = m = found.experts
        # Counters stay out of a compiled graph; bound here, not as a decorator (that would import dynamo with the
        # package, as in sparse_ffn.SparseFFN)
        self._count = torch.compiler.disable(self._count_now)
        # [E, 2I, d] and [E, d, I] views in the nn.Linear layout, whatever the stored one
        self._gate_up = (lambda: m.gate_up_proj.transpose(1, 2)) if m.is_transposed else (lambda: m.gate_up_proj)
        self._down = (lambda: m.down_proj.transpose(1, 2)) if m.is_transposed else (lambda: m.down_proj)
        self.d_ff = self._down().shape[-1]
        with torch.no_grad():  # column-sparse products read a transposed copy: a kept feature is one contiguous row
            if site is FFNSite.INPUT:
                self.gate_up_t = self._gate_up().transpose(1, 2).contiguous()  # [E, d, 2I]
            else:
                self.down_t = self._down().transpose(1, 2).contiguous()  # [E, I, d]

    def _select(self, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if isinstance(self.rule, TopP):
            return None, topp_threshold(v, self.rule.p, backend=self.backend)
        return self.rule.mask(v), None

    def _kept(self, e: int, tokens: torch.Tensor, v: torch.Tensor) -> tuple:
        """(keep-mask or None, threshold or None, kept bool mask) of v, counted into the statistics."""
        keep, tau = self._select(v)
        kept = keep if keep is not None else ~(v.abs().float() < tau) & (v != 0)
        if self.stats is not None:  # the swapped path sees no attention mask: every token counts
            self._count(e, tokens, v.masked_fill(~kept, 0))
        return keep, tau, kept

    def _count_now(self, e: int, tokens: torch.Tensor, v: torch.Tensor) -> None:
        self.stats.add_routed(self.layer, self.site, e, v, tokens, (self._num_tokens,), None)

    def _bias(self, name: str, e: int):
        return getattr(self.module, name)[e] if self.module.has_bias else None

    def expert(self, e: int, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its gathered tokens x [n, d]."""
        m, site, be, I = self.module, self.site, self.backend, self.d_ff
        gate_up_b, down_b = self._bias("gate_up_proj_bias", e), self._bias("down_proj_bias", e)
        if site is FFNSite.INPUT:
            keep, tau, _ = self._kept(e, tokens, x)
            g, u = column_sparse_matmul(x, self.gate_up_t[e], threshold=tau, keep=keep, bias=gate_up_b,
                                        backend=be).chunk(2, dim=-1)
            return F.linear(m.act_fn(g) * u, self._down()[e], down_b)
        w = self._gate_up()[e]
        w_gate, w_up = w[:I], w[I:]
        b_gate, b_up = (None, None) if gate_up_b is None else (gate_up_b[:I], gate_up_b[I:])
        if site is FFNSite.INTERMEDIATE:
            g, u = F.linear(x, w, gate_up_b).chunk(2, dim=-1)
            h = m.act_fn(g) * u
            keep, tau, _ = self._kept(e, tokens, h)
            return column_sparse_matmul(h, self.down_t[e], threshold=tau, keep=keep, bias=down_b, backend=be)
        if site is FFNSite.GATE:
            a = m.act_fn(F.linear(x, w_gate, b_gate))
            *_, kept = self._kept(e, tokens, a)
            h = a.masked_fill(~kept, 0) * row_sparse_matmul(x, w_up, kept, bias=b_up, backend=be)
        else:  # UP: act(0) = 0 keeps the skipped gate rows' products zero
            u = F.linear(x, w_up, b_up)
            *_, kept = self._kept(e, tokens, u)
            h = m.act_fn(row_sparse_matmul(x, w_gate, kept, bias=b_gate, backend=be)) * u.masked_fill(~kept, 0)
        # h is zero outside each token's kept set: the down product skips those columns
        return column_sparse_matmul(h, self.down_t[e], bias=down_b, backend=be)

    def __call__(self, module: nn.Module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        self._num_tokens = hidden_states.shape[0]
        if self.stats is not None:
            self.stats.add_expert_call(self.layer, self.site)
        return run_experts(module, hidden_states, top_k_index, top_k_weights, self.expert)


def _check_for_kernels(found: ExpertsModules, rule: SparsityRule) -> None:
    where = f"layer {found.layer}: experts module {type(found.experts).__name__}"
    if rule.scope != "token":
        raise ValueError(f"{where}: scope {rule.scope!r} is not defined for routed experts (the tokens routed to an "
                         "expert change from call to call); use scope='token' or layers without experts")
    for name, p in found.experts.named_parameters(recurse=False):
        if p.is_meta:
            raise ValueError(f"{where}: the {name} weights are on the meta device (offloaded?); load the model onto "
                             "one device before accelerate_ffn")
    if nn.utils.parametrize.is_parametrized(found.experts) or found.block.get_submodule(
            found.profile.experts) is not found.experts:
        raise ValueError(f"{where} is wrapped (a peft adapter on the expert weights?); the sparse kernels read the "
                         "plain weights and would drop it. Merge it first (model = peft_model.merge_and_unload()), "
                         "or use the masking path (dllm_sparse.sparsify), which runs the wrapped experts")


def accelerate_experts(found: list[ExpertsModules], site: FFNSite, rule: SparsityRule,
                       stats: SparsityStats | None, backend: str | None) -> None:
    """Run the experts of ``found`` on the kernels until :func:`restore_experts` (called by ``restore_ffn``)."""
    for f in found:
        check_experts(f)
        _check_for_kernels(f, rule)
    runners = {f.layer: SparseExperts(f, site, rule, stats, backend) for f in found}
    detach = attach_experts(found, runners.__getitem__)
    for f in found:
        _ATTACHED[id(f.experts)] = detach  # one detach for all: the first restore undoes every one


def experts_accelerated(model: nn.Module) -> bool:
    return any(id(m) in _ATTACHED for m in model.modules())


def restore_experts(model: nn.Module) -> None:
    for m in model.modules():
        detach = _ATTACHED.pop(id(m), None)
        if detach is not None:
            detach()
