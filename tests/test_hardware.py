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



# ---- --threads auto: idle cores from two /proc/stat samples (constructed text, no timing) -------------------

STAT_BEFORE = """cpu  300 0 100 1000 20 0 0 0 0 0
cpu0 100 0 50 500 10 0 0 0 0 0
cpu1 200 0 50 500 10 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""
# 100 ticks later: cpu0 spent 90 of them idle (80 idle + 10 iowait), cpu1 was busy for 75 (60 user + 15 steal).
STAT_AFTER = """cpu  370 0 110 1105 30 0 0 15 0 0
cpu0 105 0 55 580 20 0 0 0 0 0
cpu1 265 0 55 525 10 0 0 15 7 0
intr 22345 0 0
"""


def test_parse_proc_stat_reads_idle_and_total_ticks_per_core():
    from dllm_sparse.hardware import parse_proc_stat

    # idle = idle + iowait; total = the first eight counters (guest, already in user, left out).
    assert parse_proc_stat(STAT_BEFORE) == {0: (510, 660), 1: (510, 760)}
    assert parse_proc_stat(STAT_AFTER) == {0: (600, 760), 1: (535, 870)}
    assert parse_proc_stat("intr 1 2\nbtime 3\n") == {}


def test_parse_proc_stat_refuses_a_truncated_line():
    from dllm_sparse.hardware import parse_proc_stat

    with pytest.raises(ValueError, match="cpu3 1 2.*expected at least 4"):
        parse_proc_stat("cpu3 1 2\n")


def test_idle_cores_is_the_sum_of_idle_fractions_between_two_samples():
    from dllm_sparse.hardware import idle_cores

    samples = iter([STAT_BEFORE, STAT_AFTER])
    slept = []
    idle = idle_cores(0.5, read=lambda: next(samples), sleep=slept.append, cpus={0, 1})
    assert slept == [0.5]
    assert idle == pytest.approx(90 / 100 + 25 / 110)
    # Only the cores this process may use count.
    samples = iter([STAT_BEFORE, STAT_AFTER])
    assert idle_cores(0.5, read=lambda: next(samples), sleep=lambda s: None, cpus={1}) == pytest.approx(25 / 110)


def test_idle_cores_is_none_without_proc_stat():
    from dllm_sparse.hardware import idle_cores

    def unreadable():
        raise FileNotFoundError("/proc/stat")

    assert idle_cores(0.5, read=unreadable, sleep=lambda s: None) is None


def test_auto_threads_uses_one_thread_per_idle_core_and_says_why():
    from dllm_sparse.hardware import auto_threads

    n, why = auto_threads(2, 90 / 100 + 25 / 110)  # 1.13 idle cores
    assert n == 1 and "1.1 of 2" in why and "busy" in why and "--threads" in why
    assert auto_threads(2, 1.6)[0] == 2
    assert auto_threads(2, 0.1)[0] == 1  # never 0
    assert auto_threads(4, 7.9)[0] == 4  # never more than torch's own default
    n, why = auto_threads(3, None)
    assert n == 3 and "unknown" in why
