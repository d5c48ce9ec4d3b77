"""Speed and quality of whole generations per decoding strategy: exact, block caches, parallel decoding, FFN
sparsity on top.

``python experiments/generation_frontier.py`` is ``dllm-sparse frontier generation``: the arguments and the run live in
:mod:`dllm_sparse.cli.generation_frontier` (installed with the package, so the command needs no clone). ``--help``
lists the options.
"""

from dllm_sparse.cli.generation_frontier import *  # noqa: F403  (main, its parser and helpers, as this script's names)
from dllm_sparse.cli.generation_frontier import main

if __name__ == "__main__":
    main()
