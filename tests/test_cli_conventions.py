"""Command-line conventions shared by the experiment scripts: --sites lists, --overlap-out prefixes, fast --help."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dllm_sparse.cli.generate as generate_cli
from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.sites import parse_sites

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_sites_takes_space_or_comma_lists():
    assert parse_sites(["input", "gate"]) == ["input", "gate"]
    assert parse_sites("input,intermediate") == ["input", "intermediate"]
    assert parse_sites(["input,up", "GATE"]) == ["input", "up", "gate"]
    with pytest.raises(ValueError, match="unknown FFN site 'inptu'"):
        parse_sites(["inptu"])
    with pytest.raises(ValueError, match="given twice"):
        parse_sites(["input", "input"])
    with pytest.raises(ValueError, match="no FFN site"):
        parse_sites([","])


def test_both_scripts_take_sites_the_same_way():
    sweep_args = _script("llada_vs_llama").parse_args(["--sites", "input", "intermediate"])
    assert sweep_args.sites == ["input", "intermediate"]
    assert _script("mask_reuse").parse_args(["--sites", "input", "intermediate"]).sites == ["input", "intermediate"]
    for name in ("llada_vs_llama", "mask_reuse"):
        with pytest.raises(SystemExit):
            _script(name).parse_args(["--sites", "nope"])


def test_overlap_out_is_a_prefix_even_when_given_a_file_name():
    demo = _script("generate_demo")
    assert demo.overlap_prefix("overlap.csv") == "overlap"
    assert demo.overlap_prefix("runs/overlap") == "runs/overlap"


@pytest.mark.parametrize("name", ["llada_vs_llama", "mask_reuse", "generate_demo", "mdm_probe"])
def test_help_stays_inside_the_repository(name, capsys):
    mod = _script(name)
    if hasattr(mod, "parse_args"):
        parse = mod.parse_args
    elif hasattr(mod, "build_parser"):
        parse = mod.build_parser().parse_args
    else:  # main() parses first: --help exits before any work
        parse = mod.main
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage:" in text
    assert "shared/" not in text and "the issue" not in text


# --help must not import torch (seconds on a loaded machine): every script imports it after parsing.
SCRIPTS = sorted(p.stem for p in EXPERIMENTS.glob("*.py"))

# Runs a script as `python script --help` would, then reports how it exited and whether torch (or transformers,
# which imports it) had been imported by then.
_HELP_PROBE = r"""
import runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
try:
    runpy.run_path(script, run_name="__main__")
    code = "returned without exiting"
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(f"\nPROBE exit={code} heavy={','.join(heavy) or 'none'}")
"""


def _imports_torch_at_module_level(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            return True
    return False


def test_every_script_is_covered_by_the_help_check():
    assert len(SCRIPTS) >= 10 and "generate_demo" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_answers_without_importing_torch(name):
    path = EXPERIMENTS / f"{name}.py"
    assert not _imports_torch_at_module_level(path)
    r = subprocess.run([sys.executable, "-c", _HELP_PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    assert r.stdout.rstrip().splitlines()[-1] == "PROBE exit=0 heavy=none", (
        f"{name}.py --help imported torch: import it (and the models, samplers, kernels) inside the functions that "
        f"use them, after parse_args\n{r.stdout[-500:]}")


# Runs a script up to its parse_args (which records the parser and exits), then prints, per option, its help as
# --help shows it (defaults expanded) and its default.
_PARSER_PROBE = r"""
import argparse, json, runpy, sys
script = sys.argv[1]
seen = []
def capture(self, *args, **kwargs):
    seen.append(self)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = capture
argparse.ArgumentParser.parse_known_args = capture
sys.argv = [script]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    pass
parser = seen[0]
fmt = parser._get_formatter()
out = [{"option": "/".join(a.option_strings) or a.dest, "help": a.help or "",
        "shown": (fmt._get_help_string(a) % {**vars(a), "prog": parser.prog}) if a.help else "",
        "default": repr(a.default) if a.default is not argparse.SUPPRESS else "SUPPRESS"}
       for a in parser._actions if not isinstance(a, argparse._HelpAction)]
print("PROBE " + json.dumps(out))
"""

# The scripts whose --help shows every option's default (the benchmarks and probes the README points to).
SHOW_DEFAULTS = ("step_frontier", "mdm_probe", "kernel_bench", "decode_bench")


def _options(name: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", _PARSER_PROBE, str(EXPERIMENTS / f"{name}.py")], capture_output=True,
                       text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    assert r.returncode == 0 and line, r.stderr[-2000:]
    return json.loads(line[-1][len("PROBE "):])


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_option_has_help_text(name):
    options = _options(name)
    assert options
    missing = [o["option"] for o in options if not o["help"].strip()]
    assert not missing, f"{name}.py: options without help text: {missing}"
    if name in SHOW_DEFAULTS:  # every default that means something is on screen
        hidden = [o["option"] for o in options
                  if o["default"] not in ("None", "False", "SUPPRESS") and "default" not in o["shown"]]
        assert not hidden, f"{name}.py --help does not show the defaults of {hidden}"


def test_the_module_level_scan_sees_torch_imports(tmp_path):
    for text, expected in [("import torch\n", True), ("import torch.nn as nn\n", True),
                           ("from torch import nn\n", True), ("import numpy\n", False),
                           ("def f():\n    import torch\n", False)]:
        (tmp_path / "s.py").write_text(text)
        assert _imports_torch_at_module_level(tmp_path / "s.py") is expected, text


def test_light_modules_load_without_torch():
    """What the scripts import before parsing: the sparsity package, its sites and rule names, the atomic writes,
    the hardware probe. SparsityConfig is still there on first use (lazily), and the rules refuse a name list that
    differs from their registry."""
    code = """
import sys
import dllm_sparse, dllm_sparse.sparsity, dllm_sparse.sparsity.sites, dllm_sparse.sparsity.names
import dllm_sparse.atomic, dllm_sparse.hardware
from dllm_sparse.sparsity.names import RULE_NAMES
from dllm_sparse.atomic import json_default
assert "torch" not in sys.modules, "a light module imported torch"
assert json_default(object()).startswith("<object")
import dllm_sparse.sparsity.names as names
names.RULE_NAMES = ("top_p", "top_k", "max_p")
try:
    import dllm_sparse.sparsity.rules
except ImportError as e:
    assert "does not list the registered rules" in str(e), e
else:
    raise AssertionError("rules accepted a RULE_NAMES that lacks paper_top_p")
sys.modules.pop("dllm_sparse.sparsity.rules", None)
names.RULE_NAMES = RULE_NAMES
from dllm_sparse.sparsity import SparsityConfig
import torch
assert SparsityConfig.parse("input:top_p:0.9").id == "input:top_p:0.9:token"
assert json_default(torch.tensor([1, 2])) == [1, 2]
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_generate_demo_writes_its_trace(tmp_path, monkeypatch):
    """--trace-out once passed json.dumps a second default= and crashed after every generation had run."""
    import torch

    demo = _script("generate_demo")
    seen = []

    def fake_run(kind, name, args, sparsity, prompts):
        seen.append((kind, name, sparsity.id))
        return {"model": name, "kind": kind, "ids": torch.tensor([[1, 2]]), "config": sparsity}

    monkeypatch.setattr(generate_cli, "run_model", fake_run)  # the script's main is the library's
    trace = tmp_path / "trace.json"
    assert demo.main(["--no-diffusion", "--prompt", "hi", "--trace-out", str(trace)]) == 0
    assert seen == [("ar", "smollm2-135m", "input:top_p:0.9:token")]
    data = json.loads(trace.read_text())
    assert data["args"]["trace_out"] == str(trace) and data["args"]["prompt"] == ["hi"]
    assert data["runs"] == [{"model": "smollm2-135m", "kind": "ar", "ids": [[1, 2]],
                             "config": str(SparsityConfig.parse("input:top_p:0.9"))}]


def test_llada_vs_llama_threads_auto_takes_the_usable_cores_and_says_so(monkeypatch):
    import os

    import torch

    exp = _script("llada_vs_llama")
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1}, raising=False)  # one core for this process
    try:
        n, why = exp.set_threads("auto")
        assert n == 1 == torch.get_num_threads()
        assert why.startswith("1 (one per core this process may run on") and "--threads auto" in why
        n, why = exp.set_threads("3")
        assert n == 3 == torch.get_num_threads() and why == "3 (--threads 3)"
        for bad in ("abc", "0", "-2", "1.5"):
            with pytest.raises(SystemExit, match=f"--threads takes a whole number >= 1 or 'auto', got '{bad}'"):
                exp.set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_generate_demo_refuses_overlap_tracking_under_a_block_cache(capsys):
    demo = _script("generate_demo")
    with pytest.raises(SystemExit):
        demo.main(["--no-ar", "--block-cache", "dual", "--overlap-out", "x"])
    assert "--overlap-out tracks each position's masks" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--n-boot", "-1"], "--n-boot must be a whole number >= 0 (got -1; 0: no intervals)"),
    (["--limit", "0"], "--limit must be a whole number >= 1 (got 0)"),
    (["--limit", "-3"], "--limit must be a whole number >= 1 (got -3)"),
])
def test_llada_vs_llama_refuses_bad_counts_before_any_work(args, message, capsys):
    exp = _script("llada_vs_llama")
    with pytest.raises(SystemExit):
        exp.parse_args(args)
    assert message in capsys.readouterr().err
    assert exp.parse_args(["--n-boot", "0"]).n_boot == 0  # documented: no intervals


def _demo_refuses(argv, monkeypatch, capsys) -> str:
    """Run the demo's main with run_model replaced; it must stop with a one-line usage error before any run."""
    demo = _script("generate_demo")
    ran = []
    monkeypatch.setattr(generate_cli, "run_model", lambda *a: ran.append(a))
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2 and not ran  # nothing was loaded or generated first
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in err  # argparse's form: "<prog>: error: <message>"
    return err


def test_generate_demo_checks_every_model_before_running_any(tmp_path, monkeypatch, capsys):
    """A missing diffusion checkpoint once failed after the AR demo had run (143 s)."""
    missing = str(tmp_path / "no-such-checkpoint")
    err = _demo_refuses(["--diffusion-model", missing, "--device", "cpu"], monkeypatch, capsys)
    assert f"--diffusion-model: {missing!r}: no such file or directory" in err
    (tmp_path / "empty").mkdir()
    err = _demo_refuses(["--no-ar", "--diffusion-model", str(tmp_path / "empty")], monkeypatch, capsys)
    assert "is a directory without a config.json, not a model checkpoint" in err
    (tmp_path / "weights.bin").write_bytes(b"x")
    err = _demo_refuses(["--ar-model", str(tmp_path / "weights.bin"), "--no-diffusion"], monkeypatch, capsys)
    assert "is a file but not a .gguf model" in err
    err = _demo_refuses(["--ar-model", str(tmp_path / "m.gguf"), "--no-diffusion"], monkeypatch, capsys)
    assert "GGUF file not found" in err


@pytest.mark.parametrize("argv, message", [
    (["--no-diffusion", "--steps", "8", "--cfg-scale", "1"],
     "--steps, --cfg-scale set(s) the diffusion sampler, but no diffusion model runs"),
    (["--max-new-tokens", "48", "--block-length", "32"], "gen_length (48) must be a multiple of block_length (32)"),
    (["--max-new-tokens", "0"], "max_new_tokens / gen_length must be a positive integer, got 0"),
    (["--rule", "top_k", "--threshold", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device; use cpu, cuda, cuda:1, ... or auto"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--confidence-threshold", "0"], "confidence_threshold must be None or a finite number > 0"),
    (["--confidence-threshold", "nan"], "confidence_threshold must be None or a finite number > 0"),
    (["--max-new-tokens", "64", "--steps", "32", "--confidence-threshold", "0.9"],
     "steps (32) gives 16 steps per block, fewer than the block's 32 positions: with confidence_threshold"),
    (["--no-diffusion", "--confidence-threshold", "0.9"],
     "--confidence-threshold set(s) the diffusion sampler, but no diffusion model runs"),
])
def test_generate_demo_refuses_bad_settings_before_any_run(argv, message, monkeypatch, capsys):
    assert message in _demo_refuses(argv, monkeypatch, capsys)


def test_generate_demo_checks_the_device(monkeypatch, capsys):
    """The CUDA cases, constructed: a CPU build of torch, a CUDA build without a visible GPU, an index too high."""
    import torch

    demo = _script("generate_demo")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    err = _demo_refuses(["--device", "cuda"], monkeypatch, capsys)
    assert f"--device cuda: this PyTorch build has no CUDA support (torch {torch.__version__}); use --device cpu" in err
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert demo.device_problem("cuda:0") == "--device cuda:0: no CUDA GPU is visible on this machine; use --device cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert demo.device_problem("cuda:1") is None and demo.device_problem("cuda") is None
    assert demo.device_problem("cuda:2") == "--device cuda:2: this machine has 2 CUDA GPU(s), cuda:0 to cuda:1"
    assert demo.device_problem("cpu") is None and demo.device_problem("auto") is None


def test_llada_vs_llama_workers_split_the_threads_and_refuse_what_cannot_run():
    exp = _script("llada_vs_llama")
    assert exp.resolve_workers("auto", 2, on_cpu=True, world=1)[:2] == (2, 1)  # one per thread, one thread each
    assert exp.resolve_workers("auto", 1, on_cpu=True, world=1)[:2] == (1, 1)
    assert exp.resolve_workers("auto", 8, on_cpu=False, world=1)[:2] == (1, 8)  # a GPU: one process
    assert exp.resolve_workers("auto", 2, on_cpu=True, world=2)[:2] == (1, 2)  # a launcher already splits
    assert exp.resolve_workers("1", 2, on_cpu=True, world=1)[:2] == (1, 2)
    assert exp.resolve_workers("2", 4, on_cpu=True, world=1)[:2] == (2, 2)
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(SystemExit, match="--workers takes a whole number"):
            exp.resolve_workers(bad, 2, on_cpu=True, world=1)
    with pytest.raises(SystemExit, match="is for a CPU run"):
        exp.resolve_workers("2", 2, on_cpu=False, world=1)
    with pytest.raises(SystemExit, match="under a launcher"):
        exp.resolve_workers("2", 2, on_cpu=True, world=2)
