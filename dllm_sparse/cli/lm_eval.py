"""``dllm-sparse lm-eval``: lm-eval's CLI (``run``, ``ls``, ``validate`` and all their flags) with ``--model
dllm_sparse`` registered and this package's tasks on the include path; the same as ``dllm-sparse-lm-eval``
(:func:`dllm_sparse.eval.tasks.lm_eval_model.main`)."""

from __future__ import annotations

import sys

NEEDS = "needs lm-evaluation-harness: pip install 'dllm-sparse[eval]' (or pip install lm-eval)"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "dllm-sparse lm-eval"
    if argv[:1] in (["-h"], ["--help"]):  # lm-eval's own help: it needs neither this package's model nor torch
        try:
            from lm_eval.__main__ import cli_evaluate
        except ImportError as e:
            raise SystemExit(f"{prog} {NEEDS}") from e
        print(f"{prog}: lm-eval's CLI with --model dllm_sparse and this package's tasks; its help:\n")
        sys.argv = [prog, *argv]
        cli_evaluate()
        return 0
    from dllm_sparse.eval.tasks.lm_eval_model import (
        main as lm_eval_main,  # says what to install when lm-eval is missing
    )

    lm_eval_main(argv)
    return 0
