"""The built-in suite and any lm-evaluation-harness task, scored through lm-eval with a
:class:`~dllm_sparse.eval.tasks.scorer_lm.ScorerLM` over a scorer (the sparsity in force on the scorer applies).

The built-in suite as lm-eval tasks: ``dllm_sparse_mc`` and ``dllm_sparse_ppl``. Their YAMLs are installed with the
package (``dllm_sparse/data/lm_eval_tasks``, :data:`TASK_DIR`); their ``custom_dataset`` is a function of
:mod:`~dllm_sparse.eval.tasks.lm_eval_entry` that reads the committed JSONL with ``datasets``' json loader, so
they work from any directory and from a non-editable install (a ``data_files`` path written in a YAML is read
relative to the current directory, not to the YAML).

* ``dllm_sparse_mc``: ``multiple_choice`` over ``builtin_mc.jsonl`` (64 items), lm-eval's ``acc`` / ``acc_norm``.
* ``dllm_sparse_ppl``: ``loglikelihood_rolling`` over ``builtin_passages.jsonl`` (48 passages), lm-eval's
  ``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte``.

:func:`evaluate_builtin` is how the sweep scores ``builtin_mc`` / ``builtin_ppl`` when lm-eval is installed
(:class:`BuiltinLmEvalTask`, see :mod:`dllm_sparse.eval.tasks.registry`); :class:`LmEvalTask` runs any lm-eval task.
:func:`task_manager` indexes this package's tasks only (``dllm-sparse-lm-eval`` adds :data:`TASK_DIR` to
``--include_path`` by itself).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from importlib import resources
from typing import Any

import lm_eval
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager

from dllm_sparse.eval.tasks.base import LM_EVAL_TASKS, Task, TaskResult, builtin_request_key, check_limit
from dllm_sparse.eval.tasks.builtin import (
    MC_HIGHER_IS_BETTER,
    PERPLEXITY_HIGHER_IS_BETTER,
    MCItem,
    perplexity_metrics,
    score_multiple_choice,
)
from dllm_sparse.eval.tasks.scorer_lm import ScorerLM

__all__ = ["TASK_DIR", "task_manager", "evaluate_builtin", "BuiltinLmEvalTask", "LmEvalTask"]

#: The folder of the task YAMLs (pass it to lm-eval's ``--include_path`` / ``TaskManager(include_path=...)``).
TASK_DIR = str(resources.files("dllm_sparse") / "data" / "lm_eval_tasks")


class _NoKwargsHint(logging.Filter):
    """Drops lm-eval's hint that a ``custom_dataset`` task takes ``--metadata`` keywords, for this package's tasks
    only (their loaders take none), which it would otherwise print for every sweep cell."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(msg.startswith(f"{t}: Custom kwargs can be passed") for t in LM_EVAL_TASKS.values())


logging.getLogger("lm_eval.api.task").addFilter(_NoKwargsHint())


@contextlib.contextmanager
def _request_bar(enabled: bool):
    if enabled:
        yield
        return
    import lm_eval.api.task as lm_eval_task
    from tqdm import tqdm

    original = lm_eval_task.tqdm
    lm_eval_task.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        lm_eval_task.tqdm = original


@functools.lru_cache(maxsize=1)
def task_manager() -> TaskManager:
    """A TaskManager of this package's tasks only (indexing lm-eval's own task folder takes tens of seconds)."""
    return TaskManager(include_path=TASK_DIR, include_defaults=False)


def evaluate_builtin(name: str, scorer, limit=None) -> TaskResult:
    """Score the built-in task ``name`` (``builtin_mc`` / ``builtin_ppl``) with lm-eval's task object and metrics,
    through a :class:`ScorerLM` over ``scorer`` (every forward pass with the sparsity in force on it). Returns
    the :class:`TaskResult` the built-in code returns: for
    ``builtin_ppl`` the token-level ``ppl`` / ``nll_per_token`` come from lm-eval's per-passage log-likelihoods
    and the token counts of the model (lm-eval's rolling metrics are per word and per byte)."""
    if name not in LM_EVAL_TASKS:
        raise ValueError(f"{name!r} is not a built-in task; choose one of {sorted(LM_EVAL_TASKS)}")
    task = LM_EVAL_TASKS[name]
    limit = check_limit(limit)
    lm = ScorerLM(scorer, progress=bool(scorer.progress))
    # lm-eval's evaluate() with what simple_evaluate() would set for a zero-shot task; simple_evaluate itself
    # also collects the environment (`pip list` and more: seconds per call, for every sweep cell) and resets the
    # global random seeds, which the built-in scoring does not draw from (the ELBO has per-item generators).
    loaded = task_manager().load([task])
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=0)
    # lm-eval's request building draws a progress bar with no switch; the sweep calls this once per cell, so the
    # bar follows the scorer's progress setting instead (lm_eval.api.task imports tqdm by name).
    with _request_bar(bool(scorer.progress)):
        out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True)
    res = out["results"][task]
    metrics = {k.split(",")[0]: float(v) for k, v in res.items()
               if k != "alias" and "_stderr" not in k and isinstance(v, (int, float))}
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    if name == "builtin_mc":
        items = [MCItem(s["doc"]["id"], s["doc"]["context"], list(s["doc"]["choices"]), int(s["doc"]["gold"]),
                        s["doc"].get("category") or "") for s in samples]
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        own, details = score_multiple_choice(items, lls)  # margin is not an lm-eval metric: from the same lls
        return TaskResult(name, "acc", metrics["acc"], {**{m: metrics[m] for m in ("acc", "acc_norm")},
                                                        "margin": own["margin"]},
                          dict(MC_HIGHER_IS_BETTER), len(items), details)
    lls = [float(s["filtered_resps"][0]) for s in samples]
    tokens = [lm.rolling_tokens[(task, s["doc_id"])] for s in samples]
    texts = [s["doc"]["text"] for s in samples]
    own = perplexity_metrics(lls, tokens, texts)
    metrics.update(ppl=own["ppl"], nll_per_token=own["nll_per_token"])
    keys = [builtin_request_key(name, s["doc"]["id"]) for s in samples]
    details = [{"id": k, "ll": ll, "tokens": n} for k, ll, n in zip(keys, lls, tokens, strict=True)]
    return TaskResult(name, "ppl", metrics["ppl"], {m: metrics[m] for m in PERPLEXITY_HIGHER_IS_BETTER},
                      dict(PERPLEXITY_HIGHER_IS_BETTER), len(samples), details)


class BuiltinLmEvalTask(Task):
    """``builtin_mc`` / ``builtin_ppl`` scored by lm-evaluation-harness (its tasks ``dllm_sparse_mc`` /
    ``dllm_sparse_ppl``, metrics computed by lm-eval; see :func:`evaluate_builtin`).
    Same :class:`TaskResult` (metrics, per-item details) as :class:`~dllm_sparse.eval.tasks.builtin.MultipleChoiceTask`
    / :class:`~dllm_sparse.eval.tasks.builtin.PerplexityTask`."""

    def __init__(self, name: str):
        if name not in LM_EVAL_TASKS:
            raise ValueError(f"{name!r} is not a built-in task; choose one of {sorted(LM_EVAL_TASKS)}")
        self.name, self.lm_eval_name = name, LM_EVAL_TASKS[name]
        self.metric = "acc" if name == "builtin_mc" else "ppl"

    def evaluate(self, scorer, limit=None) -> TaskResult:
        return evaluate_builtin(self.name, scorer, limit)




_PREFERRED = ("acc_norm", "acc", "exact_match", "word_perplexity", "bits_per_byte")


class LmEvalTask(Task):
    """An lm-evaluation-harness task run through a :class:`ScorerLM` over the scorer.

    ``metric``: the metric to report (default: the task's first metric among acc, acc_norm, exact_match,
    word_perplexity, bits_per_byte, else its first). ``include_path``: a folder of extra task YAMLs.
    The sparsity in force on the scorer applies and measures, as for the built-in tasks; lm-eval's response cache
    is not used here (every configuration is computed)."""

    def __init__(self, name: str, metric: str | None = None, include_path: str | None = None,
                 num_fewshot: int | None = None, include_defaults: bool = True, **simple_evaluate_kwargs: Any):
        self.name, self.metric, self.include_path = name, metric or "", include_path
        self.num_fewshot, self.include_defaults, self.kwargs = num_fewshot, include_defaults, simple_evaluate_kwargs
        self._task_manager = None  # built once (indexing lm-eval's task folder takes tens of seconds)

    def evaluate(self, scorer, limit=None) -> TaskResult:
        limit = check_limit(limit)
        lm = ScorerLM(scorer)
        if self._task_manager is None:
            self._task_manager = TaskManager(include_path=self.include_path, include_defaults=self.include_defaults)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[self.name], limit=limit, num_fewshot=self.num_fewshot, task_manager=self._task_manager,
            bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
            fewshot_random_seed=0, **self.kwargs)
        res = out["results"][self.name]
        hib = out.get("higher_is_better", {}).get(self.name, {})
        metrics = {k.split(",")[0]: float(v) for k, v in res.items()
                   if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias"}
        metric = self.metric or next((m for m in _PREFERRED if m in metrics), next(iter(metrics)))
        if metric not in metrics:
            raise KeyError(f"lm-eval task {self.name!r} reported {sorted(metrics)}, not {metric!r}")
        n = out.get("n-samples", {}).get(self.name, {}).get("effective", 0)
        return TaskResult(self.name, metric, metrics[metric], metrics,
                          {k: bool(hib.get(k, k not in ("word_perplexity", "byte_perplexity", "bits_per_byte",
                                                         "perplexity"))) for k in metrics}, int(n))
