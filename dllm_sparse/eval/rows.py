"""Resumable result rows: append one JSON line per finished unit of work, read them back after a kill.

    done = finished(path)                        # {key: row} of the rows already written
    with JsonlWriter(path) as w:
        for key, work in plan:
            if key not in done:
                w.write({"key": key, **work()})  # one full line, flushed and fsync'ed

Guarantees: a row is one ``json.dumps`` line written with a single ``write`` and then flushed and fsync'ed, so
after a kill the file holds every finished row plus at most one torn last line (no newline, or not valid
JSON). :func:`read_rows` ignores that line, :class:`JsonlWriter` truncates it on open, so a rerun rewrites
it. Used by the sweep (:mod:`dllm_sparse.eval.sweep.run`) and the mask-reuse study
(:mod:`dllm_sparse.eval.studies.reuse_study`). Also :func:`atomic_write_csv`, :func:`atomic_write_json` and
:func:`atomic_write_text` (write a whole file to a temporary name, fsync, rename: a reader or a rerun after a kill
sees the old file or the new one, never half of one), :func:`read_json_or_none` (a summary that is missing,
truncated or unreadable reads as None, to be recomputed) and :func:`process_info` (the rank / world size a
launcher gave this process).
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dllm_sparse.atomic import atomic_open, atomic_write_json, atomic_write_text, json_default

__all__ = ["read_rows", "numbered_rows", "JsonlWriter", "finished", "atomic_write_csv", "atomic_write_json",
           "atomic_write_text", "read_json_or_none", "json_default", "atomic_open", "ProcessInfo", "process_info",
           "launch_note", "share_of"]


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (no newline / not valid JSON) is ignored."""
    return [row for _, row in numbered_rows(path, stacklevel=3)]


def numbered_rows(path: str | Path, stacklevel: int = 2) -> list[tuple[int, Any]]:
    """``(line number, row)`` of every complete line of a JSONL file (numbers from 1, as an editor shows them),
    so that a check can name the line of a bad row; the same lines :func:`read_rows` returns."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if i == len(lines) - 1:  # text after the final newline: a torn write (rewritten on resume)
            continue
        try:
            rows.append((i + 1, json.loads(line)))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: skipping a corrupt line {i + 1}", stacklevel=stacklevel)
    return rows


def finished(path: str | Path, key: str = "key") -> dict[Any, dict]:
    """``{row[key]: row}`` of the complete rows of ``path`` (later rows win): what a rerun skips."""
    out = {}
    for r in read_rows(path):
        if key not in r:
            raise ValueError(f"{path}: a row has no {key!r} field; resumable rows need one (rows: {sorted(r)[:8]})")
        out[r[key]] = r
    return out


class JsonlWriter:
    """Append-only JSONL writer: one full line per row, flushed and fsync'ed; repairs a torn tail on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)  # drop the torn last line
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, default=json_default) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def atomic_write_csv(path: str | Path, rows: list[dict], cols: list[str] | None = None) -> None:
    """Write ``rows`` as CSV (columns ``cols``, default the first row's keys; extra keys ignored) to a
    temporary file, fsync it and rename it over ``path``: readers never see a half-written table."""
    cols = cols or (list(rows[0]) if rows else [])
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_json_or_none(path: str | Path) -> Any:
    """The JSON in ``path``, or None when it is missing, truncated or not JSON (a summary to recompute, with a
    warning naming the file when it exists but cannot be read)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"{path} is unreadable ({type(e).__name__}: {e}); recomputing it", stacklevel=2)
        return None


class ProcessInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def process_info() -> ProcessInfo:
    """(rank, world_size, local_rank) of this process, from ``accelerate.PartialState`` (which reads the launcher:
    ``torchrun`` or ``accelerate launch``, and joins its process group); (0, 1, 0) for a plain ``python`` run,
    which starts nothing."""
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate treats torchrun's processes on a machine without a GPU as independent runs.
    state = PartialState(cpu=not torch.cuda.is_available())
    return ProcessInfo(state.process_index, state.num_processes, state.local_process_index)


#: Said when a run meant to be data parallel came up as one process (see :func:`launch_note`).
CPU_LAUNCH_NOTE = ("one process: `accelerate launch --cpu --num_processes N` starts N CPU processes only with MPI "
                   "(--mpirun_hostfile); for data parallel on CPU use `torchrun --nproc_per_node N <script> ...`")


def launch_note(world_size: int) -> str | None:
    """Why a run under ``accelerate launch --cpu`` has one process (accelerate's CPU multi-process needs MPI and
    otherwise quietly starts one), or None."""
    if world_size == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        return CPU_LAUNCH_NOTE
    return None


def share_of(items: Sequence, rank: int, world_size: int) -> list:
    """The contiguous share of ``items`` that rank ``rank`` of ``world_size`` takes, as
    ``accelerate.PartialState.split_between_processes`` splits a list (the first ``len % world`` ranks take one
    more)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size}): pass a rank below the world size")
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])
