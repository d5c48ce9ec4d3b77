"""experiments/check_main_cells.py: which fields it compares, and its refusals (the recomputation itself is the
check's job, run by hand: it takes minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "check_main_cells.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_main_cells", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_differences_name_every_computed_field_and_ignore_when_where_how_long():
    check = _script()
    ref = {"key": "k", "value": 0.5, "items": {"ids": ["a", "b"], "ll": [-1.0, -2.0]}, "seconds": 3.0,
           "finished_at": 1.0, "rank": 0, "threads": 1}
    same = {**ref, "seconds": 9.0, "finished_at": 2.0, "rank": 1}
    assert check.differences(same, ref) == []
    moved = {**ref, "items": {"ids": ["a", "b"], "ll": [-1.0, -2.0000001]}, "threads": 2}
    assert [d.split(":")[0] for d in check.differences(moved, ref)] == ["items", "threads"]
    assert [d.split(":")[0] for d in check.differences({k: v for k, v in ref.items() if k != "value"}, ref)] == \
        ["value"]


def test_the_committed_run_and_its_config_are_where_the_check_looks():
    args = _script().parse_args([])
    assert (args.results / "rows.jsonl").is_file() and (args.results / "sweep_config.json").is_file()
    assert args.cells == ["dense", "input", "up", "intermediate"] and args.threads == 1


@pytest.mark.parametrize("argv, match", [
    (["--threads", "0"], "--threads must be a whole number >= 1"),
    (["--cells", "nope"], "invalid choice"),
])
def test_bad_arguments_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        _script().parse_args(argv)
    assert match in capsys.readouterr().err


def test_a_results_folder_without_rows_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _script().parse_args(["--results", str(tmp_path)])
    assert "has no rows.jsonl" in capsys.readouterr().err
