"""The compiled CPU top-p kernel: ``csrc/top_p_rows.c``, built once with the system C compiler, called through ctypes.

Why compiled: on CPU the per-token top-p rule used to be NumPy's row sort followed by four PyTorch passes (running
sum, compare, mask, zero count), 1.2-1.3x the time of a dense forward of SmolLM2-135M at the gate / up /
intermediate sites. The kernel finds the same threshold without sorting (a mass histogram whose sums are exact;
the proof is at the top of the C file) and writes the masked output and each row's zero count in the same pass,
on PyTorch's intra-op thread count. Its outputs are bit-identical to the reference rule's
(``x * top_p_mask_reference(x, p)``), on every CPU: it does integer work and float64 additions in a fixed order,
built without fused multiply-adds or fast-math.

Built on first use into ``<cache>/native/`` (cache: ``$DLLM_SPARSE_CACHE``, else ``~/.cache/dllm_sparse``), under a
name that holds everything that changes the binary: the source, the compiler's version, the flags and the CPU's
feature flags (``-march=native``). Concurrent first uses build once (a file lock). ``$CC`` picks the compiler
(default ``cc``). Where no compiler works, :func:`available` is False and :func:`unavailable_reason` says why;
``TopP(method="auto")`` then runs NumPy's row sort (the same masks, 2-3x slower) and says so once.
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
from pathlib import Path

import torch

__all__ = ["available", "unavailable_reason", "describe", "top_p_rows", "library_path", "SOURCE"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "top_p_rows.c"
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-fast-math")
#: dtypes the kernel serves (bf16 / fp16 go through float32, exactly: their values are float32 values)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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


def _build(target: Path, cc: str, march_native: bool) -> None:
    """Compile into a temporary file next to ``target`` and rename it into place (readers never see half a
    library), readable by every user of a shared cache."""
    flags = _flags(march_native)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"`{cc} {' '.join(flags)}` failed on {SOURCE.name}: {run.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if shutil.which(cc) is None and not os.path.isfile(cc):
        raise RuntimeError(f"no C compiler: {cc!r} is not on PATH. Install gcc or clang, or point $CC at one")
    from filelock import FileLock

    errors = []
    for march_native in (True, False):  # -march=native is faster (AVX2 here); a compiler may refuse it
        try:
            target = library_path(cc, march_native)
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(str(target) + ".lock"):
                    if not target.is_file():  # another process may have built it while this one waited
                        _build(target, cc, march_native)
            lib = ctypes.CDLL(str(target))
            _state["built_with"] = f"{_compiler_version(cc)}, {' '.join(_flags(march_native))}"
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    else:
        raise RuntimeError("; ".join(errors))
    fn = lib.top_p_rows_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def _library() -> ctypes.CDLL | None:
    if not _state:
        with _lock:
            if not _state:
                try:
                    _state["lib"] = _load()
                except RuntimeError as e:
                    _state["error"] = str(e)
    return _state.get("lib")


def available() -> bool:
    """True when the kernel is built (or builds now) and loads."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    _library()
    return _state.get("error")


def describe() -> str:
    """One line for benchmark records: the compiler and flags the kernel was built with, or why there is none."""
    lib = _library()
    if lib is None:
        return f"not available ({_state['error']})"
    return f"{Path(lib._name).name}: {_state['built_with']}"


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
        raise RuntimeError(f"the compiled top-p kernel is not available: {_state['error']}")
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        raise ValueError(f"the compiled top-p kernel takes CPU tensors of {DTYPES}, got {x.dtype} on {x.device}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"the compiled top-p kernel takes 0 < p < 1, got {p} (p = 1 keeps every non-zero entry)")
    d = x.shape[-1]
    span = exact_span(d)
    if span < 0:
        raise ValueError(f"rows of {d} entries are too long for the compiled top-p kernel (at most 2^29)")
    x32 = x.detach().to(torch.float32).contiguous()
    rows = x32.numel() // d if d else 0
    out = torch.empty_like(x32)
    zeros = torch.empty(x.shape[:-1], dtype=torch.int64)
    if rows:
        rc = lib.top_p_rows_f32(x32.data_ptr(), rows, d, float(p), span, out.data_ptr(), zeros.data_ptr(),
                                torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"the compiled top-p kernel could not allocate its work space (rows of {d} entries)")
    return (out if x.dtype == torch.float32 else out.to(x.dtype)), zeros
