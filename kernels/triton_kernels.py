"""Triton kernels for sparse FFN matmuls, and their launchers.

Imported lazily, only when the Triton backend is chosen. To run these kernels on CPU tensors, Triton's
interpreter must be on from the start: set ``TRITON_INTERPRET=1`` before ``triton`` is imported (Triton 3.9
reads it when ``@triton.jit`` decorates a function, and ``tl.sum``/``tl.max`` are decorated at its import).

Layouts. Column-sparse kernels read ``weight_t`` = W transposed, [d_in, d_out]: each kept input entry i
reads one contiguous row of d_out values, so skipped entries cost no memory traffic. Row-sparse kernels
read W in its usual [d_out, d_in] layout, where a kept output row is also one contiguous row. Every kernel
accumulates in fp32 whatever the weight dtype (fp16, bf16, fp32).

The launchers take 2-D contiguous inputs and return fresh tensors; shape checks and the choice between
GEMV (one token) and GEMM (several tokens) live in :mod:`dllm_sparse.kernels.ops`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["topp_threshold", "colsparse_gemv", "colsparse_gemm", "rowsparse_gemv", "rowsparse_gemm"]


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _num_sms(t: torch.Tensor) -> int:
    if t.is_cuda:
        return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a handful of programs is enough to exercise the split-K path


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _dot_fp32(x: torch.Tensor) -> bool:
    """Whether tl.dot runs on fp32 tiles in IEEE precision instead of the native dtype.

    fp32 weights: yes, so that no silent TF32 rounding creeps in compared with a dense fp32 matmul.
    bf16 under the interpreter: yes, because Triton 3.9's interpreter keeps bf16 tiles as raw uint16 bits
    (numpy has no bf16) and its tl.dot multiplies those bits as integers. On a GPU bf16/fp16 stay native
    (tensor cores).
    """
    return x.dtype == torch.float32 or (not x.is_cuda and x.dtype == torch.bfloat16)


# --------------------------------------------------------------------------------------------------------
# top-p threshold: bisection on float bit patterns, one program per row
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _mass_at_least(base, D, t, BLOCK: tl.constexpr):
    """S(t) = sum of |x_i| >= t over a row too long for one register tile (float64)."""
    s = tl.zeros([], dtype=tl.float64)
    for start in range(0, D, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        a = tl.abs(tl.load(base + offs, mask=offs < D, other=0.0).to(tl.float32))
        s += tl.sum(tl.where(a >= t, a, 0.0).to(tl.float64), axis=0)
    return s


@triton.jit
def _topp_threshold_kernel(x_ptr, tau_ptr, D, stride_x, p_hi, p_lo, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr):
    # tau = the largest t with S(t) = sum(|x_i| : |x_i| >= t) >= p * ||x||_1; it is always an entry value.
    # Non-negative floats order like their int32 bit patterns, so bisecting on bits finds tau exactly in
    # at most 31 steps. Mass sums run in float64 (cheap: d values per step) so that the mask matches the
    # float64 sort-and-cumsum reference up to summation order. ONE_TILE: the row fits one register tile
    # (d <= 16384, every model here) and is loaded once; longer rows are re-read per step (from cache).
    row = tl.program_id(0)
    base = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    a = tl.abs(tl.load(base + offs, mask=offs < D, other=0.0).to(tl.float32))
    total = tl.sum(a.to(tl.float64), axis=0)
    amax = tl.max(a, axis=0)
    if not ONE_TILE:
        for start in range(BLOCK, D, BLOCK):
            offs_c = start + offs
            a_c = tl.abs(tl.load(base + offs_c, mask=offs_c < D, other=0.0).to(tl.float32))
            total += tl.sum(a_c.to(tl.float64), axis=0)
            amax = tl.maximum(amax, tl.max(a_c, axis=0))
    # Triton passes Python floats as fp32: p arrives split in two fp32 halves, recombined in float64
    # (float64 * fp32 promotes to float64).
    target = total * p_hi + total * p_lo
    lo = tl.zeros([], dtype=tl.int32)  # S(+0.0) = total >= target always
    hi = amax.to(tl.int32, bitcast=True) + 1  # above the max there is no mass: S < target (or target = 0)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        t = mid.to(tl.float32, bitcast=True)
        if ONE_TILE:
            s = tl.sum(tl.where(a >= t, a, 0.0).to(tl.float64), axis=0)
        else:
            s = _mass_at_least(base, D, t, BLOCK)
        ok = s >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    tl.store(tau_ptr + row, lo.to(tl.float32, bitcast=True))


def topp_threshold(x: torch.Tensor, p: float, block: int | None = None) -> torch.Tensor:
    """x [M, d] -> tau [M] float32 (keep: not |x| < tau, and x != 0). p >= 1 gives tau = 0.
    ``block`` (tests): tile length; rows longer than it take the chunked path."""
    M, D = x.shape
    tau = torch.zeros(M, device=x.device, dtype=torch.float32)
    if p >= 1.0 or M == 0 or D == 0:
        return tau
    p_hi = float(torch.tensor(p, dtype=torch.float32))
    p_lo = float(p - p_hi)
    block = block or _pow2(D, 16, 16384)
    # A whole row lives in registers: spread long rows over more warps (16 warps: 32 values per thread at 16384).
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    _topp_threshold_kernel[(M,)](x, tau, D, x.stride(0), p_hi, p_lo, BLOCK=block, ONE_TILE=D <= block,
                                 num_warps=num_warps)
    return tau


# --------------------------------------------------------------------------------------------------------
# Column-sparse GEMV (one token): the threshold mask is fused, skipped rows of weight_t issue no loads
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _colsparse_gemv_kernel(
    x_ptr, wt_ptr, tau_ptr, part_ptr, K, N, stride_wk, K_PER_SPLIT,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Grid (output blocks, K splits). Split-K keeps every SM busy when d_out alone gives too few programs;
    # partial sums go to part[split, n] and are added afterwards (deterministic, unlike atomics).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    tau = tl.load(tau_ptr)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = pid_s * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        offs_k = k_begin + k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        # "not below tau": a NaN entry (or the tau 0 of a row with a NaN) is kept, so NaN propagates as in the
        # dense model; out-of-range entries are loaded as 0: never kept.
        keep = (~(tl.abs(x) < tau)) & (x != 0.0)
        w = tl.load(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                    mask=keep[:, None] & n_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[:, None], axis=0)
    tl.store(part_ptr + pid_s * N + offs_n, acc, mask=n_ok)


def colsparse_gemv(
    x: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor,
    block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
) -> torch.Tensor:
    """y[n] = sum over kept i of x[i] * weight_t[i, n]; kept: not |x[i]| < tau[0], and x[i] != 0 (NaN kept).

    x [d_in], weight_t [d_in, d_out] (row stride may exceed d_out), tau [1] float32 -> y [d_out], x.dtype.
    """
    K, N = weight_t.shape
    block_n = block_n or _pow2(N, 16, 128)
    block_k = block_k or _pow2(K, 16, 64)
    n_blocks = triton.cdiv(N, block_n)
    if split_k is None:  # aim at ~4 programs per SM, each with at least a few K blocks to stream
        split_k = max(1, min(4 * _num_sms(x) // n_blocks, triton.cdiv(K, 4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    part = torch.empty(split_k, N, device=x.device, dtype=torch.float32)
    _colsparse_gemv_kernel[(n_blocks, split_k)](
        x, weight_t, tau, part, K, N, weight_t.stride(0), k_per_split, BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return part.sum(dim=0).to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# Shared-mask column-sparse GEMM (several tokens): gather the kept rows of weight_t, dense tl.dot over them
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _colsparse_gemm_kernel(
    x_ptr, wt_ptr, idx_ptr, count_ptr, y_ptr, M, N, stride_xm, stride_wk, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # The kept set (idx[:count], shared by all M rows) is read from device memory, so the launch needs no
    # host sync and can be captured in a CUDA graph. Rows outside a token's own mask hold x = 0 (exact).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    count = tl.load(count_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, count, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < count
        rows = tl.load(idx_ptr + offs_k, mask=k_ok, other=0)
        xg = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)
        wg = tl.load(wt_ptr + rows[:, None] * stride_wk + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if DOT_FP32:  # see _dot_fp32()
            acc = tl.dot(xg.to(tl.float32), wg.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xg, wg, acc)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def colsparse_gemm(
    x: torch.Tensor, weight_t: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
    block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
) -> torch.Tensor:
    """y = x[:, idx[:count]] @ weight_t[idx[:count]]: x [M, d_in] (already zero outside each row's mask),
    idx int32 [>= count], count int32 [1] -> y [M, d_out] in x.dtype."""
    M = x.shape[0]
    N = weight_t.shape[1]
    block_m = block_m or _pow2(M, 16, 64)  # tl.dot needs >= 16 per dimension
    block_n = block_n or _pow2(N, 16, 128)
    block_k = block_k or 32
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _colsparse_gemm_kernel[grid](
        x, weight_t, idx, count, y, M, N, x.stride(0), weight_t.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=_dot_fp32(x),
    )
    return y


# --------------------------------------------------------------------------------------------------------
# Row-sparse GEMV / GEMM: compute only the kept output rows (gate/up when the intermediate mask is known)
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _rowsparse_gemv_kernel(
    x_ptr, w_ptr, idx_ptr, count_ptr, y_ptr, K, stride_wn, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The grid covers every possible output row; programs past the kept count do nothing, so the grid
    # does not depend on the mask (no host sync, CUDA-graph friendly).
    pid = tl.program_id(0)
    count = tl.load(count_ptr)
    if pid * BLOCK_R < count:
        offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < count
        rows = tl.load(idx_ptr + offs_r, mask=r_ok, other=0)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _rowsparse_gemm_kernel(
    x_ptr, w_ptr, idx_ptr, count_ptr, y_ptr, M, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_r * BLOCK_R < count:
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = offs_r < count
        m_ok = offs_m < M
        rows = tl.load(idx_ptr + offs_r, mask=r_ok, other=0)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            wb = tl.load(w_ptr + rows[None, :] * stride_wn + offs_k[:, None], mask=r_ok[None, :] & k_ok[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_R]: W[rows, k] transposed on load
            if DOT_FP32:  # see _dot_fp32()
                acc = tl.dot(xb.to(tl.float32), wb.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xb, wb, acc)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + rows[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & r_ok[None, :])


def rowsparse_gemv(
    x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
    block_r: int | None = None, block_k: int | None = None,
) -> torch.Tensor:
    """y[j] = weight[j] · x for j in idx[:count], 0 elsewhere. x [d_in], weight [d_out, d_in] -> y [d_out]."""
    N, K = weight.shape
    block_r = block_r or _pow2(N, 16, 32)
    block_k = block_k or _pow2(K, 16, 256)
    y = torch.zeros(N, device=x.device, dtype=x.dtype)
    _rowsparse_gemv_kernel[(triton.cdiv(N, block_r),)](
        x, weight, idx, count, y, K, weight.stride(0), BLOCK_R=block_r, BLOCK_K=block_k,
    )
    return y


def rowsparse_gemm(
    x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
    block_m: int | None = None, block_r: int | None = None, block_k: int | None = None,
) -> torch.Tensor:
    """y[:, j] = x @ weight[j] for j in idx[:count], 0 elsewhere. x [M, d_in] -> y [M, d_out]."""
    M = x.shape[0]
    N, K = weight.shape
    block_m = block_m or _pow2(M, 16, 64)
    block_r = block_r or _pow2(N, 16, 64)
    block_k = block_k or 32
    y = torch.zeros(M, N, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, block_r), triton.cdiv(M, block_m))
    _rowsparse_gemm_kernel[grid](
        x, weight, idx, count, y, M, K, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, DOT_FP32=_dot_fp32(x),
    )
    return y
