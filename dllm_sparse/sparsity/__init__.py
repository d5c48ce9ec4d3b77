"""The bottom layer: FFN sites, sparsification rules, the one sparsity configuration, the hooks that apply it,
and the statistics they record.

Imports nothing else of the project but :mod:`dllm_sparse.models.families` (where each family keeps its FFNs).
"""

from dllm_sparse.sparsity.config import SparsityConfig

__all__ = ["SparsityConfig"]
