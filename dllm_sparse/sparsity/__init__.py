"""The bottom layer: FFN sites, sparsification rules, the hooks that apply them, and the statistics they record.

Imports nothing else of the project but :mod:`dllm_sparse.models.families` (where each family keeps its FFNs).
"""
