"""Command-line conventions shared by the experiment scripts: --sites lists, --overlap-out prefixes, fast --help."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
