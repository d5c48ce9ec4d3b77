"""What the likelihood scorers share: the sparsity configs of a call, statistics tags, progress bars, per-item
generators (common random numbers) and the LM-head chunk setting."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from contextlib import nullcontext

import torch

from dllm_sparse.models.wrappers import forward_parameters
from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.stats import SparsityStats


def as_configs(sparsity) -> list[SparsityConfig]:
    if sparsity is None:
        return []
    if isinstance(sparsity, SparsityConfig):
        return [sparsity]
    if isinstance(sparsity, str):
        raise TypeError(f"sparsity must be a SparsityConfig (e.g. SparsityConfig.parse({sparsity!r})), a list of "
                        "them, or None")
    out = list(sparsity)
    if not all(isinstance(s, SparsityConfig) for s in out):
        raise TypeError(f"sparsity must be a SparsityConfig, a list of them, or None; got {sparsity!r}")
    if len({s.site for s in out}) != len(out):
        raise ValueError("at most one SparsityConfig per site")
    return out


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword ``name``, asked of the model inside wrappers that pass their
    keywords on (a PeftModel, a ``torch.compile``-d module: their own forward shows only ``**kwargs``)."""
    return name in forward_parameters(model)


def tagged(stats: SparsityStats | None, tag: Hashable, groups: dict[str, torch.Tensor],
            row_weights: torch.Tensor | None = None):
    if stats is None:
        return nullcontext()
    return stats.tagged(tag, groups, row_weights)


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # Shown whenever enabled (lm-eval's disable_tqdm decides, as for lm-eval's own bars), on stderr.
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def item_generator(seed: int, key: Hashable) -> torch.Generator:
    """A CPU generator seeded by (seed, key): the same item draws the same masks in every configuration."""
    digest = hashlib.sha256(f"{int(seed)}|{key!r}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def content_key(context: Sequence[int], continuation: Sequence[int]) -> str:
    return hashlib.sha256(repr((list(context), list(continuation))).encode()).hexdigest()[:24]


def check_head_chunk(head_chunk: int | None) -> int | None:
    """``head_chunk``: None (the LM head over every scored row at once) or a whole number of rows >= 1."""
    if head_chunk is None:
        return None
    if isinstance(head_chunk, bool) or not isinstance(head_chunk, int) or head_chunk <= 0:
        raise ValueError(f"head_chunk must be a whole number of rows >= 1 (or None: no chunking), got {head_chunk!r}; "
                         "e.g. head_chunk=4096 holds 4096 x vocabulary float32 logits at a time")
    return head_chunk
