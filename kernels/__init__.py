"""Sparse FFN kernels (Triton, with PyTorch fallbacks) and the accelerated FFN swap.

Spec: docs/kernels.md. Installed as ``dllm_sparse.kernels``::

    from dllm_sparse import TopP
    from dllm_sparse.kernels import accelerate_ffn, restore_ffn

    accelerate_ffn(model, site="input", rule=TopP(0.5))   # FFNs now skip the masked weights
    ...
    restore_ffn(model)                                      # the original modules, bit for bit

Kernels (each a ``torch.library`` custom op; Triton on CUDA tensors, PyTorch elsewhere, see :func:`backend`):

* :func:`column_sparse_matmul` - y = x W^T reading only the rows of W^T (columns of W) whose input is kept;
  one token: GEMV with the threshold fused; several tokens: gathered dense tl.dot over the union.
* :func:`row_sparse_matmul` - compute only the kept outputs (gate/up rows when the mask is known).
* :func:`topp_threshold` - the top-p threshold per row without sorting (bisection on bit patterns).
"""

if __name__ == "dllm_sparse.kernels":
    from .dispatch import BACKENDS, ENV_VAR, backend, triton_available
    from .ops import column_sparse_matmul, kept_indices, row_sparse_matmul, topp_threshold, union_density
    from .sparse_ffn import (
        PackedKeepSet,
        SparseFFN,
        SparsePart,
        accelerate_ffn,
        accelerated_ffn,
        is_accelerated,
        restore_ffn,
    )

    __all__ = [
        "backend", "triton_available", "BACKENDS", "ENV_VAR",
        "column_sparse_matmul", "row_sparse_matmul", "topp_threshold", "kept_indices", "union_density",
        "accelerate_ffn", "restore_ffn", "accelerated_ffn", "is_accelerated", "SparseFFN", "SparsePart",
        "PackedKeepSet",
    ]
else:
    # Imported as a top-level ``kernels``: the repository root is on sys.path (a prompt, a notebook or
    # ``python -m pytest`` started there), so this folder shadows Hugging Face's ``kernels`` distribution, which
    # transformers >= 5.25 imports at start-up. This folder is only ever meant as ``dllm_sparse.kernels``, so hand the
    # name over: load the ``kernels`` found on the rest of sys.path in place of this module, or fail exactly as
    # ``import kernels`` fails where the distribution is not installed.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (this repository's kernels/ folder is dllm_sparse.kernels,"
                                  " not a top-level package)", name="kernels")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds once this file has run
    try:
        _spec.loader.exec_module(_real)
    except BaseException:
        del sys.modules["kernels"]
        raise
