"""FFN activation sparsity of a masked-diffusion LM vs its architecture-matched AR LM (paper Fig. 3d).

``python experiments/llada_vs_llama.py`` is ``dllm-sparse compare``: the arguments and the run live in
:mod:`dllm_sparse.cli.compare` (installed with the package, so the command needs no clone). ``--help`` lists
the options.
"""

import sys

from dllm_sparse.cli.compare import *  # noqa: F403  (main, its parser and helpers, as this script's names)
from dllm_sparse.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
