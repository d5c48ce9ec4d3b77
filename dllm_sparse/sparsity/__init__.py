"""The bottom layer: FFN sites, sparsification rules, the one sparsity configuration, the hooks that apply it,
and the statistics they record.

Imports nothing else of the project but :mod:`dllm_sparse.models.families` (where each family keeps its FFNs).
``SparsityConfig`` is imported lazily (it needs the rules, hence torch), so the light modules
:mod:`~dllm_sparse.sparsity.sites` and :mod:`~dllm_sparse.sparsity.names`, which command lines use to build their
parsers, load without torch and ``--help`` stays fast.
"""

from __future__ import annotations

import importlib

__all__ = ["SparsityConfig"]


def __getattr__(name: str):
    if name != "SparsityConfig":
        raise AttributeError(f"module 'dllm_sparse.sparsity' has no attribute {name!r}")
    value = importlib.import_module("dllm_sparse.sparsity.config").SparsityConfig
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted([*globals(), *__all__])
