"""Generate with and without FFN activation sparsity, side by side, for an AR and a diffusion model.

``python experiments/generate_demo.py`` is ``dllm-sparse generate``: the arguments and the run live in
:mod:`dllm_sparse.cli.generate` (installed with the package, so the command needs no clone). ``--help`` lists
the options.
"""

import sys

from dllm_sparse.cli.generate import *  # noqa: F403  (main, its parser and helpers, as this script's names)
from dllm_sparse.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
