"""What the machine can do fast: CPU feature flags, whether bf16 matmuls are worth using, and how many cores this
process may use (the ``--threads auto`` of the experiments).

On x86 CPUs without AVX512-BF16 or AMX, PyTorch runs bf16 matmuls on a slow reference GEMM: a bf16 training step
of the embedded twin measured ~30x slower than fp32 on such a CPU (AVX2 only), while on a CPU with AVX512-BF16
a bf16 forward was ~2.2x faster than fp32. Scripts that default to bf16 ask :func:`slow_bf16_reason` first.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_name", "cpu_flags", "machine_description", "slow_bf16_reason", "usable_cores", "auto_threads"]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor or machine name where it is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (an empty set where that file does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_description(threads: int) -> str:
    """One line for stated times: CPU model, cores (and how many this process may use), the flags that decide
    matmul speed, torch's threads and the library versions."""
    import torch
    import transformers

    fast = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return (f"{cpu_name()}, {os.cpu_count()} cores ({usable_cores()} usable by this process; "
            f"{' '.join(fast) or 'no AVX2'}), {threads} torch threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def slow_bf16_reason(device: str = "cpu", flags: set[str] | None = None) -> str | None:
    """None when bf16 matmuls are fast on ``device``, else a sentence saying why they are not.

    GPUs count as fast; a CPU counts as fast with AVX512-BF16 or AMX-BF16 (or when its flags cannot be read, e.g.
    not Linux, where the caller's choice is kept)."""
    if not str(device).startswith("cpu"):
        return None
    flags = cpu_flags() if flags is None else flags
    if not flags or {"avx512_bf16", "amx_bf16"} & flags:
        return None
    return ("this CPU has no AVX512-BF16 or AMX: PyTorch runs bf16 matmuls on a slow reference GEMM there "
            "(a bf16 training step measured ~30x slower than fp32 on such a CPU)")


def usable_cores() -> int:
    """How many cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where that does not
    exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_threads(cores: int | None = None) -> tuple[int, str]:
    """``(threads, why)`` of ``--threads auto``: one intra-op thread per core this process may run on
    (:func:`usable_cores`, or ``cores``).

    Why not the idle cores: an earlier version sampled ``/proc/stat`` for 0.5 s at start-up and took one thread
    per idle core; a core busy for that half second only (another process starting, a test) then made a whole
    run single-threaded (the main experiment took 1 worker x 1 thread and 18 min instead of ~10). The load of a
    shared machine changes over a run; a start-up sample does not predict it. Pass ``--threads N`` to use fewer
    cores on a machine you know to be busy."""
    n = usable_cores() if cores is None else cores
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cores must be a whole number >= 1, got {n!r}")
    return n, (f"{n} (one per core this process may run on; other load on those cores is not measured: pass "
               "--threads N to use fewer)")
