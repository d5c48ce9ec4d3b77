"""What every evaluation task shares: :class:`Task` (``task.evaluate(scorer, limit)``), :class:`TaskResult`, the
limit of items, relative performance, and the names of the built-in tasks' requests.

A task scores with whatever sparsity is in force on the scorer: the caller opens it, ``with
scorer.sparsified(config) as stats: task.evaluate(scorer)``
(:meth:`~dllm_sparse.eval.scoring.scorer.Scorer.sparsified`).

Relative performance (``relative_performance``) is sparse/dense for a higher-is-better metric and dense/sparse
for a lower-is-better one, so that perplexity gives PPL_dense / PPL_sparse (the "PPL-1%" criterion of the
Sparsing Law paper: a configuration passes when it keeps >= 99 % of the dense performance).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TaskResult", "Task", "LM_EVAL_TASKS", "builtin_request_key", "POSITIVE_DENSE_METRICS",
           "relative_performance", "apply_limit", "check_limit"]

#: The built-in tasks and the names of the same tasks in lm-evaluation-harness (dllm_sparse/data/lm_eval_tasks).
LM_EVAL_TASKS = {"builtin_mc": "dllm_sparse_mc", "builtin_ppl": "dllm_sparse_ppl"}
def builtin_request_key(task: str, item_id: str, choice: int | None = None) -> str:
    """The name of one request of a built-in task (seeds the ELBO's masks for that item): ``task/id/choice`` for a
    multiple-choice option, ``task/id`` for a passage. ``task`` is the built-in name (``builtin_mc``) in both
    scorings, so the lm-eval tasks draw the same masks as the built-in code."""
    return f"{task}/{item_id}" if choice is None else f"{task}/{item_id}/{choice}"


@dataclass
class TaskResult:
    task: str
    metric: str  # the primary metric
    value: float
    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    n: int  # items scored
    details: list[dict] = field(default_factory=list)  # per-item scores (built-in tasks)


#: Metrics whose ratio sparse / dense means "fraction kept" only when the dense value is > 0 (a margin can be
#: negative: a weak model's mean margin may be <= 0, and then no ratio says how much of it was kept).
POSITIVE_DENSE_METRICS = ("margin",)


def relative_performance(value: float, dense_value: float, higher_is_better: bool = True,
                         positive_dense: bool = False) -> float:
    """sparse / dense for higher-is-better metrics, dense / sparse for lower-is-better ones (perplexity).
    ``positive_dense`` (the :data:`POSITIVE_DENSE_METRICS`): NaN unless the dense value is > 0."""
    if value is None or dense_value is None:
        return float("nan")
    if positive_dense:
        return value / dense_value if dense_value > 0 else float("nan")
    if higher_is_better:
        return value / dense_value if dense_value else (1.0 if value == dense_value else float("nan"))
    return dense_value / value if value else float("nan")


def check_limit(limit: Any, what: str = "limit") -> int | float | None:
    """``limit`` if it is None (all items), a whole number >= 1 or a fraction in (0, 1); else a ValueError. A
    limit of 0 would score nothing (and report a relative performance of 1.0), a negative one would silently
    drop items from the end (Python slicing), so both are refused."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or math.isnan(limit):
        raise ValueError(f"{what} must be None (all items), a whole number >= 1 or a fraction in (0, 1); "
                         f"got {limit!r}")
    if 0 < limit < 1:
        return float(limit)
    if limit < 1 or limit != int(limit):
        raise ValueError(f"{what} must be None (all items), a whole number >= 1 or a fraction in (0, 1); got "
                         f"{limit!r}" + (" (0 would score no item; leave the limit out to use all items)"
                                         if limit == 0 else " (negative limits are not 'all but the last')"
                                         if limit < 0 else ""))
    return int(limit)


def apply_limit(items: Sequence, limit: int | float | None) -> list:
    """The first ``limit`` items (an int >= 1), or a fraction of them (a float in (0, 1), at least one item),
    or all (None); other limits are refused (:func:`check_limit`)."""
    items = list(items)
    limit = check_limit(limit)
    if limit is None:
        return items
    if isinstance(limit, float) and 0 < limit < 1:
        return items[: max(1, int(math.ceil(limit * len(items))))]
    return items[: int(limit)]


class Task(ABC):
    name: str
    metric: str

    @abstractmethod
    def evaluate(self, scorer, limit: int | float | None = None) -> TaskResult:
        """Score with a :class:`~dllm_sparse.eval.scoring.scorer.Scorer`, every call with the sparsity in force
        (:meth:`~dllm_sparse.eval.scoring.scorer.Scorer.sparsified`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
