"""Which implementation runs a kernel call: the Triton kernels or their PyTorch fallbacks.

One rule, one function. ``auto`` (the default) picks Triton for CUDA tensors when Triton is installed and
the PyTorch fallback otherwise (CPU tensors, no Triton). ``DLLM_SPARSE_KERNELS=torch|triton|auto`` in the
environment, or the ``override`` argument, forces a choice; forcing ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` in the environment before ``triton`` is imported (transformers imports it early, so
in practice: when the process starts), which is how the tests run the Triton code without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["backend", "triton_available", "BACKENDS", "ENV_VAR"]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "DLLM_SPARSE_KERNELS"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def backend(t: torch.Tensor | None = None, override: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for a call on tensor ``t``.

    ``override`` (or, when it is None or "auto", the ``DLLM_SPARSE_KERNELS`` variable) is one of
    ``auto``, ``triton``, ``torch``.
    """
    choice = (override or "auto").lower()
    if choice == "auto":
        choice = os.environ.get(ENV_VAR, "auto").lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r} (from the argument or ${ENV_VAR}); "
                         f"choose one of {BACKENDS}")
    on_gpu = t is not None and t.is_cuda
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("the Triton backend was requested but triton is not installed: pip install triton, "
                             f"or use the PyTorch fallback ({ENV_VAR}=torch)")
        if not on_gpu and not _interpreting():
            raise ValueError("Triton kernels need CUDA tensors; to run them on CPU start the process with "
                             f"TRITON_INTERPRET=1, or use the PyTorch fallback ({ENV_VAR}=torch)")
        return "triton"
    return "triton" if on_gpu and triton_available() else "torch"
