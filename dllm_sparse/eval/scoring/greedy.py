"""The official LLaDA greedy check of a masked-diffusion model's (prompt, answer) requests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dllm_sparse.eval.scoring.masked_forward import check_cfg_scale, check_precision, guided_logits
from dllm_sparse.sparsity.stats import SparsityStats


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
    cfg_scale = check_cfg_scale(cfg_scale)
    official = check_precision(precision) == "official"
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
                lg = guided_logits(model, canvas, answer_pos, bi, ti, mask_id=mask_id, cfg_scale=cfg_scale,
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
