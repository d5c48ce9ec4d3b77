"""``python -m dllm_sparse.cli`` is the ``dllm-sparse`` command."""

import sys

from dllm_sparse.cli import main

sys.exit(main())
