"""Likelihood scorers: exact autoregressive log-likelihood and the masked-diffusion Monte-Carlo ELBO.

The contract is ``docs/generation.md`` (section "Likelihood")::

    scorer = Scorer.from_loaded(load_model("smollm2-135m"), batch_size=16)
    scorer.loglikelihood([("The capital of France is", " Paris")])          # [(ll, is_greedy)]
    stats = SparsityStats()
    scorer.loglikelihood([("The capital of France is", " Paris")],          # every forward pass of this call
                         sparsity=SparsityConfig("input", TopP(0.9)), stats=stats)   # is sparsified
    stats.mean("input")                                                     # measured sparsity of those passes

* Autoregressive (``kind="ar"``): exact sum of log p(continuation | context); batched with left (default) or
  right padding, explicit position ids, and only the continuation's logits computed when the model supports
  ``logits_to_keep`` (looked up through a PeftModel or ``torch.compile`` wrapper); requests sharing a context
  (the choices of a multiple-choice item) share one forward pass of it, whose KV cache feeds each continuation
  (``share_context``, per-token rules only). ``is_greedy``: the continuation is the argmax at every position.
* Masked diffusion (``kind="diffusion"``): for each of ``mc_num / mc_batch`` iterations draw k uniformly from
  {1..L}; row j of the mini-batch masks ((k + j·L/b − 1) mod L) + 1 answer positions (rounded as in LLaDA's
  reference code) chosen by a random permutation; the prompt is never masked; the loss of a row is the sum of
  cross-entropies over its masked positions × L / (#masked); log-likelihood = −(mean over rows, then over
  iterations). The masks of an item come from a private generator seeded by (seed, item key), so the dense
  model and every sparse configuration see exactly the same masks (common random numbers): a difference
  between two configurations is never sampling noise.

Performance details that do not change any result:

* identical masked rows of one item (an answer of L tokens has only 2^L − 1 distinct masks, so short answers
  repeat them constantly) are computed once and weighted by their multiplicity (``dedupe=True``), in the
  log-likelihood and in the sparsity statistics alike (each row counts as often as it was drawn);
* rows of different items with the same total length are packed into one forward pass (no padding, so any
  bidirectional model works without an attention mask), at most ``batch_size`` rows per pass.
* the LM head projects the masked positions only (the scored ones), where the family profile names a head that
  can be split off the forward (:func:`~dllm_sparse.models.families.without_lm_head`; also through a PeftModel);
  other models run their full forward.

Guided ELBO (``cfg_scale`` w > 0, the official ``get_log_likelihood``): every masked row is also run with each
prompt position replaced by the mask id, in the same forward pass, and logits = uncond + (w + 1)(cond − uncond)
before the cross-entropy. The masks are the unguided estimate's (common random numbers); w = 0 is the plain ELBO.

Precision (``precision``): ``"float32"`` (the default) takes the model's logits to float32 before the guidance and
the cross-entropy, and sums the losses in float64. ``"official"`` reproduces the official evaluation bit for bit
(as ``GenerationConfig(confidence="official")`` does for the sampler): the guidance and the cross-entropy run in
the model's dtype (bf16 for LLaDA-8B), each loss is divided by its row's masked fraction in float32 and summed per
mini-batch in float32 (one ``.item()`` per mini-batch, averaged over the mini-batches), and the official layout is
used: one forward pass per item and mini-batch (the ``mc_batch`` rows of one item, every drawn row: no
de-duplication, ``batch_size`` and ``dedupe`` are not used), the LM head over every position (never split off),
and the iterative greedy check one item per forward pass with the softmax of its confidence in float32. In float32
models the two differ by float rounding only; in bf16 the guided ELBO differs between them and, occasionally, a
greedy check's verdict. Ties of the greedy check's confidence: the lowest
position in both (the official ``torch.sort`` is not stable, so its order among exact ties is its kernel's).

``is_greedy`` for diffusion (``greedy_check``):

* ``"iterative"`` (the official LLaDA check, :func:`iterative_greedy_check`): from prompt + fully masked answer,
  unmask one position per forward pass (the most confident masked one, T = 0, the whole answer as one block);
  greedy iff every answer token is reproduced. L extra forward passes per item.
* ``"one_pass"``: one extra row per item masks the whole answer; greedy when the one-shot argmax of every answer
  position equals it. A weaker, different definition (it accepts far fewer targets), kept by name.
* ``"off"`` (the scorer's default, no extra cost): always ``False``.

Sparsification applies to every forward pass of a scorer (each Monte-Carlo forward is a separate call, so
masks are computed afresh for each, like every denoising step of a sampler). Statistics are tagged ``"ar"``
or ``"elbo"`` with token groups ``context``/``continuation`` (AR) and ``prompt``/``answer``/``masked``
(diffusion), plus optional mask-ratio bins ``ratio_bins`` (diffusion rows grouped by their fraction of
masked answer tokens: the likelihood-side stand-in for "denoising step").
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from dllm_sparse.models.families import family_named, without_lm_head
from dllm_sparse.models.loading import model_device
from dllm_sparse.models.wrappers import forward_parameters
from dllm_sparse.sparsity.config import DENSE, SparsityConfig
from dllm_sparse.sparsity.hooks import sparsify
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = [
    "SparsityConfig",
    "SCORER_DEFAULT",
    "Scorer",
    "ar_loglikelihood_tokens",
    "diffusion_elbo_tokens",
    "iterative_greedy_check",
    "greedy_check_mode",
    "GREEDY_CHECKS",
    "ELBO_PRECISIONS",
    "elbo_mask_counts",
    "elbo_masks",
    "item_generator",
    "rolling_windows",
    "ByteTokenizer",
]


# ---------------------------------------------------------------------------------------------------------
# Sparsity of a call
# ---------------------------------------------------------------------------------------------------------


class _ScorerDefault:
    """The default of the per-call ``sparsity=`` / ``stats=`` arguments: use what the scorer was built with."""

    def __repr__(self) -> str:
        return "SCORER_DEFAULT"


SCORER_DEFAULT = _ScorerDefault()


def _as_configs(sparsity) -> list[SparsityConfig]:
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


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------


def _accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword ``name``, asked of the model inside wrappers that pass their
    keywords on (a PeftModel, a ``torch.compile``-d module: their own forward shows only ``**kwargs``)."""
    return name in forward_parameters(model)


def _tagged(stats: SparsityStats | None, tag: Hashable, groups: dict[str, torch.Tensor],
            row_weights: torch.Tensor | None = None):
    if stats is None:
        from contextlib import nullcontext

        return nullcontext()
    return stats.tagged(tag, groups, row_weights)


def _progress(total: int, desc: str, enabled: bool):
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


def _content_key(context: Sequence[int], continuation: Sequence[int]) -> str:
    return hashlib.sha256(repr((list(context), list(continuation))).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------------
# Autoregressive: exact log-likelihood
# ---------------------------------------------------------------------------------------------------------


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
    use_keep = _accepts(model, "logits_to_keep") and padding_side == "left"
    use_pos = _accepts(model, "position_ids")
    bar = _progress(len(seqs), "loglikelihood (AR)", progress)
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
        with torch.no_grad(), _tagged(stats, "ar", groups):
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
    use_keep = _accepts(model, "logits_to_keep")
    use_pos = _accepts(model, "position_ids")
    contexts: dict[tuple[int, ...], list[int]] = {}  # context -> requests
    for i, (full, nc) in enumerate(seqs):
        contexts.setdefault(tuple(full[:-nc]), []).append(i)
    contexts = {c: reqs for c, reqs in contexts.items() if len(reqs) > 1 and len(c) > 1}
    ctx_list = sorted(contexts, key=len, reverse=True)
    results: dict[int, tuple[float, bool]] = {}
    bar = _progress(sum(map(len, contexts.values())), "loglikelihood (AR, shared contexts)", progress)
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
        with torch.no_grad(), _tagged(stats, "ar", groups, weights):
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
    with torch.no_grad(), _tagged(stats, "ar", groups):
        return model(**kwargs).logits


# ---------------------------------------------------------------------------------------------------------
# Masked diffusion: Monte-Carlo ELBO
# ---------------------------------------------------------------------------------------------------------


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


GREEDY_CHECKS = ("iterative", "one_pass", "off")


def greedy_check_mode(value: bool | str | None) -> str:
    """The greedy check named by ``value``: ``"iterative"`` (the official LLaDA check; ``True``), ``"one_pass"``
    (one forward pass with the whole answer masked; a weaker, different definition) or ``"off"``
    (``False``/``None``: ``is_greedy`` is always False)."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "iterative"
    mode = str(value).strip().lower().replace("-", "_")
    if mode in ("true", "1", "yes", "on"):
        return "iterative"
    if mode in ("false", "0", "no", "none", ""):
        return "off"
    if mode not in GREEDY_CHECKS:
        raise ValueError(f"greedy_check must be one of {GREEDY_CHECKS} (or True = 'iterative', False = 'off'), "
                         f"got {value!r}")
    return mode


def _check_cfg_scale(cfg_scale: float) -> float:
    w = float(cfg_scale)
    if not 0 <= w < float("inf"):  # also catches NaN; an infinite w makes every guided log-likelihood NaN
        raise ValueError(f"cfg_scale must be a finite number >= 0 (0 = no guidance; the official LLaDA evaluation "
                         f"uses 0.5-2.0 on some tasks), got {cfg_scale!r}")
    return w


ELBO_PRECISIONS = ("float32", "official")


def _check_precision(precision: str) -> str:
    if precision not in ELBO_PRECISIONS:
        raise ValueError(f"precision must be one of {ELBO_PRECISIONS} ('float32' = guidance and cross-entropy in "
                         f"float32, the default; 'official' = the official LLaDA evaluation bit for bit, in the "
                         f"model's dtype), got {precision!r}")
    return precision


def _guided_rows(model: torch.nn.Module, noisy: torch.Tensor, answer_pos: torch.Tensor, bi: torch.Tensor,
                 ti: torch.Tensor, *, mask_id: int, cfg_scale: float, shift_logits: bool, stats, tag, groups,
                 row_weights: torch.Tensor | None = None, precision: str = "float32"):
    """ONE forward pass over the rows ``noisy`` [n, T] (and, with ``cfg_scale`` w > 0, the same rows with every
    prompt position (``~answer_pos``) replaced by ``mask_id``, batched after them: the official
    ``get_log_likelihood``); returns ``(sel, head)``: the final hidden states at the positions (bi, ti), conditional
    rows first, and the LM head to apply to them, where the family allows splitting the head off (no vocabulary
    projection of the other positions); else their logits and None (``precision="official"``: always, the head
    over every position as the official code runs it)."""
    x = noisy
    if cfg_scale > 0:
        x = torch.cat([noisy, noisy.masked_fill(~answer_pos, mask_id)])
        groups = {k: torch.cat([v, v]) for k, v in groups.items()}
        row_weights = None if row_weights is None else torch.cat([row_weights, row_weights])
    device = model_device(model)
    official = precision == "official"
    # official: the LM head runs over every position, as in the official code (a BLAS may round a product of
    # fewer rows differently, so the split-off head is not used where bits must match)
    with torch.no_grad(), _tagged(stats, tag, groups, row_weights), \
            (nullcontext(None) if official else without_lm_head(model)) as head:
        out = model(input_ids=x.to(device)).logits  # hidden states when head is not None
    if shift_logits:
        out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
    n = noisy.shape[0]
    b, t = bi.to(out.device), ti.to(out.device)
    sel = out[b, t] if cfg_scale == 0 else torch.cat([out[:n][b, t], out[n:][b, t]])
    return sel, head


def _rows_to_logits(sel: torch.Tensor, head: torch.nn.Linear | None, cfg_scale: float,
                    official: bool) -> torch.Tensor:
    """Guided logits of the rows from :func:`_guided_rows` (conditional rows, then as many unconditional ones
    when ``cfg_scale`` > 0): head, float32 (unless official), then uncond + (w + 1)(cond − uncond)."""
    if head is not None:
        with torch.no_grad():
            sel = F.linear(sel.to(head.weight.device), head.weight, head.bias)
    if not official:
        sel = sel.float()
    if cfg_scale == 0:
        return sel
    k = sel.shape[0] // 2
    cond, uncond = sel[:k], sel[k:]
    return uncond + (cfg_scale + 1) * (cond - uncond)


def _guided_logits(model: torch.nn.Module, noisy: torch.Tensor, answer_pos: torch.Tensor, bi: torch.Tensor,
                   ti: torch.Tensor, *, mask_id: int, cfg_scale: float, shift_logits: bool, stats, tag, groups,
                   row_weights: torch.Tensor | None = None, precision: str = "float32") -> torch.Tensor:
    """Float32 logits at the positions (bi, ti) of the rows ``noisy`` [n, T], from ONE forward pass
    (``precision="official"``: in the model's dtype, guided in it, with the LM head over every position);
    :func:`_guided_rows` then :func:`_rows_to_logits`."""
    sel, head = _guided_rows(model, noisy, answer_pos, bi, ti, mask_id=mask_id, cfg_scale=cfg_scale,
                             shift_logits=shift_logits, stats=stats, tag=tag, groups=groups, row_weights=row_weights,
                             precision=precision)
    return _rows_to_logits(sel, head, cfg_scale, precision == "official")


def check_head_chunk(head_chunk: int | None) -> int | None:
    """``head_chunk``: None (the LM head over every scored row at once) or a whole number of rows >= 1."""
    if head_chunk is None:
        return None
    if isinstance(head_chunk, bool) or not isinstance(head_chunk, int) or head_chunk <= 0:
        raise ValueError(f"head_chunk must be a whole number of rows >= 1 (or None: no chunking), got {head_chunk!r}; "
                         "e.g. head_chunk=4096 holds 4096 x vocabulary float32 logits at a time")
    return head_chunk


def _masked_ce(model, noisy, answer_pos, bi, ti, target, *, head_chunk: int | None, want_argmax: bool,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy (float32 path) of every scored row (bi, ti) against ``target``, and its argmax when asked:
    the LM head, the guidance and the cross-entropy run on ``head_chunk`` rows at a time (None: all at once), so
    at most head_chunk x vocabulary logits (x 2 with guidance) exist at once. Each row's value is computed from
    its own hidden state alone either way."""
    sel, head = _guided_rows(model, noisy, answer_pos, bi, ti, **kwargs)
    cfg_scale = kwargs["cfg_scale"]
    n = len(bi)
    step = n if head_chunk is None else head_chunk
    ces, argmaxes = [], []
    for s in range(0, n, max(step, 1)):
        e = min(s + step, n)  # never past the conditional rows: the unconditional ones follow them in sel
        part = sel[s:e] if cfg_scale == 0 else torch.cat([sel[s:e], sel[n + s:n + e]])
        lg = _rows_to_logits(part, head, cfg_scale, official=False)
        tgt = target[s:e].to(lg.device)
        ces.append(F.cross_entropy(lg, tgt, reduction="none"))
        if want_argmax:
            argmaxes.append(lg.argmax(-1))
        del lg
    ce = torch.cat(ces) if ces else sel.new_zeros(0, dtype=torch.float32)
    return ce, (torch.cat(argmaxes) if want_argmax else None)


def diffusion_elbo_tokens(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mask_id: int,
    mc_num: int = 128,
    mc_batch: int = 16,
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
    cfg_scale = _check_cfg_scale(cfg_scale)
    check = greedy_check_mode(greedy_check)
    official = _check_precision(precision) == "official"
    dedupe = dedupe and not official  # the official code runs every drawn row
    if official and head_chunk is not None:
        raise ValueError(f"head_chunk={head_chunk} with precision='official': the official evaluation runs the LM head "
                         "over every position at once (bit for bit); use precision='float32' to chunk the head")
    if keys is not None and len(keys) != len(requests):
        raise ValueError("keys must have one entry per request")
    # 1. The rows of every item: (item, answer mask, multiplicity); multiplicity 0 marks the one-pass check row.
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
        key = keys[i] if keys is not None else _content_key(prompt, answer)
        masks = elbo_masks(L, mc_num, mc_batch, item_generator(seed, key))
        if dedupe:
            uniq, counts = torch.unique(masks, dim=0, return_counts=True)
            rows += [(i, m, int(c)) for m, c in zip(uniq, counts.tolist(), strict=True)]
        else:
            rows += [(i, m, 1) for m in masks]
        if check == "one_pass":
            rows.append((i, torch.ones(L, dtype=torch.bool), 0))
    # 2. Pack rows of equal total length into forward passes (no padding needed).
    by_len: dict[int, list[int]] = {}
    for r, (i, _, _) in enumerate(rows):
        by_len.setdefault(len(seqs[i]), []).append(r)
    chunks = [rs[s:s + batch_size] for T in sorted(by_len, reverse=True) for rs in [by_len[T]]
              for s in range(0, len(rs), batch_size)]
    if official:  # the official layout: one item's mini-batch per forward pass (the one-pass check row alone)
        chunks = _official_chunks(rows, mc_batch)
    minibatch_losses: list[list[float]] = [[] for _ in requests]  # official: one float32 loss per mini-batch
    loss_sum = [0.0] * len(requests)
    greedy = [False] * len(requests)
    bar = _progress(len(chunks), "ELBO forward passes", progress)
    for chunk in chunks:
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
        bi, ti = is_mask.nonzero(as_tuple=True)
        target = clean[bi, ti]
        common = dict(mask_id=mask_id, cfg_scale=cfg_scale, shift_logits=shift_logits, stats=stats, tag="elbo",
                      groups=groups, row_weights=weight if dedupe else None, precision=precision)
        if official:
            lg = _guided_logits(model, noisy, answer_pos, bi, ti, **common)
            target = target.to(lg.device)
            if rows[chunk[0]][2] > 0:
                minibatch_losses[rows[chunk[0]][0]].append(
                    _official_minibatch_loss(lg, target, is_mask, bi, answer_pos))
                if bar is not None:
                    bar.update(1)
                continue
            ce, argmax = F.cross_entropy(lg, target, reduction="none"), lg.argmax(-1)
        else:
            ce, argmax = _masked_ce(model, noisy, answer_pos, bi, ti, target, head_chunk=head_chunk,
                                    want_argmax=check == "one_pass", **common)
        ce = ce.double().cpu()
        row_ce = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, bi, ce)
        wrong = torch.zeros(len(chunk), dtype=torch.float64).index_add_(
            0, bi, (argmax.cpu() != target.cpu()).double()) if check == "one_pass" else None
        for b, r in enumerate(chunk):
            i, m, mult = rows[r]
            if mult == 0:
                greedy[i] = bool(wrong[b].item() == 0)
            else:
                loss_sum[i] += mult * row_ce[b].item() * answer_lens[i] / int(m.sum().item())
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


def iterative_greedy_check(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mask_id: int,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    shift_logits: bool = False,
    stats: SparsityStats | None = None,
    precision: str = "float32",
) -> list[bool]:
    """The official LLaDA greedy check (``docs/generation.md``, "Greedy check") of each (prompt, answer) request.

    Start from the prompt followed by a fully masked answer; at each of L forward passes (L = answer length)
    unmask ONE position: the masked answer position whose argmax token has the highest softmax probability
    (low-confidence remasking at temperature 0, the whole answer as one block; ties: the lowest position), and
    write that argmax there. The answer is greedy iff the result reproduces every answer token. The logits are
    guided like the ELBO's when ``cfg_scale`` > 0 (the official check calls the same ``get_logits``). Items with
    the same prompt and answer lengths are decoded together, ``batch_size`` per forward pass; statistics are
    tagged ``"greedy_check"``. ``precision="official"``: the official computation (one item per forward pass,
    guidance in the model's dtype, the confidence's softmax in float32; default: float32 guidance, float64
    softmax)."""
    cfg_scale = _check_cfg_scale(cfg_scale)
    official = _check_precision(precision) == "official"
    batch_size = 1 if official else batch_size
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (prompt, answer) in enumerate(requests):
        if len(answer) == 0:
            raise ValueError("empty answer")
        by_shape.setdefault((len(prompt), len(answer)), []).append(i)
    out = [False] * len(requests)
    for (P, L), items in by_shape.items():
        for s in range(0, len(items), batch_size):
            idx = items[s:s + batch_size]
            clean = torch.tensor([list(requests[i][0]) + list(requests[i][1]) for i in idx], dtype=torch.long)
            canvas = clean.clone()
            canvas[:, P:] = mask_id
            answer_pos = torch.zeros_like(canvas, dtype=torch.bool)
            answer_pos[:, P:] = True
            rows = torch.arange(len(idx))
            # Tracked apart from the tokens: a position stays decoded even if its argmax was the mask id itself.
            masked = answer_pos.clone()
            for _ in range(L):
                groups = {"prompt": ~answer_pos, "answer": answer_pos, "masked": masked}
                # Every row has the same number of masked answer positions left (one is written per pass).
                bi, ti = masked.nonzero(as_tuple=True)
                lg = _guided_logits(model, canvas, answer_pos, bi, ti, mask_id=mask_id, cfg_scale=cfg_scale,
                                    shift_logits=shift_logits, stats=stats, tag="greedy_check", groups=groups,
                                    precision=precision)
                x0 = lg.argmax(-1).cpu()
                p = torch.softmax(lg.float() if official else lg.double(), dim=-1)
                conf = p.gather(-1, x0.to(lg.device)[:, None]).squeeze(-1).cpu()
                conf = conf.reshape(len(idx), -1)
                # nonzero() lists positions in increasing order, so a stable sort breaks ties by lowest position.
                best = torch.sort(conf, dim=-1, descending=True, stable=True).indices[:, 0]
                flat = rows * conf.shape[1] + best
                canvas[bi[flat], ti[flat]] = x0[flat]
                masked[bi[flat], ti[flat]] = False
            for r, i in enumerate(idx):
                out[i] = bool((canvas[r, P:] == clean[r, P:]).all())
    return out


# ---------------------------------------------------------------------------------------------------------
# Rolling (whole-text) windows
# ---------------------------------------------------------------------------------------------------------


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Split a text into (context, continuation) requests predicting every token exactly once.

    Each window predicts up to ``max_length`` new tokens, conditioned on as many preceding tokens as fit in an
    input of ``max_length`` (the first window is conditioned on ``prefix_id`` alone)."""
    full = [prefix_id] + list(tokens)
    out = []
    for s in range(0, len(tokens), max_length):
        e = min(s + max_length, len(tokens))
        a = max(0, e - max_length)
        out.append((full[a:1 + s], full[1 + s:1 + e]))
    return out


# ---------------------------------------------------------------------------------------------------------
# The scorer: tokenisation, sparsity, dispatch by model kind
# ---------------------------------------------------------------------------------------------------------


class Scorer:
    """Score text with an AR or masked-diffusion model, optionally sparsified (see the module docstring).

    ``sparsity``: None (dense), a :class:`SparsityConfig`, or a list of them on distinct sites (all attached at
    once; with identity rules this measures the natural sparsity of every site in one dense pass). The
    constructor's value is the default of every scoring call; each verb also takes ``sparsity=`` (and
    ``stats=``) for that call alone, leaving the scorer as it is. ``stats``: where the measured sparsity goes
    by default (created on first use when a call is sparsified). Tokenisation follows
    lm-evaluation-harness: trailing spaces of the context move to the continuation, the pair is encoded whole
    and split, and an empty context becomes the prefix token (BOS, else EOS). ``family`` names a family profile
    (:mod:`dllm_sparse.models.families`, as in ``LoadedModel.family``); a diffusion scorer takes its
    ``mask_id`` (when neither the argument, the model config nor the tokenizer gives one) and its
    ``logit_shift`` (the ``shift_logits`` default) from it. Diffusion only: ``cfg_scale`` (guided ELBO, the default
    of every call; each verb takes ``cfg_scale=`` for that call alone) and ``greedy_check`` (``"iterative"``,
    ``"one_pass"`` or ``"off"``; ``True`` = ``"iterative"``) and ``precision`` (``"float32"`` or ``"official"``,
    the official computation bit for bit), see the module docstring, and ``head_chunk`` (the LM head on that many
    scored rows at a time, :func:`diffusion_elbo_tokens` and, for an AR scorer, :func:`ar_loglikelihood_tokens`;
    part of the identity when set). AR only:
    ``share_context`` (default True) scores the requests sharing a context (multiple-choice items) from one
    forward pass of it when every rule of the call acts per token (``scope="token"``; other scopes and
    ``share_context=False`` take one pass per request; see :func:`ar_loglikelihood_tokens`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        kind: str = "ar",
        mask_id: int | None = None,
        *,
        name: str = "",
        family: str = "",
        batch_size: int = 16,
        mc_num: int = 128,
        mc_batch: int = 16,
        seed: int = 1234,
        shift_logits: bool | None = None,
        padding_side: str = "left",
        add_bos_token: bool = False,
        max_length: int | None = None,
        greedy_check: bool | str = "off",
        cfg_scale: float = 0.0,
        dedupe: bool = True,
        ratio_bins: int = 0,
        sparsity: SparsityConfig | Sequence[SparsityConfig] | None = None,
        stats: SparsityStats | None = None,
        progress: bool = False,
        precision: str = "float32",
        share_context: bool = True,
        head_chunk: int | None = None,
    ):
        if kind not in ("ar", "diffusion"):
            raise ValueError(f"kind must be 'ar' or 'diffusion', got {kind!r}")
        uniform = getattr(family_named(family), "noise", "mask") == "uniform"  # DiffusionGemma: no mask token
        if kind == "diffusion" and mask_id is None and not uniform:
            from dllm_sparse.samplers.diffusion import resolve_mask_id  # the samplers' order: config, tokenizer, family

            try:
                mask_id = resolve_mask_id(model, tokenizer, None, family)
            except ValueError:
                raise ValueError("a diffusion scorer needs mask_id: the model config and the tokenizer name no "
                                 f"mask_token_id and the family {family!r} has no profile mask_id; pass "
                                 "mask_id=...") from None
        self.model, self.tokenizer, self.kind, self.mask_id = model, tokenizer, kind, mask_id
        self.name, self.family = name or type(model).__name__, family
        self.batch_size, self.mc_num, self.mc_batch, self.seed = int(batch_size), int(mc_num), int(mc_batch), seed
        if self.mc_num % self.mc_batch:
            raise ValueError(f"mc_num ({mc_num}) must be a multiple of mc_batch ({mc_batch})")
        # Dream shifts outside the model (its profile's logit_shift); a native LLaDAModelLM with
        # config.logit_shift shifts inside its forward.
        shifts_itself = bool(getattr(getattr(model, "config", None), "logit_shift", False))
        if shift_logits and shifts_itself:
            raise ValueError("this model already shifts its logits (config.logit_shift=True); shifting again would "
                             "misalign every prediction. Leave shift_logits at None/False.")
        profile = family_named(family)
        family_shift = profile is not None and profile.logit_shift
        self.shift_logits = (family_shift and not shifts_itself) if shift_logits is None else bool(shift_logits)
        self.padding_side, self.add_bos_token = padding_side, add_bos_token
        self.max_length = max_length or self._default_max_length()
        self.greedy_check = greedy_check_mode(greedy_check)
        self.cfg_scale = _check_cfg_scale(cfg_scale)
        self.precision = _check_precision(precision)
        if self.precision != "float32" and kind != "diffusion":
            raise ValueError(f"precision={precision!r} is a diffusion-ELBO setting; an autoregressive scorer "
                             "computes the exact log-likelihood (leave precision at 'float32')")
        self.dedupe, self.ratio_bins, self.progress = dedupe, ratio_bins, progress
        self.share_context = bool(share_context)
        self.head_chunk = check_head_chunk(head_chunk)
        if self.head_chunk is not None and self.precision == "official":
            raise ValueError(f"head_chunk={head_chunk} with precision='official': the official evaluation runs the "
                             "LM head over every position at once; leave head_chunk at None (or use precision "
                             "'float32')")
        self._sparsity = _as_configs(sparsity)
        self.stats = stats

    @classmethod
    def from_loaded(cls, lm, **kwargs) -> Scorer:
        """From a :class:`dllm_sparse.models.loading.LoadedModel`."""
        return cls(lm.model, lm.tokenizer, lm.kind, lm.mask_id, name=lm.name, family=lm.family, **kwargs)

    # ---- configuration -----------------------------------------------------------------------------------
    @property
    def sparsity(self) -> list[SparsityConfig]:
        """The default sparsity of every call (the constructor's ``sparsity``)."""
        return list(self._sparsity)

    @sparsity.setter
    def sparsity(self, value) -> None:
        self._sparsity = _as_configs(value)

    def configs_for(self, sparsity=SCORER_DEFAULT) -> list[SparsityConfig]:
        """The configs a call with ``sparsity`` attaches (validated; the scorer's own by default)."""
        return list(self._sparsity) if sparsity is SCORER_DEFAULT else _as_configs(sparsity)

    def identity(self, sparsity=SCORER_DEFAULT, cfg_scale: float | None = None) -> str:
        """Everything that changes the scores of a call with this ``sparsity`` (default: the scorer's) and
        ``cfg_scale`` (default: the scorer's): model, kind, sparsity ids and the ELBO settings (guidance and the
        greedy check appear only when used, so the identities of unguided, unchecked runs are unchanged)."""
        sp = "+".join(s.id for s in self.configs_for(sparsity)) or DENSE
        est = "exact"
        if self.kind == "diffusion":
            w = self.cfg_scale if cfg_scale is None else _check_cfg_scale(cfg_scale)
            est = f"mc{self.mc_num}/b{self.mc_batch}/seed{self.seed}/shift{int(self.shift_logits)}"
            est += f"/cfg{w!r}" if w > 0 else ""
            est += f"/greedy-{self.greedy_check}" if self.greedy_check != "off" else ""
            est += f"/precision-{self.precision}" if self.precision != "float32" else ""
        if self.kind == "ar" and not self.share_context:
            est += "/ctx-per-request"  # other float rounding than the shared context pass (the default)
        # Row-chunked head products may round differently on some BLAS (kernel choice depends on the row count).
        est += f"/head-chunk{self.head_chunk}" if self.head_chunk is not None else ""
        return f"{self.name}|{self.kind}|{sp}|{est}|bos{int(self.add_bos_token)}"

    @property
    def config_id(self) -> str:
        """:meth:`identity` of the scorer's default sparsity."""
        return self.identity()

    def _default_max_length(self) -> int:
        cfg = getattr(self.model, "config", None)
        for attr in ("max_position_embeddings", "max_sequence_length", "n_positions"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        v = getattr(self.tokenizer, "model_max_length", None)
        return v if isinstance(v, int) and 0 < v < 1_000_000 else 2048

    @contextmanager
    def sparsified(self, sparsity=SCORER_DEFAULT, stats=SCORER_DEFAULT) -> Iterator[SparsityStats | None]:
        """Attach ``sparsity`` (default: the scorer's; nothing when dense) for the duration of the block; yields
        the statistics it records into (``stats``, default: the scorer's, created on first use; ``None``: not
        kept)."""
        configs = self.configs_for(sparsity)
        if stats is SCORER_DEFAULT:
            if configs and self.stats is None:
                self.stats = SparsityStats()
            stats = self.stats
        if not configs:
            yield stats
            return
        with ExitStack() as stack:
            for cfg in configs:
                stack.enter_context(sparsify(self.model, cfg, stats=stats))
            yield stats

    # ---- tokenisation ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        bos = self.tokenizer.bos_token_id
        # A chat-templated text may begin with the BOS token already (e.g. Llama 3's template): not a second one.
        if self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    @property
    def prefix_id(self) -> int:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self.tokenizer, attr, None)
            if v is not None:
                return int(v)
        raise ValueError("the tokenizer has no BOS/EOS/PAD token to stand for an empty context")

    @property
    def pad_id(self) -> int:
        v = getattr(self.tokenizer, "pad_token_id", None)
        if v is None:
            v = getattr(self.tokenizer, "eos_token_id", None)
        return int(v) if v is not None else 0

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = list(self.tokenizer.encode(continuation, add_special_tokens=False))
            return ([self.prefix_id], cont) if not cont or cont[0] != self.prefix_id else (cont[:1], cont[1:])
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- scoring -----------------------------------------------------------------------------------------
    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                             keys: Sequence[Hashable] | None = None, *, sparsity=SCORER_DEFAULT,
                             stats=SCORER_DEFAULT, cfg_scale: float | None = None) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` of token-id (context, continuation) requests, every forward pass
        sparsified with ``sparsity`` (default: the scorer's) and measured into ``stats`` (default: the scorer's).
        ``cfg_scale``: the guidance of this call (diffusion; default: the scorer's)."""
        cfg_scale = self.cfg_scale if cfg_scale is None else _check_cfg_scale(cfg_scale)
        if cfg_scale > 0 and self.kind != "diffusion":
            raise ValueError(f"cfg_scale={cfg_scale} is a diffusion-ELBO setting; an autoregressive scorer computes "
                             "the exact log-likelihood (leave cfg_scale at 0)")
        # A shared context pass sparsifies its tokens as one pass per request does only when every rule acts
        # per token; an outside sparsify() block is not seen here (pass share_context=False for one of those).
        share = self.share_context and all(c.rule.scope == "token" for c in self.configs_for(sparsity))
        with self.sparsified(sparsity, stats) as stats:
            if self.kind == "ar":
                return ar_loglikelihood_tokens(
                    self.model, requests, batch_size=self.batch_size, padding_side=self.padding_side,
                    pad_id=self.pad_id, max_length=self.max_length, stats=stats, progress=self.progress,
                    share_context=share, head_chunk=self.head_chunk)
            if self.mask_id is None:  # uniform-noise block diffusion (DiffusionGemma)
                from dllm_sparse.eval.block_diffusion_elbo import block_diffusion_loglikelihood

                unsupported = {k: v for k, v in (("cfg_scale", cfg_scale), ("greedy_check", self.greedy_check),
                               ("precision", self.precision), ("head_chunk", self.head_chunk))
                               if v not in (0.0, "off", "float32", None)}
                if unsupported:
                    raise ValueError(f"{unsupported}: settings of the masked-diffusion ELBO that the block-diffusion "
                                     "score of this uniform-noise model does not have; leave them at their defaults")

                def draw(L: int, key: Hashable):  # the ELBO's draws (common random numbers)
                    g = item_generator(self.seed, key)
                    return elbo_masks(L, self.mc_num, self.mc_batch, g), g

                keys = keys if keys is not None else [_content_key(c, a) for c, a in requests]
                return block_diffusion_loglikelihood(self.model, requests, draw=draw, keys=keys,
                                                     mc_batch=self.mc_batch, stats=stats, ratio_bins=self.ratio_bins)
            return diffusion_elbo_tokens(
                self.model, requests, mask_id=self.mask_id, mc_num=self.mc_num, mc_batch=self.mc_batch,
                batch_size=max(self.batch_size, 1), seed=self.seed, keys=keys, shift_logits=self.shift_logits,
                dedupe=self.dedupe, cfg_scale=cfg_scale, greedy_check=self.greedy_check, stats=stats,
                ratio_bins=self.ratio_bins, progress=self.progress, precision=self.precision,
                head_chunk=self.head_chunk)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], keys: Sequence[Hashable] | None = None, *,
                      sparsity=SCORER_DEFAULT, stats=SCORER_DEFAULT,
                      cfg_scale: float | None = None) -> list[tuple[float, bool]]:
        """lm-eval's ``loglikelihood`` on text pairs; ``keys`` name the items (for the ELBO's masks);
        ``sparsity`` / ``stats`` / ``cfg_scale`` as in :meth:`loglikelihood_tokens`."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], keys, sparsity=sparsity,
                                         stats=stats, cfg_scale=cfg_scale)

    def loglikelihood_rolling(self, texts: Sequence[str], keys: Sequence[Hashable] | None = None, *,
                              sparsity=SCORER_DEFAULT, stats=SCORER_DEFAULT,
                              cfg_scale: float | None = None) -> list[tuple[float, int]]:
        """``(log-likelihood of the whole text, number of tokens)`` per text (AR exact, diffusion ELBO).

        Texts longer than the model's context are split into windows (:func:`rolling_windows`). ``sparsity`` /
        ``stats`` / ``cfg_scale`` as in :meth:`loglikelihood_tokens`."""
        windows, owner, wkeys = [], [], []
        for t, text in enumerate(texts):
            tokens = list(self.tokenizer.encode(text, add_special_tokens=False))
            for w, win in enumerate(rolling_windows(tokens, self.prefix_id, self.max_length)):
                windows.append(win)
                owner.append(t)
                wkeys.append((keys[t] if keys is not None else _content_key(*win), w))
        scores = self.loglikelihood_tokens(windows, wkeys, sparsity=sparsity, stats=stats, cfg_scale=cfg_scale)
        out = [[0.0, 0] for _ in texts]
        for t, (ll, _), win in zip(owner, scores, windows, strict=True):
            out[t][0] += ll
            out[t][1] += len(win[1])
        return [(ll, n) for ll, n in out]


# ---------------------------------------------------------------------------------------------------------
# A dependency-free tokenizer for tests and toy models
# ---------------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 4; 0 pad, 1 bos, 2 eos, 3 mask (vocabulary 260). For tests."""

    pad_token_id, bos_token_id, eos_token_id, mask_token_id = 0, 1, 2, 3
    vocab_size = 260
    model_max_length = 1024
    name_or_path = "byte-tokenizer"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 4 for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", errors="replace")

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def __call__(self, texts, add_special_tokens: bool = False, **_):
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def __len__(self) -> int:
        return self.vocab_size

