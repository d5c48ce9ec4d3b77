"""experiments/check_8b_shapes.py end to end on the -mini shapes (same code path as the 8B shapes), the per-phase
RSS peaks it reports, and the memory plan's extrapolation."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dllm_sparse.eval.studies.memory_plan import CUDA_OVERHEAD_GB, extrapolate, fits_table
from dllm_sparse.eval.studies.shape_check import PeakRSS, rss_bytes

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "check_8b_shapes.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_8b_shapes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_rss_keeps_the_highest_reading_of_its_poller():
    """The poller against a scripted reader: a spike that lasts one reading is the peak, after the value falls back."""
    import threading

    readings = [100, 120, 900, 130, 110]
    done = threading.Event()

    def read() -> int:
        if len(readings) == 1:
            done.set()
            return readings[0]
        return readings.pop(0)

    with PeakRSS(interval=0, read=read) as mem:
        assert done.wait(timeout=60), "the polling thread never read the scripted values"
    assert mem.start == 100 and mem.peak == 900


@pytest.mark.skipif(rss_bytes() == 0, reason="RSS is read from /proc/self/statm (Linux)")
def test_rss_bytes_counts_pages_a_child_touches():
    """rss_bytes against memory whose residency is under the test's control: a child maps 64 MiB anonymously (no
    allocator, no pool to reuse) and touches every page; its RSS grows by at least that, then falls when unmapped."""
    code = textwrap.dedent("""
        import mmap
        from dllm_sparse.eval.studies.shape_check import rss_bytes
        size = 64 * 2**20
        before = rss_bytes()
        m = mmap.mmap(-1, size)
        for i in range(0, size, mmap.PAGESIZE):
            m[i] = 1
        during = rss_bytes()
        m.close()
        after = rss_bytes()
        print(before, during, after)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, during, after = map(int, out.stdout.split())
    assert during - before >= 64 * 2**20
    assert during - after >= 64 * 2**20


@pytest.mark.parametrize("shape", ["llada-8b-mini", "llama-3.1-8b-mini"])
def test_smoke_run_every_phase(tmp_path, shape):
    res = _script().main(["--shape", shape, "--layers", "2", "--smoke", "--output-dir", str(tmp_path)])
    rows = {r["phase"]: r for r in res["rows"]}
    assert not [r for r in res["rows"] if r.get("error")]
    assert set(rows) == {"build", "generate", "elbo@64", "rolling@64", "sweep", "lm_eval", "accelerate", "step_delta"}
    assert all(r["rss_peak"] >= r["rss_start"] > 0 for r in res["rows"])
    assert rows["accelerate"]["details"]["max_abs_diff_vs_masking_path"] == 0.0
    gen = rows["generate"]["details"]
    if shape.startswith("llada"):
        assert gen["cfg0.0"]["nfe"] == 16 and gen["cfg0.5"]["nfe"] == 32  # guidance: two forwards per step
        assert rows["step_delta"]["details"]["steps"] == 4
    else:
        assert gen["ar"]["new_tokens"] == 16
    assert {r["site"] for r in rows["sweep"]["details"]["rows"]} == {"dense", "input"}
    saved = json.loads((tmp_path / f"{shape}-2l-bf16.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"], default=str))


def test_memory_plan_end_to_end(tmp_path):
    plan = _script().main(["--memory-plan", "--plan-shapes", "llada-8b-mini", "--plan-dtypes", "bf16", "--smoke",
                           "--plan-steps", "2", "--output-dir", str(tmp_path)])
    rows = plan["models"]["llada-8b-mini/bf16"]["rows"]
    assert {r["phase"] for r in rows} >= {"build", "generate", "accelerate"}
    assert all("peak_2" in r for r in rows)
    assert (tmp_path / "memory_plan.md").read_text().count("| llada-8b-mini |") == len(rows)


def _run(peaks: dict[str, float], per_layer: int, baseline: int) -> dict:
    return {"weights": {"per_layer": per_layer}, "baseline_rss": baseline,
            "rows": [{"phase": k, "rss_peak": int(v)} for k, v in peaks.items()]}


def test_extrapolation_formula():
    one = _run({"generate": 5e9, "elbo": 7e9}, per_layer=int(0.5e9), baseline=int(0.4e9))
    two = _run({"generate": 5.6e9, "elbo": 7.4e9}, per_layer=int(0.5e9), baseline=int(0.4e9))
    rows = {r["phase"]: r for r in extrapolate(one, two, layers=32)}
    g = rows["generate"]
    assert g["predicted_2"] == 5.5e9 and g["error_2"] == pytest.approx(5.5 / 5.6 - 1)
    assert g["peak_32"] == 5e9 + 31 * 0.5e9
    assert g["gpu_32"] == 5e9 + 31 * 0.5e9 - 0.4e9 + CUDA_OVERHEAD_GB * 1e9
    # generate grew by 0.6 GB from 1 to 2 layers, more than its 0.5 GB of weights: the slope estimate is larger
    assert g["gpu_32_slope"] == pytest.approx(5e9 + 31 * 0.6e9 - 0.4e9 + CUDA_OVERHEAD_GB * 1e9)
    fits = fits_table(list(rows.values()), layers=32)
    assert fits["generate"] == ["no", "yes", "yes", "yes"]  # 25.2 GB by the slope, 22.1 GB by the weights alone
    # elbo grew by 0.4 GB, less than the weights: a layer never adds less than its weights
    assert rows["elbo"]["gpu_32_slope"] == rows["elbo"]["gpu_32"] == pytest.approx(24.1e9)
    assert fits["elbo"] == ["no", "yes", "yes", "yes"]


@pytest.mark.parametrize("shape, dtypes, table_file", [
    ("llada-8b", ["bf16", "fp32"], "memory_plan.md"),
    ("llama-3.1-8b", ["bf16", "fp32"], "memory_plan_llama-3.1-8b.md"),
])
def test_committed_memory_table_is_what_the_committed_runs_give(tmp_path, shape, dtypes, table_file):
    committed = Path(__file__).resolve().parents[1] / "docs" / "results" / "shapes_8b" / "memory"
    for f in committed.glob(f"{shape}-*.json"):
        (tmp_path / f.name).write_text(f.read_text())
    _script().main(["--memory-plan", "--plan-shapes", shape, "--plan-dtypes", *dtypes,
                    "--output-dir", str(tmp_path)])  # every run's file is there: nothing is measured again
    table = (tmp_path / "memory_plan.md").read_text()
    assert table == (committed / table_file).read_text()
    assert table in (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()  # the doc shows it
