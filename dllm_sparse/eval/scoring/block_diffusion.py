"""The likelihood the sweep uses for DiffusionGemma (uniform-noise block diffusion): a Monte-Carlo denoising score.

DiffusionGemma generates an answer canvas by canvas (``config.canvas_length`` tokens each): the causal encoder
writes the prompt and the finished canvases into a KV cache, the bidirectional decoder denoises the next canvas.
For a (context, answer) request the answer is cut into those canvases; canvas j is scored given the context plus
canvases 0..j-1 (the cache the decoder would read at generation). Within a canvas of L tokens, each of the
``mc_num`` Monte-Carlo rows noises n of its positions (n and the positions drawn exactly as the masked-diffusion
ELBO draws its masks, :func:`~dllm_sparse.eval.scoring.elbo.elbo_masks`, stratified over n = 1..L) by replacing
them with tokens drawn uniformly from the vocabulary, runs the decoder on that canvas (no self-conditioning, as
at a canvas's first step), and scores the cross-entropy of the true tokens at the noised positions, weighted by
L / n. log p(answer | context) ~ -(sum over canvases of the mean over rows).

Why this and not the training ELBO: the ELBO of uniform-state diffusion needs the training noise schedule and
its per-time weights, which neither transformers' code nor the model card publishes (the released sampler only
runs inference). The estimator above is LLaDA's masked-diffusion ELBO with uniform noise in place of the mask
token; for masked diffusion it is a bound, for uniform noise it is a consistent denoising score, not a bound.
The sweep uses relative performance (sparse / dense on the same draws), for which a proxy that scores the
model's own denoising task is what matters. The draws of an item come from a generator seeded by (seed, item key,
canvas), so the dense model and every sparse configuration see the same noise (common random numbers). The caller
supplies the draw (``draw(L, key) -> (masks [mc_num, L], generator)``; the :class:`Scorer` gives the ELBO's
``elbo_masks`` and ``item_generator``), which keeps this module independent of the scorer's.

Statistics: encoder forwards are tagged ``"prefill"`` (group ``prompt``), decoder forwards ``"elbo"`` (groups
``answer`` and ``masked``, the noised positions). The encoder runs once per canvas (``mc_batch`` copies of the
prefix; the decoder reads the cache without writing it), the decoder once per mini-batch of ``mc_batch`` rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from dllm_sparse.models.diffusion_gemma import share_encoder_ffns
from dllm_sparse.models.loaded import model_device
from dllm_sparse.models.wrappers import unwrap_model
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = ["block_diffusion_loglikelihood"]


def _tagged(stats: SparsityStats | None, tag: Hashable, groups: dict[str, torch.Tensor]):
    from contextlib import nullcontext

    return nullcontext() if stats is None else stats.tagged(tag, groups)


@torch.no_grad()
def _cache_argument(model) -> str:
    """The name DiffusionGemma's forward gives its KV cache: ``cache`` from transformers 5.25, ``past_key_values``
    before (5.23 / 5.24, the floor of the supported range)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def block_diffusion_loglikelihood(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    draw: Callable[[int, Hashable], tuple[torch.Tensor, torch.Generator]],
    keys: Sequence[Hashable],
    mc_batch: int = 16,
    stats: SparsityStats | None = None,
    ratio_bins: int = 0,
) -> list[tuple[float, bool]]:
    """``(log-likelihood estimate, False)`` per (context ids, answer ids) request (see the module docstring).
    ``draw(L, key)``: the noised positions [mc_num, L] of a canvas of L tokens and the generator to draw its noise
    tokens from; ``keys`` name the items (with the canvas's start: ``(key, start)``). ``mc_batch``: rows per
    decoder forward (a divisor of mc_num). ``ratio_bins``: also group the decoder rows by their noised fraction
    n / L into that many bins (``ratio0.00-0.20`` ..., as the masked ELBO groups by mask ratio). ``is_greedy`` is
    not computed (False)."""
    from transformers import DynamicCache

    inner = share_encoder_ffns(unwrap_model(model))
    if len(keys) != len(requests):
        raise ValueError(f"{len(keys)} keys for {len(requests)} requests")
    canvas, vocab = int(inner.config.canvas_length), int(inner.config.text_config.vocab_size)
    cache_arg = _cache_argument(inner)
    device = model_device(inner)
    out = []
    for i, (context, answer) in enumerate(requests):
        context, answer = list(context), list(answer)
        if not context or not answer:
            raise ValueError(f"request {i}: context and answer need at least one token each")
        key = keys[i]
        total = 0.0
        for start in range(0, len(answer), canvas):
            target = torch.tensor(answer[start:start + canvas])
            L = len(target)
            masks, gen = draw(L, (key, start))  # [mc_num, L]: the noised positions of each row
            mc_num = masks.shape[0]
            if mc_num % mc_batch:
                raise ValueError(f"mc_num ({mc_num}) must be a multiple of mc_batch ({mc_batch})")
            noise = torch.randint(0, vocab, (mc_num, L), generator=gen)
            prefix = torch.tensor(context + answer[:start], device=device)
            # One encoder pass of the prefix for the mini-batch's rows; the decoder only reads the cache, so
            # every mini-batch of this canvas reuses it.
            cache = DynamicCache(config=inner.config.get_text_config(decoder=True))
            ctx = prefix.expand(mc_batch, -1)
            with _tagged(stats, "prefill", {"prompt": torch.ones_like(ctx, dtype=torch.bool)}):
                inner.model.encoder(input_ids=ctx, **{cache_arg: cache})
            loss = 0.0
            for rows in torch.split(torch.arange(mc_num), mc_batch):
                m = masks[rows].to(device)
                noisy = torch.where(m, noise[rows].to(device), target.to(device))
                groups = {"answer": torch.ones_like(m), "masked": m}
                if ratio_bins:
                    ratio = m.sum(dim=1, dtype=torch.float64) / L
                    bins = (torch.ceil(ratio * ratio_bins).long() - 1).clamp(0, ratio_bins - 1)
                    for k in range(ratio_bins):
                        name = f"ratio{k / ratio_bins:.2f}-{(k + 1) / ratio_bins:.2f}"
                        groups[name] = (bins == k)[:, None].expand_as(m)
                with _tagged(stats, "elbo", groups):
                    logits = inner(decoder_input_ids=noisy, **{cache_arg: cache}).logits.float()
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.to(device).repeat(len(rows)),
                                     reduction="none").reshape(len(rows), L)
                loss += float(((ce * m).sum(dim=1, dtype=torch.float64) * L / m.sum(dim=1)).sum())
            total -= loss / mc_num
        out.append((total, False))
    return out
