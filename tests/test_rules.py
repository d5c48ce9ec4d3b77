"""Sparsification rules (dllm_sparse/sparsity/rules.py, top_p.py) against independent references written here.

The brute-force references are plain Python loops over exact values (definitions: docs/sparsification.md, "Rules"); the
fast top-p path (bisection on the threshold) is compared with the sort reference on many distributions,
allowing a disagreement only where the exact answer hinges on a rounding of the mass sums.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from dllm_sparse import (
    MaxP,
    TopK,
    TopP,
    make_rule,
    top_p_mask,
    top_p_mask_histogram,
    top_p_mask_reference,
    top_p_mask_row_sort,
    top_p_threshold,
)
from dllm_sparse.sparsity import top_p as top_p_module
from dllm_sparse.sparsity.rules import SparsityRule
from dllm_sparse.sparsity.top_p import keep_nan_rows

# --------------------------------------------------------------------------------------------------------------
# Brute-force references (exact rational arithmetic, python loops)
# --------------------------------------------------------------------------------------------------------------


def brute_top_p(v, p) -> list[bool]:
    """The spec, literally, in exact arithmetic: sort |v| descending, smallest k whose running sum reaches
    p * ||v||_1, tau = k-th largest, keep |v_i| >= tau; p = 1 keeps the non-zeros; all-zero stays zero."""
    a = [Fraction(abs(float(x))) for x in v]
    total = sum(a)
    if total == 0:
        return [False] * len(a)
    if p == 1:
        return [x > 0 for x in a]
    target = Fraction(str(p)) * total  # the decimal p the caller meant
    running = Fraction(0)
    for val in sorted(a, reverse=True):
        running += val
        if running >= target:
            tau = val
            break
    return [x >= tau and x > 0 for x in a]


def brute_top_k(v, k: int) -> list[bool]:
    """k largest |v_i| (values assumed distinct), zeros never kept."""
    a = [abs(float(x)) for x in v]
    order = sorted(range(len(a)), key=lambda i: -a[i])[:k]
    return [i in order and a[i] > 0 for i in range(len(a))]


def brute_max_p(v, p) -> list[bool]:
    a = [Fraction(abs(float(x))) for x in v]
    m = max(a)
    return [x >= Fraction(str(p)) * m and x > 0 for x in a]


def native_methods() -> tuple[str, ...]:
    """("native",) where the compiled kernel builds here (its own tests say why when it does not)."""
    from dllm_sparse.sparsity import native

    return ("native",) if native.available() else ()


def as_list(mask: torch.Tensor) -> list[bool]:
    return [bool(b) for b in mask.tolist()]


# --------------------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------------------

KNOWN_TOP_P = [
    # (vector, p, expected keep-mask)
    ([3.0, -1.0, 1.0, 0.0], 0.5, [True, False, False, False]),  # 3 alone holds 60 % >= 50 %
    ([3.0, -1.0, 1.0, 0.0], 0.6, [True, False, False, False]),  # exactly reaching the target is enough
    ([3.0, -1.0, 1.0, 0.0], 0.7, [True, True, True, False]),  # tau = 1: both tied entries kept
    ([3.0, -1.0, 1.0, 0.0], 1.0, [True, True, True, False]),  # p = 1 keeps every non-zero
    ([4.0, 3.0, 2.0, 1.0], 0.7, [True, True, False, False]),  # running sums 4, 7 -> 7 >= 7
    ([4.0, 3.0, 2.0, 1.0], 0.71, [True, True, True, False]),
    ([4.0, 3.0, 2.0, 1.0], 0.01, [True, False, False, False]),  # the largest entry is always kept
    ([1.0, -1.0, 1.0, -1.0], 0.1, [True, True, True, True]),  # all tied at tau
    ([0.0, 0.0, 0.0], 0.5, [False, False, False]),  # all-zero row stays zero
    ([0.0, 0.0, 0.0], 1.0, [False, False, False]),
    ([0.0, -2.0, 0.0, 0.0], 0.3, [False, True, False, False]),
    ([-5.0, 2.0, 2.0, 1.0], 0.8, [True, True, True, False]),  # 5, 7 < 8, 9 >= 8 -> tau 2 (both 2s)
]


@pytest.mark.parametrize("v,p,expected", KNOWN_TOP_P)
def test_top_p_known_vectors(v, p, expected):
    assert brute_top_p(v, p) == expected  # the test's own reference agrees with the hand-worked answer
    x = torch.tensor(v, dtype=torch.float32)
    assert as_list(top_p_mask_reference(x, p)) == expected
    assert as_list(top_p_mask(x, p)) == expected
    assert as_list(top_p_mask_histogram(x, p)) == expected
    for method in ("sort", "bisect", "auto", "histogram", "row_sort", *native_methods()):
        assert as_list(TopP(p, method=method).mask(x)) == expected, method


def test_top_p_threshold_known():
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-5.0, 2.0, 2.0, 1.0]])
    tau = top_p_threshold(x, 0.7)
    assert tau.shape == (3, 1)
    assert tau.flatten().tolist() == [3.0, 0.0, 2.0]
    assert top_p_threshold(x.double(), 0.7).dtype == torch.float64


def test_measured_sparsity_known_vectors():
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0], [3.0, -1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = TopP(0.7)(x)
    sparsity = (out == 0).double().mean(dim=-1).tolist()
    assert sparsity == [0.5, 0.25, 1.0]
    out = TopK(0.5)(torch.tensor([4.0, -3.0, 2.0, 1.0, 0.5, -0.25, 7.0, 6.0]))
    assert (out == 0).double().mean().item() == 0.5
    out = MaxP(0.5)(torch.tensor([4.0, -3.0, 2.0, 1.0]))
    assert out.tolist() == [4.0, -3.0, 2.0, 0.0]
    assert (out == 0).double().mean().item() == 0.25


def _dyadic_rows(n_rows: int, d: int, seed: int) -> torch.Tensor:
    """Random rows whose float64 sums are exact (multiples of 1/8 below 2^40), with ties and zeros."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-40, 41, (n_rows, d), generator=g).double() / 8


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.5, 0.77, 0.9, 0.99, 0.999, 1.0])
def test_top_p_matches_brute_force_exactly(p):
    x = _dyadic_rows(24, 13, seed=int(p * 1000))
    x[0] = 0  # an all-zero row
    expected = [brute_top_p(row, p) for row in x.tolist()]
    for got in (top_p_mask_reference(x, p), top_p_mask(x, p), top_p_mask(x.float(), p),
                top_p_mask(x.float(), p, acc_dtype=torch.float32), TopP(p, method="bisect").mask(x)):
        assert [as_list(r) for r in got] == expected


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 1.0])
def test_max_p_matches_brute_force(p):
    x = _dyadic_rows(16, 11, seed=7)
    x[3] = 0
    expected = [brute_max_p(row, p) if any(row) else [False] * 11 for row in x.tolist()]
    assert [as_list(r) for r in MaxP(p).mask(x)] == expected
    # the largest entry is always kept (on non-zero rows)
    keep = MaxP(p).mask(x)
    rows = x.abs().amax(-1) > 0
    assert keep[rows].gather(-1, x[rows].abs().argmax(-1, keepdim=True)).all()


def test_max_p_float64_keeps_its_precision():
    x = torch.tensor([1.0, 1.0 - 2**-40, 0.5], dtype=torch.float64)  # equal once rounded to float32
    assert as_list(MaxP(1.0).mask(x)) == [True, False, False]
    assert as_list(MaxP(1.0).mask(x.float())) == [True, True, False]  # float32 input: they are equal


# --------------------------------------------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s_str", ["0", "0.1", "0.25", "0.3", "0.41", "0.5", "0.57", "0.7", "0.9", "0.95", "0.99"])
@pytest.mark.parametrize("d", [1, 7, 10, 50, 64, 100])
def test_top_k_keeps_exactly_ceil(s_str, d):
    s = float(s_str)
    k = math.ceil((1 - Fraction(s_str)) * d)  # exact decimal arithmetic: the spec's k
    g = torch.Generator().manual_seed(d)
    x = (torch.randperm(d, generator=g).double() + 1) * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    keep = TopK(s).mask(x)
    assert int(keep.sum()) == k
    assert as_list(keep) == brute_top_k(x.tolist(), k)
    # batched rows and the measured sparsity follow
    xb = torch.stack([x, -x.flip(0)])
    out = TopK(s)(xb)
    assert ((out != 0).sum(-1) == k).all()
    assert TopK(s).is_identity == (s == 0.0)


def test_top_k_never_keeps_zeros():
    x = torch.tensor([0.0, 0.0, 3.0, 0.0, -1.0])
    assert as_list(TopK(0.2).mask(x)) == [False, False, True, False, True]


# --------------------------------------------------------------------------------------------------------------
# fast top-p (bisection) vs the sort reference, on many distributions
# --------------------------------------------------------------------------------------------------------------

P_GRID = [0.01, 0.1, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999, 1.0]


def _distributions() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, d = 48, 384
    normal = torch.randn(n, d, generator=g)
    u = torch.rand(n, d, generator=g, dtype=torch.float64)
    cauchy = torch.tan(math.pi * (u - 0.5)).float()
    ties = torch.randint(-3, 4, (n, d), generator=g).float()
    sparse = torch.randn(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.1)
    sparse[0] = 0  # an all-zero row
    return {
        "normal": normal,
        "cubed_normal": torch.randn(n, d, generator=g) ** 3,
        "cauchy": cauchy,
        "lognormal": torch.exp(2.5 * torch.randn(n, d, generator=g)) * torch.randn(n, d, generator=g).sign(),
        "ties": ties,
        "sparse": sparse,
        "bf16_normal": torch.randn(n, d, generator=g).bfloat16(),
        "bf16_lognormal": torch.exp(2 * torch.randn(n, d, generator=g)).bfloat16(),
        "fp16_cubed": (torch.randn(n, d, generator=g) ** 3).half(),
        "fp16_ties": torch.randint(-2, 3, (n, d), generator=g).half(),
        "float64_normal": torch.randn(n, d, generator=g, dtype=torch.float64),
        "small_d": torch.randn(n, 5, generator=g),
    }


DISTRIBUTIONS = _distributions()


def mass_strictly_above(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every entry i: B_i = sum of |v_j| with |v_j| > |v_i| (float64), and the row's L1 norm.

    In exact arithmetic top-p keeps a non-zero entry iff B_i < p * ||v||_1 (tau is the largest t whose
    tail mass S(t) reaches the target; |v_i| >= tau iff the mass strictly above |v_i| is below it), so two
    correct implementations may only disagree where B_i sits on the target up to rounding.
    """
    a = x.abs().double()
    asc, _ = torch.sort(a, dim=-1)
    prefix = torch.cumsum(asc, dim=-1)
    total = prefix[..., -1:]
    upto = torch.searchsorted(asc, a.contiguous(), right=True)  # number of entries <= |v_i|
    at_or_below = torch.gather(prefix, -1, (upto - 1).clamp(min=0))
    return (total - at_or_below).clamp(min=0), total


def assert_same_top_p(x: torch.Tensor, got: torch.Tensor, p: float, rtol: float = 1e-6) -> None:
    ref = top_p_mask_reference(x, p)
    assert got.shape == x.shape and got.dtype == torch.bool
    diff = got != ref
    if not diff.any():
        return
    above, total = mass_strictly_above(x)
    target = (p * total).expand_as(above)
    borderline = (above - target).abs() <= rtol * target
    bad = diff & ~borderline
    assert not bad.any(), (
        f"{int(bad.sum())} disagreements away from the rounding boundary (p={p}); first rows "
        f"{bad.any(-1).nonzero().flatten()[:5].tolist()}"
    )
    assert int(diff.sum()) <= max(2, diff.numel() // 1000)  # borderline flips stay rare


def test_reference_matches_brute_force_on_random_rows():
    x = DISTRIBUTIONS["cubed_normal"][:8, :40].double()
    for p in (0.3, 0.9, 0.99):
        above, total = mass_strictly_above(x)
        exact = [brute_top_p(row, p) for row in x.tolist()]
        ref = top_p_mask_reference(x, p)
        # identical except where the exact answer sits on a float64 rounding boundary
        borderline = (above - p * total).abs() <= 1e-12 * total
        for r in range(x.shape[0]):
            for i in range(x.shape[1]):
                assert bool(ref[r, i]) == exact[r][i] or bool(borderline[r, i])


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_bisect_matches_sort_reference(name):
    x = DISTRIBUTIONS[name]
    for p in P_GRID:
        got = top_p_mask(x, p)
        assert_same_top_p(x, got, p)
        if p == 1.0:
            assert torch.equal(got, x != 0)
        # at least p of the mass is kept (up to float64 rounding)
        a = x.abs().double()
        kept = (a * got).sum(-1)
        assert (kept >= p * a.sum(-1) * (1 - 1e-9)).all()


@pytest.mark.parametrize("name", ["normal", "cauchy", "lognormal", "ties", "bf16_lognormal", "fp16_cubed"])
def test_bisect_float32_accumulation(name):
    x = DISTRIBUTIONS[name]
    for p in P_GRID:
        assert_same_top_p(x, top_p_mask(x, p, acc_dtype=torch.float32), p)


@pytest.mark.parametrize("name", ["normal", "cauchy", "ties", "bf16_normal"])
def test_methods_agree(name):
    x = DISTRIBUTIONS[name]
    for p in (0.01, 0.5, 0.9, 0.99):
        sort_mask = TopP(p, method="sort").mask(x)
        assert torch.equal(sort_mask, top_p_mask_reference(x, p))
        assert torch.equal(TopP(p, method="auto").mask(x), sort_mask)  # auto = native (or the row sort) on CPU
        assert torch.equal(TopP(p, method="row_sort").mask(x), sort_mask)
        for method in native_methods():
            assert torch.equal(TopP(p, method=method).mask(x), sort_mask)
        assert torch.equal(TopP(p, method="histogram").mask(x), sort_mask)
        assert_same_top_p(x, TopP(p, method="bisect").mask(x), p)


def test_batched_shapes_are_per_row():
    x = DISTRIBUTIONS["normal"][:12].reshape(2, 3, 2, -1)
    for rule in (TopP(0.9), TopP(0.9, method="bisect"), TopK(0.6), MaxP(0.3)):
        batched = rule.mask(x)
        rowwise = torch.stack([rule.mask(r) for r in x.reshape(12, -1)]).reshape(x.shape)
        assert torch.equal(batched, rowwise)


# --------------------------------------------------------------------------------------------------------------
# scope="sequence"
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule_cls,threshold", [(TopP, 0.9), (TopP, 0.5), (TopK, 0.7), (MaxP, 0.2)])
def test_sequence_scope_equals_flattened_row(rule_cls, threshold):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, generator=g) * torch.linspace(0.1, 3, 5)[:, None]  # tokens of unequal size
    seq = rule_cls(threshold, scope="sequence")
    keep = seq.mask(x)
    flat = rule_cls(threshold).mask(x.reshape(3, 5 * 16)).reshape(x.shape)
    assert torch.equal(keep, flat)
    assert not torch.equal(keep, rule_cls(threshold).mask(x))  # the scope matters on these inputs
    if rule_cls is TopP:
        expected = [brute_top_p(row, threshold) for row in x.reshape(3, -1).tolist()]
        assert [as_list(r) for r in keep.reshape(3, -1)] == expected
    with pytest.raises(ValueError, match="tokens"):
        seq.mask(torch.ones(4))


# --------------------------------------------------------------------------------------------------------------
# Applying a rule
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", [TopP(0.8), TopP(0.8, method="bisect"), TopK(0.5), MaxP(0.25), TopP(1.0)],
                         ids=repr)
def test_rule_call_zeroes_exactly_the_unkept(dtype, rule):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 6, 32, generator=g) ** 3).to(dtype)
    keep = rule.mask(x)
    out = rule(x)
    assert out.dtype == dtype and out.shape == x.shape
    assert (out[~keep] == 0).all()
    # kept entries are bit-identical (no rescaling)
    int_view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(dtype, torch.int16)
    assert torch.equal(out[keep].view(int_view), x[keep].view(int_view))
    assert torch.equal(keep, x.abs().to(torch.float64).gt(0) & keep)  # a keep-mask never holds zeros
    if rule.is_identity:
        assert torch.equal(out, x)


# --------------------------------------------------------------------------------------------------------------
# Errors and factory
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_top_p_bad_threshold(p):
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        TopP(p)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        MaxP(p)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        top_p_mask(torch.ones(3), p)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        top_p_mask_reference(torch.ones(3), p)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan")])
def test_top_k_bad_sparsity(s):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        TopK(s)


def test_bad_scope_and_method():
    for cls, arg in ((TopP, 0.9), (TopK, 0.5), (MaxP, 0.5)):
        with pytest.raises(ValueError, match="scope must be one of"):
            cls(arg, scope="batch")
    with pytest.raises(ValueError, match="method must be"):
        TopP(0.9, method="fast")


def test_make_rule():
    assert make_rule("top_p", 0.9) == TopP(0.9)
    assert make_rule("top-p", 0.9, scope="sequence") == TopP(0.9, scope="sequence")
    assert make_rule("TOP_K", 0.5) == TopK(0.5)
    assert make_rule("max_p", 0.1) == MaxP(0.1)
    with pytest.raises(ValueError, match="unknown rule 'top_q'.*max_p.*top_k.*top_p"):
        make_rule("top_q", 0.5)
    with pytest.raises(ValueError, match="p must be"):
        make_rule("top_p", 2.0)


def test_rule_metadata():
    assert isinstance(TopP(0.9), SparsityRule)
    assert TopP(0.9).to_dict() == {"rule": "top_p", "threshold": 0.9, "scope": "token"}
    assert TopK(0.25, scope="sequence").to_dict() == {"rule": "top_k", "threshold": 0.25, "scope": "sequence"}
    assert MaxP(0.5).to_dict() == {"rule": "max_p", "threshold": 0.5, "scope": "token"}
    assert TopP(1).is_identity and TopK(0).is_identity
    assert not TopP(0.999).is_identity and not TopK(0.01).is_identity and not MaxP(0.01).is_identity
    assert TopP(1).p == 1.0 and isinstance(TopP(1).p, float)


# --------------------------------------------------------------------------------------------------------------
# the histogram path (CPU default) is the reference bit for bit
# --------------------------------------------------------------------------------------------------------------

P_EDGES = [1e-300, 1e-9, 0.01, 0.3, 0.5, 0.9, 0.99, 0.999999, 1 - 1e-12, 1.0]


def _hard_rows(d: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows that stress an exact selection: ties, zeros, tiny and huge magnitudes, SwiGLU-like products."""
    g = torch.Generator().manual_seed(seed)
    n = 12
    normal = torch.randn(n, d, generator=g)
    rows = {
        "normal": normal,
        "ties": torch.randint(-3, 4, (n, d), generator=g).float(),
        "one_value": torch.full((n, d), -0.75),
        "mostly_zero": normal * (torch.rand(n, d, generator=g) < 0.05),
        "wide_range": torch.exp(8 * torch.randn(n, d, generator=g)) * normal.sign(),  # 2^-40..2^40
        "huge": normal * 1e37,
        "tiny": normal * 1e-38,  # float32 subnormals among them
        "swiglu": torch.nn.functional.silu(torch.randn(n, d, generator=g)) * torch.randn(n, d, generator=g),
        "cubed": normal ** 3,
    }
    x = rows["normal"].clone()
    x[0] = 0  # all-zero row
    x[1, 3 % d] = float("nan")  # NaN row: keeps every non-zero
    x[2, 5 % d] = float("inf")
    x[3, :2] = float("-inf")
    x[4, 0] = 1e30  # one entry holds all the mass
    rows["special"] = x
    return rows


def _reference(x, p):
    return keep_nan_rows(x, top_p_mask_reference(x, p))  # what SparsityRule.mask returns for the sort method


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [1, 7, 576, 1536])
def test_histogram_equals_reference_bit_for_bit(dtype, d):
    for name, x in _hard_rows(d, seed=d).items():
        x = x.to(dtype)
        for p in P_EDGES:
            got = top_p_mask_histogram(x, p)
            assert torch.equal(got, _reference(x, p)), (name, p)
        assert torch.equal(TopP(0.9).mask(x), top_p_mask_histogram(x, 0.9))  # auto on CPU: the row sort


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("d", [1, 7, 576, 1536])
def test_row_sort_equals_reference_bit_for_bit(dtype, d):
    for name, x in _hard_rows(d, seed=d).items():
        x = x.to(dtype)
        for p in P_EDGES:
            assert torch.equal(top_p_mask_row_sort(x, p), _reference(x, p)), (name, p)
        assert torch.equal(TopP(0.9).mask(x), top_p_mask_row_sort(x, 0.9))  # auto on CPU is this path


def test_row_sort_traces_in_one_graph():
    """The CPU rule inside torch.compile (TopP "auto" runs the row sort there): one graph (fullgraph=True fails on any
    graph break, e.g. a host sync such as bool(tensor.any())), the reference's masks, NaN / all-zero rows included."""
    import torch._dynamo

    hard = _hard_rows(96, seed=5)
    x = torch.cat([hard["special"], hard["ties"], hard["normal"]])
    assert x.isnan().any(-1).any() and (x == 0).all(-1).any()  # the rows the NaN / zero handling is for
    for p in (0.3, 0.7, 1 - 1e-12):
        torch._dynamo.reset()  # a fresh compile: p a constant of the graph, as in a sparsified model
        rule = TopP(p)
        compiled = torch.compile(lambda v, rule=rule: (rule.mask(v), rule(v)), fullgraph=True, backend="eager")
        keep, out = compiled(x)
        assert torch.equal(keep, _reference(x, p)), p
        assert torch.equal(out.view(torch.int32), x.masked_fill(~keep, 0).view(torch.int32))  # NaN included


def test_sparsified_model_compiles_without_breaks_from_the_rule(tiny_model, token_ids):
    """A compiled sparsified model: the only graph breaks are the hooks' statistics (compiler.disable'd by design),
    none in the rule, and the logits are the eager ones."""
    import torch._dynamo

    from dllm_sparse import SparsityConfig, sparsify

    model = tiny_model("llama")
    for site in ("gate",):  # one site: every site's hook calls the same rule.mask
        with torch.no_grad(), sparsify(model, SparsityConfig(site, TopP(0.7))):
            eager = model(token_ids).logits
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(token_ids)
            rule_breaks = [b.reason for b in explained.break_reasons
                           if any(frame.filename.endswith(("rules.py", "top_p.py")) for frame in b.user_stack)]
            assert explained.graph_break_count > 0  # the statistics' breaks: explain saw the hooks
            assert rule_breaks == [], rule_breaks
            torch._dynamo.reset()
            assert torch.equal(torch.compile(model, backend="eager")(token_ids).logits, eager)


def test_histogram_alone_is_exact_on_narrow_rows(monkeypatch):
    """Rows within the exact range never reach the sorted fallback: the histogram itself finds the reference's
    tau, rounding of the mass sums and all (sums land exactly on targets in the dyadic rows)."""
    def no_fallback(x, p):
        raise AssertionError("the fallback ran on rows of a narrow range")

    monkeypatch.setattr(top_p_module, "_top_p_mask_sorted", no_fallback)
    g = torch.Generator().manual_seed(11)
    for x in (torch.randn(64, 1536, generator=g), torch.randint(-40, 41, (300, 97), generator=g).float() / 8,
              (torch.randn(64, 576, generator=g) * 3).bfloat16(), torch.rand(64, 576, generator=g).half()):
        x = x.clone()
        x[x.abs() < 1e-4] = 0  # keep every row within 2^18 of its maximum
        for p in (0.1, 0.5, 0.77, 0.9, 0.95, 0.999):
            assert torch.equal(top_p_mask_histogram(x, p), top_p_mask_reference(x, p)), p


def test_histogram_rows_with_a_tail_below_the_exact_range_are_the_reference():
    """Rows with entries below the exact range (here: 2^-60 of the maximum) get the reference's total by
    replaying its running sum over the tail; only rows whose boundary falls in the tail take the sorted
    fallback, which follows the reference's steps. The masks agree either way, also where float64 rounding
    decides the answer."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(50, 1536, generator=g)
    x[:, :8] *= 2.0 ** -60
    called = []
    original = top_p_module._top_p_mask_sorted

    def spy(rows, p):
        called.append(rows.shape[0])
        return original(rows, p)

    top_p_module._top_p_mask_sorted = spy
    try:
        for p in (0.3, 0.9, 0.999999):
            assert torch.equal(top_p_mask_histogram(x, p), top_p_mask_reference(x, p))
        assert called == []  # the tail holds ~1e-18 of the mass: every boundary is in the exact range
        # One large entry and 1535 entries at 2^-20 of it: the tail holds ~0.15 % of the mass, so p = 0.9999
        # reaches into it (the sorted fallback) while p = 0.99 does not.
        y = torch.full((3, 1536), 2.0 ** -20)
        y[:, 0] = 1.0
        y[1, 1:100] *= torch.rand(99, generator=g)
        y[2] *= -1
        for p, fallback in ((0.99, []), (0.9999, [3])):
            called.clear()
            assert torch.equal(top_p_mask_histogram(y, p), top_p_mask_reference(y, p))
            assert called == fallback
    finally:
        top_p_module._top_p_mask_sorted = original
    # Magnitudes spread over 80 octaves (log-uniform): many rows with long tails, every p.
    z = torch.exp2(-80 * torch.rand(400, 1536, generator=g)) * torch.randn(400, 1536, generator=g).sign()
    z[::7, ::3] = 0
    for p in P_EDGES[:-1] + [0.5, 0.9, 0.99]:
        assert torch.equal(top_p_mask_histogram(z, p), top_p_mask_reference(z, p)), p
        assert torch.equal(top_p_mask_histogram(z.bfloat16(), p), top_p_mask_reference(z.bfloat16(), p)), p
    # and the fallback alone equals the reference on rows whose running sums round
    wide = _hard_rows(1536, seed=3)["wide_range"]
    for p in P_EDGES[:-1]:
        assert torch.equal(top_p_module._top_p_mask_sorted(wide, p), top_p_mask_reference(wide, p))


def test_histogram_on_float64_and_long_rows_uses_the_reference():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 50, generator=g, dtype=torch.float64)
    x[0, 1] = 1 + 2**-40  # a difference float32 would lose
    for p in (0.2, 0.9):
        assert torch.equal(top_p_mask_histogram(x, p), top_p_mask_reference(x, p))
    assert TopP(0.9, method="histogram").mask(torch.zeros(0, 5)).shape == (0, 5)


def test_histogram_method_name():
    assert TopP(0.9, method="histogram").method == "histogram"
    with pytest.raises(ValueError, match="method must be one of .*histogram"):
        TopP(0.9, method="bucket")


@pytest.mark.parametrize("rule", [TopP(0.7, scope="sequence"), TopK(0.6, scope="sequence"),
                                  MaxP(0.4, scope="sequence")], ids=str)
def test_sequence_scope_with_voters_equals_each_row_alone(rule):
    """A right- (or left-) padded batch of 2 with ``voters`` = the real tokens selects, per row, exactly what that
    row's real tokens select alone; padding (even holding larger values, or a NaN) takes no mass and keeps nothing.
    Distinct magnitudes (a permutation of 1..n) so that no tie can decide anything."""
    g = torch.Generator().manual_seed(0)
    T, d, lengths = 5, 6, (5, 2)
    alone = [(torch.randperm(n * d, generator=g).double() + 1).reshape(n, d) for n in lengths]
    for side in ("right", "left"):
        x = torch.full((2, T, d), 1e6, dtype=torch.float64)  # padding larger than every real entry
        x[1, 0 if side == "right" else T - 1, 0] = float("nan")
        voters = torch.zeros(2, T, dtype=torch.bool)
        for r, (a, n) in enumerate(zip(alone, lengths, strict=True)):
            where = slice(0, n) if side == "right" else slice(T - n, T)
            x[r, where], voters[r, where] = a, True
        keep = rule.mask(x, voters=voters)
        for r, (a, n) in enumerate(zip(alone, lengths, strict=True)):
            assert torch.equal(keep[r][voters[r]].reshape(n, d), rule.mask(a[None])[0]), (side, r)
            assert not bool(keep[r][~voters[r]].any())
    with pytest.raises(ValueError, match="voters also to scope 'sequence'"):
        TopP(0.7).mask(torch.ones(1, 2, 3), voters=torch.ones(1, 2, dtype=torch.bool))
