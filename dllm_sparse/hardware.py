"""What the machine can do fast: CPU feature flags, whether bf16 matmuls are worth using, and how many cores are
idle right now (the ``--threads auto`` of the experiments).

On x86 CPUs without AVX512-BF16 or AMX, PyTorch runs bf16 matmuls on a slow reference GEMM: a bf16 training step
of the embedded twin measured ~30x slower than fp32 on such a CPU (AVX2 only), while on a CPU with AVX512-BF16
a bf16 forward was ~2.2x faster than fp32. Scripts that default to bf16 ask :func:`slow_bf16_reason` first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["cpu_name", "cpu_flags", "machine_description", "slow_bf16_reason", "parse_proc_stat", "idle_cores",
           "auto_threads"]


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
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_name()}, {os.cpu_count()} cores ({usable} usable by this process; {' '.join(fast) or 'no AVX2'}), "
            f"{threads} torch threads, torch {torch.__version__}, transformers {transformers.__version__}")


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


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """Per CPU of a ``/proc/stat`` text: ``{cpu index: (idle ticks, total ticks)}`` since boot.

    A ``cpuN`` line holds user nice system idle iowait irq softirq steal [guest guest_nice]. Idle = idle +
    iowait (a core waiting for I/O would run our threads); total = the first eight fields (guest time is already
    counted in user, so it is left out; steal, time the hypervisor gave to others, is busy for us). The
    aggregate ``cpu`` line and every other line are ignored."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        fields = [int(v) for v in rest.split()]
        if len(fields) < 4:
            raise ValueError(f"/proc/stat line {line!r} has {len(fields)} counters; expected at least 4 "
                             "(user nice system idle ...)")
        out[int(name[3:])] = (fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8]))
    return out


def _read_proc_stat() -> str:
    return Path("/proc/stat").read_text()


def idle_cores(interval: float = 0.5, read: Callable[[], str] = _read_proc_stat,
               sleep: Callable[[float], None] = time.sleep, cpus: set[int] | None = None) -> float | None:
    """How many of ``cpus`` (default: those this process may run on) were idle over the next ``interval``
    seconds: the sum over those cores of their idle fraction between two samples of ``/proc/stat``
    (:func:`parse_proc_stat`). None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        first = parse_proc_stat(read())
        sleep(interval)
        second = parse_proc_stat(read())
    except OSError:
        return None
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(second)
    idle = 0.0
    for cpu in cpus:
        if cpu not in first or cpu not in second:
            continue
        d_idle, d_total = second[cpu][0] - first[cpu][0], second[cpu][1] - first[cpu][1]
        idle += d_idle / d_total if d_total > 0 else 1.0  # no tick counted: nothing ran there
    return idle


def auto_threads(max_threads: int, idle: float | None, interval: float = 0.5) -> tuple[int, str]:
    """``(threads, why)``: one intra-op thread per idle core (``idle`` from :func:`idle_cores`, rounded to the
    nearest whole core, measured over ``interval`` seconds), at least 1 and at most ``max_threads``;
    ``max_threads`` when the idle cores are unknown.
    Why not more: on a busy machine oversubscribed OpenMP threads spin and wait for each other."""
    if idle is None:
        return max_threads, f"{max_threads} (idle cores unknown: /proc/stat unreadable; torch's default)"
    n = max(1, min(max_threads, int(idle + 0.5)))
    why = f"{n} ({idle:.1f} of {max_threads} usable cores idle over {interval:g} s"
    if n == max_threads:
        return n, why + ")"
    return n, why + "; the others are busy with other processes: pass --threads N to override)"
