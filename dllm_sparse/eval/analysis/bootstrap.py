"""Paired bootstrap intervals for relative performance and critical sparsity.

Every sweep row stores its per-item scores (``row["items"]``, :func:`item_scores`): for multiple choice whether
each item was answered right (``acc``, ``acc_norm``), for perplexity each passage's log-likelihood and token
count. A bootstrap replicate draws the items of each task with replacement (multinomial counts, one draw per
task) and recomputes every metric of that task from the same draw: the dense row, every sparse row of every
site and threshold, and every model. Relative performance is therefore resampled *paired* (the same items in the
numerator and the denominator), and so is the difference between two models evaluated on the same items.

Per replicate the critical sparsity is recomputed from the resampled curves exactly as
:mod:`dllm_sparse.eval.analysis.critical` computes it (the task-averaged curve: each task's relative performance
capped at 1 unless ``cap=False``, averaged over tasks; the measured sparsity of each point is kept fixed, since it is a
property of the configuration measured over all items, not a noisy score). The interval is the percentile
interval of the replicates (default 95 %, 1,000 replicates, seed 0: the same rows give the same interval).

What the interval covers: the choice of items (the finite test set) and, for the diffusion model, the
Monte-Carlo noise of the ELBO (each item's masks are fixed by its seed, so each item's score carries its own MC
error, which resampling items includes). What it does not cover: other thresholds than the grid's, other seeds of
the ELBO masks, or float noise of batching (see the sweep's docs).

Replicates without a value are left out of an interval, and the count is reported: a replicate whose drawn items
give the dense model a score of 0 has no relative performance (x / 0; only 0 / 0 counts as 1), and a replicate
in which no grid point reaches the threshold has no critical sparsity. A critical-sparsity replicate whose curve
has such an undefined point is left out whole (not computed from the remaining points). Wherever that happens,
the interval says so: ``*_replicates`` in the critical-sparsity records, ``replicates`` in the model differences,
``(k/n replicates)`` after the interval in the Markdown tables, and a warning.

Metrics that can be resampled: ``acc``, ``acc_norm`` (mean of 0/1 per item), ``margin`` (mean of the per-item
log-probability margin, :func:`dllm_sparse.eval.tasks.builtin.choice_margin`; its relative performance is defined only
where the dense margin of the drawn items is > 0) and ``ppl`` / ``nll_per_token`` (exp of minus the summed
log-likelihood over the summed token counts). Rows without per-item scores (lm-eval
tasks other than the built-in ones, folders written by older versions) get no interval, and every aggregate that
needs them says ``None``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dllm_sparse.sparsity.config import DENSE

__all__ = ["item_scores", "check_items", "ITEM_FIELDS", "Bootstrap", "RESAMPLABLE", "percentile_interval",
           "finite_count", "replicates_note"]

#: Metrics whose value can be recomputed from per-item scores.
RESAMPLABLE = ("acc", "acc_norm", "margin", "ppl", "nll_per_token")


def item_scores(details: Sequence[dict]) -> dict | None:
    """The compact per-item scores a sweep row stores, from a :class:`~dllm_sparse.eval.tasks.base.TaskResult`'s
    ``details``: ``{"ids", "acc", "acc_norm"}`` for multiple choice, ``{"ids", "ll", "tokens"}`` for perplexity;
    None when the details are of another kind (or empty)."""
    if not details:
        return None
    if all("pred" in d and "gold" in d for d in details):
        out = {"ids": [str(d["id"]) for d in details],
               "acc": [int(d["pred"] == d["gold"]) for d in details],
               "acc_norm": [int(d.get("pred_norm", d["pred"]) == d["gold"]) for d in details]}
        if all("margin" in d for d in details):
            out["margin"] = [float(d["margin"]) for d in details]
        return out
    if all("ll" in d and "tokens" in d for d in details):
        return {"ids": [str(d["id"]) for d in details], "ll": [float(d["ll"]) for d in details],
                "tokens": [int(d["tokens"]) for d in details]}
    return None


#: The per-item lists a row's ``items`` may hold, each one value per id.
ITEM_FIELDS = ("acc", "acc_norm", "margin", "ll", "tokens")
_SEQUENCES = (list, tuple, np.ndarray)


def check_items(row: dict) -> None:
    """A row's per-item scores are resampled by position, so every per-item list (:data:`ITEM_FIELDS`) must hold
    one finite number per id (a log-likelihood may be -inf); anything else (a hand-edited or truncated row) is
    refused naming the row, the field and the lengths, instead of failing as a NumPy shape error or resampling
    misaligned items."""
    items = row.get("items")
    if items is None or items == {}:  # no per-item scores: the row gets no interval
        return
    where = (f"row {row.get('key') or ''} ({row.get('model')} / {row.get('task')} / {row.get('site')} "
             f"p={row.get('p')})")
    fix = "rewrite the row from its run (delete its line from rows.jsonl and rerun the sweep)"
    if not isinstance(items, dict) or not isinstance(items.get("ids"), _SEQUENCES):
        raise ValueError(f"{where}: its items are {type(items).__name__} {str(items)[:60]!r}, not "
                         f"{{\"ids\": [...], <per-item lists>}}; {fix}")
    n = len(items["ids"])
    for name in ITEM_FIELDS:
        if name not in items:
            continue
        values = items[name]
        if not isinstance(values, _SEQUENCES) or len(values) != n:
            got = f"{len(values)} values" if isinstance(values, _SEQUENCES) else f"a {type(values).__name__}"
            raise ValueError(f"{where}: items[{name!r}] holds {got} but items['ids'] holds {n} ids; every per-item "
                             f"list needs one value per id; {fix}")
        # A log-likelihood may be -inf (an answer of probability 0); nothing else may be infinite or NaN.
        bad = next((i for i, v in enumerate(values) if not isinstance(v, (numbers.Real, np.bool_))
                    or not (math.isfinite(v) or (name == "ll" and v == -math.inf))), None)
        if bad is not None:
            raise ValueError(f"{where}: items[{name!r}][{bad}] is {values[bad]!r}, not a finite number"
                             f"{' (or -inf)' if name == 'll' else ''}; {fix}")


def _metric_replicates(items: dict, metric: str, weights: np.ndarray) -> np.ndarray | None:
    """The metric under each replicate's item counts ``weights`` [B, n]; None when it cannot be resampled."""
    n = len(items["ids"])
    if metric in ("acc", "acc_norm", "margin") and metric in items:
        return weights @ np.asarray(items[metric], dtype=np.float64) / n
    if metric in ("ppl", "nll_per_token") and "ll" in items:
        nll = -(weights @ np.asarray(items["ll"], dtype=np.float64)) / np.maximum(
            weights @ np.asarray(items["tokens"], dtype=np.float64), 1.0)
        return np.exp(nll) if metric == "ppl" else nll
    return None


def _relative(value: np.ndarray, dense: np.ndarray, higher_is_better: bool,
              positive_dense: bool = False) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        if positive_dense:  # a margin: "fraction kept" only of a positive dense margin
            return np.where(dense > 0, value / np.where(dense > 0, dense, 1.0), np.nan)
        if higher_is_better:
            # 0/0: both wrong on every drawn item, nothing was lost (as relative_performance says for 0 == 0).
            return np.where(dense != 0, value / np.where(dense != 0, dense, 1.0), np.where(value == 0, 1.0, np.nan))
        return np.where(value != 0, dense / np.where(value != 0, value, 1.0), np.nan)


def finite_count(samples: np.ndarray | Sequence[float]) -> int:
    """How many replicates have a value (are finite): the ones an interval is computed from."""
    return int(np.isfinite(np.asarray(samples, dtype=np.float64)).sum())


def replicates_note(used: int | None, drawn: int | None) -> str:
    """`` (k/n replicates)`` when an interval comes from fewer replicates than were drawn, else empty."""
    return "" if used is None or drawn is None or used >= drawn else f" ({used}/{drawn} replicates)"


def percentile_interval(samples: np.ndarray | Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The central ``level`` percentile interval of the finite samples; None when there are none."""
    a = np.asarray(samples, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(a, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass
class Bootstrap:
    """Replicates of one sweep's rows. ``n_boot`` replicates, ``seed`` for the item draws, ``level`` of the
    percentile intervals. Build it once per set of rows, then ask for intervals.

        boot = Bootstrap(rows)
        boot.relative(row)                      # [n_boot] relative performance of a row, paired with its dense row
        boot.relative_interval(row)             # (lo, hi) or None
    """

    rows: Sequence[dict]
    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self):
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or self.n_boot < 1:
            raise ValueError(f"n_boot must be a whole number >= 1, got {self.n_boot!r}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must lie in (0, 1), e.g. 0.95; got {self.level!r}")
        for r in self.rows:
            check_items(r)
        self._dense = {(r["model"], r["task"]): r for r in self.rows if r["site"] == DENSE}
        self._weights: dict[str, np.ndarray | None] = {}
        self._cache: dict[str, np.ndarray | None] = {}
        self._memo: dict = {}
        rng = np.random.default_rng(self.seed)
        # One draw per task, in a fixed order, shared by every model and configuration of that task (paired).
        self._ids = {task: self._task_ids(task) for task in sorted({r["task"] for r in self.rows})}
        for task, ids in self._ids.items():
            n = len(ids) if ids else 0
            self._weights[task] = (rng.multinomial(n, np.full(n, 1.0 / n), size=self.n_boot).astype(np.float64)
                                   if n else None)

    def _task_ids(self, task: str) -> list[str] | None:
        """The item ids of a task when every row of it stores the same items; else None (no resampling)."""
        ids = None
        for r in self.rows:
            if r["task"] != task:
                continue
            items = r.get("items")
            if not items:
                return None
            if ids is None:
                ids = list(items["ids"])
            elif list(items["ids"]) != ids:
                return None
        return ids

    def memo(self, key, compute):
        """``compute()`` once per ``key`` for these rows and draws (the tables and every figure of a run ask for
        the same critical-sparsity replicates)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def weights(self, task: str) -> np.ndarray | None:
        """[n_boot, n_items] multinomial item counts of every replicate of ``task`` (None: not resampled)."""
        return self._weights.get(task)

    def metric(self, row: dict, metric: str | None = None) -> np.ndarray | None:
        """[n_boot] replicates of the row's primary metric (or of ``metric``); None when it cannot be
        resampled."""
        metric = metric or row["metric"]
        key = (row.get("key") or id(row), metric)
        if key not in self._cache:
            w, items = self._weights.get(row["task"]), row.get("items")
            self._cache[key] = None if w is None or not items else _metric_replicates(items, metric, w)
        return self._cache[key]

    def relative(self, row: dict, metric: str | None = None) -> np.ndarray | None:
        """[n_boot] replicates of the row's relative performance in its primary metric (or in ``metric``), the
        same items in the row and its dense row."""
        from dllm_sparse.eval.tasks.base import POSITIVE_DENSE_METRICS

        metric = metric or row["metric"]
        if row["site"] == DENSE:
            w = self._weights.get(row["task"])
            return None if w is None else np.ones(self.n_boot)
        dense = self._dense.get((row["model"], row["task"]))
        if dense is None:
            return None
        v, d = self.metric(row, metric), self.metric(dense, metric)
        if v is None or d is None:
            return None
        hib = (row.get("higher_is_better_all") or {}).get(metric, row.get("higher_is_better", True))
        return _relative(v, d, hib, metric in POSITIVE_DENSE_METRICS)

    def relative_interval(self, row: dict) -> tuple[float, float] | None:
        """The percentile interval of :meth:`relative`; warns when some replicates have no value (their drawn
        items give the dense model a score of 0)."""
        r = self.relative(row)
        if r is None:
            return None
        used = finite_count(r)
        if used < len(r):
            warnings.warn(f"bootstrap: the relative-performance interval of {row.get('model')} / {row.get('task')} "
                          f"/ {row.get('site')} p={row.get('p')} comes from {used} of {len(r)} replicates: in the "
                          "others the dense score of the drawn items is 0, so sparse / dense is undefined",
                          stacklevel=2)
        return percentile_interval(r, self.level)

    def interval(self, samples) -> tuple[float, float] | None:
        """The percentile interval of the replicates that have a value (:func:`finite_count` says how many)."""
        return percentile_interval(samples, self.level)

    def describe(self) -> dict:
        return {"n_boot": self.n_boot, "seed": self.seed, "level": self.level,
                "items": {t: (len(ids) if ids else None) for t, ids in self._ids.items()}}


def nan_to_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
