"""The installed ``dllm-sparse`` command: its subcommands, their fast --help, errors, and a run end to end."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_sparse.cli import COMMANDS, FRONTIERS, main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [["compare"], ["generate"], ["mask-reuse"], ["frontier"], ["frontier", "step"],
               ["frontier", "trajectory"], ["frontier", "generation"], ["device-check"], ["lm-eval"]]

# Runs `dllm-sparse ARGS` through the entry point's function in a fresh interpreter, then says how it exited and
# whether torch (or transformers, which imports it) had been imported by then.
_PROBE = r"""
import sys
from dllm_sparse.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(f"\nPROBE exit={code} heavy={','.join(heavy) or 'none'}")
"""


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_the_console_script_is_declared_and_installed():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project supports 3.10)
    assert '\ndllm-sparse = "dllm_sparse.cli:main"\n' in text
    assert '"dllm_sparse.cli"]' in text  # in the packages list: the wheel ships the commands, not experiments/
    from importlib.metadata import entry_points

    installed = entry_points(group="console_scripts", name="dllm-sparse")
    if not installed:
        pytest.skip("dllm-sparse is not installed in this environment (pip install -e .)")
    assert next(iter(installed)).load() is main


def test_help_lists_every_subcommand_without_importing_torch():
    r = _run(["--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == "PROBE exit=0 heavy=none"
    for name in COMMANDS:
        assert f"\n    {name}" in r.stdout, name
    r = _run(["frontier", "--help"])
    assert "usage: dllm-sparse frontier" in r.stdout and all(f"\n    {n}" in r.stdout for n in FRONTIERS)


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_answers_help_without_importing_torch(args):
    r = _run([*args, "--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == "PROBE exit=0 heavy=none", r.stdout[-800:]
    if args != ["lm-eval"]:  # lm-eval prints its own usage line (prog lm-eval) after ours
        assert f"usage: dllm-sparse {' '.join(args)}" in r.stdout


def test_device_check_outside_a_clone_says_it_needs_one(tmp_path):
    r = _run(["device-check", "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "needs a clone" in r.stdout and "PROBE exit=0 heavy=none" in r.stdout
    r = _run(["device-check", "--smoke"], cwd=tmp_path)
    assert "dllm-sparse device-check: no clone of dllm-sparse here" in r.stderr + r.stdout
    assert "bash experiments/device_check.sh" in r.stderr + r.stdout and "PROBE exit=0" not in r.stdout


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: COMMAND"),
    (["comapre"], "argument COMMAND: invalid choice: 'comapre' (choose from 'compare', 'generate'"),
    (["frontier", "steps"],
     "argument COMMAND: invalid choice: 'steps' (choose from 'step', 'trajectory', 'generation')"),
    (["--limit", "2", "compare"], "'--limit' comes before any command: options go after it"),
    (["compare", "--bogus"], "dllm-sparse compare: error: unrecognized arguments: --bogus"),
])
def test_a_bad_command_line_fails_with_a_usage_error(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: dllm-sparse")


def _parser_of(args: list[str], monkeypatch) -> argparse.ArgumentParser:
    """The parser a subcommand builds, caught at its parse_args (which would start the work)."""
    seen = []

    def capture(self, *a, **k):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    import dllm_sparse.cli as cli

    table, name = cli.COMMANDS, args[0]
    if len(args) == 2:
        table, name = FRONTIERS, args[1]
    module = importlib.import_module(table[name][0])
    with pytest.raises(SystemExit):
        module.main([], prog="dllm-sparse " + " ".join(args))
    return seen[-1]


@pytest.mark.parametrize("args", [["compare"], ["generate"], ["mask-reuse"], ["frontier", "step"],
                                  ["frontier", "trajectory"], ["frontier", "generation"]], ids=" ".join)
def test_every_option_shows_its_default(args, monkeypatch):
    parser = _parser_of(args, monkeypatch)
    fmt = parser._get_formatter()
    hidden = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or a.default in (None, False, argparse.SUPPRESS):
            continue
        shown = fmt._get_help_string(a) % {**vars(a), "prog": parser.prog}
        if "default" not in shown:
            hidden.append("/".join(a.option_strings))
    assert not hidden, f"dllm-sparse {' '.join(args)} --help does not show the defaults of {hidden}"



def test_compare_smoke_runs_end_to_end_through_the_entry_point(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert main(["compare", "--smoke", "--sites", "input", "--tasks", "builtin_mc", "--n-boot", "0",
                 "--threads", "1", "--no-progress", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SMOKE RUN" in text and "Critical sparsity (%)" in text and "tiny-llada (smoke)" in text
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    # two models x (dense + thresholds 1.0 and 0.8) on the one site and task, 2 items each
    assert sorted((r["model"], r["site"], r["p"]) for r in rows if r["site"] != "dense") == [
        ("tiny-llada (smoke)", "input", 0.8), ("tiny-llada (smoke)", "input", 1.0),
        ("tiny-llama (smoke)", "input", 0.8), ("tiny-llama (smoke)", "input", 1.0)]
    assert {r["n_items"] for r in rows} == {2}
    assert all(r["relative_performance"] == 1.0 for r in rows if r["p"] == 1.0)  # top-p 1 keeps every feature
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == ["tiny-llada (smoke)", "tiny-llama (smoke)"]
    assert (out / "critical_sparsity.md").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--smoke", "--ar-model", "smollm2-135m"], "--smoke runs its own tiny random models; drop --ar-model"),
    (["--smoke", "--workers", "2"], "--smoke runs in one process"),
])
def test_compare_smoke_refuses_what_it_would_ignore(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["compare", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script, module", [("llada_vs_llama", "compare"), ("generate_demo", "generate"),
                                            ("mask_reuse", "mask_reuse"), ("step_frontier", "step_frontier"),
                                            ("trajectory_frontier", "trajectory_frontier"),
                                            ("generation_frontier", "generation_frontier")])
def test_the_experiment_scripts_are_the_library_commands(script, module):
    spec = importlib.util.spec_from_file_location(f"_wrapper_{script}", ROOT / "experiments" / f"{script}.py")
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    assert wrapper.main is importlib.import_module(f"dllm_sparse.cli.{module}").main
    r = subprocess.run([sys.executable, f"experiments/{script}.py", "--help"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {script}.py")


def test_python_dash_m_is_the_same_command():
    r = subprocess.run([sys.executable, "-m", "dllm_sparse.cli", "--version"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("dllm-sparse ")
    r = subprocess.run([sys.executable, "-m", "dllm_sparse.cli", "frontier", "stp"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "dllm-sparse frontier: error: argument COMMAND: invalid choice: 'stp'" in r.stderr
