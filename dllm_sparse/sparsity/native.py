"""The compiled CPU top-p kernel: ``csrc/top_p_rows.c``, built once with the system C compiler, called through ctypes.

Why compiled: on CPU the per-token top-p rule used to be NumPy's row sort followed by four PyTorch passes (running
sum, compare, mask, zero count), 1.2-1.3x the time of a dense forward of SmolLM2-135M at the gate / up /
intermediate sites. The kernel finds the same threshold without sorting (a mass histogram whose sums are exact;
the proof is at the top of the C file) and writes the masked output and each row's zero count in the same pass,
on PyTorch's intra-op thread count; bf16 is read and written as bf16 (no float32 copies). Its outputs are
bit-identical to the reference rule's (``x * top_p_mask_reference(x, p)``), on every CPU: it does integer work
and float64 additions in a fixed order, built without fused multiply-adds or fast-math.

Built on first use into ``<cache>/native/`` (cache: ``$DLLM_SPARSE_CACHE``, else ``~/.cache/dllm_sparse``), under a
name that holds everything that changes the binary: the source, the compiler's version, the flags and the CPU's
feature flags (``-march=native``). ``$CC`` picks the compiler (default ``cc``). Concurrent first uses build once (a
file lock). Where no compiler works, :func:`available` is False and :func:`unavailable_reason` says why;
``TopP(method="auto")`` then runs NumPy's row sort (the same masks, 2-3x slower) and says so once.

A shared library runs code when it is loaded, so the cache is trusted only as far as only this user can write it:

- the library, ``native/`` and the cache folder must be owned by this user and not writable by group or others,
  and the folders above the cache owned by this user or root (:func:`dllm_sparse.cache.check_private`, the
  rules of sshd's StrictModes); otherwise nothing is loaded from or built into it and the reason names the path;
- a build happens in a private temporary folder (0700) inside ``native/`` and is renamed into place;
- every build is run on constructed rows (ties, tails below the exact range, subnormals, NaN, infinities, zeros;
  fp32, bf16, fp16) against the reference rule, and refused on any difference (a miscompiled kernel would give
  wrong masks with :func:`available` True); only then its sha256 is recorded next to it (``<name>.so.sha256``);
- a load checks that hash first: a truncated, emptied or replaced library (mapping one can kill the process with
  SIGBUS) is reported once and rebuilt, never loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["available", "unavailable_reason", "describe", "top_p_rows", "library_path", "SOURCE"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "top_p_rows.c"
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-fast-math")
#: dtypes the kernel serves (fp16 goes through float32, exactly: its values are float32 values; bf16 is native)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the library's functions, one per element type it reads and writes
ENTRY_POINTS = {torch.float32: "top_p_rows_f32", torch.bfloat16: "top_p_rows_bf16"}
_REFUSED = "the compiled top-p kernel is not loaded from or built into it"

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or "error": why there is none


def _flags(march_native: bool) -> tuple[str, ...]:
    return BASE_FLAGS + (("-march=native",) if march_native else ())


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


@functools.cache  # asked for the library's name and again for the build line: one subprocess per compiler
def _compiler_version(cc: str) -> str:
    try:
        run = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no working C compiler: `{cc} --version` failed ({e}). Install one (gcc or clang) or "
                           "point $CC at it") from None
    if run.returncode != 0:
        raise RuntimeError(f"no working C compiler: `{cc} --version` exited {run.returncode}")
    return run.stdout.strip().splitlines()[0] if run.stdout.strip() else cc


def _cpu_key() -> str:
    from dllm_sparse.hardware import cpu_flags, cpu_name

    return cpu_name() + "|" + " ".join(sorted(cpu_flags()))


def library_path(cc: str | None = None, march_native: bool = True) -> Path:
    """Where the built kernel lives for this source, compiler, flags and CPU."""
    from dllm_sparse.cache import cache_dir

    cc = cc or _compiler()
    flags = _flags(march_native)
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler_version(cc).encode(), " ".join(flags).encode(),
                 (_cpu_key() if march_native else "").encode()):
        key.update(part + b"\0")
    return cache_dir() / "native" / f"top_p_rows-{key.hexdigest()[:16]}.so"


def _hash_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _private_folder(target: Path) -> Path:
    """Create (0700) and check the folder of ``target`` and the cache above it; the target spelled under the
    resolved cache folder. Raises UnsafeCacheError where another user owns or can write any of them."""
    from dllm_sparse.cache import check_private

    root = target.parent.parent
    root.mkdir(mode=0o755, parents=True, exist_ok=True)  # the model cache in it is shared read-only (0755)
    root = root.resolve()
    folder = root / target.parent.name
    if not os.path.lexists(folder):
        folder.mkdir(mode=0o700, exist_ok=True)
    check_private(folder, root, _REFUSED)
    return folder / target.name


def _check_recorded_hash(target: Path) -> str | None:
    """None when ``target`` is the library this code built and checked (its sha256 is the one recorded next to
    it); else why not. Raises UnsafeCacheError when another user owns or can write either file."""
    from dllm_sparse.cache import check_private

    root = target.parent.parent
    if not os.path.lexists(target):
        return "not built yet"
    check_private(target, root, _REFUSED)
    recorded = _hash_path(target)
    if not os.path.lexists(recorded):
        return f"it has no recorded hash ({recorded.name}), so it was not built and checked by this code"
    check_private(recorded, root, _REFUSED)
    want = recorded.read_text().split()[:1]
    got = _sha256(target)
    if want != [got]:
        return (f"its sha256 {got[:16]}... is not the {want[0][:16] if want else '(empty)'}... recorded when it was "
                "built (a truncated or replaced file)")
    return None


def _open(path: Path) -> ctypes.CDLL:
    """Load a library and declare its functions; RuntimeError when it lacks one."""
    lib = ctypes.CDLL(str(path))
    for name in ENTRY_POINTS.values():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise RuntimeError(f"{path} has no function {name}: it is not a build of {SOURCE.name} (a foreign or "
                               f"outdated library). Fix: delete it; it is rebuilt") from None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def _build(target: Path, cc: str, march_native: bool) -> None:
    """Compile in a private temporary folder inside ``target``'s (mkdtemp: 0700), check the library against the
    reference rule (:func:`_self_test`), record its sha256, and rename it into place (readers never see half a
    library). Raises RuntimeError when the compiler fails or the library gives a wrong mask."""
    flags = _flags(march_native)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        built = Path(tmp) / target.name
        run = subprocess.run([cc, *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"`{cc} {' '.join(flags)}` failed on {SOURCE.name}: {run.stderr.strip()[-2000:]}")
        os.chmod(built, 0o700)
        wrong = _self_test(_open(built))
        if wrong:
            raise RuntimeError(f"the build of {SOURCE.name} with `{cc} {' '.join(flags)}` gives masks that differ "
                               f"from the reference rule ({wrong}); it is refused (a compiler or source problem: "
                               "report it with this line)")
        from dllm_sparse.atomic import atomic_write_text

        atomic_write_text(_hash_path(target), f"{_sha256(built)}  {target.name}\n")
        os.replace(built, target)


def _self_test_rows(d: int = 300) -> torch.Tensor:
    """Rows that reach every branch of the kernel (d = 300: not a multiple of its block of 16; exact range 20
    octaves): plain, ties at the threshold, a tail below the exact range, a target inside that tail, subnormals,
    a wide range, mostly zeros, NaN, infinities, all zeros, negative zeros."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(d, generator=g), torch.randint(-3, 4, (d,), generator=g).float(),
            torch.randn(d, generator=g) * 1e-40,
            torch.randn(d, generator=g) * torch.exp(torch.randn(d, generator=g) * 8),
            torch.randn(d, generator=g) * (torch.rand(d, generator=g) < 0.1)]
    tail = torch.full((d,), 2.0**-40)
    tail[0] = 1.0
    tail[1::2] = -torch.linspace(2.0**-41, 2.0**-39, d)[1::2]
    special = torch.randn(5, d, generator=g)
    special[0, 7] = float("nan")
    special[1, 5], special[1, 9] = float("inf"), -float("inf")
    special[2] = 0.0
    special[3] = -0.0
    special[4, ::2] = 1.4e-45  # the smallest subnormal: a tie over half the row
    return torch.cat([torch.stack(rows), tail[None], special])


def _self_test(lib: ctypes.CDLL) -> str | None:
    """None when ``lib`` gives the reference rule's output and zero counts on :func:`_self_test_rows` for every
    dtype and a few p (near 0, middle, near 1: the target inside the tail); else the first difference."""
    from dllm_sparse.sparsity.top_p import keep_nan_rows, top_p_mask_reference

    x32 = _self_test_rows()
    for dtype in DTYPES:
        x = x32.to(dtype)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        for p in (1e-300, 0.5, 0.9, 1 - 1e-12):
            out, zeros = _run(lib, x, p)
            want = x * keep_nan_rows(x, top_p_mask_reference(x, p))
            rows = ((out.view(bits) != want.view(bits)).any(-1) | (zeros != (want == 0).sum(-1))).nonzero()
            if rows.numel():
                return f"{dtype}, p = {p}: row {int(rows[0])} of the check rows, {rows.numel()} rows differ"
    return None


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if shutil.which(cc) is None and not os.path.isfile(cc):
        raise RuntimeError(f"no C compiler: {cc!r} is not on PATH. Install gcc or clang, or point $CC at one")
    from filelock import FileLock

    from dllm_sparse.cache import UnsafeCacheError

    errors = []
    for march_native in (True, False):  # -march=native is faster (AVX2 here); a compiler may refuse it
        try:
            target = _private_folder(library_path(cc, march_native))
            with FileLock(str(target) + ".lock"):  # one build at a time; a reader never sees a half-written pair
                problem = _check_recorded_hash(target)
                if problem is not None:
                    if os.path.lexists(target):
                        warnings.warn(f"rebuilding the compiled top-p kernel {target}: {problem}", RuntimeWarning,
                                      stacklevel=5)
                    _build(target, cc, march_native)
                lib = _open(target)
            _state["built_with"] = f"{_compiler_version(cc)}, {' '.join(_flags(march_native))}"
            if errors:
                warnings.warn(f"the compiled top-p kernel runs its generic build: {'; '.join(errors)}",
                              RuntimeWarning, stacklevel=5)
            return lib
        except UnsafeCacheError:
            raise  # the same folder for every build: nothing else to try
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


def _library() -> ctypes.CDLL | None:
    if not _state:
        with _lock:
            if not _state:
                try:
                    _state["lib"] = _load()
                except (RuntimeError, OSError) as e:
                    _state["error"] = str(e)
    return _state.get("lib")


def available() -> bool:
    """True when the kernel is built (or builds now), passes its check and loads."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _library()
    return _state.get("error")


def describe() -> str:
    """One line for benchmark records: the compiler and flags the kernel was built with, or why there is none."""
    lib = _library()
    if lib is None:
        return f"not available ({_state.get('error')})"
    return f"{Path(lib._name).name}: {_state.get('built_with')}"


def exact_span(d: int) -> int:
    """Octaves below a row's maximum within which every float32 partial sum of d entries is exact in float64
    (52 - 23 - ceil(log2 d)); negative for rows too long for the kernel (d > 2^29)."""
    return 52 - 23 - math.ceil(math.log2(max(d, 1)))


def top_p_rows(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * keep, zeros)`` for the per-token top-p keep-mask of every row of ``x`` [..., d]: the masked
    activations (x's dtype and shape; a dropped entry is a zero with x's sign, as ``x * keep`` gives) and the
    number of zero entries of each row of them (int64, shape ``x.shape[:-1]``). The keep-mask is ``out != 0``.

    ``x``: a CPU tensor of :data:`DTYPES`, ``0 < p < 1``. Raises RuntimeError where the kernel is not available
    (:func:`unavailable_reason`)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the compiled top-p kernel is not available: {_state.get('error')}")
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        raise ValueError(f"the compiled top-p kernel takes CPU tensors of {DTYPES}, got {x.dtype} on {x.device}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"the compiled top-p kernel takes 0 < p < 1, got {p} (p = 1 keeps every non-zero entry)")
    if exact_span(x.shape[-1]) < 0:
        raise ValueError(f"rows of {x.shape[-1]} entries are too long for the compiled top-p kernel (at most 2^29)")
    return _run(lib, x.detach(), float(p))


def _run(lib: ctypes.CDLL, x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_p_rows` on a checked ``x`` with the library ``lib``."""
    d = x.shape[-1]
    kernel_dtype = x.dtype if x.dtype in ENTRY_POINTS else torch.float32  # fp16 through float32, exactly
    xk = x.to(kernel_dtype).contiguous()
    rows = xk.numel() // d if d else 0
    out = torch.empty_like(xk)
    zeros = torch.empty(x.shape[:-1], dtype=torch.int64)
    if rows:
        rc = getattr(lib, ENTRY_POINTS[kernel_dtype])(xk.data_ptr(), rows, d, p, exact_span(d), out.data_ptr(),
                                                      zeros.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"the compiled top-p kernel could not allocate its work space (rows of {d} entries)")
    return (out if out.dtype == x.dtype else out.to(x.dtype)), zeros
