"""Sweep runner: models × sites × rule thresholds × tasks, one tidy row per cell, resumable.

    from dllm_sparse.eval.sweep.config import SweepConfig, grid
    from dllm_sparse.eval.sweep.run import run_sweep
    rows = run_sweep(SweepConfig(models=["smollm2-135m"], tasks=["builtin_mc", "builtin_ppl"],
                                 thresholds=grid("quick"), output_dir="runs/quick"))

Rows (``<output_dir>/rows.jsonl``) carry: model, kind, site, rule, ``p`` (the rule threshold: p for top-p and
max-p, the target sparsity for top-k; the column keeps its historical name), scope, task, the primary metric
and its value, the dense value, the relative performance (sparse/dense; dense/sparse for lower-is-better metrics such as
perplexity), all metrics, the measured mean sparsity and per-layer sparsities (the x-axis of every curve),
the number of items, the per-item scores (``items``: what the bootstrap intervals of
:mod:`dllm_sparse.eval.analysis.bootstrap` resample) and the seconds spent.

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
* **Sparsity as a context.** Each unit runs ``with scorer.sparsified(unit.sparsity, stats): task.evaluate(scorer)``
  (:meth:`~dllm_sparse.eval.scoring.scorer.Scorer.sparsified`): every forward pass of the task is sparsified and
  measured into the unit's statistics; the grid of configurations is built once, in the plan
  (:func:`~dllm_sparse.eval.sweep.config.plan`). The pieces: :mod:`~dllm_sparse.eval.sweep.config` (configuration,
  keys, plan), :mod:`~dllm_sparse.eval.sweep.store` (the folder's rows), :mod:`~dllm_sparse.eval.sweep.validate`
  (row and key checks), :mod:`~dllm_sparse.eval.sweep.claims` (claims); this module runs them.
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
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dllm_sparse.eval.analysis.bootstrap import item_scores
from dllm_sparse.eval.rows import atomic_write_json, process_info, share_of
from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.eval.sweep.claims import ClaimWait, claim, next_model, release
from dllm_sparse.eval.sweep.config import SweepConfig, Unit, cell_key, model_identity, model_name, plan, planned_keys
from dllm_sparse.eval.sweep.store import (
    append_new_rows,
    check_model_identity,
    dense_key,
    finalize,
    folder_lock,
    load_rows,
    refuse_old_keys,
    set_relative,
    write_status,
)
from dllm_sparse.eval.tasks.base import Task
from dllm_sparse.eval.tasks.registry import get_task
from dllm_sparse.models.families import find_experts
from dllm_sparse.sparsity.config import DENSE, SparsityConfig
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = ["run_sweep"]


# ---------------------------------------------------------------------------------------------------------
# Workers: more processes sharing the folder's units through claims
# ---------------------------------------------------------------------------------------------------------


def _check_workers_arg(workers: Any) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r} (1: this process alone)")
    return workers


def _start_workers(cfg: SweepConfig, workers: int, threads: int | None, custom: list[str]) -> list:
    """Start ``workers - 1`` processes (spawned: a fresh interpreter, no forked OpenMP state) that sweep the same
    configuration into the same folder; each takes units by claim, so none is computed twice."""
    if workers == 1:
        return []
    in_memory = [model_name(m) for m in cfg.models if not isinstance(m, (str, os.PathLike))]
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
    :func:`dllm_sparse.eval.tasks.registry.get_task`. ``rank``/``world_size`` default to the launcher's environment.
    ``on_row`` is called with every row written (progress reporting, tests). ``workers`` > 1 (a plain run, models
    given by name or path): that many processes in all compute the units, this one and ``workers - 1`` started
    here, each with ``worker_threads`` torch threads (default: this process's) and its own copy of the model it
    is on; they take units one at a time from the folder (module docstring, "Workers"). ``claim_wait(keys)``: called
    (instead of :class:`~dllm_sparse.eval.sweep.claims.ClaimWait`'s pause and messages) while every unit left is
    claimed by another process."""
    workers = _check_workers_arg(workers)
    custom = [what for what, f in (("loader=", loader), ("task_factory=", task_factory)) if f is not None]
    env_rank, env_world, local_rank = process_info()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    if workers > 1 and world > 1:
        raise ValueError(f"workers={workers} under a launcher ({world} processes): the launcher's ranks already split "
                         "the units; use one or the other")
    run = _SweepRun(cfg, loader=loader, task_factory=task_factory, rank=rank, world=world, local_rank=local_rank,
                    on_row=on_row, claim_wait=claim_wait, parent=_parent)
    todo = run.prepare(launcher=rank == env_rank and world == env_world and world > 1)
    procs = _start_workers(cfg, workers, worker_threads, custom) if world == 1 and todo else []
    try:
        run.compute(todo, procs)
        for p in procs:
            p.join()
        _check_workers(procs, finished=True)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return run.finish(worker=_worker)


class _SweepRun:
    """One :func:`run_sweep` call's state: the folder's finished cells and dense rows, this rank's share of the
    plan, the model in memory, the tasks built so far, the progress bar."""

    def __init__(self, cfg: SweepConfig, *, loader, task_factory, rank: int, world: int, local_rank: int, on_row,
                 claim_wait, parent: int | None):
        self.cfg, self.out, self.rank, self.world = cfg, Path(cfg.output_dir), rank, world
        if task_factory is None:
            def task_factory(name: str) -> Task:
                return get_task(name, cfg.include_path)
        self.task_factory = task_factory
        self.default_loader = loader is None
        if loader is None:
            from dllm_sparse.models.loading import load_model as loader  # noqa: N813
        self.loader = loader
        self.device = cfg.device
        if world > 1 and self.device in (None, "auto", "cuda") and torch.cuda.is_available():
            self.device = f"cuda:{local_rank}"  # data parallel: one full model copy per process
        self.on_row, self.parent = on_row, parent
        self.wait = ClaimWait(self.out) if claim_wait is None else claim_wait
        self.tasks: dict[str, Task] = {}
        self.load_seconds: dict[str, float] = {}  # this run's model loading times (status.json)
        self.opened = False
        self.current: tuple | None = None  # (model index, loaded model, scorer, name, identity)
        self.bar = None

    def prepare(self, launcher: bool) -> list[Unit]:
        """Read the folder (refusing corrupt rows and old keys), plan the units once, take this rank's share (a
        launcher's ``split_between_processes``, else the same contiguous share) and return the units left; check
        that every model they need can be found, and open the progress bar."""
        with folder_lock(self.out):
            self.existing = load_rows(self.out)  # refuses a corrupt row, naming its file and line
        refuse_old_keys(self.out, self.existing)
        self.done = {r["key"] for r in self.existing}
        self.dense_rows = {r["key"]: r for r in self.existing if r["site"] == DENSE}
        self.plan = plan(self.cfg)
        if launcher:
            from accelerate import PartialState

            with PartialState(cpu=not torch.cuda.is_available()).split_between_processes(self.plan) as mine:
                units = list(mine)
        else:  # an explicit rank (tests, a manual split): the same contiguous share
            units = share_of(self.plan, self.rank, self.world)
        todo = [u for u in units if not all(k in self.done for k in u.keys)]
        self.path = self.out / "rows.jsonl" if self.world == 1 else self.out / "shards" / f"rows.rank{self.rank}.jsonl"
        if self.default_loader:  # every model this rank will load is findable (a hub id without network fails fast)
            from dllm_sparse.models.loading import check_available

            for mi in sorted({u.model_index for u in todo}):
                if not hasattr(self.cfg.models[mi], "model"):
                    check_available(self.cfg.models[mi])
        if self.cfg.progress and todo:
            from tqdm.auto import tqdm

            # One step per unit (a dense pass with its p = 1 cells, or one sparse cell), also those other processes
            # finish; on stderr, hidden when it is not a terminal (a log file gets no bar redraws).
            self.bar = tqdm(total=len(todo), desc=f"sweep (rank {self.rank})" if self.world > 1 else "sweep",
                            unit="cell", file=sys.stderr, disable=None, dynamic_ncols=True)
        return todo

    def open_folder(self) -> bool:
        # Only once a model has loaded: a model that cannot load (a hub id without network) leaves no folder.
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            atomic_write_json(self.out / "sweep_config.json", self.cfg.to_dict())
        return True

    def refresh(self) -> None:
        """What other sweeps into this folder have finished since (their cells are skipped, their dense rows
        used)."""
        with folder_lock(self.out):
            for r in load_rows(self.out):
                self.done.add(r["key"])
                if r.get("site") == DENSE:
                    self.dense_rows.setdefault(r["key"], r)

    def compute(self, todo: list[Unit], procs: Sequence) -> None:
        """Compute the units of ``todo`` that no other process finishes first: the current model's next unit (a
        plain run claims it), else load the next model that has a unit left, else wait for the holders."""
        while True:
            self.refresh()
            pending = [u for u in todo if not all(k in self.done for k in u.keys)]
            if self.bar is not None:
                self.bar.n = len(todo) - len(pending)
                self.bar.refresh()
            if not pending or (self.parent is not None and os.getppid() != self.parent):  # done, or no parent
                return
            _check_workers(procs)
            unit = None
            if self.current is not None:
                mine = [u for u in pending if u.model_index == self.current[0]]
                # A launcher's rank owns its share; a plain run claims each unit (several may share the folder).
                unit = (mine[0] if mine else None) if self.world > 1 else claim(self.out, mine)
            if unit is None:
                self.load_next(pending)
            else:
                self.compute_unit(unit)

    def load_next(self, pending: list[Unit]) -> None:
        """Load the next model that has a unit left to take (freeing the last one first), or wait when every
        pending unit is being computed by another process."""
        others = [u for u in pending if self.current is None or u.model_index != self.current[0]]
        mi = (others[0].model_index if others else None) if self.world > 1 else next_model(self.out, others)
        if mi is None:  # every pending unit is being computed by another process
            self.wait([u.keys[0] for u in others])
            return
        self.current = None  # free the last model before loading the next
        gc.collect()
        cfg = self.cfg
        spec = cfg.models[mi]
        t_load = time.perf_counter()
        lm = spec if hasattr(spec, "model") and hasattr(spec, "kind") else self.loader(
            spec, dtype=cfg.dtype, device=self.device)
        self.load_seconds[model_name(spec)] = time.perf_counter() - t_load
        scorer = Scorer.from_loaded(lm, batch_size=cfg.batch_size, mc_num=cfg.mc_num, mc_batch=cfg.mc_batch,
                                    seed=cfg.seed, ratio_bins=cfg.ratio_bins, head_chunk=cfg.head_chunk)
        name = model_name(spec)
        loaded = model_identity(lm)
        check_model_identity(self.out, self.existing, name, cfg, loaded)
        self.current = (mi, lm, scorer, name, loaded)
        self.opened = self.opened or self.open_folder()

    def compute_unit(self, unit: Unit) -> None:
        """Compute one claimed unit with the model in memory, append its new rows, release the claim."""
        mi, lm, scorer, name, loaded = self.current
        try:
            if unit.task not in self.tasks:
                self.tasks[unit.task] = self.task_factory(unit.task)
            if lm.kind == "diffusion":
                scorer.cfg_scale = self.cfg.cfg_for(unit.task)
            if self.bar is not None:
                self.bar.set_postfix_str(f"{name} {unit.task} {DENSE if unit.config is None else unit.config.id}")
            rows = _run_unit(self.cfg, scorer, lm, name, self.tasks[unit.task], unit, self.dense_rows, self.rank,
                             loaded)
            for row in append_new_rows(self.out, self.path, [r for r in rows if r["key"] not in self.done]):
                self.done.add(row["key"])
                if self.on_row is not None:
                    self.on_row(row)
        finally:
            if self.world == 1:
                release(self.out, unit)

    def finish(self, worker: bool) -> list[dict]:
        """Free the model, wait for the other ranks; rank 0 merges the folder and writes its status."""
        self.current = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self.opened:  # nothing left to compute on this rank
            self.open_folder()
        if self.bar is not None:
            self.bar.close()
        _barrier(self.world)
        if worker:
            return []
        if self.rank == 0:
            rows = finalize(self.out)
            write_status(self.out, self.cfg, rows, self.load_seconds, planned_keys(self.cfg, self.plan))
            return rows
        return load_rows(self.out)


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
    # "items": the per-item scores the bootstrap intervals resample (dllm_sparse.eval.analysis.bootstrap); None for
    # tasks whose scorer gives no per-item details.
    return {"metric": res.metric, "value": res.value, "metrics": res.metrics,
            "higher_is_better": res.higher_is_better.get(res.metric, True),
            "higher_is_better_all": res.higher_is_better, "n_items": res.n, "items": item_scores(res.details)}


def _groups(stats: SparsityStats, site: str) -> dict[str, float]:
    names = sorted({k[1] for k in [*stats.counts, *stats.expert_counts] if k[3] == site})
    return {g: stats.mean(site, group=g) for g in names}


def _run_unit(cfg: SweepConfig, scorer: Scorer, lm, name: str, task: Task, unit: Unit,
              dense_rows: dict, rank: int, loaded: dict) -> list[dict]:
    stats = SparsityStats()
    limit = cfg.limit_for(unit.task)
    t0 = time.perf_counter()
    # The dense pass runs identity configs (top-p at p = 1) on every site with an identity cell: one dense pass
    # measures them all (unit.sparsity, built once in the plan).
    # Routed experts take one sparsify block at a time (dllm_sparse.sparsity.experts), so a model with them
    # measures each site's identity config in a dense pass of its own (the same scores every time: each is dense).
    one_by_one = unit.config is None and len(unit.sparsity) > 1 and find_experts(lm.model)
    for group in [[c] for c in unit.sparsity] if one_by_one else [unit.sparsity]:
        with scorer.sparsified(group, stats):
            res = task.evaluate(scorer, limit)
    if unit.config is None:
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
            set_relative(row, dense)
            rows.append(row)
        return rows
    site = unit.config.site.value
    row = {**_base_row(cfg, lm, name, unit.task, unit.config, rank, loaded), **_result_fields(res),
           "dense_value": None, "dense_metrics": None, "relative": None, "relative_performance": None,
           "sparsity": stats.mean(site), "per_layer_sparsity": list(stats.per_layer(site).values()),
           "sparsity_groups": _groups(stats, site), **stats.expert_fields(site),
           "seconds": time.perf_counter() - t0,
           "source": "measured", "finished_at": time.time()}
    dense = dense_rows.get(dense_key(row["key"]))
    if dense is not None:
        set_relative(row, dense)
    return [row]
