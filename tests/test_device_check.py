"""experiments/device_check.sh --smoke end to end on the CPU (tiny shapes), the preflight's refusals, and the
package shim that makes the working tree importable where the project is not installed (the device image)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "experiments" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_of_the_shell_script(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DLLM_SPARSE_FORCE_SHIM": "1"}
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "device_check.sh"), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    outcomes = {k: v["outcome"] for k, v in summary["parts"].items()}
    assert outcomes == {"kernels": "ok", "decode": "ok", "frontier": "ok", "train": "skipped"}, summary
    assert summary["preflight"]["package_from"].startswith("working tree via")  # the shim served every part
    frontier = json.loads((tmp_path / "frontier" / "trajectory_frontier.json").read_text())
    assert {r["strategy"] for r in frontier["rows"]} >= {"dense", "delta-input:0.25/0.5@block_start"}
    assert any(f.endswith(".json") for f in summary["parts"]["kernels"]["files"])
    assert any(f.endswith(".json") for f in summary["parts"]["decode"]["files"])


def test_preflight_refuses_without_cuda_outside_smoke():
    info = _module().preflight(smoke=False)
    import torch

    if not torch.cuda.is_available():
        assert set(info["refused"]) == {"kernels", "decode", "frontier", "train"}
        assert "no CUDA device" in info["refused"]["kernels"]
    assert info["versions"]["torch"] == torch.__version__


def test_version_floors_are_compared_as_numbers():
    mod = _module()
    assert mod._version_tuple("2.11.0+cu128") < mod._version_tuple("2.13")
    assert mod._version_tuple("5.17.1") < mod._version_tuple("5.23") < mod._version_tuple("5.24.0")
    assert mod._version_tuple("3.10.0") > mod._version_tuple("3.9")


def test_shim_maps_the_subpackages(tmp_path):
    shim = _module().package_path(tmp_path, force=True)
    code = ("import dllm_sparse, dllm_sparse.samplers, dllm_sparse.kernels; "
            "print(dllm_sparse.__file__); print(dllm_sparse.samplers.__file__); "
            "print(dllm_sparse.kernels.accelerate_ffn.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": shim})
    assert proc.returncode == 0, proc.stderr[-2000:]
    init, samplers, ffn_module = proc.stdout.split()
    # Imported through the shim (first on the path), not through the installed copy; the files are the tree's own.
    assert init.startswith(shim) and samplers.startswith(shim) and ffn_module == "dllm_sparse.kernels.sparse_ffn"
    assert Path(samplers).resolve() == (ROOT / "samplers" / "__init__.py").resolve()
