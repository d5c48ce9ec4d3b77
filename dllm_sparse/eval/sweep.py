"""Sweep runner: models × sites × rule thresholds × tasks, one tidy row per cell, resumable.

    from dllm_sparse.eval.sweep import SweepConfig, run_sweep
    rows = run_sweep(SweepConfig(models=["smollm2-135m"], tasks=["builtin_mc", "builtin_ppl"],
                                 thresholds=grid("quick"), output_dir="runs/quick"))

Rows (``<output_dir>/rows.jsonl``) carry: model, kind, site, rule, ``p`` (the rule threshold: p for top-p and
max-p, the target sparsity for top-k; the column keeps its historical name), scope, task, the primary metric
and its value, the dense value, the relative performance (sparse/dense; dense/sparse for lower-is-better metrics such as
perplexity), all metrics, the measured mean sparsity and per-layer sparsities (the x-axis of every curve),
the number of items, the per-item scores (``items``: what the bootstrap intervals of
:mod:`dllm_sparse.eval.bootstrap` resample) and the seconds spent.

Guarantees:

* **Atomic rows.** Each finished cell is appended as one full JSON line, flushed and fsync'ed. On restart the
  file is read back, a torn last line (a kill during the write) is dropped, and finished cells are skipped:
  kill a sweep at any point and rerun the same command, nothing is lost or computed twice. The cell key holds
  every setting of the run's identity (:mod:`dllm_sparse.eval.identity`) known before a model loads (model,
  task, the :class:`~dllm_sparse.sparsity.config.SparsityConfig` id = site, rule, threshold, scope, layers;
  limit, ELBO settings, seed, dtype, batch size), so a rerun with other settings into the same folder computes
  new cells instead of reusing old ones. The rest of the identity, known once a model has loaded (the hash of
  its weights, its kind, parameter dtype and device type), is stored in every row (``model_identity``) and
  checked whenever a model is loaded to compute cells: rows of the same model name, dtype and batch size made
  from other weights (a re-converted checkpoint, an overwritten local folder) or on another device type refuse
  the run with a message naming what differs. Folders written before keys held config ids and batch size are
  refused with a message; :func:`upgrade_cell_keys` rewrites their keys (nothing else changes) so they resume.
* **Rows are checked when read.** Every read of a folder's rows (:func:`load_rows`, so every run and resume)
  checks each row (:func:`row_problem`): ``value`` a finite number, ``sparsity`` a number in [0, 1] or null (the
  dense row), ``relative_performance`` a number (NaN where the dense score is 0) or null (its dense row not yet
  written), ``p`` a finite number, ``kind`` ar / diffusion, ``metrics`` numbers, a valid key. A hand-edited or
  damaged row is refused naming its file, line and field; a computed row that would not pass is not written.
* **Batch size changes sparse numbers.** A sparsified forward of a padded batch is not bit-identical to the same
  rows one by one (other kernels, other reduction orders), and an activation near the rule's threshold then
  falls on the other side of it: one AR item moved by 0.34 nats between batch 1 and batch 4. Dense numbers
  move only by float noise. ``batch_size`` is therefore part of the cell key: a rerun with another batch size
  computes its own cells.
* **Dense baselines once.** Per (model, task) one dense pass is run with identity rules (top-p at p = 1, which
  keeps every non-zero entry and so cannot change any output) attached to *every* requested site at once.
  It gives the dense metric (row with ``site="dense"``, ``rule="dense"``, ``p=1.0``) and the natural sparsity
  of each site; the grid's identity cells (top-p 1.0, top-k 0.0) are written from it (``source="dense_pass"``).
* **Data parallel.** Under ``torchrun`` or ``accelerate launch`` with W processes (ranks from
  ``accelerate.PartialState``), the work units are split into W contiguous shares with
  ``split_between_processes``; each rank appends to its own shard ``shards/rows.rank{r}.jsonl``
  and rank 0 merges the shards into ``rows.jsonl`` at the end (deduplicated by key, relative performance
  filled in from the dense rows). No row is duplicated; a rerun resumes from rows.jsonl and the shards.
* **Several sweeps into one folder at once** (two identical commands started together, say): every read of the
  folder's rows that decides a write, every append and the final merge hold the folder's lock
  (``<output_dir>/.rows.lock``, :func:`folder_lock`), a cell another sweep has finished meanwhile is skipped,
  and a row is appended only when no rows file of the folder holds its key yet; whole-file rewrites go through
  :mod:`dllm_sparse.atomic` (a temporary name per writer). No row is lost or duplicated (a cell both computed
  at the same moment is written once).
* **Claims.** A plain run (no launcher) takes its units one at a time: under the lock it claims the next unit
  no live process holds (``<output_dir>/.claims.json``: the unit's first key -> pid, host and the process's
  start time), computes it and releases the claim. Sweeps into one folder at once therefore split the work
  instead of each computing all of it; a unit claimed by another process is left to it (this run waits for it
  before finishing), and a claim whose process no longer runs (a killed sweep) is taken over. The start time
  (``/proc/<pid>/stat`` and the boot id, :func:`process_start`) tells the claimer from an unrelated process that
  got the same pid later (after a kill or a restart): such a claim is taken over too. A claim made on another
  machine (a shared file system) cannot be checked and is respected until released: while a run waits for
  such claims it says, after a minute and then every ten, which claim file, pids and hosts it waits for and that
  deleting the claim file releases them (:class:`ClaimWait`).
* **Workers.** ``run_sweep(cfg, workers=N, worker_threads=T)`` starts N - 1 more processes (spawned, each with
  T torch threads and its own copy of the model it is on) that sweep the same configuration into the same
  folder through the claims; this process computes too, waits for them and merges. Models must be given by
  name or path. On a CPU, one process uses two cores only in part on small forward passes (quiet 2-core AVX2
  CPU: a dense pass of the twin's multiple-choice task 9.6-10.3 s at 1 thread, 6.5-6.7 s at 2, 1.5x; its
  perplexity task 1.8x), and the top-p row sort runs on one core; one-thread workers, one per core, ran the main
  experiment in 9 min 33 s against 13 min 53 s for one 2-thread process. The thread
  count is not part of the cell key, but like the CPU kind it can move a value by float noise (a reduction
  split another way: a tiny model's perplexity read 262.6053877 at one thread, 262.6053901 at two), so every
  row records the ``threads`` it was computed with; workers each use ``worker_threads``.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from dllm_sparse.eval.bootstrap import item_scores
from dllm_sparse.eval.identity import RunIdentity, run_identity
from dllm_sparse.eval.likelihood import Scorer
from dllm_sparse.eval.rows import (
    JsonlWriter,
    atomic_open,
    atomic_write_json,
    numbered_rows,
    process_info,
    read_rows,
    share_of,
)
from dllm_sparse.eval.rows import json_default as _json_default
from dllm_sparse.eval.tasks import POSITIVE_DENSE_METRICS, Task, check_limit, get_task, relative_performance
from dllm_sparse.models.families import find_experts
from dllm_sparse.sparsity.config import DENSE, SparsityConfig
from dllm_sparse.sparsity.rules import make_rule, rule_name
from dllm_sparse.sparsity.sites import ALL_SITES
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = [
    "GRIDS", "grid", "SweepConfig", "run_sweep", "read_rows", "JsonlWriter", "finalize", "load_rows",
    "cell_key", "cell_identity", "model_identity", "KEY_FIELDS", "dense_key", "planned_keys", "rows_for", "DENSE",
    "upgrade_cell_keys", "row_problem", "process_start", "ClaimWait", "CLAIMS_NAME",
]

STANDARD_TOP_P = [1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90,
                  0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10]
QUICK_TOP_P = [1.0, 0.995, 0.99, 0.98, 0.95, 0.9]
GRIDS: dict[str, dict[str, list[float]]] = {
    # quick: dense near p = 1, where the critical sparsity of both models of the embedded pair lies (their
    # task-averaged curves all fail by p = 0.9); the standard grid draws whole curves.
    "top_p": {"standard": STANDARD_TOP_P, "quick": QUICK_TOP_P},
    "top_k": {"standard": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
                           0.75, 0.8, 0.85, 0.9, 0.95],
              "quick": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]},
    "max_p": {"standard": [0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5],
              "quick": [0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]},
    # The paper's LLaDA variant takes p in percent: the top-p grids times 100.
    "paper_top_p": {"standard": [round(100 * p, 6) for p in STANDARD_TOP_P],
                    "quick": [round(100 * p, 6) for p in QUICK_TOP_P]},
}


def grid(name: str = "quick", rule: str = "top_p") -> list[float]:
    """The ``standard`` (the spec's 25-point top-p grid) or ``quick`` threshold grid of a rule."""
    rule = rule_name(rule)
    try:
        return list(GRIDS[rule][name])
    except KeyError:
        raise ValueError(f"no grid {name!r} for rule {rule!r}; grids: "
                         f"{ {r: sorted(g) for r, g in GRIDS.items()} }") from None


# ---------------------------------------------------------------------------------------------------------
# Row files (appending and reading back rows: dllm_sparse.eval.rows)
# ---------------------------------------------------------------------------------------------------------


def _atomic_write_rows(path: Path, rows: Iterable[dict]) -> None:
    """Rewrite a rows file atomically (dllm_sparse.atomic: a temporary name of this writer's own)."""
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, default=_json_default) + "\n")


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


def _append_new_rows(out: Path, path: Path, rows: Sequence[dict]) -> list[dict]:
    """Append the rows whose key no rows file of the folder holds yet (another sweep into the same folder may
    have written them meanwhile); returns those written. The file is opened for these rows only: a handle kept
    open would keep appending to a file another process's :func:`finalize` has already replaced."""
    for r in rows:  # a row the next read would refuse is not written (a NaN score: a broken forward pass)
        why = row_problem(json.loads(json.dumps(r, default=_json_default)))
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


def _shard_paths(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("rows.rank*.jsonl"))


def load_rows(output_dir: str | Path) -> list[dict]:
    """Every finished row of a sweep folder (rows.jsonl plus unmerged shards), deduplicated by key. Every row is
    checked as it is read (:func:`row_problem`); a folder holding a corrupt row is refused with a
    ``RuntimeError`` naming its file, line and field."""
    out = Path(output_dir)
    seen, rows, problems = set(), [], []
    for path in [out / "rows.jsonl", *_shard_paths(out)]:
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
        _set_relative(r, d)
        changed = True
    return changed


def _set_relative(row: dict, dense: dict) -> None:
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
        for p in _shard_paths(out):
            p.unlink()
    return rows


# ---------------------------------------------------------------------------------------------------------
# Configuration and work units
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SweepConfig:
    """What to sweep. ``models``: names/paths for :func:`dllm_sparse.load_model`, or ``LoadedModel`` objects.
    ``limit``: items per task (an int >= 1 or a fraction in (0, 1) for all tasks, a {task: limit} dict, or None
    for all items; 0 and negative limits are refused). The cells are the :class:`SparsityConfig` of every site x
    threshold of ``rule`` (:meth:`configs`). ``batch_size`` is part of every cell's key (see the module
    docstring: batching moves sparse results)."""

    models: list[Any]
    output_dir: str | Path
    sites: list[str] = field(default_factory=lambda: [s.value for s in ALL_SITES])
    rule: str = "top_p"
    thresholds: list[float] = field(default_factory=lambda: grid("quick"))
    tasks: list[str] = field(default_factory=lambda: ["builtin_mc", "builtin_ppl"])
    limit: int | float | dict[str, int | float | None] | None = None
    mc_num: int = 128
    mc_batch: int = 16
    batch_size: int = 16
    seed: int = 1234
    dtype: str | None = None
    device: str | None = None
    scope: str = "token"
    include_path: str | None = None
    ratio_bins: int = 5  # diffusion: also measure sparsity per mask-ratio bin of the ELBO passes
    progress: bool = True
    # Guided ELBO w of the diffusion models (a float for every task or a {task: w} dict, e.g. the official
    # LLaDA per-task values of dllm_sparse.eval.presets); autoregressive models ignore it.
    cfg_scale: float | dict[str, float] = 0.0
    # The LM head on this many scored rows at a time (Scorer(head_chunk=...)): bounds the logits' memory for long
    # rolling windows at a large vocabulary; None = all at once. Part of the cell key when set.
    head_chunk: int | None = None

    def __post_init__(self):
        from dllm_sparse.eval.likelihood import check_head_chunk

        self.rule = rule_name(self.rule)
        check_head_chunk(self.head_chunk)
        self.configs()  # a bad site or threshold fails here, not after the first model has loaded
        for task in self.tasks:
            check_limit(self.limit_for(task), what=f"limit of task {task!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")

    def configs(self) -> list[SparsityConfig]:
        """One config per (site, threshold), in that order."""
        return [SparsityConfig(site, make_rule(self.rule, t, scope=self.scope))
                for site in self.sites for t in self.thresholds]

    def limit_for(self, task: str):
        return self.limit.get(task) if isinstance(self.limit, dict) else self.limit

    def cfg_for(self, task: str) -> float:
        w = self.cfg_scale.get(task, 0.0) if isinstance(self.cfg_scale, dict) else self.cfg_scale
        return float(w)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = [_model_name(m) for m in self.models]
        d["output_dir"] = str(self.output_dir)
        return d


def _model_name(m: Any) -> str:
    return m if isinstance(m, (str, os.PathLike)) and not hasattr(m, "model") else getattr(m, "name", str(m))


KEY_FIELDS = ("model", "task", "sparsity", "limit", "mc_num", "mc_batch", "seed", "dtype", "batch_size")
# The fields of a model's identity known only once it has loaded; stored in every row as "model_identity".
MODEL_IDENTITY_FIELDS = ("weights", "kind", "param_dtype", "device_type")


def _key(model: str, task: str, sparsity_id: str, limit, mc_num: int, mc_batch: int, seed: int, dtype: str,
         batch_size: int, cfg_scale: float = 0.0, head_chunk: int | None = None) -> str:
    k = [str(model), task, sparsity_id, limit, mc_num, mc_batch, seed, str(dtype), int(batch_size)]
    # Options appended only when set, so the keys of unguided, unchunked cells stay what they were.
    options: dict[str, Any] = {}
    if cfg_scale:
        options["cfg"] = float(cfg_scale)
    if head_chunk is not None:
        options["head_chunk"] = int(head_chunk)
    if options:
        k.append(options)
    return json.dumps(k, separators=(",", ":"))


def cell_identity(cfg: SweepConfig, model: str, task: str, config: SparsityConfig | None) -> RunIdentity:
    """The part of a cell's :class:`~dllm_sparse.eval.identity.RunIdentity` known before its model loads
    (:data:`KEY_FIELDS`); ``config=None`` is the dense cell."""
    return run_identity(model=str(model), sparsity=config, task=task, limit=cfg.limit_for(task), mc_num=cfg.mc_num,
                        mc_batch=cfg.mc_batch, seed=cfg.seed, dtype=str(cfg.dtype), batch_size=cfg.batch_size)


def cell_key(cfg: SweepConfig, model: str, task: str, config: SparsityConfig | None) -> str:
    """The key of a cell: :func:`cell_identity` as a JSON list in :data:`KEY_FIELDS` order (the sparsity as
    its config id, ``dense`` for the dense cell)."""
    ident = cell_identity(cfg, model, task, config)
    return _key(*(ident[f] for f in KEY_FIELDS), cfg_scale=cfg.cfg_for(task), head_chunk=cfg.head_chunk)


def model_identity(lm) -> dict:
    """The loaded model's part of the identity (:data:`MODEL_IDENTITY_FIELDS`): weights hash, kind, the dtype of
    its parameters and its device type."""
    ident = run_identity(lm)
    return {"weights": ident["weights"], "kind": ident["kind"], "param_dtype": ident.get("dtype"),
            "device_type": ident.get("device_type")}


def _check_model_identity(out: Path, rows: list[dict], name: str, cfg: SweepConfig, current: dict) -> None:
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


@dataclass
class _Unit:
    model_index: int
    task: str
    config: SparsityConfig | None  # None for the dense pass
    keys: list[str]  # the rows this unit writes
    identity_cells: list[SparsityConfig] = field(default_factory=list)  # dense pass: identity cells it fills


def _plan(cfg: SweepConfig) -> list[_Unit]:
    units = []
    configs = cfg.configs()
    identities = [c for c in configs if c.is_identity]
    for mi, model in enumerate(cfg.models):
        name = _model_name(model)
        for task in cfg.tasks:
            keys = [cell_key(cfg, name, task, None)] + [cell_key(cfg, name, task, c) for c in identities]
            units.append(_Unit(mi, task, None, keys, identities))
            units += [_Unit(mi, task, c, [cell_key(cfg, name, task, c)]) for c in configs if not c.is_identity]
    return units


_OLD_KEY_FORMS = {
    11: "[model, task, site, rule, p, scope, limit, mc_num, mc_batch, seed, dtype]",
    8: "[model, task, sparsity config id, limit, mc_num, mc_batch, seed, dtype]",
}


def _old_key_to_new(key: str, batch_size: int | None) -> str | None:
    """The current key of a cell keyed an old way (:data:`_OLD_KEY_FORMS`: without the config id, or without
    the batch size, which ``batch_size`` supplies); None when ``key`` is not an old key."""
    try:
        k = json.loads(key)
    except (TypeError, ValueError):
        return None
    if not isinstance(k, list) or len(k) not in _OLD_KEY_FORMS:
        return None
    if len(k) == 11:
        model, task, site, rule, p, scope, limit, mc_num, mc_batch, seed, dtype = k
        sparsity_id = DENSE if site == DENSE else SparsityConfig(site, make_rule(rule, p, scope=scope)).id
    else:
        model, task, sparsity_id, limit, mc_num, mc_batch, seed, dtype = k
    return _key(model, task, sparsity_id, limit, mc_num, mc_batch, seed, dtype, -1 if batch_size is None
                else batch_size)


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
        for path in [out / "rows.jsonl", *_shard_paths(out)]:
            rows = read_rows(path)
            n = 0
            for r in rows:
                new = _old_key_to_new(r.get("key"), batch_size)
                if new is not None:
                    r["key"] = new
                    n += 1
            if n:
                _atomic_write_rows(path, rows)
                changed += n
    return changed


def _key_problem(key: Any) -> str | None:
    """What is wrong with a cell key of the current form (:data:`KEY_FIELDS`, plus ``{"cfg": w, "head_chunk": n}``
    holding the options that are set), or None when it is one."""
    if not isinstance(key, str):
        return f"its key is {type(key).__name__} {key!r:.60}, not a string"
    try:
        k = json.loads(key)
    except ValueError:
        return f"its key {key!r:.80} is not JSON"
    if not isinstance(k, list):
        return f"its key {key!r:.80} is not a JSON list"
    if len(k) not in (len(KEY_FIELDS), len(KEY_FIELDS) + 1):
        return f"its key has {len(k)} fields, not the {len(KEY_FIELDS)} of [{', '.join(KEY_FIELDS)}]"
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {"model": lambda v: isinstance(v, str), "task": lambda v: isinstance(v, str),
              "sparsity": lambda v: isinstance(v, str) and (v == DENSE or _parses(v)),
              "limit": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
              "mc_num": whole, "mc_batch": whole, "seed": whole, "dtype": lambda v: isinstance(v, str),
              "batch_size": whole}
    for name, value in zip(KEY_FIELDS, k, strict=False):
        if not checks[name](value):
            return f"its key's {name} field is {value!r:.60}, which is not a valid {name}"
    if len(k) > len(KEY_FIELDS):
        opts = k[-1]
        number = {"cfg": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "head_chunk": whole}
        if not (isinstance(opts, dict) and opts and set(opts) <= set(number)
                and all(number[n](v) for n, v in opts.items())):
            return (f"its key's last field {opts!r:.60} is not the options "
                    "{\"cfg\": w, \"head_chunk\": n} (either or both)")
    return None


def _parses(sparsity_id: str) -> bool:
    try:
        SparsityConfig.parse(sparsity_id)
    except (TypeError, ValueError):
        return False
    return True


def _is_old_key(key: Any) -> bool:
    """A well-formed key of an earlier release (:data:`_OLD_KEY_FORMS`), which :func:`upgrade_cell_keys` rewrites;
    not a garbled one."""
    try:
        new = _old_key_to_new(key, 1)
    except (TypeError, ValueError):  # an old-length list whose site / rule / threshold do not read
        return False
    return new is not None and _key_problem(new) is None


def _row_key_problem(key: Any) -> str | None:
    """What is wrong with a row's key; None for a current key and for a well-formed old one."""
    problem = _key_problem(key)
    if problem is None:
        return None
    try:
        new = _old_key_to_new(key, 1)
    except (TypeError, ValueError) as e:  # the length of an old form, but its fields do not read
        return f"its key {key!r:.80} has the length of an old form, but {e}"
    if new is None:
        return problem
    old_problem = _key_problem(new)
    return None if old_problem is None else f"{old_problem} (in a key of the old {len(json.loads(key))}-field form)"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


#: What each field of a row must hold when present (:func:`row_problem`); ``None`` stands for JSON null.
_ROW_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model": ("a string", lambda v: isinstance(v, str) and v != ""),
    "task": ("a string", lambda v: isinstance(v, str) and v != ""),
    "site": ("a string", lambda v: isinstance(v, str) and v != ""),
    "metric": ("a string", lambda v: isinstance(v, str) and v != ""),
    "value": ("a finite number", _finite),
    "kind": ("'ar' or 'diffusion'", lambda v: v in ("ar", "diffusion")),
    "p": ("a finite number", _finite),
    "sparsity": ("a number in [0, 1], or null (the dense row)", lambda v: v is None or (_finite(v) and 0 <= v <= 1)),
    "relative_performance": ("a number (NaN: undefined, the dense score is 0), or null (its dense row is not in yet)",
                             lambda v: v is None or _number(v)),
    "dense_value": ("a finite number, or null (its dense row is not in yet)", lambda v: v is None or _finite(v)),
    "metrics": ("an object of metric name -> number",
                lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items())),
    "n_items": ("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
}
#: Fields every row has (the rest are checked when present: rows of older versions lack some).
_REQUIRED_FIELDS = ("key", "model", "task", "site", "metric", "value")


def row_problem(row: Any) -> str | None:
    """What is wrong with a row read back from a sweep folder, or None. A row is a JSON object with the fields
    :data:`_REQUIRED_FIELDS`, a key of the current (or an old, upgradable) form, and, for each field of
    :data:`_ROW_FIELDS` it holds, a value of that form: ``value`` a finite number; ``sparsity`` a number in
    [0, 1] or null (dense rows); ``relative_performance`` a number (NaN where the dense score is 0) or null (its
    dense row was not written yet); ``p`` a finite number; ``kind`` ar / diffusion. A hand-edited or damaged row
    (``"value": "abc"``) would otherwise be kept and poison every table."""
    if not isinstance(row, dict):
        return f"it is a JSON {type(row).__name__}, not an object"
    missing = [f for f in _REQUIRED_FIELDS if f not in row]
    if missing:
        return f"it has no {missing[0]} field"
    why = _row_key_problem(row["key"])
    if why is not None:
        return why
    for name, (form, ok) in _ROW_FIELDS.items():
        if name in row and not ok(row[name]):
            return f"its {name} field is {row[name]!r:.60}, not {form}"
    return None


def _refuse_old_keys(out: Path, rows: list[dict]) -> None:
    old = [r["key"] for r in rows if _is_old_key(r.get("key"))]
    if old:
        fields = ", ".join(KEY_FIELDS).replace("sparsity", "sparsity config id")
        form = _OLD_KEY_FORMS[len(json.loads(old[0]))]
        bs = _folder_batch_size(out)
        call = f"upgrade_cell_keys('{out}')" if bs is not None else f"upgrade_cell_keys('{out}', batch_size=N)"
        raise RuntimeError(
            f"{out} holds {len(old)} rows keyed the old way, {form} (e.g. {old[0]}); cells are now keyed "
            f"[{fields}] (e.g. {_old_key_to_new(old[0], bs)}), so they would not be recognised and "
            f"would be computed again. Rewrite the keys in place (values unchanged; the batch size "
            + (f"{bs} from its sweep_config.json" if bs is not None else "N the rows were computed with")
            + f") with `python -c \"from dllm_sparse.eval.sweep import upgrade_cell_keys; {call}\"`, "
            f"or use a fresh output folder.")


def planned_keys(cfg: SweepConfig) -> set[str]:
    """The keys of every cell this configuration asks for (to select its rows from a shared folder)."""
    return {k for u in _plan(cfg) for k in u.keys}


# ---------------------------------------------------------------------------------------------------------
# Claims and workers: several processes sharing one folder's units
# ---------------------------------------------------------------------------------------------------------

#: Which process computes which unit: {first key of the unit: {"pid", "host", "start"}}, read and written under
#: the lock (``start``: :func:`process_start`, which tells a reused pid from the process that claimed).
CLAIMS_NAME = ".claims.json"


def _read_claims(out: Path) -> dict[str, dict]:
    try:
        data = json.loads((out / CLAIMS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def process_start(pid: int) -> str | None:
    """Who a pid is: ``"<boot id>:<start time>"`` of the process running as ``pid`` now (Linux: the kernel's boot
    id and field 22 of ``/proc/<pid>/stat``, the start time in clock ticks after boot), so that a pid reused by
    another process after the claimer ended (or after a restart) reads differently. None when ``pid`` does not
    run, or where ``/proc`` cannot be read (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        return None
    return f"{boot}:{stat_start_time(stat)}"


def stat_start_time(stat: str) -> str:
    """Field 22 (``starttime``) of a ``/proc/<pid>/stat`` line. Field 2, the command name in parentheses, may
    hold spaces and parentheses itself, so the fields are counted from the last ')'."""
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19]  # fields[0] is field 3 (the state), so field 22 is fields[19]


def _this_claim() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}


def _claim_alive(claim: Any, start_of: Callable[[int], str | None] = process_start) -> bool:
    """Whether the process that made a claim still runs (a killed sweep's claims are taken over).

    On this host, with ``/proc``: alive iff ``claim["pid"]`` runs and is the same process (its :func:`process_start`
    equals the claim's ``start``): a pid reused by an unrelated process after a kill or a restart is recognised
    as dead, and so is a claim without ``start`` (written by an older version, which cannot be told from a
    reused pid: at worst that unit is computed twice, and its rows are written once). Without ``/proc``: whether
    the pid runs (``os.kill(pid, 0)``). A claim made on another machine (a shared file system) counts as alive:
    its process cannot be asked (the waiting sweep says so, see :class:`ClaimWait`)."""
    if not isinstance(claim, dict) or not isinstance(claim.get("pid"), int) or isinstance(claim.get("pid"), bool):
        return False
    if claim.get("host") != socket.gethostname():
        return True
    if start_of(os.getpid()) is not None:  # /proc is readable
        now = start_of(claim["pid"])
        return now is not None and claim.get("start") is not None and now == claim["start"]
    try:
        os.kill(claim["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _live_claims(out: Path) -> dict[str, dict]:
    return {k: c for k, c in _read_claims(out).items() if _claim_alive(c) and c.get("pid") != os.getpid()}


def _next_model(out: Path, units: Sequence[_Unit]) -> int | None:
    """The model index of the first unit no other live process has claimed, or None."""
    with folder_lock(out):
        taken = _live_claims(out) if out.is_dir() else {}
    return next((u.model_index for u in units if u.keys[0] not in taken), None)


def _claim(out: Path, units: Sequence[_Unit]) -> _Unit | None:
    """Claim the first of ``units`` that no other live process has claimed (stale claims are dropped); None when
    every one is taken."""
    with folder_lock(out):
        claims = _live_claims(out)
        unit = next((u for u in units if u.keys[0] not in claims), None)
        if unit is not None:
            claims[unit.keys[0]] = _this_claim()
            atomic_write_json(out / CLAIMS_NAME, claims)
    return unit


class ClaimWait:
    """The wait of a sweep whose remaining units are all claimed by other processes: a pause per call, and, once
    it has waited ``first`` seconds and then every ``every`` seconds, when a holder is on another machine, a
    message (``say``, default: a warning on the ``dllm_sparse.eval.sweep`` logger) naming the claim file, each
    holder (pid and host, and whether this run can see it running) and how to release a claim whose holder is
    gone: delete the claim file (or its entries). A claim made on another machine cannot be checked from here, so
    without that message such a wait would be silent and endless; claims of this host are checked alive (the
    usual wait for workers' last units) and need no message. ``clock`` / ``sleep`` are injectable (tests)."""

    def __init__(self, out: Path, *, first: float = 60.0, every: float = 600.0, pause: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 say: Callable[[str], None] | None = None):
        self.out, self.first, self.every, self.pause = Path(out), first, every, pause
        self.clock, self.sleep = clock, sleep
        self.say = say if say is not None else logging.getLogger(__name__).warning
        self.since: float | None = None
        self.next_note: float | None = None

    def message(self, keys: Sequence[str], waited: float) -> str | None:
        """What this run waits for: the holders of ``keys`` (the first keys of the units left); None when every
        holder runs on this host (checked alive: such a wait ends with them, e.g. the workers' last units)."""
        with folder_lock(self.out):
            claims = _live_claims(self.out) if self.out.is_dir() else {}
        host = socket.gethostname()
        holders: dict[tuple, int] = {}
        for k in keys:
            c = claims.get(k)
            if c is not None:
                where = (c.get("pid"), c.get("host"))
                holders[where] = holders.get(where, 0) + 1
        if all(h == host for _, h in holders):
            return None
        parts = [f"pid {pid} on this host ({n} unit(s); it runs: its units finish there)" if h == host else
                 f"pid {pid} on host {h!r} ({n} unit(s); another machine: this run cannot check that it still runs)"
                 for (pid, h), n in holders.items()]
        path = self.out / CLAIMS_NAME
        return (f"sweep {self.out}: waiting {waited / 60:.0f} min for {len(keys)} unit(s) that other processes "
                f"claimed in {path}: {'; '.join(parts) or 'none any more'}. If a holder no longer runs (killed, or "
                f"its machine restarted), release its claims by deleting {path} (or its entries): this run then "
                "computes those units (a unit whose holder does still run may then be computed twice; its rows are "
                "written once).")

    def __call__(self, keys: Sequence[str]) -> None:
        now = self.clock()
        if self.since is None:
            self.since, self.next_note = now, now + self.first
        if now >= self.next_note:
            text = self.message(keys, now - self.since)
            if text is not None:
                self.say(text)
            self.next_note = now + self.every
        self.sleep(self.pause)


def _release(out: Path, unit: _Unit) -> None:
    with folder_lock(out):
        claims = _live_claims(out)
        claims.pop(unit.keys[0], None)
        atomic_write_json(out / CLAIMS_NAME, claims)


def _check_workers_arg(workers: Any) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r} (1: this process alone)")
    return workers


def _start_workers(cfg: SweepConfig, workers: int, threads: int | None, custom: list[str]) -> list:
    """Start ``workers - 1`` processes (spawned: a fresh interpreter, no forked OpenMP state) that sweep the same
    configuration into the same folder; each takes units by claim, so none is computed twice."""
    if workers == 1:
        return []
    in_memory = [_model_name(m) for m in cfg.models if not isinstance(m, (str, os.PathLike))]
    if in_memory:
        raise ValueError(f"workers={workers} needs every model given by name or path (a worker loads its own copy); "
                         f"{in_memory} are loaded objects: pass their names/paths, or workers=1")
    if custom:
        raise ValueError(f"workers={workers} uses the default loader and tasks (a worker is a fresh process); "
                         f"drop {' / '.join(custom)}, or use workers=1")
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    threads = torch.get_num_threads() if threads is None else threads
    quiet = replace(cfg, progress=False)
    procs = [ctx.Process(target=_worker_main, args=(quiet, threads, os.getpid()), name=f"sweep-worker-{i + 1}")
             for i in range(workers - 1)]
    for p in procs:
        p.start()
    return procs


def _worker_main(cfg: SweepConfig, threads: int, parent: int) -> None:
    torch.set_num_threads(threads)
    run_sweep(cfg, rank=0, world_size=1, _worker=True, _parent=parent)


def _check_workers(procs: Sequence, finished: bool = False) -> None:
    """A worker that failed stops the run (its traceback is on stderr): the parent would otherwise wait for it."""
    for p in procs:
        if p.exitcode not in (None, 0) or (finished and p.exitcode is None):
            raise RuntimeError(f"sweep worker {p.name} exited with code {p.exitcode} (its error is printed above); "
                               "rerun the same command to resume, or pass workers=1")


def _barrier(world: int) -> None:
    if world <= 1:
        return
    from accelerate import PartialState

    PartialState().wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------


def run_sweep(
    cfg: SweepConfig,
    *,
    loader: Callable[..., Any] | None = None,
    task_factory: Callable[[str], Task] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    on_row: Callable[[dict], None] | None = None,
    workers: int = 1,
    worker_threads: int | None = None,
    claim_wait: Callable[[Sequence[str]], None] | None = None,
    _worker: bool = False,
    _parent: int | None = None,
) -> list[dict]:
    """Run (or resume) the sweep; returns every row of the folder (after merging, on rank 0).

    ``loader(name, dtype=, device=)`` defaults to :func:`dllm_sparse.load_model`; ``task_factory(name)`` to
    :func:`dllm_sparse.eval.tasks.get_task`. ``rank``/``world_size`` default to the launcher's environment.
    ``on_row`` is called with every row written (progress reporting, tests). ``workers`` > 1 (a plain run, models
    given by name or path): that many processes in all compute the units, this one and ``workers - 1`` started
    here, each with ``worker_threads`` torch threads (default: this process's) and its own copy of the model it
    is on; they take units one at a time from the folder (module docstring, "Workers"). ``claim_wait(keys)``: called
    (instead of :class:`ClaimWait`'s pause and messages) while every unit left is claimed by another process."""
    workers = _check_workers_arg(workers)
    custom = [what for what, f in (("loader=", loader), ("task_factory=", task_factory)) if f is not None]
    env_rank, env_world, local_rank = process_info()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    if workers > 1 and world > 1:
        raise ValueError(f"workers={workers} under a launcher ({world} processes): the launcher's ranks already split "
                         "the units; use one or the other")
    out = Path(cfg.output_dir)
    if task_factory is None:
        def task_factory(name: str) -> Task:
            return get_task(name, cfg.include_path)
    default_loader = loader is None
    if loader is None:
        from dllm_sparse.models.loading import load_model as loader  # noqa: N813
    device = cfg.device
    if world > 1 and device in (None, "auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"  # data parallel: one full model copy per process

    with folder_lock(out):
        existing = load_rows(out)  # refuses a corrupt row, naming its file and line
    _refuse_old_keys(out, existing)
    done = {r["key"] for r in existing}
    dense_rows = {r["key"]: r for r in existing if r["site"] == DENSE}
    plan = _plan(cfg)
    if rank == env_rank and world == env_world and world > 1:
        from accelerate import PartialState

        with PartialState(cpu=not torch.cuda.is_available()).split_between_processes(plan) as mine:
            units = list(mine)
    else:  # an explicit rank (tests, a manual split): the same contiguous share
        units = share_of(plan, rank, world)
    todo = [u for u in units if not all(k in done for k in u.keys)]
    path = out / "rows.jsonl" if world == 1 else out / "shards" / f"rows.rank{rank}.jsonl"
    if default_loader:  # every model this rank will load is findable (a hub id without network fails in seconds)
        from dllm_sparse.models.loading import check_available

        for mi in sorted({u.model_index for u in todo}):
            if not hasattr(cfg.models[mi], "model"):
                check_available(cfg.models[mi])
    tasks: dict[str, Task] = {}
    load_seconds: dict[str, float] = {}  # this run's model loading times (status.json)

    def open_folder() -> bool:
        # Only once a model has loaded: a model that cannot load (a hub id without network) leaves no folder.
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            atomic_write_json(out / "sweep_config.json", cfg.to_dict())
        return True

    def refresh() -> None:
        """What other sweeps into this folder have finished since (their cells are skipped, their dense rows
        used)."""
        with folder_lock(out):
            for r in load_rows(out):
                done.add(r["key"])
                if r.get("site") == DENSE:
                    dense_rows.setdefault(r["key"], r)

    bar = None
    if cfg.progress and todo:
        from tqdm.auto import tqdm

        # One step per unit (a dense pass with its p = 1 cells, or one sparse cell), also those other processes
        # finish; on stderr, hidden when it is not a terminal (a log file gets no bar redraws).
        bar = tqdm(total=len(todo), desc=f"sweep (rank {rank})" if world > 1 else "sweep", unit="cell",
                   file=sys.stderr, disable=None, dynamic_ncols=True)
    procs = _start_workers(cfg, workers, worker_threads, custom) if world == 1 and todo else []
    opened = False
    wait = ClaimWait(out) if claim_wait is None else claim_wait
    current: tuple | None = None  # (model index, loaded model, scorer, name, identity)
    try:
        while True:
            refresh()
            pending = [u for u in todo if not all(k in done for k in u.keys)]
            if bar is not None:
                bar.n = len(todo) - len(pending)
                bar.refresh()
            if not pending or (_parent is not None and os.getppid() != _parent):  # done, or the parent is gone
                break
            _check_workers(procs)
            unit = None
            if current is not None:
                mine = [u for u in pending if u.model_index == current[0]]
                # A launcher's rank owns its share; a plain run claims each unit (several may share the folder).
                unit = (mine[0] if mine else None) if world > 1 else _claim(out, mine)
            if unit is None:  # load the next model that has a unit left to take
                others = [u for u in pending if current is None or u.model_index != current[0]]
                mi = (others[0].model_index if others else None) if world > 1 else _next_model(out, others)
                if mi is None:  # every pending unit is being computed by another process
                    wait([u.keys[0] for u in others])
                    continue
                current = None  # free the last model before loading the next
                gc.collect()
                spec = cfg.models[mi]
                t_load = time.perf_counter()
                lm = spec if hasattr(spec, "model") and hasattr(spec, "kind") else loader(
                    spec, dtype=cfg.dtype, device=device)
                load_seconds[_model_name(spec)] = time.perf_counter() - t_load
                scorer = Scorer.from_loaded(lm, batch_size=cfg.batch_size, mc_num=cfg.mc_num,
                                            mc_batch=cfg.mc_batch, seed=cfg.seed, ratio_bins=cfg.ratio_bins,
                                            head_chunk=cfg.head_chunk)
                name = _model_name(spec)
                loaded = model_identity(lm)
                _check_model_identity(out, existing, name, cfg, loaded)
                current = (mi, lm, scorer, name, loaded)
                opened = opened or open_folder()
                del lm, scorer
                continue
            mi, lm, scorer, name, loaded = current
            try:
                if unit.task not in tasks:
                    tasks[unit.task] = task_factory(unit.task)
                if lm.kind == "diffusion":
                    scorer.cfg_scale = cfg.cfg_for(unit.task)
                if bar is not None:
                    bar.set_postfix_str(f"{name} {unit.task} {DENSE if unit.config is None else unit.config.id}")
                rows = _run_unit(cfg, scorer, lm, name, tasks[unit.task], unit, dense_rows, rank, loaded)
                for row in _append_new_rows(out, path, [r for r in rows if r["key"] not in done]):
                    done.add(row["key"])
                    if on_row is not None:
                        on_row(row)
            finally:
                if world == 1:
                    _release(out, unit)
        for p in procs:
            p.join()
        _check_workers(procs, finished=True)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    current = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not opened:  # nothing left to compute on this rank
        open_folder()
    if bar is not None:
        bar.close()
    _barrier(world)
    if _worker:
        return []
    if rank == 0:
        rows = finalize(out)
        _write_status(out, cfg, rows, load_seconds)
        return rows
    return load_rows(out)


def _write_status(out: Path, cfg: SweepConfig, rows: list[dict], load_seconds: dict[str, float]) -> None:
    planned = planned_keys(cfg)
    have = {r["key"] for r in rows}
    status = {"planned_cells": len(planned), "finished_cells": len(planned & have),
              "complete": planned <= have, "rows_in_folder": len(rows),
              "load_seconds_this_run": load_seconds}
    atomic_write_json(out / "status.json", status)


def _base_row(cfg: SweepConfig, lm, name: str, task: str, config: SparsityConfig | None, rank: int,
              loaded: dict) -> dict:
    # "p" is the rule threshold (top-k: the target sparsity); the column keeps the name existing rows use.
    site, rule, threshold = (DENSE, DENSE, 1.0) if config is None else (
        config.site.value, config.rule.name, config.rule.threshold)
    return {
        "key": cell_key(cfg, name, task, config), "model": name, "kind": lm.kind,
        "family": getattr(lm, "family", ""), "site": site, "rule": rule, "p": float(threshold), "scope": cfg.scope,
        "task": task, "limit": cfg.limit_for(task), "seed": cfg.seed, "dtype": str(cfg.dtype),
        "mc_num": cfg.mc_num if lm.kind == "diffusion" else None,
        "mc_batch": cfg.mc_batch if lm.kind == "diffusion" else None, "batch_size": cfg.batch_size, "rank": rank,
        "model_identity": loaded, "cfg_scale": cfg.cfg_for(task) if lm.kind == "diffusion" else None,
        "threads": torch.get_num_threads(),
    }


def _result_fields(res) -> dict:
    # "items": the per-item scores the bootstrap intervals resample (dllm_sparse.eval.bootstrap); None for tasks
    # whose scorer gives no per-item details.
    return {"metric": res.metric, "value": res.value, "metrics": res.metrics,
            "higher_is_better": res.higher_is_better.get(res.metric, True),
            "higher_is_better_all": res.higher_is_better, "n_items": res.n, "items": item_scores(res.details)}


def _groups(stats: SparsityStats, site: str) -> dict[str, float]:
    names = sorted({k[1] for k in [*stats.counts, *stats.expert_counts] if k[3] == site})
    return {g: stats.mean(site, group=g) for g in names}


def _run_unit(cfg: SweepConfig, scorer: Scorer, lm, name: str, task: Task, unit: _Unit,
              dense_rows: dict, rank: int, loaded: dict) -> list[dict]:
    stats = SparsityStats()
    limit = cfg.limit_for(unit.task)
    t0 = time.perf_counter()
    if unit.config is None:
        # Identity configs (top-p at p = 1) on every site with an identity cell: one dense pass measures them all.
        sites = dict.fromkeys(c.site for c in unit.identity_cells)
        configs = [SparsityConfig.identity(s, cfg.scope) for s in sites]
        # Routed experts take one sparsify block at a time (dllm_sparse.sparsity.experts), so a model with them
        # measures each site in a dense pass of its own (the same scores every time: each pass is dense).
        for group in [[c] for c in configs] if find_experts(lm.model) else [configs]:
            res = task.evaluate(scorer, limit, sparsity=group, stats=stats)
        seconds = time.perf_counter() - t0
        dense = {**_base_row(cfg, lm, name, unit.task, None, rank, loaded), **_result_fields(res),
                 "dense_value": res.value, "dense_metrics": res.metrics, "relative_performance": 1.0,
                 "relative": {m: 1.0 for m in res.metrics}, "sparsity": None,
                 "sparsity_by_site": {s: stats.mean(s) for s in stats.sites()},
                 "per_layer_by_site": {s: list(stats.per_layer(s).values()) for s in stats.sites()},
                 "seconds": seconds, "source": "measured", "finished_at": time.time()}
        dense_rows[dense["key"]] = dense
        rows = [dense]
        for c in unit.identity_cells:
            site = c.site.value
            row = {**_base_row(cfg, lm, name, unit.task, c, rank, loaded), **_result_fields(res),
                   "sparsity": stats.mean(site), "per_layer_sparsity": list(stats.per_layer(site).values()),
                   "sparsity_groups": _groups(stats, site), **stats.expert_fields(site), "seconds": 0.0,
                   "source": "dense_pass",
                   "finished_at": time.time()}
            _set_relative(row, dense)
            rows.append(row)
        return rows
    site = unit.config.site.value
    res = task.evaluate(scorer, limit, sparsity=unit.config, stats=stats)
    row = {**_base_row(cfg, lm, name, unit.task, unit.config, rank, loaded), **_result_fields(res),
           "dense_value": None, "dense_metrics": None, "relative": None, "relative_performance": None,
           "sparsity": stats.mean(site), "per_layer_sparsity": list(stats.per_layer(site).values()),
           "sparsity_groups": _groups(stats, site), **stats.expert_fields(site), "seconds": time.perf_counter() - t0,
           "source": "measured", "finished_at": time.time()}
    dense = dense_rows.get(dense_key(row["key"]))
    if dense is not None:
        _set_relative(row, dense)
    return [row]


def rows_for(rows: Sequence[dict], **match: Any) -> list[dict]:
    """Rows whose fields equal the given values, e.g. ``rows_for(rows, model="m", site="input")``."""
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]
