"""dllm_sparse.kernels.bench's CUDA-graph timing, run on a CPU against a stand-in for torch.cuda: which path a call
takes (graph replays; eager with the synchronising call named; eager after a failed capture), and that the sync
debug mode is put back. The GPU itself is exercised by experiments/device_check.py."""

from __future__ import annotations

import types

import pytest
import torch

from dllm_sparse.kernels import bench


class FakeCuda:
    """The parts of torch.cuda that bench uses. A call "synchronises" when it runs ``sync()`` while the debug mode
    is "error" (it raises like PyTorch does); capture fails when ``capture_error`` is set."""

    def __init__(self, capture_error: Exception | None = None):
        self.mode, self.capture_error, self.replays, self.captured = 0, capture_error, 0, []
        self.capturing = False

    # sync debug mode
    def get_sync_debug_mode(self):
        return self.mode

    def set_sync_debug_mode(self, mode):
        self.mode = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)

    def synchronize(self):
        pass

    def sync(self):  # what .item() does
        if self.mode == 2:
            raise RuntimeError("called a synchronizing CUDA operation")

    # streams, graphs, events
    def Stream(self):
        return types.SimpleNamespace(wait_stream=lambda other: None)

    def current_stream(self):
        return types.SimpleNamespace(wait_stream=lambda other: None)

    def stream(self, s):
        return _Context()

    def CUDAGraph(self):
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1

        return Graph()

    def graph(self, g):
        fake = self

        class Capture:
            def __enter__(self):
                fake.capturing = True

            def __exit__(self, *exc):
                fake.capturing = False
                if fake.capture_error is not None and exc[0] is None:
                    raise fake.capture_error
                return False

        return Capture()

    def Event(self, enable_timing=False):
        return types.SimpleNamespace(record=lambda: None, elapsed_time=lambda other: 2.0)


class _Context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_cuda(monkeypatch):
    def install(**kwargs):
        fake = FakeCuda(**kwargs)
        for name in ("get_sync_debug_mode", "set_sync_debug_mode", "synchronize", "Stream", "current_stream", "stream",
                     "CUDAGraph", "graph", "Event"):
            monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
        return fake

    return install


def test_a_clean_call_is_captured_and_replayed(fake_cuda):
    fake = fake_cuda()
    calls = []
    ms, how = bench.graph_ms(lambda: calls.append(fake.capturing), calls=20, replays=5)
    assert how == "cuda_graph"
    assert calls.count(True) == 20  # the 20 calls were made inside the capture
    assert fake.replays == 1 + 5  # one warm replay, then the timed ones
    assert ms == pytest.approx(2.0 / 20)  # median replay time (2 ms) over the calls per graph
    assert fake.mode == 0


def test_a_host_sync_names_the_call_and_times_eagerly(fake_cuda):
    fake = fake_cuda()

    def step():
        fake.sync()  # the offending line

    ms, how = bench.graph_ms(step, calls=4, replays=3)
    assert how.startswith("eager: host sync, called a synchronizing CUDA operation at ")
    assert "test_bench_timing.py" in how and "fake.sync()  # the offending line" in how
    assert fake.replays == 0 and ms == pytest.approx(2.0 / 4)
    assert fake.mode == 0  # the debug mode is back to what it was


def test_a_failed_capture_is_recorded(fake_cuda):
    fake = fake_cuda(capture_error=RuntimeError("operation not permitted when stream is capturing"))
    ms, how = bench.graph_ms(lambda: None, calls=2, replays=3)
    assert how == "eager: capture failed, RuntimeError: operation not permitted when stream is capturing"
    assert fake.replays == 0 and ms == pytest.approx(1.0)


def test_host_sync_site_keeps_a_previous_mode(fake_cuda):
    fake = fake_cuda()
    fake.set_sync_debug_mode("warn")
    assert bench.host_sync_site(lambda: None) is None
    assert fake.mode == 1
    assert "synchronizing" in bench.host_sync_site(fake.sync)
    assert fake.mode == 1
