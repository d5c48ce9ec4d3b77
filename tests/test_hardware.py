"""dllm_sparse.hardware: when bf16 is worth using."""

import pytest

from dllm_sparse.hardware import slow_bf16_reason


def test_bf16_is_fast_only_with_bf16_matmul_units():
    assert slow_bf16_reason("cpu", {"avx2", "avx512f"}) is not None  # AVX512 without BF16: slow GEMM
    assert "AVX512-BF16" in slow_bf16_reason("cpu", {"avx2"})
    assert slow_bf16_reason("cpu", {"avx2", "avx512_bf16"}) is None
    assert slow_bf16_reason("cpu", {"amx_bf16"}) is None
    assert slow_bf16_reason("cuda:0", {"avx2"}) is None
    assert slow_bf16_reason("cpu", set()) is None  # flags unknown: keep the caller's choice



# ---- --threads auto: one thread per usable core ---------------------------------------------------------------


def test_auto_threads_is_one_thread_per_usable_core_and_says_so(monkeypatch):
    import os

    import dllm_sparse.hardware as hardware

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)  # 3 cores of a bigger machine
    assert hardware.usable_cores() == 3
    n, why = hardware.auto_threads()
    assert n == 3 and why.startswith("3 (one per core this process may run on") and "--threads N" in why
    assert hardware.auto_threads(8)[0] == 8
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="cores must be a whole number >= 1"):
            hardware.auto_threads(bad)


def test_usable_cores_without_sched_getaffinity(monkeypatch):
    import os

    import dllm_sparse.hardware as hardware

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert hardware.usable_cores() == 6
