"""The compiled CPU top-p kernel (dllm_sparse/sparsity/native.py, csrc/top_p_rows.c) against the reference rule.

Every case compares bit patterns with ``x * top_p_mask_reference(x, p)`` (the spec's sort and float64 running sum,
NaN rows kept whole): the masked output, the keep-mask (``out != 0``) and the zero count of every row. The cases
are built to reach each branch of the kernel: rows whose partial sums are exact, rows with a tail below the exact
range (where the reference's running sum rounds), a target that falls inside that tail, ties at the threshold,
subnormals, NaN, infinities, all-zero rows, row lengths that are not multiples of the kernel's block of 16.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dllm_sparse import SparsityConfig, TopP, sparsify, top_p_mask_reference
from dllm_sparse.sparsity import native
from dllm_sparse.sparsity import rules as rules_module
from dllm_sparse.sparsity.top_p import keep_nan_rows

# Skipped only without a compiler: where one works, a kernel that does not build, is refused (its check against the
# reference failed) or is not loaded fails these tests with the reason.
needs_kernel = pytest.mark.skipif(shutil.which(native._compiler()) is None, reason="no C compiler (gcc / clang / $CC)")


def reference_out(x: torch.Tensor, p: float) -> torch.Tensor:
    return x * keep_nan_rows(x, top_p_mask_reference(x, p))


def assert_kernel_matches(x: torch.Tensor, p: float) -> None:
    out, zeros = native.top_p_rows(x, p)
    ref = reference_out(x, p)
    assert out.dtype == x.dtype and out.shape == x.shape and zeros.shape == x.shape[:-1]
    bits = torch.int32 if x.dtype == torch.float32 else torch.int16
    diff = (out.view(bits) != ref.view(bits)).sum().item()
    assert diff == 0, f"p={p}: {diff} entries differ from x * reference mask"
    assert torch.equal(out != 0, keep_nan_rows(x, top_p_mask_reference(x, p)))
    assert torch.equal(zeros, (ref == 0).sum(-1))


def rows(kind: str, d: int, n: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, d, generator=g)
    if kind == "scaled_tiny":  # every value subnormal or near it
        return torch.randn(n, d, generator=g) * 1e-40
    if kind == "scaled_huge":
        return torch.randn(n, d, generator=g) * 1e37
    if kind == "wide_range":  # exponents over ~60 octaves: most rows have a tail below the exact range
        return torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, d, generator=g) * 8)
    if kind == "ties":  # few distinct magnitudes: the threshold falls inside a group of equal values
        return torch.randint(-3, 4, (n, d), generator=g).float()
    if kind == "sparse":  # mostly zeros
        x = torch.randn(n, d, generator=g)
        return x * (torch.rand(n, d, generator=g) < 0.1)
    raise ValueError(kind)


KINDS = ("normal", "scaled_tiny", "scaled_huge", "wide_range", "ties", "sparse")
P_GRID = (1e-300, 0.01, 0.5, 0.9, 0.999, 1 - 1e-12, 1 - 2**-53)


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 3, 16, 17, 576, 1536])
def test_kernel_equals_reference(kind, d):
    x = rows(kind, d)
    for p in P_GRID:
        assert_kernel_matches(x, p)


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d", [1, 17, 576, 1536])
def test_bf16_kernel_equals_reference(kind, d):
    """bf16 has its own path (read and written as bf16, one histogram bucket per bf16 value, no sort)."""
    x = rows(kind, d, seed=7).to(torch.bfloat16)
    for p in P_GRID:
        assert_kernel_matches(x, p)


@needs_kernel
def test_bf16_target_inside_the_tail():
    """bf16 rows with a tail below the exact range (gathered in the histogram pass) and a target inside it."""
    d = 1536
    x = torch.full((5, d), 2.0**-40)
    x[:, 0] = 1.0
    x[1, 1:] = torch.linspace(2.0**-41, 2.0**-39, d - 1)
    x[2, 1::2] = -x[2, 1::2]
    x[3, 5] = 2.0**-19
    x[4, 1::3] = 0.0
    for p in (0.5, 0.99, 1 - 1e-9, 1 - 1e-12, 1 - 2**-53):
        assert_kernel_matches(x.to(torch.bfloat16), p)


@needs_kernel
def test_target_inside_the_tail():
    """One entry holds almost all the mass and the rest lie below the exact range (2^-40 of it, at d = 1536 the
    exact range is 18 octaves): for p near 1 the target is only reached by adding tail entries one by one,
    with float64 rounding at every step, as the reference adds them."""
    d = 1536
    x = torch.full((6, d), 2.0**-40)
    x[:, 0] = 1.0
    x[1, 1:] = torch.linspace(2.0**-41, 2.0**-39, d - 1)  # distinct tail values
    x[2, 1::2] = -x[2, 1::2]
    x[3, 5] = 2.0**-19  # one entry just outside the exact range
    x[4, 1:] = 2.0**-70
    x[5, :] = 0.0
    x[5, :4] = torch.tensor([1.0, 2.0**-60, 2.0**-60, 2.0**-61])
    assert native.exact_span(d) == 18
    for p in (0.5, 0.99, 1 - 1e-9, 1 - 1e-12, 1 - 1e-15, 1 - 2**-53):
        assert_kernel_matches(x, p)


@needs_kernel
def test_special_rows():
    x = torch.randn(9, 37)
    x[0, 3] = float("nan")  # a NaN row keeps every non-zero entry
    x[0, :5] = 0.0
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")  # the infinities alone are kept (the running sum is inf from the first on)
    x[2, 4], x[2, 9] = -float("inf"), float("inf")
    x[3] = 0.0  # all zeros: nothing kept
    x[4, :20] = 0.0
    x[5] = 1.4e-45  # the smallest subnormal everywhere: a tie over the whole row
    x[6, ::2] = 1.4e-45
    x[7] = -0.0
    x[8, 0] = float("nan")
    x[8, 1] = float("inf")
    for p in (1e-300, 0.3, 0.9, 1 - 2**-53):
        assert_kernel_matches(x, p)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    x = (torch.randn(32, 300) * torch.exp(torch.randn(32, 300) * 2)).to(dtype)
    for p in (0.5, 0.9, 0.999):
        assert_kernel_matches(x, p)


@needs_kernel
def test_thread_count_does_not_change_anything():
    x = rows("wide_range", 777, n=13, seed=3).reshape(13, 1, 777)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 16):
            torch.set_num_threads(threads)
            results.append(native.top_p_rows(x, 0.9))
    finally:
        torch.set_num_threads(before)
    for out, zeros in results[1:]:
        assert torch.equal(out.view(torch.int32), results[0][0].view(torch.int32))
        assert torch.equal(zeros, results[0][1])
    assert_kernel_matches(x, 0.9)  # [..., d] with leading dims


@needs_kernel
def test_generic_and_native_builds_agree(tmp_path, monkeypatch):
    """The kernel's arithmetic is integer work and float64 additions in a fixed order (no FMA, no fast-math), so a
    build for this CPU (-march=native) and a generic x86-64 build give the same bits."""
    import ctypes

    monkeypatch.setenv("DLLM_SPARSE_CACHE", str(tmp_path))
    generic = native._private_folder(native.library_path(march_native=False))
    native._build(generic, native._compiler(), march_native=False)
    lib = ctypes.CDLL(str(generic))
    x = torch.cat([rows(k, 1536, n=8, seed=i) for i, k in enumerate(KINDS)])
    for p in (0.5, 0.9, 1 - 1e-12):
        out = torch.empty_like(x)
        zeros = torch.empty(x.shape[0], dtype=torch.int64)
        assert lib.top_p_rows_f32(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(x.shape[0]), ctypes.c_int64(1536),
                                  ctypes.c_double(p), ctypes.c_int(18), ctypes.c_void_p(out.data_ptr()),
                                  ctypes.c_void_p(zeros.data_ptr()), ctypes.c_int(2)) == 0
        want, want_zeros = native.top_p_rows(x, p)
        assert torch.equal(out.view(torch.int32), want.view(torch.int32))
        assert torch.equal(zeros, want_zeros)


@needs_kernel
def test_library_name_holds_what_changes_the_binary(monkeypatch):
    base = native.library_path()
    assert native.library_path(march_native=False) != base
    monkeypatch.setattr(native, "_compiler_version", lambda cc: "gcc (other) 99.0")
    assert native.library_path() != base
    monkeypatch.undo()
    monkeypatch.setattr(native, "_cpu_key", lambda: "another CPU|avx512f")
    assert native.library_path() != base
    assert native.library_path(march_native=False) == native.library_path(march_native=False)


def test_bad_input_is_refused():
    if not native.available():
        with pytest.raises(RuntimeError, match="not available"):
            native.top_p_rows(torch.randn(2, 4), 0.5)
        return
    with pytest.raises(ValueError, match="CPU tensors of"):
        native.top_p_rows(torch.randn(2, 4, dtype=torch.float64), 0.5)
    for p in (0.0, 1.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="0 < p < 1"):
            native.top_p_rows(torch.randn(2, 4), p)
    with pytest.raises(ValueError, match="CPU tensors"):
        TopP(0.5, method="native").mask(torch.randn(3, 5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Through the rule and the hooks
# ---------------------------------------------------------------------------------------------------------------


@needs_kernel
def test_auto_picks_the_kernel_where_it_serves():
    r = TopP(0.9)
    assert r._method_for(torch.randn(2, 8)) == "native"
    assert r._method_for(torch.randn(2, 8).to(torch.bfloat16)) == "native"
    assert r._method_for(torch.randn(2, 8, dtype=torch.float64)) == "row_sort"
    assert TopP(1.0)._method_for(torch.randn(2, 8)) == "row_sort"
    x = torch.randn(3, 4, 50)
    assert torch.equal(r.mask(x), top_p_mask_reference(x, 0.9))
    out, zeros = r.apply_fused(x)
    assert torch.equal(out, reference_out(x, 0.9)) and zeros.shape == (3, 4)
    # no fused result where autograd needs a graph, or for other scopes
    assert r.apply_fused(x.clone().requires_grad_()) is None
    assert TopP(0.9, scope="sequence").apply_fused(x) is None
    assert TopP(0.9, method="row_sort").apply_fused(x) is None


@needs_kernel
@pytest.mark.parametrize("site", ["input", "gate", "up", "intermediate"])
def test_hooks_give_the_row_sort_path_bit_for_bit(tiny_model, token_ids, site):
    """The fused hook path (kernel output, its zero counts, keep = out != 0 for observers) against the mask path
    (method="row_sort": keep = mask(x), out = x * keep, zeros counted from out)."""
    model = tiny_model("llama")
    attn = torch.ones_like(token_ids)
    attn[0, :2] = 0  # padding: the statistics count real tokens only
    results = {}
    for method in ("native", "row_sort"):
        seen = []
        cfg = SparsityConfig(site, TopP(0.6, method=method))
        with torch.no_grad(), sparsify(model, cfg, mask_observers=[lambda e, seen=seen: seen.append(e.keep.clone())],
                                       record_masks=True) as stats:
            logits = model(token_ids, attention_mask=attn).logits
        results[method] = (logits, stats.records(), seen, [m["keep"] for m in stats.masks])
    (a_logits, a_rec, a_seen, a_masks), (b_logits, b_rec, b_seen, b_masks) = results["native"], results["row_sort"]
    assert torch.equal(a_logits, b_logits)
    assert a_rec == b_rec and a_rec
    assert len(a_seen) == len(b_seen) == 2 and all(torch.equal(u, v) for u, v in zip(a_seen, b_seen, strict=True))
    assert all(torch.equal(u, v) for u, v in zip(a_masks, b_masks, strict=True))


def test_without_the_kernel_auto_runs_the_row_sort_and_says_why(monkeypatch):
    monkeypatch.setattr(native, "_state", {"error": "no C compiler: 'cc' is not on PATH"})
    monkeypatch.setattr(rules_module, "_native_fallback_said", False)
    x = torch.randn(4, 6, 40)
    with pytest.warns(RuntimeWarning, match="not on PATH"):
        keep = TopP(0.8).mask(x)
    assert torch.equal(keep, top_p_mask_reference(x, 0.8))
    assert TopP(0.8).apply_fused(x) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not at every call
        TopP(0.8).mask(x)
    with pytest.raises(RuntimeError, match="not available: no C compiler"):
        TopP(0.8, method="native").mask(x)


def test_a_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DLLM_SPARSE_CACHE", str(tmp_path / "cache"))
    assert not native.available()
    assert "not on PATH" in native.unavailable_reason() and "$CC" in native.unavailable_reason()
    assert not (tmp_path / "cache" / "native").exists() or not any((tmp_path / "cache" / "native").glob("*.so"))


def test_a_failing_compiler_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'fakecc 1.0'; exit 0; fi\n"
                    "echo 'fatal error: stdint.h: No such file' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("DLLM_SPARSE_CACHE", str(tmp_path / "cache"))
    assert not native.available()
    reason = native.unavailable_reason()
    assert "stdint.h" in reason and "failed on top_p_rows.c" in reason
    assert not list((tmp_path / "cache" / "native").glob("*.so"))  # nothing half-built left as a library


# ---------------------------------------------------------------------------------------------------------------
# The cache: who may have put the library there, truncated or foreign libraries, wrong builds
# ---------------------------------------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="giving a folder to another user (chown) needs root")
OTHER_UID = 65534  # nobody


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh load state and an empty cache folder of this user (0755) at tmp_path / "cache"."""
    monkeypatch.setattr(native, "_state", {})
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    monkeypatch.setenv("DLLM_SPARSE_CACHE", str(cache))
    return cache


def plant_library(path, marker):
    """A library with the kernel's function names whose constructor writes ``marker`` when it is loaded, and the
    sha256 a build would record for it (a planter can write that file too)."""
    source = path.parent / "planted.c"
    source.write_text('#include <stdio.h>\n'
                      f'__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); '
                      'if (f) fclose(f); }\n'
                      'int top_p_rows_f32(void) { return 0; }\nint top_p_rows_bf16(void) { return 0; }\n')
    subprocess.run([native._compiler(), "-shared", "-fPIC", "-o", str(path), str(source)], check=True)
    source.unlink()
    native._hash_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  " + path.name + "\n")


def hostile(kind, cache):
    """Lay out one hostile cache; returns the path the refusal must name and the fix it must give."""
    native_dir = cache / "native"
    if kind in ("cache o+w", "cache g+w"):
        cache.chmod(0o757 if kind == "cache o+w" else 0o775)
        return cache, "chmod go-w"
    if kind == "cache of another user":
        os.chown(cache, OTHER_UID, OTHER_UID)
        return cache, "DLLM_SPARSE_CACHE to a folder you own"
    if kind == "sticky shared cache, native/ made by another user":
        cache.chmod(0o1777)
        native_dir.mkdir(mode=0o755)
        os.chown(native_dir, OTHER_UID, OTHER_UID)
        return cache, "chmod go-w"
    native_dir.mkdir(mode=0o700)
    if kind == "native/ of another user":
        os.chown(native_dir, OTHER_UID, OTHER_UID)
        return native_dir, "DLLM_SPARSE_CACHE to a folder you own"
    if kind == "native/ o+w":
        native_dir.chmod(0o703)
        return native_dir, "chmod go-w"
    if kind == "native/ a link":
        native_dir.rmdir()
        (cache / "elsewhere").mkdir(mode=0o700)
        native_dir.symlink_to(cache / "elsewhere")
        return native_dir, "remove the link"
    library = native.library_path()
    if kind == "library of another user":
        return library, "DLLM_SPARSE_CACHE to a folder you own"
    if kind == "library g+w":
        return library, "chmod go-w"
    raise ValueError(kind)


@needs_kernel
@needs_root
@pytest.mark.parametrize("kind", ["cache o+w", "cache g+w", "cache of another user",
                                  "sticky shared cache, native/ made by another user", "native/ of another user",
                                  "native/ o+w", "native/ a link", "library of another user", "library g+w"])
def test_a_cache_others_can_write_is_refused(fresh, tmp_path, kind):
    """A library planted where another user could have put it is never loaded (its constructor never runs) and
    nothing is built there; the reason names the path and the fix."""
    named, fix = hostile(kind, fresh)
    marker = tmp_path / "constructor-ran"
    library = native.library_path()
    if library.parent.is_dir():  # plant the library (with a matching hash) wherever the layout lets one
        plant_library(library, marker)
        if kind == "library of another user":
            os.chown(library, OTHER_UID, OTHER_UID)
        if kind == "library g+w":
            library.chmod(0o770)
    assert not native.available()
    reason = native.unavailable_reason()
    assert str(named.resolve() if kind != "native/ a link" else named) in reason and fix in reason, reason
    assert not marker.exists()
    built = [p for p in fresh.rglob("*.so") if p.resolve() != library.resolve()]
    assert built == [], built  # nothing built into the refused folder
    with pytest.raises(RuntimeError, match="not available: .*" + fix):
        TopP(0.5, method="native").mask(torch.randn(2, 8))


@needs_kernel
def test_a_folder_above_the_cache_that_others_can_write_is_refused(fresh, tmp_path, monkeypatch):
    above = tmp_path / "shared"
    above.mkdir(mode=0o777)
    above.chmod(0o777)  # no sticky bit: another user could rename the cache away and put their own
    cache = above / "cache"
    cache.mkdir(mode=0o755)
    monkeypatch.setenv("DLLM_SPARSE_CACHE", str(cache))
    assert not native.available()
    assert f"{above}, a folder above the cache" in native.unavailable_reason()
    assert f"chmod go-w {above}" in native.unavailable_reason()
    above.chmod(0o1777)  # sticky, as /tmp: others cannot touch this user's entries
    native._state.clear()
    assert native.available(), native.unavailable_reason()


@needs_kernel
def test_the_planted_library_test_can_fail(fresh, tmp_path):
    """The marker works: the same planted library, with its hash recorded, in a private cache is loaded (its
    constructor runs). Only the checks above keep it out there."""
    marker = tmp_path / "constructor-ran"
    library = native._private_folder(native.library_path())
    plant_library(library, marker)
    assert native.available() and marker.exists()


@needs_kernel
@pytest.mark.parametrize("damage", ["truncated", "emptied", "no recorded hash"])
def test_a_damaged_library_is_reported_once_and_rebuilt(fresh, tmp_path, damage):
    """A cut library used to kill every later run with SIGBUS (rc 135, no message): its hash no longer matches, so
    it is never loaded; the first use says so once, rebuilds it, and the next process loads it silently. Run in
    child processes, so that a crash is a failure, not the end of the test run."""
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from dllm_sparse.sparsity import native\n"
            "ok = native.available(); print('AVAILABLE', ok, native.unavailable_reason())\n"
            "x = torch.randn(4, 300)\n"
            "from dllm_sparse import top_p_mask_reference\n"
            "print('EQUAL', torch.equal(native.top_p_rows(x, 0.9)[0] != 0, top_p_mask_reference(x, 0.9)))\n")

    def child():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DLLM_SPARSE_CACHE": str(fresh)})

    first = child()
    assert first.returncode == 0 and "AVAILABLE True" in first.stdout, first.stderr
    library = native.library_path()
    good = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(good[: len(good) // 3])
    elif damage == "emptied":
        library.write_bytes(b"")
    else:
        native._hash_path(library).unlink()
    second = child()
    assert second.returncode == 0, (second.returncode, second.stderr[-2000:])
    assert "AVAILABLE True" in second.stdout and "EQUAL True" in second.stdout
    assert second.stderr.count(f"rebuilding the compiled top-p kernel {library}") == 1, second.stderr
    assert ("recorded hash" if damage == "no recorded hash" else "truncated or replaced") in second.stderr
    assert library.read_bytes() == good  # replaced by a fresh build (the build is deterministic)
    third = child()
    assert third.returncode == 0 and "rebuilding" not in third.stderr and "AVAILABLE True" in third.stdout


@needs_kernel
def test_a_library_without_the_kernel_is_a_clear_error(fresh, tmp_path):
    """A library (with a matching recorded hash) that lacks the kernel's function: available() is False with the
    reason (it used to raise AttributeError, then KeyError: 'error' from TopP(method="native"))."""
    source = tmp_path / "other.c"
    source.write_text("int something_else(void) { return 1; }\n")
    for march_native in (True, False):  # both builds, or the generic one is built and used (saying why)
        library = native._private_folder(native.library_path(march_native=march_native))
        subprocess.run([native._compiler(), "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
        native._hash_path(library).write_text(hashlib.sha256(library.read_bytes()).hexdigest() + "\n")
    assert not native.available()
    assert "has no function top_p_rows_f32" in native.unavailable_reason()
    assert "not available" in native.describe()
    with pytest.raises(RuntimeError, match="not available: .*has no function top_p_rows_f32"):
        TopP(0.5, method="native").mask(torch.randn(2, 8))


@needs_kernel
def test_a_build_that_gives_wrong_masks_is_refused(fresh, tmp_path, monkeypatch):
    """A kernel that keeps ties at the threshold out (a flipped comparison) builds and loads, but its check against
    the reference fails: refused (never put in the cache), and auto runs the row sort saying why."""
    source = native.SOURCE.read_text()
    assert source.count(">= tau;") == 2
    wrong = tmp_path / "top_p_rows.c"
    wrong.write_text(source.replace(">= tau;", "> tau;"))
    monkeypatch.setattr(native, "SOURCE", wrong)
    monkeypatch.setattr(rules_module, "_native_fallback_said", False)
    assert not native.available()
    reason = native.unavailable_reason()
    assert "differ from the reference rule" in reason and "refused" in reason, reason
    assert not list(fresh.rglob("*.so")) and not list(fresh.rglob("*.sha256"))
    x = torch.randint(-3, 4, (5, 40)).float()
    with pytest.warns(RuntimeWarning, match="differ from the reference rule"):
        assert torch.equal(TopP(0.5).mask(x), top_p_mask_reference(x, 0.5))


@needs_kernel
def test_the_self_test_rows_reach_the_kernels_branches():
    """The build check's rows hold what the kernel treats apart: ties at the threshold, a tail below the exact range,
    subnormals, NaN, infinities, all-zero rows, a length that is not a multiple of 16; and the check passes on the
    library in use."""
    x = native._self_test_rows()
    d = x.shape[-1]
    a = x.abs()
    assert d % 16 and x.isnan().any() and x.isinf().any() and (x == 0).all(-1).any()
    assert ((a > 0) & (a < torch.finfo(torch.float32).tiny)).any()  # subnormals
    low = a < a.nan_to_num(0, 0, 0).amax(-1, keepdim=True) * 2.0 ** -native.exact_span(d)
    assert ((low & (a > 0)).any(-1)).sum() >= 2  # rows with a tail
    assert native._self_test(native._library()) is None
