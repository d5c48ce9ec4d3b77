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
    # Imported as a top-level ``kernels`` (the repo root is on sys.path, e.g. ``python -m pytest`` run from it).
    # transformers probes for Hugging Face's own ``kernels`` package by importing that name while it is itself
    # being imported; importing dllm_sparse from here would then be circular. Stay an empty module without a
    # __version__, which the probe reads as "not installed". The package lives at dllm_sparse.kernels.
    __all__ = []
