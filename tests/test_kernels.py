"""Sparse kernels vs dense references: PyTorch fallbacks and the Triton code (interpreted on CPU).

How the Triton code runs without a GPU (Triton 3.9): ``TRITON_INTERPRET=1`` must be in the environment before
``import triton`` - not only before our kernels are decorated, because ``tl.sum``/``tl.max`` are themselves
``@jit`` functions decorated at Triton's import. transformers imports Triton when the conftest loads, so a
variable set in this module is too late. Instead, on a CPU-only machine, the tests parametrised with the
"triton" backend skip in the normal run and :func:`test_triton_code_under_the_interpreter` re-runs exactly
those tests in a child pytest with ``TRITON_INTERPRET=1`` set from the start. With CUDA they run compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm_sparse import top_p_mask_reference
from dllm_sparse.kernels import (
    backend,
    column_sparse_matmul,
    kept_indices,
    row_sparse_matmul,
    topp_threshold,
    triton_available,
    union_density,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REPO = Path(__file__).resolve().parents[1]


def interpreter_active() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (its own jit helpers are then interpreted)."""
    if not triton_available():
        return False
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def _triton_ready() -> str | None:
    """None when the Triton backend can run in this process, else the reason to skip."""
    if not triton_available():
        return "triton is not installed"
    if DEVICE == "cpu" and not interpreter_active():
        return "no GPU: Triton tests run in the TRITON_INTERPRET=1 child (test_triton_code_under_the_interpreter)"
    return None


INTERPRETER_TEST = "test_triton_code_under_the_interpreter"


def run_triton_tests_in_interpreter(test_file: str, request, timeout: int = 900) -> None:
    """The Triton-parametrised tests of ``test_file``, run by a child pytest with TRITON_INTERPRET=1 (CPU only).

    One child runs them for every test file of this session that has this test (one interpreter start and one
    import of torch and Triton instead of one per file: the default suite's time); each file's test then asserts
    its own file's results in the child's JUnit report: at least one passed, none failed or skipped."""
    if DEVICE == "cuda":
        pytest.skip("CUDA is available: the compiled Triton kernels ran in the tests themselves")
    if interpreter_active():
        pytest.skip("this is already the interpreter run")
    if not triton_available():
        pytest.skip("triton is not installed")
    runs = request.session.__dict__.setdefault("_dllm_sparse_triton_interpreter", {})
    me = str(Path(test_file).resolve())
    if me not in runs:
        files = sorted({str(Path(it.path).resolve()) for it in request.session.items
                        if getattr(it, "originalname", it.name) == INTERPRETER_TEST} | {me})
        result = _interpret(files, timeout)
        runs.update({f: result for f in files})
    result = runs[me]
    cases = result["cases"].get(me, [])
    failed = [name for name, outcome in cases if outcome != "passed"]
    assert cases and not failed, (f"interpreted Triton tests of {Path(me).name}: "
                                  f"{'none ran' if not cases else 'not passed: ' + ', '.join(failed)}\n"
                                  f"{result['tail']}")


def _interpret(files: list[str], timeout: int) -> dict:
    """One child pytest over ``files`` under the interpreter; its test cases by file, as (name, outcome)."""
    import tempfile
    import xml.etree.ElementTree as ET

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-k", "triton and not interpreter and not sm90"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        tail = proc.stdout[-6000:] + proc.stderr[-2000:]
        assert junit.is_file(), f"the interpreted Triton run wrote no report (exit {proc.returncode}):\n{tail}"
        cases: dict[str, list] = {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            path = str((REPO / (case.get("classname", "").replace(".", "/") + ".py")).resolve())
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            cases.setdefault(path, []).append((case.get("name"), outcome))
    return {"cases": cases, "tail": tail, "returncode": proc.returncode}


def test_triton_code_under_the_interpreter(request):
    run_triton_tests_in_interpreter(__file__, request)


@pytest.fixture(params=["torch", "triton"])
def be(request):
    if request.param == "triton" and (reason := _triton_ready()):
        pytest.skip(reason)
    return request.param


def _tk():
    from dllm_sparse.kernels import triton_kernels

    return triton_kernels


def _heavy(*shape, seed=0, dtype=torch.float32):
    """Heavy-tailed values (Student-t, 3 dof) like real activations, with some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g)
    chi = torch.randn(*shape, 3, generator=g).pow(2).mean(-1).sqrt()
    x = z / chi
    x[torch.rand(*shape, generator=g) < 0.05] = 0
    return x.to(dtype).to(DEVICE)


def _assert_close(y, ref, dtype):
    tol = TOL[dtype]
    scale = ref.abs().max().clamp(min=1.0)
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(scale))


# --------------------------------------------------------------------------------------------------------
# Threshold
# --------------------------------------------------------------------------------------------------------


def _assert_topp_mask(x: torch.Tensor, p: float, keep: torch.Tensor) -> None:
    """keep equals the reference mask, except in rows whose boundary decision lies within 1e-6 of the
    target mass (the spec's tolerance for summation order)."""
    ref = top_p_mask_reference(x, p)
    for r in (keep != ref).any(-1).nonzero().flatten().tolist():
        a = x[r].abs().double()
        total = float(a.sum())
        tau = float(a[keep[r]].min())
        kept, above = float(a[a >= tau].sum()), float(a[a > tau].sum())
        target = p * total
        assert min(abs(kept - target), abs(above - target)) <= 1e-6 * total, f"row {r} differs from the reference"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.3, 0.9, 1.0])
def test_topp_threshold_matches_reference(be, dtype, p):
    x = _heavy(4, 37, seed=1, dtype=dtype)
    x[1] = 0  # an all-zero row keeps nothing
    x[2, 5:] = 0  # few non-zeros
    x[3] = torch.round(x[3] * 2) / 2  # many ties: ties at tau are kept
    tau = topp_threshold(x, p, backend=be)
    assert tau.shape == (4, 1) and tau.dtype == torch.float32
    keep = (x.abs().float() >= tau) & (x != 0)
    _assert_topp_mask(x.cpu(), p, keep.cpu())
    assert not keep[1].any()


def test_topp_threshold_long_rows_take_the_chunked_path():
    if reason := _triton_ready():
        pytest.skip(reason)
    x = _heavy(3, 70, seed=2)
    tau = _tk().topp_threshold(x, 0.8, block=16)  # 70 > 16: re-reads the row in chunks at every step
    _assert_topp_mask(x.cpu(), 0.8, ((x.abs() >= tau[:, None]) & (x != 0)).cpu())


@pytest.mark.parametrize("scale", [1e-40, 3e-38])
def test_topp_threshold_subnormal_and_near_subnormal_rows(be, scale):
    """The bisection compares float64 values built from float32 bit patterns by integer operations: subnormal
    candidates (below 2^-126) take their own branch of that construction; the thresholds stay entry values."""
    x = (_heavy(3, 50, seed=22) * scale).float()
    tau = topp_threshold(x, 0.7, backend=be)
    keep = (x.abs() >= tau) & (x != 0)
    _assert_topp_mask(x.cpu(), 0.7, keep.cpu())
    assert all(float(t) in x[r].abs().tolist() for r, t in enumerate(tau.flatten().cpu()))
    if scale < 1e-38:
        assert (tau < 2.0 ** -126).all() and (tau > 0).all()


def test_topp_threshold_bad_p():
    with pytest.raises(ValueError, match="p must be"):
        topp_threshold(torch.ones(2, 3), 0.0)


# --------------------------------------------------------------------------------------------------------
# Column-sparse: one token (GEMV, fused threshold) and several (shared-mask GEMM over the union)
# --------------------------------------------------------------------------------------------------------

K_IN, N_OUT = 45, 29  # deliberately not multiples of any block size


def _dense_ref(x_masked, weight_t, bias=None):
    y = x_masked.double() @ weight_t.double()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["threshold", "keep", "empty", "full"])
@pytest.mark.parametrize("M", [1, 6])
def test_column_sparse_matmul(be, dtype, mode, M):
    x = _heavy(M, K_IN, seed=3, dtype=dtype)
    wt = _heavy(K_IN, N_OUT, seed=4, dtype=dtype)
    bias = _heavy(N_OUT, seed=5, dtype=dtype) if mode == "keep" else None
    kw = {}
    if mode == "threshold":
        kw["threshold"] = topp_threshold(x, 0.6, backend=be)
        kept = (x.abs().float() >= kw["threshold"]) & (x != 0)
    elif mode == "keep":
        kept = kw["keep"] = torch.rand(M, K_IN, generator=torch.Generator().manual_seed(6)).to(DEVICE) < 0.4
    elif mode == "empty":
        kw["threshold"] = float("inf")
        kept = torch.zeros_like(x, dtype=torch.bool)
    else:
        kw["threshold"] = 0.0
        kept = torch.ones_like(x, dtype=torch.bool)
    y = column_sparse_matmul(x, wt, bias=bias, backend=be, **kw)
    assert y.shape == (M, N_OUT) and y.dtype == dtype
    _assert_close(y, _dense_ref(x.masked_fill(~kept, 0), wt, bias), dtype)
    if mode == "empty":
        assert (y == 0).all()


def test_column_sparse_matmul_keeps_leading_dims(be):
    x = _heavy(2, 3, K_IN, seed=7)
    wt = _heavy(K_IN, N_OUT, seed=8)
    tau = topp_threshold(x, 0.5, backend=be)
    y = column_sparse_matmul(x, wt, threshold=tau, backend=be)
    kept = (x.abs() >= tau) & (x != 0)
    assert y.shape == (2, 3, N_OUT)
    _assert_close(y, _dense_ref(x.masked_fill(~kept, 0), wt), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_triton_gemv_small_blocks_and_split_k(dtype, split_k):
    """Several output blocks, several K blocks per split, a ragged last block everywhere."""
    if reason := _triton_ready():
        pytest.skip(reason)
    x = _heavy(K_IN, seed=9, dtype=dtype)
    wt = _heavy(K_IN, N_OUT, seed=10, dtype=dtype)
    tau = torch.tensor([0.4], device=DEVICE)
    y = _tk().colsparse_gemv(x, wt, tau, block_n=16, block_k=16, split_k=split_k)
    kept = (x.abs().float() >= 0.4) & (x != 0)
    _assert_close(y, _dense_ref(x.masked_fill(~kept, 0), wt), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gemm_small_blocks(dtype):
    if reason := _triton_ready():
        pytest.skip(reason)
    x = _heavy(19, K_IN, seed=11, dtype=dtype)
    x[x.abs() < 0.8] = 0
    wt = _heavy(K_IN, N_OUT, seed=12, dtype=dtype)
    idx, count = kept_indices(x != 0)
    y = _tk().colsparse_gemm(x, wt, idx, count, block_m=16, block_n=16, block_k=16)
    _assert_close(y, _dense_ref(x, wt), dtype)


@pytest.mark.parametrize("split_k", [2, 3])
def test_triton_gemm_split_k(split_k):
    """K split over the kept rows (fp32 partial sums added afterwards), ragged count, ragged blocks."""
    if reason := _triton_ready():
        pytest.skip(reason)
    x = _heavy(5, K_IN, seed=23)
    x[:, torch.rand(K_IN, generator=torch.Generator().manual_seed(24)) < 0.3] = 0
    wt = _heavy(K_IN, N_OUT, seed=25)
    idx, count = kept_indices(x != 0)
    y = _tk().colsparse_gemm(x, wt, idx, count, block_m=16, block_n=16, block_k=16, split_k=split_k)
    assert int(count) > 2 * 16  # several K blocks to share between the splits
    _assert_close(y, _dense_ref(x, wt), torch.float32)


def test_weight_t_with_padded_rows(be):
    """A row stride larger than d_out (a column slice of a wider matrix) is read correctly."""
    x = _heavy(1, K_IN, seed=13)
    wide = _heavy(K_IN, N_OUT + 7, seed=14)
    wt = wide[:, :N_OUT]
    y = column_sparse_matmul(x, wt, threshold=0.3, backend=be)
    kept = (x.abs() >= 0.3) & (x != 0)
    _assert_close(y, _dense_ref(x.masked_fill(~kept, 0), wt), torch.float32)


# --------------------------------------------------------------------------------------------------------
# Row-sparse
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["random", "empty", "full"])
@pytest.mark.parametrize("M", [1, 5])
def test_row_sparse_matmul(be, dtype, mode, M):
    x = _heavy(M, K_IN, seed=15, dtype=dtype)
    w = _heavy(N_OUT, K_IN, seed=16, dtype=dtype)
    bias = _heavy(N_OUT, seed=17, dtype=dtype)
    if mode == "random":
        keep = torch.rand(M, N_OUT, generator=torch.Generator().manual_seed(18)).to(DEVICE) < 0.3
    else:
        keep = torch.full((N_OUT,), mode == "full", device=DEVICE)
    y = row_sparse_matmul(x, w, keep, bias=bias, backend=be)
    union = keep.reshape(-1, N_OUT).any(0)
    ref = (_dense_ref(x, w.t(), bias)) * union.double()
    assert y.shape == (M, N_OUT) and y.dtype == dtype
    _assert_close(y, ref, dtype)
    assert (y[..., ~union] == 0).all()


@pytest.mark.parametrize("M", [1, 17])
def test_triton_row_sparse_small_blocks(M):
    if reason := _triton_ready():
        pytest.skip(reason)
    x = _heavy(M, K_IN, seed=19)
    w = _heavy(N_OUT, K_IN, seed=20)
    keep = torch.rand(N_OUT, generator=torch.Generator().manual_seed(21)).to(DEVICE) < 0.6
    idx, count = kept_indices(keep)
    tk = _tk()
    for programs in (1, None):  # 1: one persistent program walks every row block
        if M == 1:
            y = tk.rowsparse_gemv(x[0], w, idx, count, block_r=8, block_k=16, programs=programs).unsqueeze(0)
        else:
            y = tk.rowsparse_gemm(x, w, idx, count, block_m=16, block_r=16, block_k=16, programs=programs)
        _assert_close(y, _dense_ref(x, w.t()) * keep.double(), torch.float32)


# --------------------------------------------------------------------------------------------------------
# Helpers, dispatch, validation
# --------------------------------------------------------------------------------------------------------


def test_kept_indices_and_union_density():
    keep = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    idx, count = kept_indices(keep)
    assert count.tolist() == [3] and idx.dtype == torch.int32 and idx.shape == (6,)
    assert idx[:3].tolist() == [1, 2, 4]
    assert float(union_density(keep)) == pytest.approx(0.5)
    idx, count = kept_indices(torch.zeros(5, dtype=torch.bool))
    assert count.tolist() == [0]
    with pytest.raises(ValueError, match="bool"):
        kept_indices(torch.ones(3))


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("DLLM_SPARSE_KERNELS", raising=False)
    assert backend(cpu) == "torch"  # CPU tensors run the fallback by default
    assert backend(cpu, "torch") == "torch"
    monkeypatch.setenv("DLLM_SPARSE_KERNELS", "torch")
    assert backend(cpu) == "torch"
    monkeypatch.setenv("DLLM_SPARSE_KERNELS", "bogus")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        backend(cpu)
    monkeypatch.delenv("DLLM_SPARSE_KERNELS")
    if triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            backend(cpu, "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend(cpu, "triton") == "triton"


def test_bad_inputs_get_clear_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x has 8 features"):
        column_sparse_matmul(x, torch.randn(7, 3))
    with pytest.raises(ValueError, match="cast"):
        column_sparse_matmul(x, torch.randn(8, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous rows"):
        column_sparse_matmul(x, torch.randn(3, 8).t())
    with pytest.raises(ValueError, match="one value per row"):
        column_sparse_matmul(x, torch.randn(8, 3), threshold=torch.zeros(3))
    with pytest.raises(ValueError, match="bool mask"):
        row_sparse_matmul(x, torch.randn(3, 8), torch.ones(3))


# Compiling the real kernels for sm_80 / sm_90 (no GPU needed): tests/test_kernels_aot.py
