"""The masked-diffusion Monte-Carlo ELBO of token-id requests (the contract: :mod:`dllm_sparse.eval.scoring.scorer`
and ``docs/generation.md``, section "Likelihood"): stratified mask counts, per-item generators, de-duplicated rows
packed by length, the guided and the official variants."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from dllm_sparse.eval.scoring.common import check_head_chunk, content_key, item_generator, progress_bar
from dllm_sparse.eval.scoring.defaults import MC_BATCH, MC_NUM
from dllm_sparse.eval.scoring.greedy import iterative_greedy_check
from dllm_sparse.eval.scoring.masked_forward import (
    check_cfg_scale,
    check_precision,
    greedy_check_mode,
    guided_logits,
    masked_ce,
)
from dllm_sparse.sparsity.stats import SparsityStats


def elbo_mask_counts(L: int, mc_num: int, mc_batch: int, generator: torch.Generator) -> torch.Tensor:
    """Number of masked answer positions of each of the ``mc_num`` rows (shape [mc_num // mc_batch, mc_batch]).

    Per iteration k ~ U{1..L}; row j masks round(k + j·L/b), wrapped into {1..L} (LLaDA's stratification)."""
    if L < 1:
        raise ValueError("the answer must hold at least one token")
    if mc_num < 1 or mc_batch < 1 or mc_num % mc_batch:
        raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of mc_batch ({mc_batch})")
    out = []
    for _ in range(mc_num // mc_batch):
        k = int(torch.randint(1, L + 1, (1,), generator=generator).item())
        x = torch.round(torch.linspace(float(k), k + (mc_batch - 1) * (L / mc_batch), steps=mc_batch,
                                       dtype=torch.float64)).long()
        out.append(((x - 1) % L) + 1)
    return torch.stack(out)


def elbo_masks(L: int, mc_num: int, mc_batch: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean answer masks [mc_num, L]: each row masks its count of positions chosen by a random permutation."""
    counts = elbo_mask_counts(L, mc_num, mc_batch, generator).reshape(-1)
    masks = torch.zeros((len(counts), L), dtype=torch.bool)
    for r, n in enumerate(counts.tolist()):
        masks[r, torch.randperm(L, generator=generator)[:n]] = True
    return masks


def diffusion_elbo_tokens(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mask_id: int,
    mc_num: int = MC_NUM,
    mc_batch: int = MC_BATCH,
    batch_size: int | None = None,
    seed: int = 0,
    keys: Sequence[Hashable] | None = None,
    shift_logits: bool = False,
    dedupe: bool = True,
    cfg_scale: float = 0.0,
    greedy_check: bool | str = "off",
    stats: SparsityStats | None = None,
    ratio_bins: int = 0,
    progress: bool = False,
    precision: str = "float32",
    head_chunk: int | None = None,
) -> list[tuple[float, bool]]:
    """Monte-Carlo ELBO estimate of ``log p(answer | prompt)`` for each (prompt ids, answer ids) request.

    ``mc_batch`` is the stratified mini-batch b of the spec; ``batch_size`` caps the masked rows of one forward
    pass (default ``mc_batch``; with guidance each row is run twice in that pass, conditional and unconditional).
    ``keys`` name the items for the per-item generators (default: a hash of the tokens); use the same keys in
    every configuration. ``shift_logits``: Dream-style models predict position i from the hidden state at i−1
    (leave it off for models that shift inside their forward, such as a native LLaDA model with
    ``config.logit_shift``). ``cfg_scale``: classifier-free guidance w of the official ``get_log_likelihood``
    (0 = none); the masks do not depend on it, so guided and unguided estimates share their random numbers.
    ``greedy_check``: ``"iterative"`` / ``"one_pass"`` / ``"off"`` (see :func:`greedy_check_mode` and the module
    docstring). ``precision``: ``"float32"`` or ``"official"`` (the official computation bit for bit, with its
    batch layout: ``batch_size`` and ``dedupe`` are then not used; module docstring). ``head_chunk``: the LM head,
    guidance and cross-entropy of a forward pass's scored positions run on this many rows at a time (None: all at
    once; a rolling window of 4096 tokens at mc_batch 8 scores ~16k positions, 8 GB of float32 logits at a
    126k vocabulary; see docs/memory.md); the official precision runs the head over every position and refuses it.
    Returns ``(ll, is_greedy)`` per request.
    """
    head_chunk = check_head_chunk(head_chunk)
    batch_size = batch_size or mc_batch
    cfg_scale = check_cfg_scale(cfg_scale)
    check = greedy_check_mode(greedy_check)
    official = check_precision(precision) == "official"
    dedupe = dedupe and not official  # the official code runs every drawn row
    if official and head_chunk is not None:
        raise ValueError(f"head_chunk={head_chunk} with precision='official': the official evaluation runs the LM head "
                         "over every position at once (bit for bit); use precision='float32' to chunk the head")
    if keys is not None and len(keys) != len(requests):
        raise ValueError("keys must have one entry per request")
    rows, seqs, answer_lens = _item_rows(requests, keys, mc_num=mc_num, mc_batch=mc_batch, seed=seed,
                                         shift_logits=shift_logits, dedupe=dedupe, one_pass=check == "one_pass")
    if official:  # the official layout: one item's mini-batch per forward pass (the one-pass check row alone)
        chunks = _official_chunks(rows, mc_batch)
    else:
        chunks = _packed_chunks(rows, seqs, batch_size)
    minibatch_losses: list[list[float]] = [[] for _ in requests]  # official: one float32 loss per mini-batch
    loss_sum = [0.0] * len(requests)
    greedy = [False] * len(requests)
    bar = progress_bar(len(chunks), "ELBO forward passes", progress)
    for chunk in chunks:
        clean, noisy, is_mask, answer_pos, groups, weight = _chunk_inputs(chunk, rows, seqs, answer_lens, mask_id,
                                                                          ratio_bins)
        bi, ti = is_mask.nonzero(as_tuple=True)
        target = clean[bi, ti]
        common = dict(mask_id=mask_id, cfg_scale=cfg_scale, shift_logits=shift_logits, stats=stats, tag="elbo",
                      groups=groups, row_weights=weight if dedupe else None, precision=precision)
        if official:
            lg = guided_logits(model, noisy, answer_pos, bi, ti, **common)
            target = target.to(lg.device)
            if rows[chunk[0]][2] > 0:
                minibatch_losses[rows[chunk[0]][0]].append(
                    _official_minibatch_loss(lg, target, is_mask, bi, answer_pos))
                if bar is not None:
                    bar.update(1)
                continue
            ce, argmax = F.cross_entropy(lg, target, reduction="none"), lg.argmax(-1)
        else:
            ce, argmax = masked_ce(model, noisy, answer_pos, bi, ti, target, head_chunk=head_chunk,
                                   want_argmax=check == "one_pass", **common)
        _add_chunk_losses(chunk, rows, answer_lens, bi, ce, argmax if check == "one_pass" else None, target,
                          loss_sum, greedy)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if check == "iterative":
        greedy = iterative_greedy_check(model, requests, mask_id=mask_id, batch_size=batch_size,
                                        cfg_scale=cfg_scale, shift_logits=shift_logits, stats=stats,
                                        precision=precision)
    if official:  # the official mean of the per-mini-batch losses, in Python floats
        return [(-sum(losses) / len(losses), greedy[i]) for i, losses in enumerate(minibatch_losses)]
    # Mean over rows then over iterations = mean over all mc_num rows (every mini-batch has b rows).
    return [(-loss_sum[i] / mc_num, greedy[i]) for i in range(len(requests))]


def _item_rows(requests, keys, *, mc_num: int, mc_batch: int, seed: int, shift_logits: bool, dedupe: bool,
               one_pass: bool) -> tuple[list[tuple[int, torch.Tensor, int]], list[torch.Tensor], list[int]]:
    """Step 1 of :func:`diffusion_elbo_tokens`: the rows of every item, (item, answer mask, multiplicity), with
    multiplicity 0 marking the one-pass check row; and per item its token sequence and answer length."""
    rows: list[tuple[int, torch.Tensor, int]] = []
    seqs, answer_lens = [], []
    for i, (prompt, answer) in enumerate(requests):
        prompt, answer = list(prompt), list(answer)
        L = len(answer)
        if L == 0:
            raise ValueError("empty answer")
        if shift_logits and not prompt:
            raise ValueError("shift_logits needs a non-empty prompt (position 0 is predicted from position -1)")
        seqs.append(torch.tensor(prompt + answer, dtype=torch.long))
        answer_lens.append(L)
        key = keys[i] if keys is not None else content_key(prompt, answer)
        masks = elbo_masks(L, mc_num, mc_batch, item_generator(seed, key))
        if dedupe:
            uniq, counts = torch.unique(masks, dim=0, return_counts=True)
            rows += [(i, m, int(c)) for m, c in zip(uniq, counts.tolist(), strict=True)]
        else:
            rows += [(i, m, 1) for m in masks]
        if one_pass:
            rows.append((i, torch.ones(L, dtype=torch.bool), 0))
    return rows, seqs, answer_lens


def _packed_chunks(rows: list[tuple[int, torch.Tensor, int]], seqs: list[torch.Tensor],
                   batch_size: int) -> list[list[int]]:
    """Step 2 of :func:`diffusion_elbo_tokens`: rows of equal total length packed into forward passes of at most
    ``batch_size`` rows (no padding needed), longest first."""
    by_len: dict[int, list[int]] = {}
    for r, (i, _, _) in enumerate(rows):
        by_len.setdefault(len(seqs[i]), []).append(r)
    return [rs[s:s + batch_size] for T in sorted(by_len, reverse=True) for rs in [by_len[T]]
            for s in range(0, len(rs), batch_size)]


def _chunk_inputs(chunk: list[int], rows, seqs, answer_lens, mask_id: int, ratio_bins: int):
    """The inputs of one forward pass over the rows ``chunk``: (clean ids, noisy ids, masked positions, answer
    positions, statistics groups, statistics row weights)."""
    T = len(seqs[rows[chunk[0]][0]])
    clean = torch.stack([seqs[rows[r][0]] for r in chunk])
    is_mask = torch.zeros_like(clean, dtype=torch.bool)
    answer_pos = torch.zeros_like(is_mask)
    ratio = torch.empty(len(chunk), dtype=torch.float64)
    # Statistics weight: a de-duplicated row stands for `mult` identical rows; the one-pass check row is
    # one real forward row (weight 1).
    weight = torch.tensor([float(rows[r][2] or 1) for r in chunk], dtype=torch.float64)
    for b, r in enumerate(chunk):
        i, m, _ = rows[r]
        L = answer_lens[i]
        is_mask[b, T - L:] = m
        answer_pos[b, T - L:] = True
        ratio[b] = m.sum().item() / L
    noisy = torch.where(is_mask, torch.full_like(clean, mask_id), clean)
    groups = {"prompt": ~answer_pos, "answer": answer_pos, "masked": is_mask}
    if ratio_bins:
        bins = (torch.ceil(ratio * ratio_bins).long() - 1).clamp(0, ratio_bins - 1)
        for k in range(ratio_bins):
            groups[f"ratio{k / ratio_bins:.2f}-{(k + 1) / ratio_bins:.2f}"] = (bins == k)[:, None].expand_as(clean)
    return clean, noisy, is_mask, answer_pos, groups, weight


def _add_chunk_losses(chunk, rows, answer_lens, bi, ce, argmax, target, loss_sum, greedy) -> None:
    """Adds each row's loss (its cross-entropy sum x L / #masked, times its multiplicity) to its item's
    ``loss_sum``; the one-pass check row (multiplicity 0) sets its item's ``greedy`` instead."""
    ce = ce.double().cpu()
    row_ce = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, bi, ce)
    wrong = torch.zeros(len(chunk), dtype=torch.float64).index_add_(
        0, bi, (argmax.cpu() != target.cpu()).double()) if argmax is not None else None
    for b, r in enumerate(chunk):
        i, m, mult = rows[r]
        if mult == 0:
            greedy[i] = bool(wrong[b].item() == 0)
        else:
            loss_sum[i] += mult * row_ce[b].item() * answer_lens[i] / int(m.sum().item())


def _official_chunks(rows: list[tuple[int, torch.Tensor, int]], mc_batch: int) -> list[list[int]]:
    """Forward-pass chunks of the official layout: each item's drawn rows in order, ``mc_batch`` per pass (one
    mini-batch), and the one-pass check row (multiplicity 0) on its own."""
    chunks: list[list[int]] = []
    for r, (i, _, mult) in enumerate(rows):
        if mult == 0 or not chunks or len(chunks[-1]) == mc_batch or rows[chunks[-1][0]][0] != i \
                or rows[chunks[-1][0]][2] == 0:
            chunks.append([r])
        else:
            chunks[-1].append(r)
    return chunks


def _official_minibatch_loss(lg: torch.Tensor, target: torch.Tensor, is_mask: torch.Tensor, bi: torch.Tensor,
                             answer_pos: torch.Tensor) -> float:
    """The official ``get_loglikelihood`` loss of one mini-batch: cross-entropy in the logits' dtype, divided by
    the row's masked fraction (float32, count / L), summed in float32 over every masked position (row-major, the
    order of boolean indexing) and divided by the rows."""
    L = int(answer_pos[0].sum())
    p_mask = (is_mask.sum(dim=1) / L).to(lg.device)  # integer / int: float32, as the official x / target_len
    loss = F.cross_entropy(lg, target, reduction="none") / p_mask[bi.to(lg.device)]
    return (loss.sum() / is_mask.shape[0]).item()
