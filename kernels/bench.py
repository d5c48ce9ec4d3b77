"""What the benchmark scripts share: the run's environment record, rows appended as they finish, and timing that
measures the GPU's work rather than Python's (CUDA graphs), naming the op when a host sync breaks a capture.

    env = environment(device, backend="triton")          # GPU, driver, torch, Triton, CUDA, numpy, backend
    append_row("rows.jsonl", {**row, "env": env})         # one JSON line, flushed: a killed run keeps its rows
    ms, how = graph_ms(fn, calls=20)                       # CUDA graph replays; "eager: <why>" when it could not

Why graphs: one Python call of a sparse op costs tens of microseconds of host time (experiments/op_host_cost.py),
as much as the kernel itself at 8B shapes, so eager timings of back-to-back calls measure Python. A captured
graph replays the launches with no Python in between. A step that synchronises with the host (``.item()``,
``bool(tensor)``, ``.nonzero()``) cannot be captured: before capturing, the step runs once under
``torch.cuda.set_sync_debug_mode("error")``, which raises at the synchronising call, and its traceback names the op.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = ["environment", "append_row", "host_sync_site", "graph_ms", "cpu_ms"]


@functools.cache
def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment(device, backend: str | None = None) -> dict:
    """The record every result file carries: device name, NVIDIA driver, torch / Triton / CUDA / numpy / Python
    versions, the kernel backend, the CPU, the command line and the time."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "driver": _driver_version() if on_gpu else None,
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "numpy": numpy_version,
        "python": platform.python_version(), "backend": backend,
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def append_row(path, row: dict) -> None:
    """Append ``row`` as one JSON line to ``path`` and flush it to disk: a part killed later keeps this row."""
    from dllm_sparse.atomic import json_default

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cpu_ms(fn: Callable[[], object], budget_s: float = 0.2) -> float:
    """Median milliseconds of ``fn`` on the CPU (perf_counter, after two warmup calls): the smoke runs' timer."""
    for _ in range(2):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_sync_site(fn: Callable[[], object]) -> str | None:
    """Run ``fn`` once under ``torch.cuda.set_sync_debug_mode("error")``; None when it never synchronises with the
    host, else the error and the innermost frames of the call that did (what keeps it out of a CUDA graph)."""
    import torch

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        torch.cuda.set_sync_debug_mode(previous)  # before the synchronize below, which would itself be flagged
        torch.cuda.synchronize()
        return None
    except RuntimeError as e:
        frames = traceback.extract_tb(e.__traceback__)[-4:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.line or f.name}" for f in reversed(frames))
        return f"{str(e).splitlines()[0]} at {where}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _replay_ms(run: Callable[[], object], replays: int) -> float:
    """Median milliseconds of ``run()`` over ``replays`` runs, each between two CUDA events."""
    import torch

    run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def graph_ms(fn: Callable[[], object], calls: int = 1, replays: int = 25, warmup: int = 2) -> tuple[float, str]:
    """(milliseconds per call of ``fn``, how it was timed): ``calls`` back-to-back calls captured in one
    ``torch.cuda.CUDAGraph`` (after ``warmup`` calls on a side stream, as capture needs: compilation, lazy inits,
    the allocator), the median of ``replays`` replays divided by ``calls``: "cuda_graph". A call that synchronises
    with the host, or fails to capture, is timed eagerly the same way: "eager: <the synchronising op or the error>".
    The inputs are whatever tensors ``fn`` closes over; replays reuse them (and, for weights larger than L2, read
    them from HBM every time; smaller ones may stay in L2)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)

    def eager():
        for _ in range(calls):
            fn()

    run, how = eager, "cuda_graph"
    sync = host_sync_site(fn)
    if sync is not None:
        how = f"eager: host sync, {sync}"
    else:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                eager()
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - any capture failure is recorded with the eager time instead
            torch.cuda.synchronize()
            how = f"eager: capture failed, {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return _replay_ms(run, replays) / calls, how
