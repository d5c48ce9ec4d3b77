"""dllm_sparse.hardware: when bf16 is worth using."""

from dllm_sparse.hardware import slow_bf16_reason


def test_bf16_is_fast_only_with_bf16_matmul_units():
    assert slow_bf16_reason("cpu", {"avx2", "avx512f"}) is not None  # AVX512 without BF16: slow GEMM
    assert "AVX512-BF16" in slow_bf16_reason("cpu", {"avx2"})
    assert slow_bf16_reason("cpu", {"avx2", "avx512_bf16"}) is None
    assert slow_bf16_reason("cpu", {"amx_bf16"}) is None
    assert slow_bf16_reason("cuda:0", {"avx2"}) is None
    assert slow_bf16_reason("cpu", set()) is None  # flags unknown: keep the caller's choice

