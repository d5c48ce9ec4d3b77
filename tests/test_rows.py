"""Resumable rows (dllm_sparse.eval.rows): atomic appends, torn last lines, keyed resume, process info."""

import csv
import json

import pytest
import torch

from dllm_sparse.eval import sweep
from dllm_sparse.eval.rows import JsonlWriter, ProcessInfo, atomic_write_csv, finished, process_info, read_rows


def test_rows_round_trip_and_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    with JsonlWriter(path) as w:
        w.write({"key": "a", "x": torch.tensor([1, 2])})  # tensors as lists
        w.write({"key": "b", "x": 2.5})
    assert read_rows(path) == [{"key": "a", "x": [1, 2]}, {"key": "b", "x": 2.5}]
    with open(path, "ab") as f:  # a kill in the middle of a write
        f.write(b'{"key": "c", "x"')
    assert [r["key"] for r in read_rows(path)] == ["a", "b"]
    # complete JSON but no newline: also torn (the write never finished)
    path2 = tmp_path / "rows2.jsonl"
    path2.write_bytes(b'{"key": "a"}\n{"key": "b"}')
    assert read_rows(path2) == [{"key": "a"}]
    # reopening repairs the tail, so the next row starts on its own line
    with JsonlWriter(path) as w:
        w.write({"key": "c", "x": 3})
    assert path.read_bytes().count(b"\n") == 3
    assert [r["key"] for r in read_rows(path)] == ["a", "b", "c"]
    assert read_rows(tmp_path / "missing.jsonl") == []


def test_a_corrupt_middle_line_warns_and_is_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.warns(UserWarning, match="corrupt line 2"):
        assert read_rows(path) == [{"key": "a"}, {"key": "b"}]


def test_finished_is_keyed_and_later_rows_win(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"key": "a", "v": 1}, {"key": "b", "v": 2},
                                                         {"key": "a", "v": 3}]) + "\n")
    done = finished(path)
    assert list(done) == ["a", "b"] and done["a"]["v"] == 3
    assert finished(path, key="v") == {1: {"key": "a", "v": 1}, 2: {"key": "b", "v": 2}, 3: {"key": "a", "v": 3}}
    with pytest.raises(ValueError, match="no 'id' field"):
        finished(path, key="id")


def test_atomic_csv(tmp_path):
    path = tmp_path / "t" / "table.csv"
    atomic_write_csv(path, [{"a": 1, "b": 2, "extra": 9}, {"a": 3}], ["a", "b"])
    assert list(csv.DictReader(open(path))) == [{"a": "1", "b": "2"}, {"a": "3", "b": ""}]
    assert not (tmp_path / "t" / "table.csv.tmp").exists()
    atomic_write_csv(path, [{"z": 1}])  # columns default to the first row's keys
    assert path.read_text().splitlines() == ["z", "1"]


def test_process_info_reads_the_launchers_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PROCESS_INDEX", "LOCAL_PROCESS_INDEX"):
        monkeypatch.delenv(name, raising=False)
    assert process_info() == ProcessInfo(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("PROCESS_INDEX", "3")  # accelerate's names
    assert process_info() == (3, 4, 3)
    monkeypatch.setenv("RANK", "2")  # torchrun's names take precedence
    monkeypatch.setenv("LOCAL_RANK", "0")
    info = process_info()
    assert (info.rank, info.world_size, info.local_rank) == (2, 4, 0)


def test_the_sweep_uses_these_rows():
    assert sweep.read_rows is read_rows and sweep.JsonlWriter is JsonlWriter
