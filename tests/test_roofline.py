"""kernels/roofline.py against the roofline figures worked out by hand for the 8B FFN matrices (H100, bf16, one
token): bytes = kept weight rows + x + y, time = bytes / 3.35 TB/s."""

from __future__ import annotations

import pytest

from dllm_sparse.kernels.roofline import (
    bound_us,
    expected_us,
    gpu_key,
    kept_rows,
    matmul_bytes,
    matmul_flops,
    share_of_bound,
)

SPARSITIES = (0.0, 0.5, 0.7, 0.9)


@pytest.mark.parametrize("d_in, d_out, matrices, expected", [
    (4096, 14336, 1, (35.1, 17.5, 10.5, 3.5)),    # LLaMA-3.1-8B gate (or up): 117 MB dense
    (4096, 14336, 2, (70.1, 35.1, 21.0, 7.0)),    # LLaMA-3.1-8B gate + up in one launch
    (4096, 12288, 1, (30.0, 15.0, 9.0, 3.0)),     # LLaDA-8B gate
])
def test_known_h100_bounds(d_in, d_out, matrices, expected):
    got = [bound_us(matmul_bytes(d_in, d_out, sparsity=s, matrices=matrices), "H100") for s in SPARSITIES]
    # The figures count the weights alone, rounded to 0.1 us; x and y add at most 0.03 us (fused: 21.06 vs 21.0).
    assert got == pytest.approx(expected, abs=0.06)
    weights_only = [matrices * kept_rows(d_in, s) * d_out * 2 / 3.35e12 * 1e6 for s in SPARSITIES]
    assert [round(w, 1) for w in weights_only] == list(expected)


def test_bytes_by_hand():
    # 10 inputs, 30 % masked -> 7 kept rows of 6 bf16 values, x 10 values, y 6 values per matrix.
    assert matmul_bytes(10, 6, sparsity=0.3) == (7 * 6 + 10 + 6) * 2
    assert matmul_bytes(10, 6, sparsity=0.3, tokens=3, matrices=2, dtype="fp32") == (2 * 7 * 6 + 3 * 10 + 2 * 3 * 6) * 4
    assert matmul_flops(10, 6, sparsity=0.3, tokens=3, matrices=2) == 2 * 2 * 3 * 7 * 6
    assert matmul_bytes(4096, 14336) == 117_440_512 + (4096 + 14336) * 2  # the 117 MB matrix


def test_h200_and_compute_bound():
    nbytes = matmul_bytes(4096, 14336)
    assert bound_us(nbytes, "H200") == pytest.approx(nbytes / 4.8e12 * 1e6)
    # 4096 tokens through gate: 481 GFLOP at 989 TFLOP/s outlasts its 268 MB of traffic.
    flops = matmul_flops(4096, 14336, tokens=4096)
    assert bound_us(matmul_bytes(4096, 14336, tokens=4096), "H100", flops) == pytest.approx(flops / 989e12 * 1e6)
    assert expected_us(nbytes, "H100", kernels=2, graph=True) == pytest.approx(bound_us(nbytes) + 3.0)
    assert expected_us(nbytes, "H100", graph=False) == pytest.approx(bound_us(nbytes) + 5.0)


def test_device_names_and_shares():
    assert gpu_key("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_key("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_key("NVIDIA H200") == "H200"
    assert gpu_key("cpu") is None and share_of_bound(10.0, 4096, 14336, "cpu") == {}
    row = share_of_bound(70.2, 4096, 14336, "NVIDIA H100 80GB HBM3", sparsity=0.0)
    assert row["bound_gpu"] == "H100" and row["of_bound"] == pytest.approx(35.07 / 70.2, rel=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=float("nan")), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(tokens=0), "tokens"), (dict(matrices=0), "matrices"), (dict(dtype="int8"), "unknown dtype"),
])
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        matmul_bytes(4096, 14336, **kwargs)


def test_bad_gpu_and_time():
    with pytest.raises(ValueError, match="unknown GPU"):
        bound_us(1000, "A100")
    with pytest.raises(ValueError, match="positive time"):
        share_of_bound(0.0, 16, 16, "NVIDIA H100")
    with pytest.raises(ValueError, match="positive time"):
        share_of_bound(float("inf"), 16, 16, "NVIDIA H100")


def test_the_docs_table_is_what_the_module_prints():
    from pathlib import Path

    from dllm_sparse.kernels.roofline import table_8b

    table = table_8b()
    assert table in (Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text()
    fused = next(ln for ln in table.splitlines() if ln.startswith("| LLaMA-3.1-8B | gate + up") and "| 1 |" in ln)
    assert "| 70.1 / 35.1 / 21.1 / 7.0 |" in fused  # H100, one token: 70.1 / 35.1 / 21.0 / 7.0 by the weights alone
