"""What the machine can do fast: CPU feature flags and whether bf16 matmuls are worth using.

On x86 CPUs without AVX512-BF16 or AMX, PyTorch runs bf16 matmuls on a slow reference GEMM: a bf16 training step
of the embedded twin measured ~30x slower than fp32 on such a CPU (AVX2 only), while on a CPU with AVX512-BF16
a bf16 forward was ~2.2x faster than fp32. Scripts that default to bf16 ask :func:`slow_bf16_reason` first.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["cpu_flags", "slow_bf16_reason"]


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (an empty set where that file does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


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
