"""Host (CPU) cost of one call of the sparse op path, with the Triton launch stubbed out.

    python experiments/op_host_cost.py --label before      # docs/results/op_host_cost/op_host_cost_before.json
    python experiments/op_host_cost.py --label after --calls 500

What is timed: the public functions of dllm_sparse.kernels (argument checks, reshapes, the custom-op dispatch, the
choice of backend, the Triton launchers' own tensor bookkeeping: output allocation, index compaction, partial
sums) exactly as a GPU call runs them, except that each ``kernel[grid](...)`` launch is replaced by a stub that
returns at once (and counts itself, so a call that never reached the launch is reported, not timed). On a GPU this
host time is spent before the kernel can start; when it exceeds the kernel's own time (a few microseconds at 8B
shapes, kernels/roofline.py) eager decoding measures Python, which is why the benchmarks time CUDA graphs.

How: the process sets ``TRITON_INTERPRET=1`` (so that the Triton backend accepts CPU tensors) and
``DLLM_SPARSE_KERNELS=triton`` before Triton is imported, then replaces every Triton kernel object in
dllm_sparse.kernels.triton_kernels with the stub. The tensors are small (default 256 x 512, float32) so that the
CPU work of the bookkeeping ops is negligible next to their dispatch, as it is on a GPU where they are launches;
one torch thread. Each figure is the median over ``--repeats`` batches of ``--calls`` calls, in microseconds per
call (and the fastest batch, the least disturbed on a shared machine). A CPU timing: it depends on the machine and its
load (the JSON records both, with the load average), not a unit test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Before triton (transformers imports it early) and before the kernels choose a backend.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["DLLM_SPARSE_KERNELS"] = "triton"


class StubKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing and counts."""

    def __init__(self, name: str):
        self.name = name
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1

        return launch


def stub_kernels() -> list[StubKernel]:
    """Replace every Triton kernel in dllm_sparse.kernels.triton_kernels with a StubKernel; returns the stubs."""
    import triton

    from dllm_sparse.kernels import triton_kernels

    kernel_types = tuple(t for t in (getattr(triton.runtime, "JITFunction", None),
                                     getattr(triton.runtime.interpreter, "InterpretedFunction", None)) if t)
    stubs = []
    for name, obj in list(vars(triton_kernels).items()):
        if isinstance(obj, kernel_types):
            stubs.append(StubKernel(name))
            setattr(triton_kernels, name, stubs[-1])
    if not stubs:
        raise RuntimeError("no Triton kernel found in dllm_sparse.kernels.triton_kernels to stub")
    return stubs


def per_call_us(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(median, min) over ``repeats`` batches of the microseconds per call; the min is the least disturbed by
    other processes on a shared machine."""
    for _ in range(20):
        fn()
    batches = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(batches), min(batches)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="now", help="names the result file op_host_cost_<label>.json (default: now)")
    ap.add_argument("--shape", type=int, nargs=2, default=(256, 512), metavar=("D_IN", "D_OUT"),
                    help="weight shape (default: 256 512)")
    ap.add_argument("--calls", type=int, default=300, help="calls per batch (default: 300)")
    ap.add_argument("--repeats", type=int, default=7, help="batches; the median is reported (default: 7)")
    ap.add_argument("--output-dir", type=Path, default=Path("docs/results/op_host_cost"),
                    help="where the JSON goes (default: docs/results/op_host_cost)")
    args = ap.parse_args(argv)
    for name in ("calls", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.shape) < 1:
        ap.error(f"--shape must be two positive sizes, got {args.shape}")
    if "triton" in sys.modules and type(sys.modules["triton"].language.sum).__name__ != "InterpretedFunction":
        raise SystemExit("triton was imported before TRITON_INTERPRET=1 was set: run this as a script")

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from dllm_sparse.atomic import atomic_write_json
    from dllm_sparse.hardware import machine_description
    from dllm_sparse.kernels import backend, column_sparse_matmul, row_sparse_matmul, topp_threshold
    from dllm_sparse.kernels.bench import environment

    stubs = stub_kernels()
    d_in, d_out = args.shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g)
    wt = w.t().contiguous()
    x1, x4 = torch.randn(1, d_in, generator=g), torch.randn(4, d_in, generator=g)
    tau1, tau4 = torch.full((1, 1), 0.5), torch.full((4, 1), 0.5)
    keep_out = torch.rand(d_out, generator=g) >= 0.5
    assert backend(x1) == "triton", "the Triton backend must be chosen for the stubs to stand in for launches"
    calls = {
        "column_sparse GEMV, threshold (M=1)": lambda: column_sparse_matmul(x1, wt, threshold=tau1),
        "topp_threshold (M=1)": lambda: topp_threshold(x1, 0.5),
        "row_sparse GEMV (M=1)": lambda: row_sparse_matmul(x1, w, keep_out),
        "column_sparse gathered GEMM, threshold (M=4)": lambda: column_sparse_matmul(x4, wt, threshold=tau4),
        "reference: F.linear (M=1, computes on the CPU)": lambda: F.linear(x1, w),
    }
    rows = []
    load_before = os.getloadavg()
    for name, fn in calls.items():
        before = sum(s.launches for s in stubs)
        fn()
        launches = sum(s.launches for s in stubs) - before
        if launches == 0 and not name.startswith("reference"):
            raise SystemExit(f"{name}: no stubbed kernel was launched; the op path no longer reaches "
                             "triton_kernels' kernels as this script expects")
        us, best = per_call_us(fn, args.calls, args.repeats)
        rows.append({"call": name, "host_us_per_call": us, "host_us_per_call_min": best, "kernel_launches": launches})
        print(f"{name:48s} {us:8.1f} us per call (min {best:6.1f})  ({launches} stubbed "
              f"launch{'es' if launches != 1 else ''})", flush=True)
    threads = torch.get_num_threads()
    result = {"label": args.label, "machine": machine_description(threads), "threads": threads,
              "shape": [d_in, d_out], "dtype": "float32", "calls": args.calls, "repeats": args.repeats,
              "env": environment("cpu", backend="triton (launches stubbed)"), "rows": rows,
              "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg(), "cores": os.cpu_count()},
              "note": "CPU host cost of the op path with each Triton launch stubbed; machine- and load-dependent"}
    path = args.output_dir / f"op_host_cost_{args.label}.json"
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
