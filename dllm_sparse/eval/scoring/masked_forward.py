"""One forward pass over masked rows of a masked-diffusion model, optionally with classifier-free guidance (the
official ``get_log_likelihood``), and the checks of the ELBO settings (guidance, precision, greedy check): what the
ELBO (:mod:`~dllm_sparse.eval.scoring.elbo`) and the greedy check (:mod:`~dllm_sparse.eval.scoring.greedy`) share."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from dllm_sparse.eval.scoring.common import tagged
from dllm_sparse.models.families import without_lm_head
from dllm_sparse.models.loading import model_device

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


def check_cfg_scale(cfg_scale: float) -> float:
    w = float(cfg_scale)
    if not 0 <= w < float("inf"):  # also catches NaN; an infinite w makes every guided log-likelihood NaN
        raise ValueError(f"cfg_scale must be a finite number >= 0 (0 = no guidance; the official LLaDA evaluation "
                         f"uses 0.5-2.0 on some tasks), got {cfg_scale!r}")
    return w


ELBO_PRECISIONS = ("float32", "official")


def check_precision(precision: str) -> str:
    if precision not in ELBO_PRECISIONS:
        raise ValueError(f"precision must be one of {ELBO_PRECISIONS} ('float32' = guidance and cross-entropy in "
                         f"float32, the default; 'official' = the official LLaDA evaluation bit for bit, in the "
                         f"model's dtype), got {precision!r}")
    return precision


def guided_rows(model: torch.nn.Module, noisy: torch.Tensor, answer_pos: torch.Tensor, bi: torch.Tensor,
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
    with torch.no_grad(), tagged(stats, tag, groups, row_weights), \
            (nullcontext(None) if official else without_lm_head(model)) as head:
        out = model(input_ids=x.to(device)).logits  # hidden states when head is not None
    if shift_logits:
        out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
    n = noisy.shape[0]
    b, t = bi.to(out.device), ti.to(out.device)
    sel = out[b, t] if cfg_scale == 0 else torch.cat([out[:n][b, t], out[n:][b, t]])
    return sel, head


def rows_to_logits(sel: torch.Tensor, head: torch.nn.Linear | None, cfg_scale: float,
                    official: bool) -> torch.Tensor:
    """Guided logits of the rows from :func:`guided_rows` (conditional rows, then as many unconditional ones
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


def guided_logits(model: torch.nn.Module, noisy: torch.Tensor, answer_pos: torch.Tensor, bi: torch.Tensor,
                   ti: torch.Tensor, *, mask_id: int, cfg_scale: float, shift_logits: bool, stats, tag, groups,
                   row_weights: torch.Tensor | None = None, precision: str = "float32") -> torch.Tensor:
    """Float32 logits at the positions (bi, ti) of the rows ``noisy`` [n, T], from ONE forward pass
    (``precision="official"``: in the model's dtype, guided in it, with the LM head over every position);
    :func:`guided_rows` then :func:`rows_to_logits`."""
    sel, head = guided_rows(model, noisy, answer_pos, bi, ti, mask_id=mask_id, cfg_scale=cfg_scale,
                             shift_logits=shift_logits, stats=stats, tag=tag, groups=groups, row_weights=row_weights,
                             precision=precision)
    return rows_to_logits(sel, head, cfg_scale, precision == "official")


def masked_ce(model, noisy, answer_pos, bi, ti, target, *, head_chunk: int | None, want_argmax: bool,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy (float32 path) of every scored row (bi, ti) against ``target``, and its argmax when asked:
    the LM head, the guidance and the cross-entropy run on ``head_chunk`` rows at a time (None: all at once), so
    at most head_chunk x vocabulary logits (x 2 with guidance) exist at once. Each row's value is computed from
    its own hidden state alone either way."""
    sel, head = guided_rows(model, noisy, answer_pos, bi, ti, **kwargs)
    cfg_scale = kwargs["cfg_scale"]
    n = len(bi)
    step = n if head_chunk is None else head_chunk
    ces, argmaxes = [], []
    for s in range(0, n, max(step, 1)):
        e = min(s + step, n)  # never past the conditional rows: the unconditional ones follow them in sel
        part = sel[s:e] if cfg_scale == 0 else torch.cat([sel[s:e], sel[n + s:n + e]])
        lg = rows_to_logits(part, head, cfg_scale, official=False)
        tgt = target[s:e].to(lg.device)
        ces.append(F.cross_entropy(lg, tgt, reduction="none"))
        if want_argmax:
            argmaxes.append(lg.argmax(-1))
        del lg
    ce = torch.cat(ces) if ces else sel.new_zeros(0, dtype=torch.float32)
    return ce, (torch.cat(argmaxes) if want_argmax else None)
