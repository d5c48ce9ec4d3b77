"""Per-sample gathered products: each sample of a batch multiplies by its own subset of a weight's rows.

The step-delta FFN (:mod:`dllm_sparse.samplers.step_delta`) recomputes, per sample, only a set S of features
that changes from step to step (``idx`` [B, k] below), and with ``select="held"`` a set held between two
refreshes, whose weights it packs once (:class:`PackedFFNRows`). The products:

* :func:`gathered_matmul` - ``v[..., idx] @ w_t[idx]``: a delta on the kept input rows of a transposed weight;
* :func:`compact_gathered_matmul` - the same for a delta given at ``idx`` only ([B, T, k]);
* :func:`selected_outputs_matmul` - ``x @ w[idx]^T``: the kept outputs of an ``nn.Linear`` weight only;
* :class:`PackedFFNRows` - ``W_gate[S]``, ``W_up[S]`` and ``W_down[:, S]`` packed per sample: a delta step is then
  dense matmuls of width |S|.

``backend`` (None / ``"auto"``, ``"triton"``, ``"torch"``; see :func:`dllm_sparse.kernels.backend`): ``torch``
gathers the weight rows into a contiguous copy and runs ``torch.bmm`` (CPU, and the reference); ``triton`` runs
the column-sparse GEMM and row-sparse kernels one sample at a time, reading the kept rows in place (no copy of
the weights). The packed products are dense ``torch.bmm`` on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .dispatch import backend as choose_backend
from .ops import colsparse_gemm_op, rowsparse_op

__all__ = ["batched_rows", "gathered_matmul", "compact_gathered_matmul", "selected_outputs_matmul",
           "PackedFFNRows"]


def batched_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """w [n, m] and idx [B, k] -> w[idx] [B, k, m] (each sample's kept rows, contiguous for the matmul)."""
    return w.index_select(0, idx.reshape(-1)).reshape(*idx.shape, w.shape[-1])


def _kept_count(k: int, device: torch.device) -> torch.Tensor:
    return torch.full((1,), k, dtype=torch.int32, device=device)


def gathered_matmul(v: torch.Tensor, w_t: torch.Tensor, idx: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """v [B, T, n], w_t [n, m], idx [B, k] -> v[..., idx] @ w_t[idx] [B, T, m]: the rows idx of w_t only."""
    B, T, k = v.shape[0], v.shape[1], idx.shape[1]
    if choose_backend(v, backend) == "triton":  # the kernel gathers the kept rows inside its tl.dot loop
        count = _kept_count(k, v.device)
        return torch.stack([colsparse_gemm_op(v[b].contiguous(), w_t, idx[b].to(torch.int32).contiguous(), count,
                                               "triton") for b in range(B)])
    return torch.bmm(v.gather(-1, idx[:, None, :].expand(B, T, k)), batched_rows(w_t, idx))


def compact_gathered_matmul(v_s: torch.Tensor, w_t: torch.Tensor, idx: torch.Tensor,
                            backend: str | None = None) -> torch.Tensor:
    """v_s [B, T, k] (a vector's values at idx; zero elsewhere), w_t [n, m], idx [B, k] -> v_s @ w_t[idx]
    [B, T, m]. The Triton kernel reads a full-width input, so there v_s is scattered into zeros of width n."""
    if choose_backend(v_s, backend) == "triton":
        B, T, k = v_s.shape
        full = v_s.new_zeros(B, T, w_t.shape[0]).scatter_(-1, idx[:, None, :].expand(B, T, k), v_s)
        return gathered_matmul(full, w_t, idx, backend)
    return torch.bmm(v_s, batched_rows(w_t, idx))


def selected_outputs_matmul(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                            backend: str | None = None) -> torch.Tensor:
    """x [B, T, d], w [n, d], idx [B, k] -> x @ w[idx]^T [B, T, k]: the outputs idx of w only."""
    B, T, k = x.shape[0], x.shape[1], idx.shape[1]
    if choose_backend(x, backend) == "triton":  # computes the kept outputs only (zeros elsewhere), then reads them
        count = _kept_count(k, x.device)
        return torch.stack([rowsparse_op(x[b].contiguous(), w, idx[b].to(torch.int32).contiguous(), count,
                                          "triton").gather(-1, idx[b][None].expand(T, k)) for b in range(B)])
    return torch.bmm(x, batched_rows(w, idx).transpose(1, 2))


@dataclass
class PackedFFNRows:
    """One FFN's weights of a per-sample feature set S [B, k], packed contiguously: a delta step on S is then
    one matmul for the gate and up projections and one for the down projection, of width k."""

    gate_up: torch.Tensor  # [B, d, 2k]: W_gate[S]^T and W_up[S]^T side by side (one matmul)
    down: torch.Tensor  # [B, k, d]: W_down[:, S]^T
    bias: torch.Tensor | None  # [B, 2k], or None when neither projection has a bias

    @classmethod
    def pack(cls, gate: nn.Linear, up: nn.Linear, down_t: torch.Tensor, s: torch.Tensor) -> PackedFFNRows:
        """``gate`` / ``up`` the [d_ff, d] projections, ``down_t`` W_down transposed [d_ff, d], ``s`` [B, k]."""
        gate_up = torch.cat([batched_rows(gate.weight, s), batched_rows(up.weight, s)], dim=1).transpose(1, 2)
        bias = None
        if gate.bias is not None or up.bias is not None:
            zeros = gate.weight.new_zeros(gate.weight.shape[0])
            bias = torch.cat([(gate.bias if gate.bias is not None else zeros)[s],
                              (up.bias if up.bias is not None else zeros)[s]], dim=-1)
        return cls(gate_up.contiguous(), batched_rows(down_t, s), bias)

    def intermediate(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h[S] = act(W_gate[S] x) * (W_up[S] x) for x [B, T, d] -> [B, T, k]."""
        k = self.down.shape[1]
        gu = torch.bmm(x, self.gate_up)
        if self.bias is not None:
            gu = gu + self.bias[:, None, :]
        return act(gu[..., :k]) * gu[..., k:]

    def down_product(self, h_s: torch.Tensor) -> torch.Tensor:
        """W_down[:, S] h_s for h_s [B, T, k] -> [B, T, d]."""
        return torch.bmm(h_s, self.down)
