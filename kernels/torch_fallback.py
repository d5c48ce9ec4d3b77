"""PyTorch fallbacks of the Triton kernels: same signatures, same results (up to summation order).

These run whenever Triton or a GPU is missing (CPU tensors). They gather the kept rows with index_select,
so they too read only the kept part of the weight. The tests compare both these and the Triton code against
dense matmuls and :func:`dllm_sparse.top_p_mask_reference`.
"""

from __future__ import annotations

import torch

from dllm_sparse.sparsity.rules import top_p_threshold_reference

__all__ = ["topp_threshold", "colsparse_gemv", "colsparse_gemm", "rowsparse_gemv", "rowsparse_gemm", "kept_indices"]


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    # Accumulate in fp32 like the kernels: CPU half-precision matmuls are slow or round partial sums.
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return (a @ b).to(out_dtype)
    return (a.float() @ b.float()).to(out_dtype)


def topp_threshold(x: torch.Tensor, p: float) -> torch.Tensor:
    """x [M, d] -> tau [M] float32: the spec's top-p threshold, by sort + float64 cumsum (the reference).

    On CPU a row sort is faster than 31 bisection passes, and it is the definition itself."""
    M, d = x.shape
    if p >= 1.0 or M == 0 or d == 0:
        return torch.zeros(M, device=x.device, dtype=torch.float32)
    return top_p_threshold_reference(x, p).squeeze(-1).to(torch.float32)


def colsparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """x [d_in], weight_t [d_in, d_out], tau [1] -> y [d_out]; rows with |x| < tau or x == 0 are skipped."""
    keep = ~(x.abs().float() < tau) & (x != 0)  # "not below": a NaN entry (or a NaN tau) is kept
    rows = keep.nonzero().squeeze(1)
    return _mm(x[rows].unsqueeze(0), weight_t.index_select(0, rows), x.dtype).squeeze(0)


def colsparse_gemm(x: torch.Tensor, weight_t: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """x [M, d_in] (zero outside each row's mask), kept rows idx[:count] -> y [M, d_out]."""
    rows = idx[: int(count.reshape(-1)[0])].long()
    return _mm(x.index_select(1, rows), weight_t.index_select(0, rows), x.dtype)


def rowsparse_gemm(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """x [M, d_in], weight [d_out, d_in] -> y [M, d_out] with only the columns idx[:count] computed, 0 elsewhere."""
    rows = idx[: int(count.reshape(-1)[0])].long()
    y = torch.zeros(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    y[:, rows] = _mm(x, weight.index_select(0, rows).t(), x.dtype)
    return y


def rowsparse_gemv(x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """x [d_in] -> y [d_out]: rowsparse_gemm for one token."""
    return rowsparse_gemm(x.unsqueeze(0), weight, idx, count).squeeze(0)


def kept_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact a keep-mask without a host sync: bool [..., d] -> (idx int32 [d], count int32 [1]).

    The kept set is the union over the leading dimensions. idx[:count] lists the kept positions in
    increasing order; idx[count:] is padding (0). No .nonzero(): a cumsum gives each kept entry its slot
    and a scatter writes it there, so the result has a fixed shape and the work can be captured in a CUDA
    graph or traced by torch.compile.
    """
    d = keep.shape[-1]
    union = keep.reshape(-1, d).any(dim=0) if keep.dim() > 1 else keep.bool()
    flags = union.to(torch.int32)
    slot = torch.cumsum(flags, dim=0, dtype=torch.int32) - flags  # exclusive prefix sum
    slot = torch.where(union, slot, d)  # non-kept entries all land in a spare slot d, dropped below
    positions = torch.arange(d, device=keep.device, dtype=torch.int32)
    idx = torch.zeros(d + 1, device=keep.device, dtype=torch.int32).scatter_(0, slot.long(), positions)
    return idx[:d], flags.sum(dtype=torch.int32).reshape(1)
