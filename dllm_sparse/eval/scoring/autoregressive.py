"""Exact autoregressive log-likelihood: sum log p(continuation | context) of token-id requests of a causal LM,
batched, with the LM head on the continuation only and a shared forward pass of a context shared by several
requests (see :mod:`dllm_sparse.eval.scoring.scorer` for the contract)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from dllm_sparse.eval.scoring.common import accepts, check_head_chunk, progress_bar, tagged
from dllm_sparse.models.families import without_lm_head
from dllm_sparse.models.loading import model_device
from dllm_sparse.sparsity.stats import SparsityStats


def ar_loglikelihood_tokens(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    padding_side: str = "left",
    pad_id: int = 0,
    max_length: int | None = None,
    stats: SparsityStats | None = None,
    progress: bool = False,
    share_context: bool = False,
    head_chunk: int | None = None,
) -> list[tuple[float, bool]]:
    """Exact ``(sum log p(continuation | context), is_greedy)`` for token-id requests of a causal LM.

    ``context`` must hold at least one token (use a BOS/EOS prefix for an empty context). Requests are sorted by
    length for batching and returned in the input order. A context longer than ``max_length`` is cut from the
    left, as lm-evaluation-harness does.

    ``share_context``: requests with the same context (the choices of a multiple-choice item) share one
    forward pass of it; its KV cache then feeds each continuation (:func:`_ar_shared_context`). The same
    log-likelihoods up to float rounding (other matmul shapes), and the same statistics: each context token
    counts once per request, as in one pass per request. Only valid when every sparsity rule attached acts per
    token (a rule selecting over a sequence, or a keep-set shared by the context's tokens, would see another
    set of tokens); the :class:`Scorer` turns it on exactly then. Models without a KV cache keyword take one
    pass per request.

    ``head_chunk`` (None: off): the one-pass-per-request path projects each request's continuation through the LM
    head ``head_chunk`` rows at a time, so at most ``head_chunk`` x vocabulary logits exist at once instead of
    ``batch_size`` x continuation x vocabulary (a rolling window of 4096 tokens at batch 16 and a 128k vocabulary:
    33 GB in float32). The forward then returns final hidden states (the head split off by
    :func:`~dllm_sparse.models.families.without_lm_head`); where the head cannot be split off (remote code, an
    offloaded head), the forward's logits are used and only the float32 copy and the log-softmax are chunked.
    Each position's value comes from its own hidden state either way: equal to the unchunked path up to float
    rounding. The shared-context path (multiple-choice items: one position per context, short continuations)
    is not chunked.
    """
    head_chunk = check_head_chunk(head_chunk)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    seqs = []
    for ctx, cont in requests:
        ctx, cont = list(ctx), list(cont)
        if not ctx:
            raise ValueError("an autoregressive request needs a non-empty context (prepend a BOS/EOS token)")
        if not cont:
            raise ValueError("empty continuation")
        full = ctx + cont
        if max_length is not None and len(full) - 1 > max_length:
            if len(cont) > max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={max_length}")
            full = full[len(full) - 1 - max_length:]
        seqs.append((full, len(cont)))
    results: list[tuple[float, bool] | None] = [None] * len(seqs)
    pending = list(range(len(seqs)))
    if share_context:
        shared = _ar_shared_context(model, seqs, batch_size=batch_size, pad_id=pad_id, stats=stats,
                                    progress=progress)
        if shared is not None:
            for i, res in shared.items():
                results[i] = res
            pending = [i for i in pending if results[i] is None]
    order = sorted(pending, key=lambda i: -len(seqs[i][0]))
    device = model_device(model)
    use_keep = accepts(model, "logits_to_keep") and padding_side == "left"
    use_pos = accepts(model, "position_ids")
    bar = progress_bar(len(seqs), "loglikelihood (AR)", progress)
    with without_lm_head(model) if head_chunk is not None else nullcontext(None) as head:
        _ar_per_request(model, seqs, order, results, batch_size=batch_size, padding_side=padding_side,
                        pad_id=pad_id, device=device, use_keep=use_keep, use_pos=use_pos, stats=stats,
                        head=head, head_chunk=head_chunk, bar=bar)
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _ar_per_request(model, seqs, order, results, *, batch_size, padding_side, pad_id, device, use_keep, use_pos,
                    stats, head, head_chunk, bar) -> None:
    """The one-pass-per-request path of :func:`ar_loglikelihood_tokens`: requests ``order`` (longest first),
    ``batch_size`` per forward pass; writes ``results[i]``. With ``head`` (split off the forward) the forward
    returns hidden states and the head runs on ``head_chunk`` continuation rows at a time."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        inputs = [seqs[i][0][:-1] for i in idx]
        T = max(len(x) for x in inputs)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(idx), T), dtype=torch.long)
        cont_group = torch.zeros((len(idx), T), dtype=torch.bool)
        for r, (i, x) in enumerate(zip(idx, inputs, strict=True)):
            n, nc = len(x), seqs[i][1]
            sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
            ids[r, sl] = torch.tensor(x)
            att[r, sl] = 1
            end = sl.stop
            cont_group[r, end - nc + 1:end] = True  # input positions holding continuation tokens
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": att.to(device)}
        if use_pos:
            kwargs["position_ids"] = (att.cumsum(-1) - 1).clamp(min=0).to(device)
        max_cont = max(seqs[i][1] for i in idx)
        if use_keep:
            kwargs["logits_to_keep"] = max_cont
        groups = {"context": (att.bool() & ~cont_group), "continuation": cont_group}
        with torch.no_grad(), tagged(stats, "ar", groups):
            out = model(**kwargs).logits  # hidden states when the head is split off
        offset = T - out.shape[1]  # the output covers input positions offset .. T-1
        for r, i in enumerate(idx):
            full, nc = seqs[i]
            n = len(full) - 1
            end = T if padding_side == "left" else n
            pos = torch.arange(end - nc, end) - offset
            rows = out[r, pos.to(out.device)]
            if head_chunk is None:
                results[i] = _score_continuation(rows, full[-nc:])
            else:
                results[i] = _score_chunked(rows, full[-nc:], head, head_chunk)
        del out
        if bar is not None:
            bar.update(len(idx))


def _score_chunked(rows: torch.Tensor, target: Sequence[int], head: torch.nn.Linear | None,
                   chunk: int) -> tuple[float, bool]:
    """:func:`_score_continuation` of ``rows`` (hidden states when ``head`` is given, else logits) ``chunk`` rows
    at a time: the per-chunk log-likelihoods summed in float64."""
    ll, greedy = 0.0, True
    with torch.no_grad():
        for s in range(0, rows.shape[0], chunk):
            part = rows[s:s + chunk]
            lg = part if head is None else F.linear(part, head.weight, head.bias)
            part_ll, part_greedy = _score_continuation(lg, target[s:s + chunk])
            ll, greedy = ll + part_ll, greedy and part_greedy
    return ll, greedy


def _score_continuation(logits: torch.Tensor, target: Sequence[int]) -> tuple[float, bool]:
    """(sum of log-softmax at the targets, every target is the argmax) of logits [n, V] predicting ``target``."""
    lg = logits.float()
    t = torch.tensor(list(target), device=lg.device)
    ll = F.log_softmax(lg, dim=-1).gather(-1, t[:, None]).sum().item()
    return ll, bool((lg.argmax(-1) == t).all().item())


def _ar_shared_context(model: torch.nn.Module, seqs: list[tuple[list[int], int]], *, batch_size: int,
                       pad_id: int, stats: SparsityStats | None,
                       progress: bool) -> dict[int, tuple[float, bool]] | None:
    """:func:`ar_loglikelihood_tokens` with one forward pass per distinct context (``seqs``: (context +
    continuation, continuation length) per request), for the requests whose context of at least two tokens is
    shared by another request: {request index: result}; the others (e.g. rolling windows after a lone BOS,
    where there is nothing to save) are left to the per-request passes. None when the model takes no KV cache.

    1. Contexts, ``batch_size`` per pass, left-padded, with a KV cache; the logits of the last context position
       predict every continuation's first token. Statistics: row weight = the number of requests of the
       context (so its tokens count as in one pass per request), token group ``context``.
    2. Continuations, ``batch_size`` rows per pass: the inputs continuation[:-1] (right-padded) on a copy of
       their context's cache rows, attention mask = context mask + their own; token group ``continuation``.
       Skipped when every continuation is one token.
    """
    import copy

    from dllm_sparse.samplers.kv_cache import KVCacheError, cache_keyword, check_cache_length, new_cache

    try:
        cache_kw = cache_keyword(model)
    except KVCacheError:
        return None
    device = model_device(model)
    use_keep = accepts(model, "logits_to_keep")
    use_pos = accepts(model, "position_ids")
    contexts: dict[tuple[int, ...], list[int]] = {}  # context -> requests
    for i, (full, nc) in enumerate(seqs):
        contexts.setdefault(tuple(full[:-nc]), []).append(i)
    contexts = {c: reqs for c, reqs in contexts.items() if len(reqs) > 1 and len(c) > 1}
    ctx_list = sorted(contexts, key=len, reverse=True)
    results: dict[int, tuple[float, bool]] = {}
    bar = progress_bar(sum(map(len, contexts.values())), "loglikelihood (AR, shared contexts)", progress)
    for start in range(0, len(ctx_list), batch_size):
        batch = ctx_list[start:start + batch_size]
        Tc = len(batch[0])
        ids = torch.full((len(batch), Tc), pad_id, dtype=torch.long)
        att = torch.zeros((len(batch), Tc), dtype=torch.long)
        for r, ctx in enumerate(batch):
            ids[r, Tc - len(ctx):] = torch.tensor(ctx)
            att[r, Tc - len(ctx):] = 1
        cache = new_cache(model)
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": att.to(device), cache_kw: cache,
                                  "use_cache": True}
        if use_pos:
            kwargs["position_ids"] = (att.cumsum(-1) - 1).clamp(min=0).to(device)
        if use_keep:
            kwargs["logits_to_keep"] = 1
        weights = torch.tensor([float(len(contexts[c])) for c in batch], dtype=torch.float64)
        groups = {"context": att.bool(), "continuation": torch.zeros_like(att, dtype=torch.bool)}
        with torch.no_grad(), tagged(stats, "ar", groups, weights):
            first = model(**kwargs).logits[:, -1]  # [contexts, V]: predicts each continuation's first token
        check_cache_length(cache, Tc, model)
        rows = [(r, i) for r, c in enumerate(batch) for i in contexts[c]]
        for cstart in range(0, len(rows), batch_size):
            chunk = rows[cstart:cstart + batch_size]
            Tn = max(seqs[i][1] for _, i in chunk) - 1
            rest = None
            if Tn > 0:
                rest = _ar_continuations(model, seqs, chunk, Tn, att, cache, cache_kw, pad_id, device, use_pos,
                                         stats, copy.deepcopy)
            for k, (r, i) in enumerate(chunk):
                full, nc = seqs[i]
                lg = first[r:r + 1] if nc == 1 else torch.cat([first[r:r + 1], rest[k, :nc - 1].to(first.device)])
                results[i] = _score_continuation(lg, full[-nc:])
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return results


def _ar_continuations(model, seqs, chunk, Tn, ctx_att, cache, cache_kw, pad_id, device, use_pos, stats,
                      copy_cache) -> torch.Tensor:
    """Logits [rows, Tn, V] of the continuation inputs of ``chunk`` ((context row, request) pairs) fed after
    their context's KV cache (step 2 of :func:`_ar_shared_context`)."""
    ctx_rows = torch.tensor([r for r, _ in chunk])
    ids = torch.full((len(chunk), Tn), pad_id, dtype=torch.long)
    own = torch.zeros((len(chunk), Tn), dtype=torch.long)
    for k, (_, i) in enumerate(chunk):
        full, nc = seqs[i]
        inputs = full[len(full) - nc:-1]  # continuation[:-1]: the last token is predicted, never fed
        ids[k, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        own[k, :len(inputs)] = 1
    att = torch.cat([ctx_att[ctx_rows], own], dim=1)
    rows_cache = copy_cache(cache)
    rows_cache.reorder_cache(ctx_rows.to(device))  # the context's cache rows, one per continuation row
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": att.to(device), cache_kw: rows_cache,
                              "use_cache": True}
    if use_pos:
        kwargs["position_ids"] = (ctx_att[ctx_rows].sum(-1, keepdim=True) + torch.arange(Tn)).to(device)
    groups = {"context": torch.zeros_like(own, dtype=torch.bool), "continuation": own.bool()}
    with torch.no_grad(), tagged(stats, "ar", groups):
        return model(**kwargs).logits
