"""Tasks by name: a built-in task (``builtin_mc``, ``builtin_ppl``), scored through lm-evaluation-harness when it is
installed (:mod:`~dllm_sparse.eval.tasks.lm_eval_tasks`) or by this package's own code
(:mod:`~dllm_sparse.eval.tasks.builtin`), else an lm-eval task (``name`` or ``name:metric``)."""

from __future__ import annotations

import importlib.util

from dllm_sparse.eval.tasks.base import LM_EVAL_TASKS, Task
from dllm_sparse.eval.tasks.builtin import (
    MultipleChoiceTask,
    PerplexityTask,
    load_builtin_mc,
    load_builtin_passages,
)

__all__ = ["BUILTIN_TASKS", "SCORINGS", "builtin_task", "get_task", "lm_eval_available"]

#: How :func:`get_task` scores a built-in task: through lm-eval's task objects, or this module's own code.
SCORINGS = ("lm_eval", "builtin")


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


_BUILTIN_FALLBACK = {
    "builtin_mc": lambda: MultipleChoiceTask("builtin_mc", load_builtin_mc()),
    "builtin_ppl": lambda: PerplexityTask("builtin_ppl", load_builtin_passages()),
}
#: The built-in task names (:func:`get_task` decides how they are scored).
BUILTIN_TASKS = tuple(LM_EVAL_TASKS)


def builtin_task(name: str, scoring: str | None = None) -> Task:
    """A built-in task: through lm-eval (``scoring="lm_eval"``, the default when lm-eval is installed) or this
    module's own code (``"builtin"``, the default without lm-eval)."""
    if scoring is None:
        scoring = "lm_eval" if lm_eval_available() else "builtin"
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}: choose one of {SCORINGS} (or None: lm_eval when installed)")
    if name not in _BUILTIN_FALLBACK:
        raise ValueError(f"{name!r} is not a built-in task; choose one of {list(BUILTIN_TASKS)}")
    if scoring == "lm_eval":
        if not lm_eval_available():
            raise ImportError("scoring='lm_eval' needs lm-evaluation-harness: pip install -e '.[eval]'")
        from dllm_sparse.eval.tasks.lm_eval_tasks import BuiltinLmEvalTask  # needs lm-eval

        return BuiltinLmEvalTask(name)
    return _BUILTIN_FALLBACK[name]()


def get_task(name: str, include_path: str | None = None, scoring: str | None = None) -> Task:
    """A built-in task by name (scored as :func:`builtin_task` says), else an lm-eval task (``name`` or
    ``name:metric``)."""
    if name in BUILTIN_TASKS:
        return builtin_task(name, scoring)
    from dllm_sparse.eval.tasks.lm_eval_tasks import LmEvalTask  # needs lm-eval

    task, _, metric = name.partition(":")
    return LmEvalTask(task, metric or None, include_path)
