"""What :func:`dllm_sparse.models.loading.load_model` returns (:class:`LoadedModel`), and where a loaded model's
inputs go (:func:`model_device`). Kept apart from the loader so that modules which build models themselves
(the diffusion twin, degraded copies) return the same record without importing the loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LoadedModel", "model_device", "load_options"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    kind: str  # "ar" (causal LM) or "diffusion" (masked-diffusion LM)
    name: str
    mask_id: int | None = None  # diffusion models only
    family: str = ""  # family profile name (llama, llada, ...; dllm_sparse.models.families)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def load_options(self) -> dict[str, Any]:
        """The from_pretrained settings that can change the numbers (see :func:`load_options`)."""
        return load_options(self.model)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the input embeddings (with accelerate's placement the first layer's
    device), else of the first parameter. A weight that accelerate offloads (``cpu_offload``, a ``device_map``
    with ``"cpu"``/``"disk"`` entries) sits on the meta device between calls; its hook's execution device is
    where the computation runs."""
    try:
        embeddings = model.get_input_embeddings()
        weight = embeddings.weight
        if weight is not None:
            if weight.device.type != "meta":
                return weight.device
            hook_device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
            if hook_device is not None:
                return torch.device(hook_device)
    except (AttributeError, NotImplementedError):
        pass
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return next(model.parameters()).device



def load_options(model: torch.nn.Module) -> dict[str, Any]:
    """The settings :func:`~dllm_sparse.models.loading.load_model` passed to ``from_pretrained`` that can change
    the numbers (:data:`dllm_sparse.models.loading.NUMERIC_OPTIONS` and config-field overrides), as JSON values;
    ``{}`` for a model loaded without any (or not by load_model). The run identity reads them from here."""
    return dict(getattr(model, "_dllm_sparse_load_options", {}))

