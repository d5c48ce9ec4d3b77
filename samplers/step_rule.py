"""The masked-diffusion step rule: from a step's block logits to the positions it commits and their tokens.

The sampler loop (:mod:`.diffusion`) runs the model and hands the current block's logits here, as diffusers'
pipelines hand a scheduler the model output. Definitions (``docs/generation.md``):

* proposal: x0 = argmax(logits) at temperature 0; at T > 0 the float64 Gumbel-max argmax(exp(logits) / (-log u)^T);
* confidence: the softmax probability of x0 (``low_confidence``; float64, or the model's dtype with
  ``confidence="official"``) or u ~ U(0, 1) (``random``); -inf at positions that are not masked;
* commit: the k most confident masked positions of the block (k from :func:`num_transfer_tokens`), ties lowest
  position first (a stable sort), or ``torch.topk`` order over the whole canvas row (``confidence="official"``);
* parallel decoding (Fast-dLLM, ``GenerationConfig(confidence_threshold=t)`` or ``confidence_factor=f``): k is
  not fixed in advance but read off the step's confidences (:func:`parallel_count`): the threshold rule commits
  every masked position of the block with confidence >= t, and at least the most confident one (k = max(1,
  #{confidence >= t})); the factor rule commits the n most confident for the largest n such that the i-th most
  confident has confidence >= 1 - f / (i + 1) for every i = 2..n, at least one. The k positions are then taken as
  above (the same tie order), so t > 1 is the one-token-per-step sampler. A block ends when none of its
  positions is masked, so ``steps`` is an upper bound (``gen_length``: one token per step at worst).
  ``confidence="official"`` also reproduces a quirk of Fast-dLLM's factor code: when the first position to fail
  is the block's last masked one, it commits that one too (all n);
* teacher forcing: a recorded step's positions and tokens instead of the sampler's own choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["num_transfer_tokens", "propose", "parallel_count", "commit_step", "forced_steps", "forced_commit"]


def num_transfer_tokens(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B] masked counts -> [B, steps] tokens to commit per step: n // s each, +1 on the first n % s steps."""
    n = n_masked.reshape(-1, 1).long()
    extra = torch.arange(steps, device=n.device)[None, :] < (n % steps)
    return n // steps + extra.long()


def propose(logits: torch.Tensor, config: Any, gens: list[torch.Generator] | None,
            active: list[bool] | None = None):
    """Block logits [B, b, V] -> (x0 [B, b], confidence [B, b]). Draws the step's random numbers (per row, in
    the documented order: the Gumbel noise, then the random confidences), only for the ``active`` rows (those
    with a masked position in the block; default all): under parallel decoding a row whose block is done waits
    for the others without drawing, so it draws what it draws alone (the fixed schedule keeps every row active)."""
    B, b, V = logits.shape
    active = [True] * B if active is None else active

    def draw(shape, g, on):
        return (torch.rand(shape, generator=g, dtype=torch.float64, device=logits.device) if on
                else torch.full(shape, 0.5, dtype=torch.float64, device=logits.device))  # never committed

    if config.temperature == 0:
        x0 = logits.argmax(dim=-1)
    else:
        u = torch.stack([draw((b, V), g, on) for g, on in zip(gens, active, strict=True)])
        x0 = (logits.to(torch.float64).exp() / (-torch.log(u)) ** config.temperature).argmax(dim=-1)
    if config.remasking == "low_confidence":
        # official: the softmax in the model's dtype, as the official generate.py computes it
        p = F.softmax(logits if config.confidence == "official" else logits.to(torch.float64), dim=-1)
        conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
    else:
        conf = torch.stack([draw((b,), g, on) for g, on in zip(gens, active, strict=True)])
    return x0, conf


def _official_topk(conf: torch.Tensor, k: torch.Tensor, start: int, S: int) -> torch.Tensor:
    """The official selection: per row, ``torch.topk`` over the whole canvas row (confidence -inf outside the
    block's masked positions), so equal confidences are taken in topk's order. Returns the block's commit mask."""
    B, b = conf.shape
    full = torch.full((B, S), -torch.inf, dtype=conf.dtype, device=conf.device)
    full[:, start:start + b] = conf
    commit = torch.zeros((B, S), dtype=torch.bool, device=conf.device)
    for r in range(B):
        commit[r, torch.topk(full[r], k=int(k[r])).indices] = True
    return commit[:, start:start + b]


def _top_k(conf: torch.Tensor, k: torch.Tensor, block_masked: torch.Tensor) -> torch.Tensor:
    """Top-k per row with k [B, 1], vectorised: the rank of each position in a stable descending sort (ties: lowest
    position first); the ranks below k are committed."""
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=conf.device)
                                             .expand_as(order))
    return (ranks < k) & block_masked


def parallel_count(conf: torch.Tensor, block_masked: torch.Tensor, config: Any) -> torch.Tensor:
    """[B] tokens to commit this step under parallel decoding (``confidence_threshold`` / ``confidence_factor``):
    at least one while a position of the block is masked, none once it has none. ``conf`` [B, b] holds the
    confidences of the block's masked positions (-inf elsewhere)."""
    n = block_masked.sum(dim=-1)
    conf = conf.to(torch.float64)  # compared in float64 (a bf16 compare would round t itself)
    if config.confidence_threshold is not None:
        k = ((conf >= config.confidence_threshold) & block_masked).sum(dim=-1)
    else:
        ranked = conf.sort(dim=-1, descending=True).values  # the masked ones first
        i = torch.arange(ranked.shape[-1], device=conf.device)
        bar = 1 - config.confidence_factor / (i + 2).to(torch.float64)  # rank i (0-based) is the (i + 1)-th
        bar[0] = -torch.inf  # the most confident is always committed
        passes = (ranked >= bar) & (i < n[:, None])
        k = passes.long().cumprod(dim=-1).sum(dim=-1)  # the passing run from the top
        if config.confidence == "official":
            k = torch.where(k == n - 1, n, k)  # Fast-dLLM: a failure at the last rank commits it too
    return torch.minimum(k.clamp(min=1), n)


def commit_step(block_logits: torch.Tensor, block_masked: torch.Tensor, k: torch.Tensor, config: Any,
                gens: list[torch.Generator] | None, *, start: int, canvas_length: int) -> tuple[torch.Tensor, ...]:
    """The sampler's own choice for one step: (commit [B, b] bool, x0 [B, b]). ``k`` [B]: tokens to commit per
    row (replaced by :func:`parallel_count` under parallel decoding); ``start``: the block's first canvas position
    (the official selection ranks over the whole canvas row)."""
    x0, conf = propose(block_logits, config, gens, block_masked.any(dim=-1).tolist())
    conf = conf.masked_fill(~block_masked, -torch.inf)
    if config.confidence_threshold is not None or config.confidence_factor is not None:
        k = parallel_count(conf, block_masked, config)
    if config.confidence == "official" and config.remasking == "low_confidence":
        return _official_topk(conf, k, start, canvas_length), x0
    return _top_k(conf, k[:, None], block_masked), x0


def forced_steps(forced: Sequence[Any] | None, B: int, gen_length: int, steps: int) -> list[tuple] | None:
    """Teacher-forcing entries -> per step (committed, tokens), both per row; checks the shape of the plan."""
    if forced is None:
        return None
    out = []
    for t, entry in enumerate(forced):
        cols, toks = (entry["committed"], entry["tokens"]) if isinstance(entry, dict) else (entry.committed,
                                                                                        entry.tokens)
        if len(cols) != B or len(toks) != B:
            raise ValueError(f"forced_commits[{t}] has {len(cols)} rows of positions and {len(toks)} of tokens for "
                             f"a batch of {B} prompts; record the trajectory with the same prompts")
        for r, (c, k) in enumerate(zip(cols, toks, strict=True)):
            if len(c) != len(k):
                raise ValueError(f"forced_commits[{t}], row {r}: {len(c)} positions but {len(k)} tokens")
            if any(not 0 <= int(x) < gen_length for x in c):
                raise ValueError(f"forced_commits[{t}], row {r}: positions {list(c)} outside the generated region "
                                 f"0..{gen_length - 1} (indices count from the first generated token)")
        out.append(([[int(x) for x in c] for c in cols], [[int(x) for x in k] for k in toks]))
    if not out or len(out) > steps:
        raise ValueError(f"forced_commits has {len(out)} steps; give between 1 and steps ({steps}) entries "
                         "(the trace of a generation with the same steps / block_length / gen_length)")
    return out


def forced_commit(entry: tuple, step: int, start: int, block_masked: torch.Tensor,
                  mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forced step -> (commit [B, b] bool, tokens [B, b]) for the block starting at generated index
    ``start``. Every forced position must lie in the current block and still hold the mask token."""
    B, b = block_masked.shape
    commit = torch.zeros((B, b), dtype=torch.bool, device=block_masked.device)
    x0 = torch.full((B, b), mask_id, dtype=torch.long, device=block_masked.device)
    for r, (cols, toks) in enumerate(zip(*entry, strict=True)):
        for c, t in zip(cols, toks, strict=True):
            j = c - start
            if not 0 <= j < b:
                raise ValueError(f"forced step {step}, row {r}: position {c} is outside the current block "
                                 f"{start}..{start + b - 1}; the sampler only commits inside the current block "
                                 "(replay with the block_length / steps the trajectory was recorded with)")
            if not bool(block_masked[r, j]) or bool(commit[r, j]):
                raise ValueError(f"forced step {step}, row {r}: position {c} was already written; each position "
                                 "is committed once")
            if t == mask_id:
                raise ValueError(f"forced step {step}, row {r}: token at position {c} is the mask id {mask_id}")
            commit[r, j] = True
            x0[r, j] = t
    return commit, x0
