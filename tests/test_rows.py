"""Resumable rows (dllm_sparse.eval.rows): atomic appends, torn last lines, keyed resume, process info."""

import csv
import json

import pytest
import torch

from dllm_sparse.eval.rows import (
    JsonlWriter,
    ProcessInfo,
    atomic_write_csv,
    finished,
    launch_note,
    process_info,
    read_rows,
    share_of,
)
from dllm_sparse.eval.sweep import store


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


def test_process_info_of_a_plain_run():
    assert process_info() == ProcessInfo(0, 1, 0)


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (5, 2), (6, 3), (7, 3), (10, 4)])
def test_share_of_splits_into_contiguous_nearly_equal_shares(n, world):
    items = list(range(n))
    shares = [share_of(items, r, world) for r in range(world)]
    assert [x for sh in shares for x in sh] == items  # every item once, in order
    sizes = [len(sh) for sh in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="rank"):
        share_of(items, world, world)


def test_launch_note_explains_a_single_cpu_process(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert launch_note(1) is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu` sets
    assert "torchrun" in launch_note(1) and launch_note(2) is None


_TORCHRUN_PROBE = """
import json
import sys
from pathlib import Path
from accelerate import PartialState
from dllm_sparse.eval.rows import process_info, share_of
items = list(range(7))
info = process_info()
with PartialState().split_between_processes(items) as mine:
    theirs = list(mine)
# one file per rank: the launcher may interleave the ranks' stdout
Path(sys.argv[1], f"rank{info.rank}.json").write_text(
    json.dumps([info.rank, info.world_size, theirs, share_of(items, info.rank, info.world_size)]))
"""


def test_torchrun_ranks_and_shares_match_accelerate(tmp_path):
    """Two real CPU processes (gloo): ranks come from the launcher and share_of is accelerate's split."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port, so parallel runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "probe.py"
    script.write_text(_TORCHRUN_PROBE)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), str(script), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = sorted(json.loads(p.read_text()) for p in tmp_path.glob("rank*.json"))
    assert [r[:2] for r in results] == [[0, 2], [1, 2]]
    assert all(r[2] == r[3] for r in results) and results[0][2] + results[1][2] == list(range(7))


def test_the_sweep_uses_these_rows():
    assert store.read_rows is read_rows and store.JsonlWriter is JsonlWriter
