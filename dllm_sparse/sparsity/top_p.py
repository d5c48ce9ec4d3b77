"""Top-p selection: the keep-mask of the largest-magnitude entries holding a fraction p of each row's L1 mass.

The definition (``docs/sparsification.md``) is :func:`top_p_mask_reference` (a row sort and a float64 running
sum); the other functions compute the same masks faster: bisection on the threshold (no sort; the GPU path), a
mass histogram refined inside its boundary bucket, and the reference's own steps with NumPy's row sort (the CPU
paths). The rule objects that use them are in :mod:`dllm_sparse.sparsity.rules`; the compiled CPU kernel
(:mod:`dllm_sparse.sparsity.native`) checks itself against the reference here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "check_p",
    "keep_nan_rows",
    "top_p_threshold_reference",
    "top_p_mask_reference",
    "top_p_threshold",
    "top_p_mask",
    "top_p_mask_histogram",
    "top_p_mask_row_sort",
]


# --------------------------------------------------------------------------------------------------------
# top-p: reference (sort + cumulative sum in float64), bisection on the threshold (no sort; the GPU path) and
# a mass histogram refined inside its boundary bucket (the CPU path)
# --------------------------------------------------------------------------------------------------------


def check_p(p: float) -> float:
    """``p`` as a float in (0, 1], or a ValueError naming the range (NaN included)."""
    p = float(p)
    if not (0.0 < p <= 1.0) or math.isnan(p):
        raise ValueError(f"p must be in (0, 1], got {p}. Use p = 1 for the dense model (keeps every non-zero).")
    return p


def top_p_threshold_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """The definition, literally: sort |v| descending, find the smallest k whose running sum reaches
    p·||v||_1; tau = the k-th largest |v| (shape [..., 1], float64). Slow; it defines correctness."""
    a = x.detach().abs().to(torch.float64)
    sorted_a, _ = torch.sort(a, dim=-1, descending=True)
    csum = torch.cumsum(sorted_a, dim=-1)
    target = p * csum[..., -1:]
    # k - 1 = number of prefixes whose sum is still below the target.
    k_minus_1 = (csum < target).sum(dim=-1, keepdim=True).clamp(max=a.shape[-1] - 1)
    return torch.gather(sorted_a, -1, k_minus_1)


def top_p_mask_reference(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep every entry with |v| >= tau of :func:`top_p_threshold_reference` (ties kept), zeros never.
    Float64 throughout; it defines correctness for the fast path and the kernels."""
    p = check_p(p)
    a = x.detach().abs().to(torch.float64)
    if p >= 1.0:
        return a != 0
    return ~(a < top_p_threshold_reference(x, p)) & (a != 0)


_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}


def top_p_threshold(x: torch.Tensor, p: float, acc_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row top-p threshold tau (shape [..., 1], float32; float64 for float64 input) without sorting.

    Why this works: S(t) = sum of |v_i| >= t is non-increasing in t, and the spec's tau is exactly the
    largest t with S(t) >= p·||v||_1 (it is always an entry value). For non-negative floats the integer
    bit pattern is monotone in the value, so a bisection over bit patterns finds tau *exactly* in 31
    steps (63 for float64), each a compare and a masked row sum.
    ``acc_dtype``: dtype of the mass sums; float64 by default on CPU (matches the reference bit for bit up to
    summation order), float32 on GPUs (the spec's minimum).
    """
    p = check_p(p)
    a = x.detach().abs()
    search_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a = a.to(search_dtype)
    if acc_dtype is None:
        acc_dtype = torch.float64 if a.device.type == "cpu" else torch.float32
    int_dtype = _INT_VIEW[search_dtype]
    total = a.sum(dim=-1, keepdim=True, dtype=acc_dtype)
    target = total * p
    # Invariant: S(lo) >= target (lo = +0.0 always qualifies), S(hi) < target (above the max there is no mass).
    lo = torch.zeros_like(total, dtype=int_dtype)
    hi = a.amax(dim=-1, keepdim=True).view(int_dtype) + 1
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    for _ in range(64 if int_dtype == torch.int64 else 32):
        mid = lo + (hi - lo) // 2
        t = mid.view(search_dtype)
        ok = torch.where(a >= t, a, zero).sum(dim=-1, keepdim=True, dtype=acc_dtype) >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
        # The loop bound covers the full bit range; most rows converge well before it on real data.
    return lo.view(search_dtype)


def top_p_mask(x: torch.Tensor, p: float, acc_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fast top-p keep-mask (bisection threshold); equal to :func:`top_p_mask_reference`."""
    p = check_p(p)
    a = x.detach().abs()
    if p >= 1.0:
        return a != 0
    tau = top_p_threshold(x, p, acc_dtype)
    a = a.to(tau.dtype)
    return ~(a < tau) & (a != 0)


# Bits of the significand each input dtype carries (its values, upcast to float32, have no more).
_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_SUB_BUCKET_BITS = 5  # 2^5 buckets per octave: ~1-3 % of a row's entries share the boundary bucket
_F32_INF_BITS = 0x7F800000  # float32 bit pattern of +inf; NaN patterns are larger


def top_p_mask_histogram(x: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p keep-mask by a mass histogram, bit-identical to :func:`top_p_mask_reference` (NaN rows included:
    they keep every non-zero entry, as :meth:`SparsityRule.mask` defines). The CPU path of ``TopP``.

    How: bucket every |v| by its float32 exponent and top 5 mantissa bits (an integer shift of its bit pattern,
    which is monotone in the value), add the masses per bucket (one ``scatter_add_`` in float64), find the
    bucket where the running mass from the top reaches p·||v||_1, and sort only the entries of that bucket
    (about 1-3 % of a row; a ``topk`` of that many) to find tau inside it. A few passes over the data instead of a
    row sort.

    Why it equals the reference bit for bit: a row whose non-zero |v| all lie within ``52 - m - ceil(log2 d)``
    octaves of its maximum (m = significand bits of the input dtype: 23 for float32, 7 for bfloat16, 10 for
    float16) has every partial sum, in any order, exactly representable in float64 (all are integer multiples
    of the smallest value's last bit, below 2^53 of them). Then the reference's running sums, its total and so
    its target p·total are exact too, and both find the same tau. The masses below that range are collected in
    a last bucket: a row with any mass there (a huge dynamic range, e.g. float32 entries below 2^-18 of the
    row's maximum at d = 1536: 20-40 % of SmolLM2's fp32 intermediate rows, none in bf16), or with an
    infinity, is computed as the reference computes it (its steps, with a NumPy row sort). float64 input, or
    rows too long for any exact range, go to the reference whole.
    """
    p = check_p(p)
    if p >= 1.0 or x.numel() == 0:
        return x.detach() != 0  # |v| != 0 <=> v != 0 (NaN included)
    d = x.shape[-1]
    if x.dtype not in _MANTISSA_BITS:
        return keep_nan_rows(x, top_p_mask_reference(x, p))
    span = 52 - _MANTISSA_BITS[x.dtype] - math.ceil(math.log2(d))  # octaves below the max with exact sums
    if span < 0:
        return keep_nan_rows(x, top_p_mask_reference(x, p))
    # |v| as a float32 bit pattern: clearing the sign bit is abs() without a floating-point pass. For
    # non-negative floats integer order == value order (NaN above +inf).
    bits = x.detach().reshape(-1, d).float().view(torch.int32) & 0x7FFFFFFF
    k = _SUB_BUCKET_BITS
    n_exact = (span + 1) << k  # buckets 0..n_exact-1 cover the exact range; bucket n_exact holds what is below
    max_bits = bits.amax(dim=-1, keepdim=True)
    # Bucket 0 = the top sub-octave of the row maximum's octave; one bucket per 2^-k octave downwards. In
    # int32 and in place (values below 2^14), widened once for scatter_add_: no mixed int64 - int32 arithmetic
    # (a slow casting loop on CPU), and the comparisons below read 4 bytes an entry, not 8.
    top = (((max_bits >> 23) + 1) << k) - 1
    bucket = (bits >> (23 - k)).neg_().add_(top).clamp_(0, n_exact)
    a64 = bits.view(torch.float32).double()
    hist = torch.zeros(bits.shape[0], n_exact + 1, dtype=torch.float64, device=bits.device).scatter_add_(
        1, bucket.long(), a64)
    reach = hist.cumsum(dim=-1)  # mass of the buckets down to this one (exact in the exact range)
    total = reach[:, -1:].clone()
    nan_rows = max_bits > _F32_INF_BITS
    # Rows with mass below the exact range: the reference's total is its running sum in descending order, which
    # is exact down to the last exact bucket (reach[:, n_exact - 1]) and then adds the tail's entries one by
    # one, rounding each time. Replaying just that (a sort of the tail's few entries) gives its total bit for
    # bit; the boundary then lies in the exact range unless p reaches into the tail (checked below).
    tail_rows = ((hist[:, -1] > 0) & (max_bits.squeeze(-1) != _F32_INF_BITS) & ~nan_rows.squeeze(-1)).nonzero()
    tail_rows = tail_rows.squeeze(-1)
    if tail_rows.numel():
        total[tail_rows] = _tail_total(a64[tail_rows], bucket[tail_rows] == n_exact, reach[tail_rows, n_exact - 1])
    target = p * total  # the reference's target: p times the same total
    # The boundary bucket: the first with a running mass >= target, skipping empty leading buckets (target 0).
    boundary = ((reach < target) | (reach == 0)).sum(dim=-1, keepdim=True).clamp_(max=n_exact)
    above = reach.gather(1, boundary) - hist.gather(1, boundary)  # mass of the buckets above the boundary one
    # Left to the reference's own steps: rows with an infinity, and rows whose boundary falls in the tail.
    inexact = ((max_bits == _F32_INF_BITS) | ((boundary == n_exact) & (hist[:, -1:] > 0))) & ~nan_rows
    # The boundary bucket's entries (rows whose boundary is the tail bucket are settled by the reference).
    in_bucket = (bucket == boundary.int()) & (boundary < n_exact)
    tau = _tau_in_bucket(bits, in_bucket, above, target)
    # tau as a bit pattern: |v| >= tau <=> bits >= tau_bits. Bits 1 (the smallest subnormal) keeps every
    # non-zero entry, NaN included: what a NaN row and (vacuously) an all-zero row need.
    tau_bits = torch.where(nan_rows | (total == 0), torch.ones_like(max_bits), tau.float().view(torch.int32))
    keep = bits >= tau_bits
    rows = inexact.squeeze(-1).nonzero().squeeze(-1)
    if rows.numel():
        keep[rows] = _top_p_mask_sorted(x.reshape(-1, d)[rows], p)
    return keep.reshape(x.shape)


# The smallest positive value of each dtype (a subnormal): a threshold that keeps every non-zero entry.
_SMALLEST_POSITIVE = {torch.float32: float(np.nextafter(np.float32(0), np.float32(1))), torch.float64: math.ulp(0.0)}


def top_p_mask_row_sort(x: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p keep-mask by the reference's own steps, bit-identical to :func:`top_p_mask_reference` (NaN rows
    keep every non-zero entry, as :meth:`SparsityRule.mask` defines). The CPU path of ``TopP``.

    The row sort is NumPy's on float32 values, in place (vectorised; a float32 row sorts in about half the time
    of the same row in float64, and far faster than ``torch.sort``): fp32 / bf16 / fp16 values are exactly
    float32, and float32 -> float64 is exact and monotone, so the sorted row equals the reference's float64
    sorted row. The same ``torch.cumsum`` in float64 then gives the same running sums, target and tau, rounding
    included; the cut is found by a binary search (the running sums of |v| never decrease). float64 input sorts
    in float64; other devices run the reference. Inside ``torch.compile`` the sort is ``torch.sort`` (the same
    values) and nothing waits on a tensor's value, so the rule traces without a graph break."""
    p = check_p(p)
    if p >= 1.0 or x.numel() == 0:
        return x.detach() != 0  # |v| != 0 <=> v != 0 (NaN included)
    if x.device.type != "cpu":
        return keep_nan_rows(x, top_p_mask_reference(x, p))
    d = x.shape[-1]
    a = x.detach().reshape(-1, d).abs()
    if a.dtype != torch.float64:
        a = a.float()
    if torch.compiler.is_compiling():
        desc = torch.sort(a, dim=-1, descending=True).values  # traceable; the same values in the same order
    else:
        desc = a.neg()
        desc.numpy().sort(axis=-1)  # -|v| ascending, in place ...
        desc.neg_()  # ... = |v| descending
    csum = desc.cumsum(dim=-1, dtype=torch.float64)
    total = csum[:, -1:]
    # The reference's k - 1 = the number of running sums below the target (NaN rows are settled below).
    k_minus_1 = torch.searchsorted(csum, p * total).clamp_(max=d - 1)
    tau = desc.gather(1, k_minus_1)
    # One threshold per row, compared as "not |v| < tau" (a NaN entry is never below it), all in tensor ops, so
    # that torch.compile traces the rule without a graph break:
    # - tau > 0 unless the row is all zeros; there the smallest positive value keeps nothing (zeros never are);
    # - a row holding a NaN (its |v| sum to NaN) keeps every non-zero entry: the smallest positive value again.
    # With tau > 0, "not |v| < tau" is the reference's "not |v| < tau and v != 0".
    keep_all_nonzero = (tau <= 0) | total.isnan()
    tau = torch.where(keep_all_nonzero, _SMALLEST_POSITIVE[tau.dtype], tau)
    return (a < tau).logical_not_().reshape(x.shape)


def _top_p_mask_sorted(x: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`top_p_mask_reference` step for step, with the row sort done by NumPy (values only, ~20x faster
    than ``torch.sort`` on CPU). The sorted values are the same numbers (ties are equal values), and the same
    ``torch.cumsum`` runs over them, so the masks are the reference's bit for bit, rounding included."""
    a = x.detach().abs().to(torch.float64)
    if a.device.type != "cpu":
        return top_p_mask_reference(x, p)
    sorted_a = torch.from_numpy(np.sort(a.neg().numpy(), axis=-1)).neg_()
    csum = torch.cumsum(sorted_a, dim=-1)
    target = p * csum[..., -1:]
    k_minus_1 = (csum < target).sum(dim=-1, keepdim=True).clamp(max=a.shape[-1] - 1)
    return ~(a < torch.gather(sorted_a, -1, k_minus_1)) & (a != 0)


def _tail_total(a64: torch.Tensor, in_tail: torch.Tensor, exact_part: torch.Tensor) -> torch.Tensor:
    """Per row ([rows, 1]): ``exact_part`` followed by the row's ``in_tail`` entries in descending order, summed
    left to right in float64 (``torch.cumsum``, as the reference sums its sorted row)."""
    in_tail = in_tail & (a64 > 0)  # zeros add nothing
    rows, cols = in_tail.nonzero(as_tuple=True)
    counts = in_tail.sum(dim=-1)
    width = max(int(counts.max()), 1)
    starts = counts.cumsum(0) - counts
    seq = torch.zeros(a64.shape[0], width + 1, dtype=torch.float64, device=a64.device)
    seq[rows, 1 + torch.arange(rows.numel(), device=a64.device) - starts[rows]] = a64[rows, cols]
    tail = seq[:, 1:]
    if tail.device.type == "cpu":
        tail.copy_(torch.from_numpy(np.sort(tail.neg().numpy(), axis=-1)).neg_())
    else:
        tail.copy_(torch.sort(tail, dim=-1, descending=True).values)
    seq[:, 0] = exact_part
    return seq.cumsum(dim=-1)[:, -1:]


def _tau_in_bucket(bits: torch.Tensor, in_bucket: torch.Tensor, above: torch.Tensor,
                   target: torch.Tensor) -> torch.Tensor:
    """Per row: the largest entry c of the boundary bucket with above + (bucket mass >= c) >= target ([rows, 1],
    float64). ``bits``: the rows' |v| as float32 bit patterns."""
    width = max(int(in_bucket.sum(dim=-1).max()), 1)
    # The bucket's entries, largest first: a partial sort (topk) of the rows with every other entry zeroed.
    # The zeros sort last and add no mass, so they never become tau while the bucket's own mass reaches the
    # target; no gather of the bucket's scattered entries is needed.
    cand = torch.where(in_bucket, bits, 0).view(torch.float32)
    desc = torch.topk(cand, width, dim=-1, sorted=True).values.double()
    reach = desc.cumsum(dim=-1) + above
    j = (reach < target).sum(dim=-1, keepdim=True).clamp_(max=width - 1)
    return desc.gather(1, j)


def keep_nan_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows holding a NaN keep every non-zero entry, so the NaN propagates as in the dense model."""
    if x.is_floating_point():
        keep = keep | (torch.isnan(x).any(dim=-1, keepdim=True) & (x != 0))
    return keep
