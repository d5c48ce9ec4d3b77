"""Ahead-of-time compile checks of the Triton kernels (no GPU): experiments/kernels_aot.py compiles the
specializations the launchers pick at the 8B FFN shapes for sm_80 / sm_90 and fails on a compile error or a
register spill; the compiled PTX is read for the properties the kernels were written for.

Compiling needs Triton's real compiler, not its interpreter, so every compile runs in a child process without
TRITON_INTERPRET. The launch plans (grids, splits, tiles) are checked in-process on ``meta`` tensors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dllm_sparse.kernels import triton_available

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "kernels_aot.py"

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _needs_nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")


def _child(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset; 1 is its default
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _script():
    spec = importlib.util.spec_from_file_location("kernels_aot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tk():
    from dllm_sparse.kernels import triton_kernels

    return triton_kernels


# --------------------------------------------------------------------------------------------------------
# Launch plans (no compile)
# --------------------------------------------------------------------------------------------------------


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_gathered_gemm_splits_k_only_when_the_output_tiles_leave_sms_idle():
    tk = _tk()
    idx, count = _meta(14336, dtype=torch.int32), _meta(1, dtype=torch.int32)
    plans = {}
    for M in (4, 100, 288):
        with tk.recording_launches(num_sms=132) as rec:
            y = tk.colsparse_gemm(_meta(M, 14336), _meta(14336, 4096), idx, count)  # W_down^T at the LLaMA-8B shape
        assert y.shape == (M, 4096) and y.dtype == torch.bfloat16
        (launch,) = rec
        plans[M] = (launch["grid"], launch["args"]["SPLIT_K"], launch["args"]["out_ptr"].dtype)
    # 1 x 32 output tiles: 4 splits fill 128 of 132 SMs; 2 x 32: 2 splits; 5 x 32 = 160 tiles: no split
    assert plans[4] == ((1, 32, 4), 4, torch.float32)
    assert plans[100] == ((2, 32, 2), 2, torch.float32)
    assert plans[288] == ((5, 32, 1), 1, torch.bfloat16)  # one split writes y directly


def test_row_sparse_grids_are_persistent_not_full_width():
    tk = _tk()
    idx, count = _meta(14336, dtype=torch.int32), _meta(1, dtype=torch.int32)
    with tk.recording_launches(num_sms=132) as rec:
        tk.rowsparse_gemv(_meta(4096), _meta(14336, 4096), idx, count)
        tk.rowsparse_gemm(_meta(64, 4096), _meta(14336, 4096), idx, count)
        tk.rowsparse_gemm(_meta(288, 4096), _meta(14336, 4096), idx, count)
        tk.rowsparse_gemv(_meta(4096), _meta(40, 4096), idx, count)  # fewer row blocks than the cap
    grids = [launch["grid"] for launch in rec]
    # 14336 / 8 = 1792 row blocks, capped at 2 programs per SM; the GEMM shares the cap among its M blocks
    assert grids == [(264,), (224, 1), (52, 5), (5,)]


def test_tile_configs_fp32_smaller_and_sparsity_bins(monkeypatch):
    tk = _tk()
    for M in (2, 17, 64, 288):
        half = tk.tile_config("colsparse_gemm", torch.bfloat16, M)
        full = tk.tile_config("colsparse_gemm", torch.float32, M)
        assert full["BLOCK_M"] * full["BLOCK_N"] <= half["BLOCK_M"] * half["BLOCK_N"] // 2
        assert full["BLOCK_M"] <= 32
    assert tk.tile_config("colsparse_gemm", torch.float16, 300)["BLOCK_M"] == 64
    default = tk.tile_config("colsparse_gemv", torch.bfloat16, 1, sparsity=0.95)
    assert default == tk.tile_config("colsparse_gemv", torch.bfloat16, 1)  # no tuned entry: the default
    tuned = dict(BLOCK_K=128, BLOCK_N=64, num_warps=8)
    monkeypatch.setitem(tk.TILES, ("colsparse_gemv", "16", 1, 0.9), tuned)
    assert tk.tile_config("colsparse_gemv", torch.bfloat16, 1, sparsity=0.95) == tuned  # bin 0.9 holds 0.9..1
    assert tk.tile_config("colsparse_gemv", torch.bfloat16, 1, sparsity=0.89) == default
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        tk.tile_config("colsparse_gemv", torch.bfloat16, 1, sparsity=1.5)
    with tk.recording_launches(num_sms=4):
        with pytest.raises(RuntimeError, match="does not nest"):
            with tk.recording_launches(num_sms=4):
                pass


def test_script_refuses_the_interpreter_and_bad_tokens():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "run without it" in proc.stderr
    with pytest.raises(SystemExit):
        _script().parse_args(["--tokens", "0"])


def test_loop_bodies_finds_backward_branches_only():
    ptx = textwrap.dedent("""
        ld.global.b32 %r1, [%rd1];
        $L__BB0_1:
        add.s32 %r2, %r2, 1;
        $L__BB0_2:
        bar.sync 0;
        @%p1 bra $L__BB0_2;
        @%p2 bra $L__BB0_1;
        @%p3 bra $L__BB0_9;
        $L__BB0_9:
        bar.sync 0;
        ret;
    """)
    bodies = _script().loop_bodies(ptx)
    assert len(bodies) == 2 and all("bar.sync" in b for b in bodies)
    assert "add.s32" not in bodies[0] and "add.s32" in bodies[1] and "ret;" not in bodies[1]


# --------------------------------------------------------------------------------------------------------
# Compiled code (child processes, no GPU)
# --------------------------------------------------------------------------------------------------------

_PTX_CHECK = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "experiments")
    import kernels_aot as ka
    out = {}
    for launch, where in ka.record_launches(132, ["llama-3.1-8b"], ["bf16"], [1]):
        key = ka.specialization(launch)
        name = key[0] + ("" if key[0] != "_topp_threshold_kernel" else str(dict(key[2])["BLOCK"]))
        if name in out or key[0] not in ("_colsparse_gemv_kernel", "_topp_threshold_kernel"):
            continue
        kernel, log = ka.compile_key(key, 90)
        loops = ka.loop_bodies(kernel.asm["ptx"])
        out[name] = {"loops": len(loops), "bar": [b.count("bar.sync") for b in loops],
                     "cvt_f64": [len([l for l in b.splitlines() if "cvt.f64" in l or "cvt.rn.f64" in l])
                                 for b in loops],
                     "v4_loads": [b.count("ld.global.v4") for b in loops], **ka.ptxas_usage(log)}
        sass = ka.sass_loops(kernel.asm["cubin"])
        if sass is not None:
            out[name]["sass"] = [[i.split()[0] if not i.startswith("@") else i.split()[1] for i in loop
                                  if "LDG" in i or "BAR" in i] for loop in sass]
    print(json.dumps(out))
""")


def test_compiled_gemv_and_topp_loops():
    """sm_90 PTX at the LLaMA-3.1-8B shape, bf16, one token: the column-sparse GEMV's K loop has no barrier (its
    reduction over K is after the loop) and issues its 8 vector weight loads per iteration; the top-p bisection loop
    holds no float64 conversion (the row is converted once, before it)."""
    _needs_nvidia_backend()
    proc = _child(["-c", _PTX_CHECK])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"_colsparse_gemv_kernel", "_topp_threshold_kernel4096", "_topp_threshold_kernel16384"}
    gemv = out["_colsparse_gemv_kernel"]
    assert gemv["loops"] == 1 and gemv["bar"] == [0], gemv
    assert gemv["v4_loads"] == [8], gemv  # 64 x 128 bf16 per iteration: 128 bytes per thread, 8 x 16 bytes
    if "sass" in gemv:  # ptxas kept the 8 wide loads (no barrier between them) in the machine code
        (ops,) = [loop for loop in gemv["sass"] if "LDG.E.128" in loop]
        assert ops.count("LDG.E.128") == 8 and not any(op.startswith("BAR") for op in ops), ops
    for block in (4096, 16384):
        topp = out[f"_topp_threshold_kernel{block}"]
        assert topp["loops"] == 1 and topp["cvt_f64"] == [0], topp  # the one loop: the bisection
        assert topp["spill_stores"] == 0, topp


def test_aot_quick_subset():
    """A few token counts at one shape, bf16, sm_80 and sm_90: compiles, no spill (the full run is below)."""
    _needs_nvidia_backend()
    proc = _child([str(SCRIPT), "--shapes", "llama-3.1-8b", "--dtypes", "bf16", "--tokens", "1", "48", "--archs",
                   "80", "90"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert {r.split()[0] for r in rows} == {"sm_80", "sm_90"}
    assert all(re.search(r"spill\s+0 B", r) for r in rows), rows
    for kernel in ("topp_threshold", "colsparse_gemv", "colsparse_gemm", "rowsparse_gemv", "rowsparse_gemm"):
        assert any(kernel in r for r in rows), kernel


def test_aot_moe_expert_shape_for_sm90():
    """One routed expert's products (Qwen3-30B-A3B: hidden 2048, expert width 768; accelerate_ffn runs them on the
    same kernels over each expert's gathered tokens) compile for sm_90 with no spill."""
    _needs_nvidia_backend()
    proc = _child([str(SCRIPT), "--shapes", "qwen3-30b-a3b-expert", "--dtypes", "bf16", "--tokens", "1", "48",
                   "--archs", "90"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("sm_90")]
    assert rows and all(re.search(r"spill\s+0 B", r) for r in rows), rows
    for kernel in ("topp_threshold", "colsparse_gemv", "colsparse_gemm", "rowsparse_gemv", "rowsparse_gemm"):
        assert any(kernel in r for r in rows), kernel


@pytest.mark.slow
def test_aot_every_8b_specialization_and_the_docs_table(tmp_path):
    """Every specialization at both 8B shapes, fp16 and bf16, M = 1..288, sm_80 and sm_90: compiles, no spill; under
    the Triton version the docs' table was made with, the table in docs/kernels.md is this run's."""
    _needs_nvidia_backend()
    table = tmp_path / "aot.md"
    proc = _child([str(SCRIPT), "--markdown", str(table)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    generated = table.read_text()
    docs = (ROOT / "docs" / "kernels.md").read_text()
    import triton

    documented = re.search(r"^Triton (\S+) \(ptxas from its wheel\)", docs, re.M)
    assert documented, "docs/kernels.md has no ahead-of-time compile table"
    if documented.group(1) != triton.__version__:
        pytest.skip(f"the docs' table is from Triton {documented.group(1)}, this is {triton.__version__}")
    assert generated in docs, "docs/kernels.md's table differs from this run: regenerate it (see its header line)"
