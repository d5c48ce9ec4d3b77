"""Quality vs measured speed of a denoising step, per sparsity strategy.

``python experiments/step_frontier.py`` is ``dllm-sparse frontier step``: the arguments and the run live in
:mod:`dllm_sparse.cli.step_frontier` (installed with the package, so the command needs no clone). ``--help`` lists
the options.
"""

from dllm_sparse.cli.step_frontier import *  # noqa: F403  (main, its parser and helpers, as this script's names)
from dllm_sparse.cli.step_frontier import main

if __name__ == "__main__":
    main()
