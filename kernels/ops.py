"""The public sparse-matmul functions, and the custom ops they run through.

Each kernel is registered once as a ``torch.library.custom_op`` (``dllm_sparse::...``) with a fake
(meta) implementation, so that ``torch.compile`` treats it as one opaque node and a CUDA-graph capture
records the Triton launch as it is. The op body picks Triton or the PyTorch fallback at run time with
:func:`dllm_sparse.kernels.dispatch.backend`; the functions below only reshape, validate and mask.

Semantics shared by all column-sparse calls: an input entry is *kept* when it is non-zero and not below
the row's threshold; a masked entry is zero, so skipping its weight row is exact. For several tokens the
kept set is the union of the tokens' sets (still exact: each token's masked entries are zero), and the
union's density decides the speedup - see :func:`union_density`.
"""

from __future__ import annotations

import torch

from . import torch_fallback
from .dispatch import backend as choose_backend

__all__ = [
    "topp_threshold", "kept_indices", "union_density", "column_sparse_matmul", "row_sparse_matmul",
    # the custom ops themselves (no reshaping or checks): for kernels built on them (kernels/gathered.py)
    "topp_threshold_op", "colsparse_gemv_op", "colsparse_gemm_op", "rowsparse_op",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _impl(t: torch.Tensor, override: str):
    """The module implementing the kernels for this call (imported lazily: see triton_kernels' docstring)."""
    if choose_backend(t, override) == "triton":
        if t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"the Triton kernels support fp16, bf16 and fp32 tensors, got {t.dtype}; "
                             "cast the model (model.to(torch.bfloat16)) or use the PyTorch fallback")
        from . import triton_kernels

        return triton_kernels
    return torch_fallback


# --------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, one launch each
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("dllm_sparse::topp_threshold", mutates_args=())
def topp_threshold_op(x: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    # .contiguous() is a no-op for the callers below; it guards the kernels' layout assumptions when a
    # compiler hands the op differently strided activations.
    return _impl(x, backend).topp_threshold(x.contiguous(), p)


@topp_threshold_op.register_fake
def _(x, p, backend):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("dllm_sparse::colsparse_gemv", mutates_args=())
def colsparse_gemv_op(x: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor, backend: str) -> torch.Tensor:
    return _impl(x, backend).colsparse_gemv(x.contiguous(), weight_t, tau.contiguous())


@colsparse_gemv_op.register_fake
def _(x, weight_t, tau, backend):
    return x.new_empty(weight_t.shape[1])


@torch.library.custom_op("dllm_sparse::colsparse_gemm", mutates_args=())
def colsparse_gemm_op(
    x: torch.Tensor, weight_t: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, backend: str,
) -> torch.Tensor:
    return _impl(x, backend).colsparse_gemm(x.contiguous(), weight_t, idx.contiguous(), count)


@colsparse_gemm_op.register_fake
def _(x, weight_t, idx, count, backend):
    return x.new_empty(x.shape[0], weight_t.shape[1])


@torch.library.custom_op("dllm_sparse::rowsparse_matmul", mutates_args=())
def rowsparse_op(
    x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, backend: str,
) -> torch.Tensor:
    impl = _impl(x, backend)
    x, idx = x.contiguous(), idx.contiguous()
    if x.shape[0] == 1:
        return impl.rowsparse_gemv(x[0], weight, idx, count).unsqueeze(0)
    return impl.rowsparse_gemm(x, weight, idx, count)


@rowsparse_op.register_fake
def _(x, weight, idx, count, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------


def _check_weight(x: torch.Tensor, w: torch.Tensor, name: str, d_in: int, layout: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D {layout}, got shape {tuple(w.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but {name} {tuple(w.shape)} expects {d_in} ({layout})")
    if x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but {name} is {w.dtype}; cast one to the other (as nn.Linear requires)")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but {name} is on {w.device}; move them to one device")
    if w.stride(-1) != 1:
        raise ValueError(f"{name} must have contiguous rows (stride(-1) == 1); make it contiguous once at setup "
                         "(e.g. weight.t().contiguous()), not per call")


def topp_threshold(x: torch.Tensor, p: float, *, backend: str | None = None) -> torch.Tensor:
    """Per-row top-p threshold tau, shape [..., 1] float32: the row's keep-mask is ``~(|x| < tau) & (x != 0)``
    (so a NaN is kept), equal to :func:`dllm_sparse.top_p_mask_reference` (definitions:
    docs/sparsification.md). No full sort on GPU: 31 bisection steps on the float bit pattern, float64 mass sums."""
    p = float(p)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    d = x.shape[-1]
    x2 = x.detach().reshape(-1, d).contiguous()
    return topp_threshold_op(x2, p, backend or "auto").reshape(*x.shape[:-1], 1)


def kept_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool keep-mask [..., d] -> (idx int32 [d], count int32 [1]) of the union over rows, no host sync."""
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask, got {keep.dtype}")
    return torch_fallback.kept_indices(keep)


def union_density(keep: torch.Tensor) -> torch.Tensor:
    """Fraction of the d positions kept by at least one row of ``keep`` [..., d] (a 0-dim float32 tensor).

    This, not the per-token density, bounds the speedup of a shared-mask GEMM over several tokens."""
    d = keep.shape[-1]
    return keep.reshape(-1, d).any(dim=0).float().mean()


def _row_thresholds(threshold, M: int, x: torch.Tensor) -> torch.Tensor | None:
    if threshold is None:
        return None
    t = torch.as_tensor(threshold, device=x.device).float()
    if t.numel() == 1:
        return t.reshape(1).expand(M)
    if t.numel() != M:
        raise ValueError(f"threshold must be a scalar or hold one value per row ({M} rows, shape [..., 1]); "
                         f"got shape {tuple(t.shape)}")
    return t.reshape(M)


def column_sparse_matmul(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    *,
    threshold: torch.Tensor | float | None = None,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x_kept @ weight_t (+ bias), reading only the rows of ``weight_t`` that some token keeps.

    ``x`` [..., d_in]; ``weight_t`` [d_in, d_out] = W transposed (row i = column i of W), contiguous rows.
    An entry of x is kept when it is non-zero, is not below ``threshold`` (a scalar or [..., 1] per row,
    e.g. from :func:`topp_threshold`) and is inside ``keep`` (a bool mask broadcastable to x).
    One token runs the GEMV with the threshold fused; several tokens share the union of their kept sets
    and run a gathered GEMM. Returns [..., d_out] in x's dtype, accumulated in fp32.
    """
    _check_weight(x, weight_t, "weight_t", weight_t.shape[0] if weight_t.dim() == 2 else -1, "[d_in, d_out]")
    d_in, d_out = weight_t.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    M = x2.shape[0]
    if keep is not None:
        if keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool mask, got {keep.dtype}")
        x2 = x2.masked_fill(~torch.broadcast_to(keep, x.shape).reshape(M, d_in), 0)
    tau = _row_thresholds(threshold, M, x2)
    be = backend or "auto"
    if M == 0:
        y = x2.new_zeros(0, d_out)
    elif M == 1:
        t = tau if tau is not None else torch.zeros(1, device=x.device, dtype=torch.float32)
        y = colsparse_gemv_op(x2[0].contiguous(), weight_t, t.contiguous(), be).unsqueeze(0)
    else:
        if tau is not None:
            x2 = x2.masked_fill(x2.abs().float() < tau[:, None], 0)
        idx, count = torch_fallback.kept_indices(x2 != 0)
        y = colsparse_gemm_op(x2.contiguous(), weight_t, idx, count, be)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, d_out)


def row_sparse_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x @ weight.T for the kept output positions only; the others are exactly 0.

    ``x`` [..., d_in]; ``weight`` [d_out, d_in] (the nn.Linear layout: a kept output is one contiguous row);
    ``keep`` bool [d_out] or [..., d_out]; with several rows the union is computed for every token (exact
    when the result is multiplied by a vector that is zero outside each token's own mask, as in a GLU).
    """
    _check_weight(x, weight, "weight", weight.shape[1] if weight.dim() == 2 else -1, "[d_out, d_in]")
    d_out, d_in = weight.shape
    if keep.dtype != torch.bool or keep.shape[-1] != d_out:
        raise ValueError(f"keep must be a bool mask [..., {d_out}], got {keep.dtype} {tuple(keep.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in).contiguous()
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, d_out)
    idx, count = torch_fallback.kept_indices(keep)
    y = rowsparse_op(x2, weight, idx, count, backend or "auto")
    if bias is not None:
        union = keep.reshape(-1, d_out).any(dim=0)
        y = y + bias.masked_fill(~union, 0)
    return y.reshape(*lead, d_out)
