"""A sweep folder's rows: appending finished cells under the folder's lock, reading them back (checked), merging
rank shards, filling in relative performance, the status file, and rewriting the keys of earlier releases."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from dllm_sparse.eval.identity import RunIdentity
from dllm_sparse.eval.rows import JsonlWriter, atomic_open, atomic_write_json, json_default, numbered_rows, read_rows
from dllm_sparse.eval.sweep.config import KEY_FIELDS, SweepConfig, planned_keys
from dllm_sparse.eval.sweep.validate import OLD_KEY_FORMS, is_old_key, old_key_to_new, row_problem
from dllm_sparse.eval.tasks.base import POSITIVE_DENSE_METRICS, relative_performance
from dllm_sparse.sparsity.config import DENSE

__all__ = ["LOCK_NAME", "folder_lock", "append_new_rows", "load_rows", "dense_key", "set_relative", "finalize",
           "check_model_identity", "upgrade_cell_keys", "refuse_old_keys", "write_status", "rows_for"]

def _atomic_write_rows(path: Path, rows: Iterable[dict]) -> None:
    """Rewrite a rows file atomically (dllm_sparse.atomic: a temporary name of this writer's own)."""
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, default=json_default) + "\n")


#: The lock every reader-then-writer of a sweep folder's rows holds (several sweeps may share a folder).
LOCK_NAME = ".rows.lock"


@contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold the folder's row lock (``<out>/.rows.lock``, a ``filelock.FileLock``: one holder across processes)
    while reading rows to decide what to write and writing them, so two sweeps running into the same folder
    at once neither duplicate a row nor lose one, and never rewrite ``rows.jsonl`` under each other. A folder
    that does not exist yet has nothing to read: no lock (and no folder) is made for it."""
    if not out.is_dir():
        yield
        return
    with FileLock(str(out / LOCK_NAME)):
        yield


def append_new_rows(out: Path, path: Path, rows: Sequence[dict]) -> list[dict]:
    """Append the rows whose key no rows file of the folder holds yet (another sweep into the same folder may
    have written them meanwhile); returns those written. The file is opened for these rows only: a handle kept
    open would keep appending to a file another process's :func:`finalize` has already replaced."""
    for r in rows:  # a row the next read would refuse is not written (a NaN score: a broken forward pass)
        why = row_problem(json.loads(json.dumps(r, default=json_default)))
        if why is not None:
            raise RuntimeError(f"cell {r.get('key')}: the computed row is not valid ({why}), so it is not written; "
                               "the model's scores on this configuration are not numbers (see the row's metrics: "
                               f"{r.get('metrics')})")
    with folder_lock(out):
        present = {r.get("key") for r in load_rows(out)}
        new = [r for r in rows if r["key"] not in present]
        if new:
            with JsonlWriter(path) as writer:
                for row in new:
                    writer.write(row)
    return new


def shard_paths(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("rows.rank*.jsonl"))


def load_rows(output_dir: str | Path) -> list[dict]:
    """Every finished row of a sweep folder (rows.jsonl plus unmerged shards), deduplicated by key. Every row is
    checked as it is read (:func:`row_problem`); a folder holding a corrupt row is refused with a
    ``RuntimeError`` naming its file, line and field."""
    out = Path(output_dir)
    seen, rows, problems = set(), [], []
    for path in [out / "rows.jsonl", *shard_paths(out)]:
        for line, r in numbered_rows(path, stacklevel=3):
            why = row_problem(r)
            if why is not None:
                problems.append(f"{path} line {line}: {why}")
            elif r["key"] not in seen:
                seen.add(r["key"])
                rows.append(r)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise RuntimeError(f"{out} holds {len(problems)} corrupt row(s): {shown}. Restore the file, or delete those "
                           "lines (their cells are then computed again), or use a fresh output folder.")
    return rows


def dense_key(key: str) -> str:
    """The key of the dense cell that a cell's relative performance refers to (same model, task, settings)."""
    k = json.loads(key)
    k[2] = DENSE
    return json.dumps(k, separators=(",", ":"))


def _fill_relative(rows: list[dict]) -> bool:
    dense = {r["key"]: r for r in rows if r["site"] == DENSE}
    changed = False
    for r in rows:
        d = dense.get(dense_key(r["key"]))
        if r["site"] == DENSE or d is None or r.get("relative_performance") is not None:
            continue
        set_relative(r, d)
        changed = True
    return changed


def set_relative(row: dict, dense: dict) -> None:
    hib = row.get("higher_is_better_all", {})
    row["dense_value"] = dense["value"]
    row["dense_metrics"] = dense["metrics"]
    row["relative"] = {m: relative_performance(v, dense["metrics"].get(m), hib.get(m, True),
                                               positive_dense=m in POSITIVE_DENSE_METRICS)
                       for m, v in row["metrics"].items() if m in dense["metrics"]}
    row["relative_performance"] = row["relative"].get(row["metric"])


def finalize(output_dir: str | Path) -> list[dict]:
    """Merge shards into rows.jsonl (dedup by key), fill relative performance, rewrite atomically if needed."""
    out = Path(output_dir)
    main = out / "rows.jsonl"
    with folder_lock(out):
        base = read_rows(main)
        rows = load_rows(out)
        changed = len(rows) != len(base) or (main.is_file() and not main.read_bytes().endswith(b"\n")
                                             and main.stat().st_size > 0)
        changed |= _fill_relative(rows)
        if changed:
            _atomic_write_rows(main, rows)
        for p in shard_paths(out):
            p.unlink()
    return rows


def check_model_identity(out: Path, rows: list[dict], name: str, cfg: SweepConfig, current: dict) -> None:
    """Refuse to add cells of ``name`` next to rows of the same name, dtype and batch size that were computed
    from other weights or on another device type."""
    for r in rows:
        if r.get("model") != name or "model_identity" not in r:
            continue
        k = json.loads(r["key"])
        if k[KEY_FIELDS.index("dtype")] != str(cfg.dtype) or k[KEY_FIELDS.index("batch_size")] != cfg.batch_size:
            continue
        RunIdentity(current).require_same(
            r["model_identity"], what=f"{out}: the rows of model {name!r} (e.g. cell {r['key']})",
            fix="The folder's finished cells would be mixed with cells of this model. Start a fresh --output-dir "
                "(or output_dir=...), or resume with the model files, dtype and device type the folder was "
                "made with.")


def _folder_batch_size(out: Path) -> int | None:
    """The batch size recorded in a folder's sweep_config.json (written by every run before it computes)."""
    try:
        bs = json.loads((out / "sweep_config.json").read_text()).get("batch_size")
    except (OSError, ValueError, AttributeError):
        return None
    return bs if isinstance(bs, int) and not isinstance(bs, bool) else None


def upgrade_cell_keys(output_dir: str | Path, batch_size: int | None = None) -> int:
    """Rewrite the old-style cell keys of a sweep folder (rows.jsonl and shards) to the current ones, which
    name the sparsity by its config id and hold the batch size; every other field is kept. ``batch_size``: the
    batch size the rows were computed with (default: the one in the folder's ``sweep_config.json``; an error
    when there is none). Returns the number of rows rewritten."""
    out = Path(output_dir)
    batch_size = _folder_batch_size(out) if batch_size is None else int(batch_size)
    if batch_size is None:
        raise ValueError(f"{out} has no sweep_config.json naming the batch size its rows were computed with; pass "
                         "it: upgrade_cell_keys(folder, batch_size=N)")
    changed = 0
    with folder_lock(out):
        for path in [out / "rows.jsonl", *shard_paths(out)]:
            rows = read_rows(path)
            n = 0
            for r in rows:
                new = old_key_to_new(r.get("key"), batch_size)
                if new is not None:
                    r["key"] = new
                    n += 1
            if n:
                _atomic_write_rows(path, rows)
                changed += n
    return changed


def refuse_old_keys(out: Path, rows: list[dict]) -> None:
    old = [r["key"] for r in rows if is_old_key(r.get("key"))]
    if old:
        fields = ", ".join(KEY_FIELDS).replace("sparsity", "sparsity config id")
        form = OLD_KEY_FORMS[len(json.loads(old[0]))]
        bs = _folder_batch_size(out)
        call = f"upgrade_cell_keys('{out}')" if bs is not None else f"upgrade_cell_keys('{out}', batch_size=N)"
        raise RuntimeError(
            f"{out} holds {len(old)} rows keyed the old way, {form} (e.g. {old[0]}); cells are now keyed "
            f"[{fields}] (e.g. {old_key_to_new(old[0], bs)}), so they would not be recognised and "
            f"would be computed again. Rewrite the keys in place (values unchanged; the batch size "
            + (f"{bs} from its sweep_config.json" if bs is not None else "N the rows were computed with")
            + f") with `python -c \"from dllm_sparse.eval.sweep.run import upgrade_cell_keys; {call}\"`, "
            f"or use a fresh output folder.")


def write_status(out: Path, cfg: SweepConfig, rows: list[dict], load_seconds: dict[str, float],
                  planned: set[str] | None = None) -> None:
    """``status.json``: planned and finished cells of ``cfg`` (``planned``: its keys, when known), rows in the
    folder, and this run's model loading times."""
    planned = planned_keys(cfg) if planned is None else planned
    have = {r["key"] for r in rows}
    status = {"planned_cells": len(planned), "finished_cells": len(planned & have),
              "complete": planned <= have, "rows_in_folder": len(rows),
              "load_seconds_this_run": load_seconds}
    atomic_write_json(out / "status.json", status)


def rows_for(rows: Sequence[dict], **match: Any) -> list[dict]:
    """Rows whose fields equal the given values, e.g. ``rows_for(rows, model="m", site="input")``."""
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]
