"""The tiny random LLaDA that the frontier commands' ``--smoke`` runs on: seconds on a CPU, no download."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported inside the function at run time: --help must not load torch
    from dllm_sparse.models.loading import LoadedModel


def smoke_llada(**config) -> LoadedModel:
    """A seeded tiny random LLaDA (``tiny_llada_config(**config)``) as a :class:`LoadedModel` with no tokenizer
    (prompts are token ids) and mask id 99."""
    import torch

    from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config
    from dllm_sparse.models.loading import LoadedModel

    torch.manual_seed(0)
    model = LLaDAModelLM(tiny_llada_config(**config)).eval()
    return LoadedModel(model=model, tokenizer=None, kind="diffusion", name="tiny-llada (smoke)", mask_id=99,
                       family="llada")
