"""Where the project caches what it builds once (the dequantised SmolLM2, the embedded twin, the compiled CPU
top-p kernel): ``$DLLM_SPARSE_CACHE``, else ``~/.cache/dllm_sparse``. Bottom layer: no torch, no project import."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$DLLM_SPARSE_CACHE``, else ``~/.cache/dllm_sparse``."""
    root = os.environ.get("DLLM_SPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dllm_sparse")
    return Path(root)
