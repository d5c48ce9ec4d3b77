"""The built-in suite as lm-evaluation-harness tasks: ``dllm_sparse_mc`` and ``dllm_sparse_ppl``.

The task YAMLs are installed with the package (``dllm_sparse/data/lm_eval_tasks``, :data:`TASK_DIR`); their
``custom_dataset`` is a function of this module that reads the committed JSONL with ``datasets``' json loader,
so they work from any directory and from a non-editable install (a ``data_files`` path written in a YAML is
read relative to the current directory, not to the YAML).

* ``dllm_sparse_mc``: ``multiple_choice`` over ``builtin_mc.jsonl`` (64 items), lm-eval's ``acc`` / ``acc_norm``.
* ``dllm_sparse_ppl``: ``loglikelihood_rolling`` over ``builtin_passages.jsonl`` (48 passages), lm-eval's
  ``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte``.

``dllm-sparse-lm-eval`` (lm-eval's CLI with the ``dllm_sparse`` model registered) adds :data:`TASK_DIR` to
``--include_path`` by itself; :func:`task_manager` is the same for the Python API. Importing this module
registers the ``dllm_sparse`` model, which is why a stock ``lm_eval`` also works when it is given the YAML
file itself (``--tasks "$(python -m dllm_sparse.eval.tasks.lm_eval_tasks)/dllm_sparse_mc.yaml"``, which prints
:data:`TASK_DIR`): lm-eval 0.4.13 resolves the ``!function`` tags of such a file before it builds the model.

:func:`evaluate_builtin` is how the sweep scores ``builtin_mc`` / ``builtin_ppl`` when lm-eval is installed
(see :mod:`dllm_sparse.eval.tasks.builtin`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from importlib import resources
from typing import Any

from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager

from dllm_sparse.eval.scoring.scorer import SCORER_DEFAULT
from dllm_sparse.eval.tasks.lm_eval_model import DllmSparseLM  # registers --model dllm_sparse (see the docstring)
from dllm_sparse.eval.tasks.builtin import (
    LM_EVAL_TASKS,
    MC_HIGHER_IS_BETTER,
    PERPLEXITY_HIGHER_IS_BETTER,
    MCItem,
    TaskResult,
    builtin_dataset,
    builtin_request_key,
    check_limit,
    perplexity_metrics,
    score_multiple_choice,
)

__all__ = ["TASK_DIR", "builtin_mc_dataset", "builtin_ppl_dataset", "task_manager", "evaluate_builtin"]

#: The folder of the task YAMLs (pass it to lm-eval's ``--include_path`` / ``TaskManager(include_path=...)``).
TASK_DIR = str(resources.files("dllm_sparse") / "data" / "lm_eval_tasks")


class _NoKwargsHint(logging.Filter):
    """Drops lm-eval's hint that a ``custom_dataset`` task takes ``--metadata`` keywords, for this package's tasks
    only (their loaders take none), which it would otherwise print for every sweep cell."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(msg.startswith(f"{t}: Custom kwargs can be passed") for t in LM_EVAL_TASKS.values())


logging.getLogger("lm_eval.api.task").addFilter(_NoKwargsHint())


def _as_splits(dataset) -> Any:
    import datasets

    return datasets.DatasetDict({"test": dataset})


def builtin_mc_dataset(**_metadata: Any):
    """``custom_dataset`` of ``dllm_sparse_mc``: ``builtin_mc.jsonl`` as a ``DatasetDict`` with a ``test`` split.
    (lm-eval passes the task's metadata and the model arguments as keywords; the file does not depend on them.)"""
    return _as_splits(builtin_dataset("builtin_mc.jsonl"))


def builtin_ppl_dataset(**_metadata: Any):
    """``custom_dataset`` of ``dllm_sparse_ppl``: ``builtin_passages.jsonl`` (``test`` split)."""
    return _as_splits(builtin_dataset("builtin_passages.jsonl"))


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


def evaluate_builtin(name: str, scorer, limit=None, *, sparsity=SCORER_DEFAULT, stats=SCORER_DEFAULT) -> TaskResult:
    """Score the built-in task ``name`` (``builtin_mc`` / ``builtin_ppl``) with lm-eval's task object and metrics,
    through a :class:`DllmSparseLM` over ``scorer`` (every forward pass sparsified with ``sparsity`` and measured
    into ``stats``, defaults: the scorer's own). Returns the :class:`TaskResult` the built-in code returns: for
    ``builtin_ppl`` the token-level ``ppl`` / ``nll_per_token`` come from lm-eval's per-passage log-likelihoods
    and the token counts of the model (lm-eval's rolling metrics are per word and per byte)."""
    if name not in LM_EVAL_TASKS:
        raise ValueError(f"{name!r} is not a built-in task; choose one of {sorted(LM_EVAL_TASKS)}")
    task = LM_EVAL_TASKS[name]
    limit = check_limit(limit)
    lm = DllmSparseLM.from_scorer(scorer, sparsity=sparsity, stats=stats, progress=bool(scorer.progress))
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


if __name__ == "__main__":
    print(TASK_DIR)
