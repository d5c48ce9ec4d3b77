"""The chunked LM head (``head_chunk``) of the ELBO and of the AR scorer: equal to the unchunked path, refused
where it cannot apply.

The references are independent computations of the same values: the full model forward (head over every
position, no split-off head), then a plain cross-entropy over the masked positions of each drawn row (ELBO) or
a float64 log-softmax at every continuation position of one unpadded request (AR)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from byte_tokenizer import ByteTokenizer

from dllm_sparse.eval.scoring.common import item_generator
from dllm_sparse.eval.scoring.elbo import diffusion_elbo_tokens, elbo_masks
from dllm_sparse.eval.scoring.scorer import Scorer
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
    with pytest.raises(ValueError, match="precision='official'"):
        Scorer(_model(), ByteTokenizer(), "diffusion", mask_id=99, precision="official", head_chunk=8)
    plain = Scorer(_model(), ByteTokenizer(), "diffusion", mask_id=99, mc_num=8, mc_batch=4)
    chunked = Scorer(_model(), ByteTokenizer(), "diffusion", mask_id=99, mc_num=8, mc_batch=4, head_chunk=64)
    assert "head-chunk64" in chunked.identity() and "head-chunk" not in plain.identity()


# ---- the AR scorer ----------------------------------------------------------------------------------------
# Long continuations (a rolling window scores every position) next to short ones, in one batch of mixed lengths.
AR_REQUESTS = [([1], list(range(3, 40))), ([5, 17, 3, 9], [40, 2, 11, 30, 7, 8, 60]), ([7, 7, 21], [2]),
               ([1, 2], [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61])]


def _ar_reference(model, requests):
    """Per request alone (no padding): sum of float64 log-softmax at the continuation, and all-argmax."""
    out = []
    for ctx, cont in requests:
        ids = torch.tensor([ctx + cont[:-1]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(ctx) - 1:].double()
        t = torch.tensor(cont)
        out.append((F.log_softmax(logits, -1).gather(-1, t[:, None]).sum().item(),
                     bool((logits.argmax(-1) == t).all())))
    return out


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_ar_chunked_head_equals_unchunked_and_the_reference(chunk, padding_side):
    from conftest import build_tiny_model

    from dllm_sparse.eval.scoring.autoregressive import ar_loglikelihood_tokens

    model = build_tiny_model("llama").eval()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    kw = dict(batch_size=3, padding_side=padding_side)
    plain = ar_loglikelihood_tokens(model, AR_REQUESTS, **kw)
    assert calls  # the unchunked path runs the head module inside the forward
    calls.clear()
    chunked = ar_loglikelihood_tokens(model, AR_REQUESTS, head_chunk=chunk, **kw)
    assert not calls  # chunked: the head was split off the forward and applied to the rows alone
    ref = _ar_reference(model, AR_REQUESTS)
    for (a, ga), (b, gb), (r, gr) in zip(plain, chunked, ref, strict=True):
        assert ga == gb == gr
        assert b == pytest.approx(a, rel=1e-5, abs=1e-5)
        assert b == pytest.approx(r, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("how", ["peft", "compile", "dispatch_model", "cpu_offload"])
def test_ar_chunked_head_on_a_wrapped_model(how):
    """Through a PeftModel and torch.compile the head is split off inside the wrapped model; with accelerate's
    cpu_offload the head's weights are on the meta device, so it stays in the forward and only the float32
    logits and the log-softmax are chunked. The numbers are the plain model's either way."""
    from conftest import build_tiny_model, wrapped_model

    from dllm_sparse.eval.scoring.autoregressive import ar_loglikelihood_tokens

    wrapped, reference = wrapped_model(build_tiny_model("llama").eval(), how)
    got = ar_loglikelihood_tokens(wrapped, AR_REQUESTS, batch_size=2, head_chunk=4)
    want = _ar_reference(reference, AR_REQUESTS)
    assert [g for _, g in got] == [w for _, w in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=1e-4, abs=1e-4)


def test_ar_scorer_head_chunk_is_in_the_identity_and_reaches_the_scorer():
    from conftest import build_tiny_model

    model = build_tiny_model("llama").eval()
    plain = Scorer(model, ByteTokenizer(), "ar", batch_size=2)
    chunked = Scorer(model, ByteTokenizer(), "ar", batch_size=2, head_chunk=3)
    assert "head-chunk3" in chunked.identity() and "head-chunk" not in plain.identity()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    texts = ["a rolling window of bytes long enough to span several chunks"]
    got, want = chunked.loglikelihood_rolling(texts), plain.loglikelihood_rolling(texts)
    assert len(calls) == 1  # only the unchunked scorer ran the head inside its forward
    assert got[0] == pytest.approx(want[0], rel=1e-5)
