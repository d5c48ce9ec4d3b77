"""The roofline of one kernel call: the bytes it must move, the time that takes at the GPU's memory bandwidth (or
its peak FLOP rate, whichever is slower), and the launch cost added on top.

    from dllm_sparse.kernels.roofline import matmul_bytes, bound_us
    bound_us(matmul_bytes(4096, 14336, sparsity=0.5), "H100")      # 17.5: LLaMA-3.1-8B gate at 50 %, one token

Bytes of a (column-)sparse GEMV/GEMM ``y[M, d_out] = x[M, d_in] @ W^T`` over ``matrices`` weights that share the
input (2: gate and up fused into one launch): the kept rows of W^T (``(1 - sparsity) * d_in`` of them, each
``d_out`` values, per matrix), the activations read (``M * d_in``) and the outputs written (``M * d_out`` per
matrix). Index lists, partial sums and caches are the implementation's business, not the minimum: a kernel at 100 %
of this bound moves nothing else. FLOPs: ``2 * M * kept * d_out`` per matrix.

GPUs (SXM datasheet figures; a PCIe H100 is slower and is named separately): H100 3.35 TB/s HBM3, H200 4.8 TB/s
HBM3e, both 989 dense bf16/fp16 TFLOP/s (fp32 tensor-core work runs as TF32 or slower; the bound then is a floor).

Launch cost (assumed, not measured here): under a CUDA graph about 1.5 us per kernel (the gap between dependent
kernel nodes); eager about 5 us per kernel when the host keeps ahead of the GPU (cudaLaunchKernel latency), and
when it does not, the host's own cost per call: ``experiments/op_host_cost.py`` measures the Python op path
(tens of microseconds per call on a CPU), which is why the benchmarks time the kernels under CUDA graphs.
"""

from __future__ import annotations

import math

__all__ = ["GPUS", "LAUNCH_US", "gpu_key", "kept_rows", "matmul_bytes", "matmul_flops", "bound_us", "expected_us",
           "share_of_bound", "table_8b"]

# name -> (memory bandwidth in bytes/s, dense bf16/fp16 tensor FLOP/s)
GPUS = {
    "H100": (3.35e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H200": (4.8e12, 989e12),
}
# Microseconds added per kernel launch (see the module docstring: assumptions).
LAUNCH_US = {"graph": 1.5, "eager": 5.0}

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "bfloat16": 2, "float16": 2, "float32": 4}


def gpu_key(device_name: str) -> str | None:
    """The GPUS entry of a ``torch.cuda.get_device_name()`` answer ("NVIDIA H100 80GB HBM3" -> "H100"), or None
    for a GPU this table does not know (its rows then have no bound)."""
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIE" in name else "H100"
    return None


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, int):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPE_BYTES)} or bytes per element")
    return _DTYPE_BYTES[key]


def _check(d_in: int, d_out: int, tokens: int, sparsity: float, matrices: int) -> None:
    for name, v in (("d_in", d_in), ("d_out", d_out), ("tokens", tokens), ("matrices", matrices)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be a finite fraction in [0, 1), got {sparsity!r}")


def kept_rows(d_in: int, sparsity: float) -> int:
    """Input rows a sparsity leaves: ``d_in - round(sparsity * d_in)`` (what the benchmarks keep)."""
    return d_in - int(round(sparsity * d_in))


def matmul_bytes(d_in: int, d_out: int, *, tokens: int = 1, sparsity: float = 0.0, dtype="bf16",
                 matrices: int = 1) -> int:
    """Bytes one call must move: kept weight rows + activations read + outputs written (module docstring)."""
    _check(d_in, d_out, tokens, sparsity, matrices)
    b = _dtype_bytes(dtype)
    weights = matrices * kept_rows(d_in, sparsity) * d_out * b
    return weights + tokens * d_in * b + matrices * tokens * d_out * b


def matmul_flops(d_in: int, d_out: int, *, tokens: int = 1, sparsity: float = 0.0, matrices: int = 1) -> int:
    _check(d_in, d_out, tokens, sparsity, matrices)
    return 2 * matrices * tokens * kept_rows(d_in, sparsity) * d_out


def _gpu(gpu: str) -> tuple[float, float]:
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {sorted(GPUS)} (gpu_key() maps a device name)")
    return GPUS[gpu]


def bound_us(nbytes: int, gpu: str = "H100", flops: int = 0) -> float:
    """The roofline time in microseconds: the slower of moving ``nbytes`` and doing ``flops`` on ``gpu``."""
    bandwidth, peak = _gpu(gpu)
    return max(nbytes / bandwidth, flops / peak) * 1e6


def expected_us(nbytes: int, gpu: str = "H100", flops: int = 0, kernels: int = 1, graph: bool = True) -> float:
    """What a call can be expected to take: the bound plus ``kernels`` launches (LAUNCH_US)."""
    return bound_us(nbytes, gpu, flops) + kernels * LAUNCH_US["graph" if graph else "eager"]


def share_of_bound(measured_us: float, d_in: int, d_out: int, device_name: str, **shape) -> dict:
    """The bound of one measured row and the share of it the measurement reached (bound / measured, 1 = at the
    roofline); {} on a GPU the table does not know (the CPU smoke run among them)."""
    if not (math.isfinite(measured_us) and measured_us > 0):
        raise ValueError(f"measured_us must be a positive time, got {measured_us!r}")
    gpu = gpu_key(device_name)
    if gpu is None:
        return {}
    bound = bound_us(matmul_bytes(d_in, d_out, **shape), gpu,
                     matmul_flops(d_in, d_out, **{k: v for k, v in shape.items() if k != "dtype"}))
    return {"bound_us": bound, "of_bound": bound / measured_us, "bound_gpu": gpu}


# The FFN products of the published 8B shapes: (model, product, d_in, d_out, matrices sharing the input).
_8B_PRODUCTS = (
    ("LLaMA-3.1-8B", "gate or up", 4096, 14336, 1), ("LLaMA-3.1-8B", "gate + up, one launch", 4096, 14336, 2),
    ("LLaMA-3.1-8B", "down", 14336, 4096, 1),
    ("LLaDA-8B", "gate or up", 4096, 12288, 1), ("LLaDA-8B", "gate + up, one launch", 4096, 12288, 2),
    ("LLaDA-8B", "down", 12288, 4096, 1),
)


def _call_bound(d_in: int, d_out: int, sparsity: float, gpu: str, dtype: str, tokens: int, matrices: int) -> float:
    nbytes = matmul_bytes(d_in, d_out, tokens=tokens, sparsity=sparsity, dtype=dtype, matrices=matrices)
    return bound_us(nbytes, gpu, matmul_flops(d_in, d_out, tokens=tokens, sparsity=sparsity, matrices=matrices))


def table_8b(sparsities=(0.0, 0.5, 0.7, 0.9), tokens=(1, 32), dtype: str = "bf16") -> str:
    """The Markdown roofline table of docs/kernels.md: every FFN product of the 8B shapes, per token count, with the
    bound in microseconds on H100 and H200 at each sparsity (the fraction of W^T rows not read; for several tokens,
    of the union of their keep-masks). ``python -m dllm_sparse.kernels.roofline`` prints it."""
    head = " / ".join(f"{round(100 * s)}" for s in sparsities)
    lines = ["| model | product (d_in x d_out) | tokens | MB read, dense | "
             f"H100 us at {head} % | H200 us at {head} % |", "| --- | --- | ---: | ---: | --- | --- |"]
    for model, what, d_in, d_out, m in _8B_PRODUCTS:
        for t in tokens:
            cells = [" / ".join(f"{_call_bound(d_in, d_out, s, gpu, dtype, t, m):.1f}" for s in sparsities)
                     for gpu in ("H100", "H200")]
            mb = matmul_bytes(d_in, d_out, tokens=t, dtype=dtype, matrices=m) / 1e6
            lines.append(f"| {model} | {what} ({d_in} x {m * d_out}) | {t} | {mb:.0f} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table_8b())
