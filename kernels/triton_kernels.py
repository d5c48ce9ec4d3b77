"""Triton kernels for sparse FFN matmuls, and their launchers.

Imported lazily, only when the Triton backend is chosen. To run these kernels on CPU tensors, Triton's
interpreter must be on from the start: set ``TRITON_INTERPRET=1`` before ``triton`` is imported (Triton 3.9
reads it when ``@triton.jit`` decorates a function, and ``tl.sum``/``tl.max`` are decorated at its import).

Layouts. Column-sparse kernels read ``weight_t`` = W transposed, [d_in, d_out]: each kept input entry i
reads one contiguous row of d_out values, so skipped entries cost no memory traffic. Row-sparse kernels
read W in its usual [d_out, d_in] layout, where a kept output row is also one contiguous row. Every kernel
accumulates in fp32 whatever the weight dtype (fp16, bf16, fp32).

The launchers take 2-D contiguous inputs and return fresh tensors; shape checks and the choice between
GEMV (one token) and GEMM (several tokens) live in :mod:`dllm_sparse.kernels.ops`. Every launch goes through
:func:`_launch`, so :func:`recording_launches` can list the exact specializations the launchers pick for given
shapes without running anything (the ahead-of-time compile check, experiments/kernels_aot.py).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

__all__ = ["topp_threshold", "colsparse_gemv", "colsparse_gemm", "rowsparse_gemv", "rowsparse_gemm", "TILES",
           "tile_config", "recording_launches"]


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# --------------------------------------------------------------------------------------------------------
# Launch plumbing: one place that runs (or, for the ahead-of-time check, records) every launch
# --------------------------------------------------------------------------------------------------------

_recording: dict | None = None  # set by recording_launches(): {"num_sms": int, "launches": list}


@contextmanager
def recording_launches(num_sms: int):
    """Inside, the launchers record their launches instead of running them, as if on a GPU with ``num_sms`` SMs.

    Call them with tensors on the ``meta`` device (shapes, strides and dtypes are all a launcher reads). Yields
    the list of launches, each a dict: kernel, grid, args (name -> value, in the kernel's order), num_warps."""
    global _recording
    if _recording is not None:
        raise RuntimeError("recording_launches() is already active; it does not nest")
    _recording = {"num_sms": int(num_sms), "launches": []}
    try:
        yield _recording["launches"]
    finally:
        _recording = None


def _launch(kernel, grid: tuple, num_warps: int, **args) -> None:
    if _recording is not None:
        _recording["launches"].append({"kernel": kernel, "grid": grid, "args": args, "num_warps": num_warps})
        return
    kernel[grid](**args, num_warps=num_warps)


def _num_sms(t: torch.Tensor) -> int:
    if _recording is not None:
        return _recording["num_sms"]
    if t.is_cuda:
        return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a handful of programs is enough to exercise the split-K and persistent paths


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda or _recording is not None


def _dot_fp32(x: torch.Tensor) -> bool:
    """Whether tl.dot runs on fp32 tiles in IEEE precision instead of the native dtype.

    fp32 weights: yes, so that no silent TF32 rounding creeps in compared with a dense fp32 matmul.
    bf16 under the interpreter: yes, because Triton 3.9's interpreter keeps bf16 tiles as raw uint16 bits
    (numpy has no bf16) and its tl.dot multiplies those bits as integers. On a GPU bf16/fp16 stay native
    (tensor cores).
    """
    return x.dtype == torch.float32 or (not _on_gpu(x) and x.dtype == torch.bfloat16)


# --------------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------------

# (kernel, weight class, M bin) -> block sizes and warps. A fixed table, no autotuning (tests and runs are
# reproducible, and nothing is timed at first call). Weight class "16" is fp16/bf16, "32" fp32; the M bins are
# the token counts the GEMMs tile by (tl.dot needs >= 16 per dimension). fp32 tiles are smaller: at BLOCK_M = 64 an
# IEEE fp32 tl.dot holds a 64 x 128 fp32 accumulator plus fp32 operand tiles and ran out of registers (255, spills).
# Every entry compiles for sm_80 and sm_90 with no spill at the 8B FFN shapes (experiments/kernels_aot.py; the
# registers and shared memory are tabulated in docs/kernels.md).
#
# Sparsity bins (TEAL's layout): a launcher given the expected kept fraction looks up (kernel, class, M bin,
# sparsity bin) first, bins at 0/25/50/70/90 % skipped (the benchmark's levels); a GPU sweep (kernel_bench.py) adds
# entries there. No entry is tuned yet, so every bin uses the default; the ops never pass a sparsity (it is on the
# device), so the default is what runs.
TILES: dict[tuple, dict] = {
    ("colsparse_gemv", "16", 1): dict(BLOCK_K=64, BLOCK_N=128, num_warps=4),
    ("colsparse_gemv", "32", 1): dict(BLOCK_K=32, BLOCK_N=128, num_warps=4),
    ("rowsparse_gemv", "16", 1): dict(BLOCK_R=8, BLOCK_K=1024, num_warps=4),
    ("rowsparse_gemv", "32", 1): dict(BLOCK_R=8, BLOCK_K=512, num_warps=4),
}
for _m in (16, 32, 64):
    TILES[("colsparse_gemm", "16", _m)] = dict(BLOCK_M=_m, BLOCK_N=128, BLOCK_K=32, num_warps=4)
    TILES[("colsparse_gemm", "32", _m)] = dict(BLOCK_M=min(_m, 32), BLOCK_N=64, BLOCK_K=32, num_warps=4)
    TILES[("rowsparse_gemm", "16", _m)] = dict(BLOCK_M=_m, BLOCK_R=64, BLOCK_K=32, num_warps=4)
    TILES[("rowsparse_gemm", "32", _m)] = dict(BLOCK_M=min(_m, 32), BLOCK_R=64, BLOCK_K=32, num_warps=4)
SPARSITY_BINS = (0.0, 0.25, 0.5, 0.7, 0.9)


def tile_config(kernel: str, dtype: torch.dtype, M: int, sparsity: float | None = None) -> dict:
    """The tile configuration of ``kernel`` for ``M`` tokens of ``dtype`` weights (a copy; see :data:`TILES`).

    ``sparsity``: the expected skipped fraction, if known; picks the entry of its bin (the largest bin <= it)
    when one exists, else the default."""
    wclass = "32" if dtype == torch.float32 else "16"
    m_bin = 1 if kernel.endswith("gemv") else _pow2(M, 16, 64)
    if sparsity is not None:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity}")
        s_bin = max(b for b in SPARSITY_BINS if b <= sparsity)
        if (kernel, wclass, m_bin, s_bin) in TILES:
            return dict(TILES[(kernel, wclass, m_bin, s_bin)])
    return dict(TILES[(kernel, wclass, m_bin)])


def _tiles(kernel: str, x: torch.Tensor, M: int, sparsity: float | None, **given) -> dict:
    """tile_config() with the caller's explicit block sizes (tests: small blocks) taking precedence."""
    cfg = tile_config(kernel, x.dtype, M, sparsity)
    cfg.update({k.upper(): v for k, v in given.items() if v is not None})
    return cfg


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
def _f32_bits_to_f64(bits):
    """The float64 value of the non-negative float32 whose bit pattern is ``bits`` (int32), built with integer
    operations and bitcasts only (no conversion instruction): the bisection's threshold, once per step."""
    b = bits.to(tl.int64)
    e = b >> 23
    m = b & 0x7FFFFF
    normal = (((e + 896) << 52) | (m << 29)).to(tl.float64, bitcast=True)  # exponent rebiased 127 -> 1023
    # A subnormal is m * 2^-149: (2^52 + m) - 2^52 is m exactly, times 2^-149 (a power of two: exact).
    two52 = tl.full([], 0x4330000000000000, tl.int64).to(tl.float64, bitcast=True)
    two_m149 = tl.full([], 0x36A0000000000000, tl.int64).to(tl.float64, bitcast=True)
    subnormal = ((m | 0x4330000000000000).to(tl.float64, bitcast=True) - two52) * two_m149
    return tl.where(e > 0, normal, subnormal)


@triton.jit
def _topp_threshold_kernel(x_ptr, tau_ptr, D, stride_x, p_hi, p_lo, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr):
    # tau = the largest t with S(t) = sum(|x_i| : |x_i| >= t) >= p * ||x||_1; it is always an entry value.
    # Non-negative floats order like their int32 bit patterns, so bisecting on bits finds tau exactly in
    # at most 31 steps. Mass sums run in float64 so that the mask matches the float64 sort-and-cumsum reference
    # up to summation order. ONE_TILE: the row fits one register tile (d <= 16384, every model here) and is
    # loaded and converted to float64 once, before the bisection; each step compares the float64 row with the
    # float64 value of the candidate threshold (exact: float32 -> float64 is), so a step converts nothing and holds
    # only the float64 copy in registers. Longer rows are re-read (from cache) and converted per step.
    row = tl.program_id(0)
    base = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    a = tl.abs(tl.load(base + offs, mask=offs < D, other=0.0).to(tl.float32))
    a64 = a.to(tl.float64)
    total = tl.sum(a64, axis=0)
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
        if ONE_TILE:
            s = tl.sum(tl.where(a64 >= _f32_bits_to_f64(mid), a64, 0.0), axis=0)
        else:
            s = _mass_at_least(base, D, mid.to(tl.float32, bitcast=True), BLOCK)
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
    _launch(_topp_threshold_kernel, (M,), num_warps, x_ptr=x, tau_ptr=tau, D=D, stride_x=x.stride(0), p_hi=p_hi,
            p_lo=p_lo, BLOCK=block, ONE_TILE=D <= block)
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
    # A 2-D accumulator, reduced over K once after the loop: a reduction inside the loop crosses warps through
    # shared memory (barriers in every iteration), and the barrier lets the compiler issue only a couple of the
    # tile's weight loads ahead of it; without it every load of an iteration is in flight at once.
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    k_begin = pid_s * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        offs_k = k_begin + k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        # "not below tau": a NaN entry (or the tau 0 of a row with a NaN) is kept, so NaN propagates as in the
        # dense model; out-of-range entries are loaded as 0: never kept.
        keep = (~(tl.abs(x) < tau)) & (x != 0.0)
        w = tl.load(wt_ptr + offs_k[:, None] * stride_wk + offs_n[None, :],
                    mask=keep[:, None] & n_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[:, None]
    tl.store(part_ptr + pid_s * N + offs_n, tl.sum(acc, axis=0), mask=n_ok)


def colsparse_gemv(
    x: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor,
    block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
    sparsity: float | None = None,
) -> torch.Tensor:
    """y[n] = sum over kept i of x[i] * weight_t[i, n]; kept: not |x[i]| < tau[0], and x[i] != 0 (NaN kept).

    x [d_in], weight_t [d_in, d_out] (row stride may exceed d_out), tau [1] float32 -> y [d_out], x.dtype.
    """
    K, N = weight_t.shape
    cfg = _tiles("colsparse_gemv", x, 1, sparsity, block_n=block_n, block_k=block_k)
    block_n, block_k = min(cfg["BLOCK_N"], _pow2(N, 16, 1 << 30)), min(cfg["BLOCK_K"], _pow2(K, 16, 1 << 30))
    n_blocks = triton.cdiv(N, block_n)
    if split_k is None:  # aim at ~4 programs per SM, each with at least a few K blocks to stream
        split_k = max(1, min(4 * _num_sms(x) // n_blocks, triton.cdiv(K, 4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    part = torch.empty(split_k, N, device=x.device, dtype=torch.float32)
    _launch(_colsparse_gemv_kernel, (n_blocks, split_k), cfg["num_warps"], x_ptr=x, wt_ptr=weight_t, tau_ptr=tau,
            part_ptr=part, K=K, N=N, stride_wk=weight_t.stride(0), K_PER_SPLIT=k_per_split, BLOCK_K=block_k,
            BLOCK_N=block_n)
    return part.sum(dim=0).to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# Shared-mask column-sparse GEMM (several tokens): gather the kept rows of weight_t, dense tl.dot over them
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _colsparse_gemm_kernel(
    x_ptr, wt_ptr, idx_ptr, count_ptr, out_ptr, M, N, stride_xm, stride_wk, stride_om, stride_os, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # The kept set (idx[:count], shared by all M rows) is read from device memory, so the launch needs no
    # host sync and can be captured in a CUDA graph. Rows outside a token's own mask hold x = 0 (exact).
    # Grid (M blocks, N blocks, K splits): split s takes its share of the kept rows' K blocks and writes fp32
    # partial sums to out[s] (added by the launcher: deterministic); with one split out is y itself.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    count = tl.load(count_ptr)
    per_split = tl.cdiv(tl.cdiv(count, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_s * per_split
    k_hi = tl.minimum(k_lo + per_split, count)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        rows = tl.load(idx_ptr + offs_k, mask=k_ok, other=0)
        xg = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)
        wg = tl.load(wt_ptr + rows[:, None] * stride_wk + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if DOT_FP32:  # see _dot_fp32()
            acc = tl.dot(xg.to(tl.float32), wg.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xg, wg, acc)
    tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def colsparse_gemm(
    x: torch.Tensor, weight_t: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
    block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
    split_k: int | None = None, sparsity: float | None = None,
) -> torch.Tensor:
    """y = x[:, idx[:count]] @ weight_t[idx[:count]]: x [M, d_in] (already zero outside each row's mask),
    idx int32 [>= count], count int32 [1] -> y [M, d_out] in x.dtype."""
    M = x.shape[0]
    K, N = weight_t.shape
    cfg = _tiles("colsparse_gemm", x, M, sparsity, block_m=block_m, block_n=block_n, block_k=block_k)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _pow2(N, 16, 1 << 30))
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    if split_k is None:
        # Split K only when the output tiles alone leave SMs idle (W_down at N = 4096: 32 tiles on 132 SMs), into
        # about one wave, each split keeping >= 4 K blocks of the largest possible kept set (d_in; the real count
        # is on the device).
        sms = _num_sms(x)
        split_k = 1 if tiles >= sms else max(1, min(sms // tiles, K // (4 * cfg["BLOCK_K"])))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split_k)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    out = y if split_k == 1 else torch.empty(split_k, M, N, device=x.device, dtype=torch.float32)
    _launch(_colsparse_gemm_kernel, grid, cfg.pop("num_warps"), x_ptr=x, wt_ptr=weight_t, idx_ptr=idx,
            count_ptr=count, out_ptr=out, M=M, N=N, stride_xm=x.stride(0), stride_wk=weight_t.stride(0),
            stride_om=out.stride(-2), stride_os=0 if split_k == 1 else out.stride(0), SPLIT_K=split_k,
            **cfg, DOT_FP32=_dot_fp32(x))
    return y if split_k == 1 else out.sum(dim=0).to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# Row-sparse GEMV / GEMM: compute only the kept output rows (gate/up when the intermediate mask is known)
# --------------------------------------------------------------------------------------------------------

# Grid sizing. The kept count is on the device (a fresh mask of this step's activations), so the host cannot size
# the grid to it without a sync, and no useful upper bound is known there. The kernels are persistent instead:
# min(row blocks of d_out, PROGRAMS_PER_SM x SMs) programs each take row blocks pid, pid + grid, ... below the kept
# count. Idle programs are thereby at most one small wave, whatever d_out, instead of the empty tail of a grid over
# all d_out rows (at 90 % sparsity 45 of 448 GEMV programs used to do the work). Small row blocks (8 rows in the
# GEMV) spread even a 10 % kept set of an 8B FFN (1434 rows: 180 blocks) over more than the SMs of an H100 (132).
PROGRAMS_PER_SM = 2


@triton.jit
def _rowsparse_gemv_kernel(
    x_ptr, w_ptr, idx_ptr, count_ptr, y_ptr, K, stride_wn, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    count = tl.load(count_ptr)
    for blk in range(tl.program_id(0), tl.cdiv(count, BLOCK_R), tl.num_programs(0)):
        offs_r = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < count
        rows = tl.load(idx_ptr + offs_r, mask=r_ok, other=0)
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)  # reduced once after the K loop (see the GEMV above)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=r_ok)


@triton.jit
def _rowsparse_gemm_kernel(
    x_ptr, w_ptr, idx_ptr, count_ptr, y_ptr, M, K, stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(1)
    count = tl.load(count_ptr)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    for blk in range(tl.program_id(0), tl.cdiv(count, BLOCK_R), tl.num_programs(0)):
        offs_r = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < count
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


def _persistent_programs(row_blocks: int, t: torch.Tensor, programs: int | None, per_column: int = 1) -> int:
    if programs is None:
        programs = max(1, PROGRAMS_PER_SM * _num_sms(t) // per_column)
    return max(1, min(row_blocks, programs))


def rowsparse_gemv(
    x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
    block_r: int | None = None, block_k: int | None = None, programs: int | None = None,
    sparsity: float | None = None,
) -> torch.Tensor:
    """y[j] = weight[j] · x for j in idx[:count], 0 elsewhere. x [d_in], weight [d_out, d_in] -> y [d_out].
    ``programs`` (tests): the persistent grid's size."""
    N, K = weight.shape
    cfg = _tiles("rowsparse_gemv", x, 1, sparsity, block_r=block_r, block_k=block_k)
    block_k = min(cfg["BLOCK_K"], _pow2(K, 16, 1 << 30))
    y = torch.zeros(N, device=x.device, dtype=x.dtype)
    grid = (_persistent_programs(triton.cdiv(N, cfg["BLOCK_R"]), x, programs),)
    _launch(_rowsparse_gemv_kernel, grid, cfg["num_warps"], x_ptr=x, w_ptr=weight, idx_ptr=idx, count_ptr=count,
            y_ptr=y, K=K, stride_wn=weight.stride(0), BLOCK_R=cfg["BLOCK_R"], BLOCK_K=block_k)
    return y


def rowsparse_gemm(
    x: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
    block_m: int | None = None, block_r: int | None = None, block_k: int | None = None,
    programs: int | None = None, sparsity: float | None = None,
) -> torch.Tensor:
    """y[:, j] = x @ weight[j] for j in idx[:count], 0 elsewhere. x [M, d_in] -> y [M, d_out].
    ``programs`` (tests): the persistent grid's size along the rows."""
    M = x.shape[0]
    N, K = weight.shape
    cfg = _tiles("rowsparse_gemm", x, M, sparsity, block_m=block_m, block_r=block_r, block_k=block_k)
    cfg["BLOCK_R"] = min(cfg["BLOCK_R"], _pow2(N, 16, 1 << 30))
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    y = torch.zeros(M, N, device=x.device, dtype=x.dtype)
    grid = (_persistent_programs(triton.cdiv(N, cfg["BLOCK_R"]), x, programs, m_blocks), m_blocks)
    _launch(_rowsparse_gemm_kernel, grid, cfg.pop("num_warps"), x_ptr=x, w_ptr=weight, idx_ptr=idx, count_ptr=count,
            y_ptr=y, M=M, K=K, stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_ym=y.stride(0), **cfg,
            DOT_FP32=_dot_fp32(x))
    return y
