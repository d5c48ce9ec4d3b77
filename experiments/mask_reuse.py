"""Mask reuse across denoising steps: how stable are FFN keep-masks, and what does reusing them cost?

``python experiments/mask_reuse.py`` is ``dllm-sparse mask-reuse``: the arguments and the run live in
:mod:`dllm_sparse.cli.mask_reuse` (installed with the package, so the command needs no clone). ``--help`` lists
the options.
"""

import sys

from dllm_sparse.cli.mask_reuse import *  # noqa: F403  (main, its parser and helpers, as this script's names)
from dllm_sparse.cli.mask_reuse import main

if __name__ == "__main__":
    sys.exit(main())
