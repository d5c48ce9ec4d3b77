"""Look through the wrappers that stand between a caller and the model that does the work.

A ``torch.compile``-d model (``OptimizedModule``, the original under ``_orig_mod``), a peft ``PeftModel`` (the
transformers model, with its adapter layers, under ``get_base_model()``), ``nn.DataParallel`` /
``DistributedDataParallel`` (under ``module``) and any module that names what it wraps in ``__wrapped__``
forward every keyword to the model inside. Their own ``forward`` takes ``**kwargs``, so a question about the
model's interface (which KV-cache keyword it takes, whether it takes ``position_ids``, which class it is)
must be asked of the innermost module. accelerate's hooks (``dispatch_model``, ``cpu_offload``) need nothing:
they wrap the module's own ``forward`` with ``functools.wraps``, which :func:`forward_parameters` follows.

Calls still go through the wrapper (compiled code, the adapter's forward, the hooks); only questions are asked
of the inner module.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

__all__ = ["unwrap_model", "wrapper_chain", "forward_parameters"]


def _inner(model: Any) -> Any | None:
    """The module ``model`` wraps, or None when it is not one of the known wrappers."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule):
        return model._orig_mod
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    get_base = getattr(type(model), "get_base_model", None)  # peft's PeftModel (not a module's __getattr__)
    if callable(get_base):
        return model.get_base_model()
    wrapped = getattr(model, "__wrapped__", None)
    if isinstance(wrapped, nn.Module):
        return wrapped
    return None


def wrapper_chain(model: Any) -> list[Any]:
    """``model``, the module it wraps, the one that wraps, ... down to the innermost model (the wrappers the
    module docstring names)."""
    chain = [model]
    while True:
        inner = _inner(chain[-1])
        if inner is None or any(inner is m for m in chain):
            return chain
        chain.append(inner)


def unwrap_model(model: Any) -> Any:
    """The innermost model under any stack of the wrappers the module docstring names (``model`` itself when
    it wraps nothing)."""
    return wrapper_chain(model)[-1]


def forward_parameters(model: Any) -> dict[str, inspect.Parameter]:
    """The parameters of the innermost model's ``forward`` (an empty dict when it has no readable signature)."""
    try:
        return dict(inspect.signature(unwrap_model(model).forward).parameters)
    except (TypeError, ValueError):
        return {}
