"""The ELBO's chunked LM head (``head_chunk``): equal to the unchunked path, refused where it cannot apply.

The reference is an independent computation of the same estimate: the full model forward (head over every
position, no split-off head) and a plain cross-entropy over the masked positions of each drawn row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dllm_sparse.eval.likelihood import ByteTokenizer, Scorer, diffusion_elbo_tokens, elbo_masks, item_generator
from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config

REQUESTS = [([5, 17, 3, 9], [40, 2, 11, 30, 7, 8, 60]), ([7, 7, 21], [2, 11, 30]),
            ([1, 2, 3, 4], [50, 51, 52, 53, 54, 55, 56])]


def _model() -> LLaDAModelLM:
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_llada_config()).eval()


def _reference(model, requests, mc_num, mc_batch, seed, keys, cfg_scale):
    """mean over the mc_num drawn rows of (L / #masked) x the summed CE of the masked answer positions."""
    out = []
    for (prompt, answer), key in zip(requests, keys, strict=True):
        L = len(answer)
        masks = elbo_masks(L, mc_num, mc_batch, item_generator(seed, key))
        clean = torch.tensor(prompt + answer)
        total = 0.0
        for m in masks:
            is_mask = torch.zeros(len(clean), dtype=torch.bool)
            is_mask[len(prompt):] = m
            noisy = clean.masked_fill(is_mask, 99)
            with torch.no_grad():
                logits = model(noisy[None]).logits[0].double()
                if cfg_scale > 0:
                    uncond = noisy.clone()
                    uncond[:len(prompt)] = 99
                    un = model(uncond[None]).logits[0].double()
                    logits = un + (cfg_scale + 1) * (logits - un)
            ce = F.cross_entropy(logits[is_mask], clean[is_mask], reduction="sum").item()
            total += ce * L / int(m.sum())
        out.append(-total / mc_num)
    return out


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_head_equals_unchunked_and_the_reference(cfg_scale, chunk):
    model = _model()
    keys = list(range(len(REQUESTS)))
    kw = dict(mask_id=99, mc_num=8, mc_batch=4, batch_size=4, seed=3, keys=keys, cfg_scale=cfg_scale,
              greedy_check="one_pass")
    plain = diffusion_elbo_tokens(model, REQUESTS, **kw)
    chunked = diffusion_elbo_tokens(model, REQUESTS, head_chunk=chunk, **kw)
    for (a, ga), (b, gb) in zip(plain, chunked, strict=True):
        assert ga == gb
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6)  # rows are computed alone either way: float rounding only
    ref = _reference(model, REQUESTS, 8, 4, 3, keys, cfg_scale)
    assert [ll for ll, _ in chunked] == pytest.approx(ref, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "8"])
def test_bad_head_chunk_is_refused(bad):
    with pytest.raises(ValueError, match="head_chunk must be a whole number of rows >= 1"):
        diffusion_elbo_tokens(_model(), REQUESTS[:1], mask_id=99, mc_num=4, mc_batch=4, head_chunk=bad)
    with pytest.raises(ValueError, match="head_chunk must be a whole number"):
        Scorer(_model(), ByteTokenizer(), "diffusion", mask_id=99, head_chunk=bad)


def test_head_chunk_is_refused_where_it_cannot_apply_and_is_in_the_identity():
    with pytest.raises(ValueError, match="precision='official'"):
        diffusion_elbo_tokens(_model(), REQUESTS[:1], mask_id=99, mc_num=4, mc_batch=4, head_chunk=8,
                              precision="official")
    with pytest.raises(ValueError, match="kind='ar'"):
        Scorer(_model(), ByteTokenizer(), "ar", head_chunk=8)
    plain = Scorer(_model(), ByteTokenizer(), "diffusion", mask_id=99, mc_num=8, mc_batch=4)
    chunked = Scorer(_model(), ByteTokenizer(), "diffusion", mask_id=99, mc_num=8, mc_batch=4, head_chunk=64)
    assert "head-chunk64" in chunked.identity() and "head-chunk" not in plain.identity()
