"""lm-evaluation-harness's way in: the loaders the built-in task YAMLs name (``custom_dataset`` of
``dllm_sparse_mc`` / ``dllm_sparse_ppl``), in a module whose import registers the ``dllm_sparse`` model.

lm-eval resolves the ``!function`` tags of a task YAML given to ``--tasks`` before it builds the model, so a
stock ``lm_eval --model dllm_sparse --tasks "$(python -m dllm_sparse.eval.tasks.lm_eval_entry)/dllm_sparse_mc.yaml"``
works (this module's ``__main__`` prints :data:`~dllm_sparse.eval.tasks.lm_eval_tasks.TASK_DIR`; see
:mod:`dllm_sparse.eval.tasks.lm_eval_model` for why the stock CLI needs that). Nothing else of this package
imports this module or the model it registers.
"""

from __future__ import annotations

from typing import Any

from dllm_sparse.eval.tasks import lm_eval_model  # noqa: F401  (registers --model dllm_sparse)
from dllm_sparse.eval.tasks.builtin import builtin_dataset
from dllm_sparse.eval.tasks.lm_eval_tasks import TASK_DIR

__all__ = ["builtin_mc_dataset", "builtin_ppl_dataset"]


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


if __name__ == "__main__":
    print(TASK_DIR)
