"""What a sweep runs: its configuration (:class:`SweepConfig`), the threshold grids, the key of every cell (the
part of its run identity known before a model loads) and the plan of work units (a dense pass per model and task,
then one unit per sparse cell)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dllm_sparse.eval.identity import RunIdentity, run_identity
from dllm_sparse.eval.scoring.common import check_head_chunk
from dllm_sparse.eval.scoring.defaults import MC_BATCH, MC_NUM, SEED
from dllm_sparse.eval.tasks.base import check_limit
from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.rules import make_rule, rule_name
from dllm_sparse.sparsity.sites import ALL_SITES

__all__ = ["GRIDS", "grid", "SweepConfig", "KEY_FIELDS", "MODEL_IDENTITY_FIELDS", "cell_identity", "cell_key",
           "model_identity", "model_name", "make_key", "Unit", "plan", "planned_keys"]

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
    mc_num: int = MC_NUM
    mc_batch: int = MC_BATCH
    batch_size: int = 16
    seed: int = SEED
    dtype: str | None = None
    device: str | None = None
    scope: str = "token"
    include_path: str | None = None
    ratio_bins: int = 5  # diffusion: also measure sparsity per mask-ratio bin of the ELBO passes
    progress: bool = True
    # Guided ELBO w of the diffusion models (a float for every task or a {task: w} dict, e.g. the official
    # LLaDA per-task values of dllm_sparse.eval.scoring.presets); autoregressive models ignore it.
    cfg_scale: float | dict[str, float] = 0.0
    # The LM head on this many scored rows at a time (Scorer(head_chunk=...)): bounds the logits' memory for long
    # rolling windows at a large vocabulary; None = all at once. Part of the cell key when set.
    head_chunk: int | None = None

    def __post_init__(self):
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
        d["models"] = [model_name(m) for m in self.models]
        d["output_dir"] = str(self.output_dir)
        return d


def model_name(m: Any) -> str:
    return m if isinstance(m, (str, os.PathLike)) and not hasattr(m, "model") else getattr(m, "name", str(m))


KEY_FIELDS = ("model", "task", "sparsity", "limit", "mc_num", "mc_batch", "seed", "dtype", "batch_size")
# The fields of a model's identity known only once it has loaded; stored in every row as "model_identity".
MODEL_IDENTITY_FIELDS = ("weights", "kind", "param_dtype", "device_type")


def make_key(model: str, task: str, sparsity_id: str, limit, mc_num: int, mc_batch: int, seed: int, dtype: str,
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
    return make_key(*(ident[f] for f in KEY_FIELDS), cfg_scale=cfg.cfg_for(task), head_chunk=cfg.head_chunk)


def model_identity(lm) -> dict:
    """The loaded model's part of the identity (:data:`MODEL_IDENTITY_FIELDS`): weights hash, kind, the dtype of
    its parameters and its device type."""
    ident = run_identity(lm)
    return {"weights": ident["weights"], "kind": ident["kind"], "param_dtype": ident.get("dtype"),
            "device_type": ident.get("device_type")}


@dataclass
class Unit:
    """One piece of work: a model's dense pass of a task (``config`` None), or one sparse cell. ``sparsity`` is what
    it runs with (``scorer.sparsified(unit.sparsity)``): the cell's config, or for the dense pass identity rules
    (top-p at p = 1) on every site with an identity cell, so one dense pass measures them all."""

    model_index: int
    task: str
    config: SparsityConfig | None  # None for the dense pass
    keys: list[str]  # the rows this unit writes
    identity_cells: list[SparsityConfig] = field(default_factory=list)  # dense pass: identity cells it fills
    sparsity: list[SparsityConfig] = field(default_factory=list)


def plan(cfg: SweepConfig) -> list[Unit]:
    """Every unit of the sweep, in order (per model, per task: the dense pass, then each sparse cell); the grid of
    configurations is built here, once."""
    units = []
    configs = cfg.configs()
    identities = [c for c in configs if c.is_identity]
    dense_pass = [SparsityConfig.identity(s, cfg.scope) for s in dict.fromkeys(c.site for c in identities)]
    for mi, model in enumerate(cfg.models):
        name = model_name(model)
        for task in cfg.tasks:
            keys = [cell_key(cfg, name, task, None)] + [cell_key(cfg, name, task, c) for c in identities]
            units.append(Unit(mi, task, None, keys, identities, dense_pass))
            units += [Unit(mi, task, c, [cell_key(cfg, name, task, c)], sparsity=[c])
                      for c in configs if not c.is_identity]
    return units


def planned_keys(cfg: SweepConfig, units: list[Unit] | None = None) -> set[str]:
    """The keys of every cell this configuration asks for (to select its rows from a shared folder); ``units``:
    its plan, when already made."""
    return {k for u in (plan(cfg) if units is None else units) for k in u.keys}
