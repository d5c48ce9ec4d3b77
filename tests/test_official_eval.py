"""The official LLaDA evaluation, checked against references written from its definitions (docs/generation.md):
the guided ELBO (classifier-free guidance), the iterative greedy check, and the statistics of the de-duplicated
ELBO."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from byte_tokenizer import ByteTokenizer
from conftest import build_tiny_model

from dllm_sparse.eval.scoring.common import item_generator
from dllm_sparse.eval.scoring.elbo import diffusion_elbo_tokens, elbo_masks
from dllm_sparse.eval.scoring.greedy import iterative_greedy_check
from dllm_sparse.eval.scoring.masked_forward import greedy_check_mode
from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.rules import TopP


def _llada(seed=3):
    from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config

    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_llada_config(init_std=0.2)).eval()


# ---- guided ELBO ----------------------------------------------------------------------------------------------


def _row_loss(model, prompt, answer, subset, mask_id, w):
    """Loss of one masked row, written from the formula: cross-entropy over the masked answer positions of
    uncond + (w + 1)(cond − uncond), times L / (number masked); each half its own forward pass, in float64."""
    P, L = len(prompt), len(answer)
    noisy = torch.tensor([prompt + answer])
    for j in subset:
        noisy[0, P + j] = mask_id
    with torch.no_grad():
        cond = model(input_ids=noisy).logits[0].double()
        uncond_in = noisy.clone()
        uncond_in[0, :P] = mask_id
        uncond = model(input_ids=uncond_in).logits[0].double()
    logits = cond if w == 0 else uncond + (w + 1) * (cond - uncond)
    pos = [P + j for j in subset]
    ce = F.cross_entropy(logits[pos], torch.tensor([answer[j] for j in subset]), reduction="sum")
    return ce.item() * L / len(subset)


def _all_subsets(L):
    return [s for k in range(1, L + 1) for s in itertools.combinations(range(L), k)]


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("answer", [[11, 12], [20, 21, 22]])
def test_guided_elbo_equals_the_formula_on_every_mask(w, answer):
    model = _llada()
    mask_id = model.config.mask_token_id
    prompt, key, seed, mc_num, mc_batch = [5, 6, 7], "item", 3, 64, 4
    (ll, _), = diffusion_elbo_tokens(model, [(prompt, answer)], mask_id=mask_id, mc_num=mc_num, mc_batch=mc_batch,
                                     seed=seed, keys=[key], cfg_scale=w)
    # The estimate is the average of the row losses over the drawn masks: enumerate every possible mask and
    # weight its brute-force loss by how often it was drawn (the same generator, so the same masks).
    masks = elbo_masks(len(answer), mc_num, mc_batch, item_generator(seed, key))
    freq = {s: 0 for s in _all_subsets(len(answer))}
    for m in masks:
        freq[tuple(m.nonzero().flatten().tolist())] += 1
    ref = -sum(n * _row_loss(model, prompt, answer, s, mask_id, w) for s, n in freq.items()) / mc_num
    assert ll == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_guided_elbo_is_an_unbiased_estimate_of_its_enumerated_expectation():
    model = _llada()
    mask_id = model.config.mask_token_id
    prompt, answer, w = [5, 6, 7], [11, 12], 1.0
    L = len(answer)
    # Expectation over the mask distribution: k uniform on 1..L, then a uniform subset of k positions.
    losses = {s: _row_loss(model, prompt, answer, s, mask_id, w) for s in _all_subsets(L)}
    per_k = [[v for s, v in losses.items() if len(s) == k] for k in range(1, L + 1)]
    expected = -sum(sum(v) / len(v) for v in per_k) / L
    var = sum((v - (-expected)) ** 2 for vs in per_k for v in vs) / sum(len(v) for v in per_k)
    mc_num = 4000  # cheap: de-duplication leaves 3 distinct rows
    (ll, _), = diffusion_elbo_tokens(model, [(prompt, answer)], mask_id=mask_id, mc_num=mc_num, mc_batch=2,
                                     seed=0, keys=["x"], cfg_scale=w)
    assert abs(ll - expected) < 4 * (var / mc_num) ** 0.5 + 1e-9
    assert ll != pytest.approx(diffusion_elbo_tokens(model, [(prompt, answer)], mask_id=mask_id, mc_num=mc_num,
                                                     mc_batch=2, seed=0, keys=["x"])[0][0])  # guidance matters


def test_guidance_zero_is_todays_estimate_and_guided_rows_share_one_forward_pass():
    model = _llada()
    mask_id = model.config.mask_token_id
    reqs = [([5, 6, 7], [8, 9, 10, 11]), ([3, 4], [13, 14, 15])]
    kw = dict(mask_id=mask_id, mc_num=8, mc_batch=4, seed=1, keys=["a", "b"])
    assert diffusion_elbo_tokens(model, reqs, cfg_scale=0.0, **kw) == diffusion_elbo_tokens(model, reqs, **kw)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].clone()), with_kwargs=True)
    try:
        diffusion_elbo_tokens(model, reqs, **kw)
        plain = list(calls)
        calls.clear()
        diffusion_elbo_tokens(model, reqs, cfg_scale=0.5, **kw)
    finally:
        handle.remove()
    assert len(calls) == len(plain)  # the unconditional half rides in the same forward pass
    for guided, cond in zip(calls, plain, strict=True):
        n = cond.shape[0]
        assert torch.equal(guided[:n], cond)  # common random numbers: the unguided estimate's masks
        prompt_len = 3 if cond.shape[1] == 7 else 2
        assert (guided[n:, :prompt_len] == mask_id).all() and torch.equal(guided[n:, prompt_len:],
                                                                          cond[:, prompt_len:])
    with pytest.raises(ValueError, match="cfg_scale"):
        diffusion_elbo_tokens(model, reqs, cfg_scale=-1, **kw)


def test_scorer_cfg_scale_per_call_and_in_its_identity():
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3)
    kw = dict(mask_id=3, mc_num=4, mc_batch=2)
    pairs = [("hello", " world")]
    plain = Scorer(model, ByteTokenizer(), "diffusion", **kw)
    guided = Scorer(model, ByteTokenizer(), "diffusion", cfg_scale=0.5, **kw)
    assert guided.loglikelihood(pairs) == plain.loglikelihood(pairs, cfg_scale=0.5)
    assert guided.loglikelihood(pairs, cfg_scale=0.0) == plain.loglikelihood(pairs)
    assert guided.loglikelihood(pairs) != plain.loglikelihood(pairs)
    assert "cfg" not in plain.identity() and "/cfg0.5" in guided.identity()
    assert plain.identity(cfg_scale=0.5) == guided.identity()
    ar = Scorer(build_tiny_model("llama", vocab_size=260), ByteTokenizer(), "ar")
    with pytest.raises(ValueError, match="diffusion-ELBO setting"):
        ar.loglikelihood(pairs, cfg_scale=1.0)


# ---- de-duplication keeps the statistics of every drawn row ----------------------------------------------------


def test_dedupe_gives_identical_likelihood_and_statistics():
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3)
    pairs = [("ab", " cd"), ("hello", " x")]  # short answers: many repeated masks
    out = {}
    for dedupe in (True, False):
        s = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, mc_num=16, mc_batch=4, batch_size=64,
                   dedupe=dedupe, ratio_bins=2, sparsity=SparsityConfig("input", TopP(0.8)))
        out[dedupe] = (s.loglikelihood(pairs), s.stats.records())
    (ll_d, rec_d), (ll_n, rec_n) = out[True], out[False]
    assert [ll for ll, _ in ll_d] == pytest.approx([ll for ll, _ in ll_n], rel=1e-9)
    assert [(r["tag"], r["group"], r["layer"], r["tokens"]) for r in rec_d] == \
        [(r["tag"], r["group"], r["layer"], r["tokens"]) for r in rec_n]
    assert [r["sparsity"] for r in rec_d] == pytest.approx([r["sparsity"] for r in rec_n], abs=1e-12)
    assert rec_d[0]["tokens"] == 16 * (2 + 3) + 16 * (5 + 2)  # every drawn row counted, not only the unique ones


# ---- the official (iterative) greedy check ---------------------------------------------------------------------


def _reference_iterative(model, prompt, answer, mask_id):
    """From the definition: unmask one position per forward pass, the most confident masked one (softmax
    probability of its argmax; ties: lowest position), the whole answer as one block."""
    P, L = len(prompt), len(answer)
    x = prompt + [mask_id] * L
    masked = set(range(P, P + L))
    for _ in range(L):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([x])).logits[0].double()
        best, best_conf, best_tok = None, -1.0, None
        for j in sorted(masked):
            p = torch.softmax(logits[j], -1)
            tok = int(p.argmax())
            if p[tok].item() > best_conf:
                best, best_conf, best_tok = j, p[tok].item(), tok
        x[best] = best_tok
        masked.remove(best)
    return x[P:]


def test_iterative_greedy_check_equals_the_reference_loop_and_differs_from_one_pass():
    model = _llada()
    mask_id = model.config.mask_token_id
    prompts = [[5, 6, 7], [9, 8, 7], [30, 31, 32], [3, 4, 5], [40, 41, 42], [50, 51, 52]]
    L = 5
    decoded = [_reference_iterative(model, p, [0] * L, mask_id) for p in prompts]
    requests = [(p, d) for p, d in zip(prompts, decoded, strict=True)]
    wrong = [(p, d[:-1] + [(d[-1] + 1) % 100]) for p, d in requests]  # one token off: not greedy
    got = iterative_greedy_check(model, requests + wrong, mask_id=mask_id, batch_size=4)
    assert got == [True] * len(requests) + [False] * len(wrong)
    # The one-pass check (whole answer masked, one argmax) is another definition: it rejects targets that the
    # official check accepts.
    one_pass = [g for _, g in diffusion_elbo_tokens(model, requests, mask_id=mask_id, mc_num=2, mc_batch=2,
                                                    greedy_check="one_pass")]
    iterative = [g for _, g in diffusion_elbo_tokens(model, requests, mask_id=mask_id, mc_num=2, mc_batch=2,
                                                     greedy_check="iterative")]
    assert iterative == [True] * len(requests)
    assert False in one_pass
    with torch.no_grad():
        for (p, d), g in zip(requests, one_pass, strict=True):
            x = torch.tensor([p + [mask_id] * L])
            assert g == (model(input_ids=x).logits[0, len(p):].argmax(-1).tolist() == d)


def test_greedy_check_modes():
    assert greedy_check_mode(True) == "iterative" and greedy_check_mode(False) == "off"
    assert greedy_check_mode("one-pass") == "one_pass" and greedy_check_mode(None) == "off"
    with pytest.raises(ValueError, match="greedy_check must be one of"):
        greedy_check_mode("sometimes")
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3)
    s = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, mc_num=2, mc_batch=2, greedy_check=True)
    assert s.greedy_check == "iterative" and "/greedy-iterative" in s.identity()
    assert "greedy" not in Scorer(model, ByteTokenizer(), "diffusion", mask_id=3).identity()


# ---- precision="official": the official computation in bf16, bit for bit ---------------------------------------


def _official_logits(model, batch, prompt_len, mask_id, cfg):
    """The official ``get_logits``: with cfg > 0 the batch with its prompt masked rides in the same forward pass,
    and the guidance runs on the model's logits in their own dtype."""
    if cfg > 0:
        un_batch = batch.clone()
        un_batch[:, :prompt_len] = mask_id
        batch = torch.cat([batch, un_batch])
    logits = model(input_ids=batch).logits
    if cfg > 0:
        logits, un_logits = torch.chunk(logits, 2, dim=0)
        logits = un_logits + (cfg + 1) * (logits - un_logits)
    return logits


def _official_loglikelihood(model, prefix, target, masks, mc_batch, mask_id, cfg):
    """The official ``get_loglikelihood`` on given answer masks [mc_num, L] (the draw itself is elbo_masks'):
    per mini-batch, cross-entropy of the masked positions in the logits' dtype divided by the row's masked
    fraction (float32), summed in float32 and divided by the rows; then minus the mean of the ``.item()`` values."""
    P, L = len(prefix), len(target)
    seq = torch.tensor(prefix + target)[None].repeat(mc_batch, 1)
    loss_acc = []
    with torch.no_grad():
        for s in range(0, len(masks), mc_batch):
            m = masks[s:s + mc_batch]
            is_mask = torch.cat([torch.zeros(mc_batch, P, dtype=torch.bool), m], dim=1)
            perturbed = torch.where(is_mask, mask_id, seq)
            p_mask = (m.sum(dim=1) / L).unsqueeze(1).repeat(1, seq.shape[1])
            mask_indices = perturbed == mask_id
            logits = _official_logits(model, perturbed, P, mask_id, cfg)
            loss = F.cross_entropy(logits[mask_indices], seq[mask_indices], reduction="none") / p_mask[mask_indices]
            loss_acc.append((loss.sum() / mc_batch).item())
    return -sum(loss_acc) / len(loss_acc)


def _official_greedy(model, prefix, target, mask_id, cfg):
    """The official ``suffix_greedy_prediction``: L passes, each keeps the argmax of the most confident masked
    position (softmax in float32) and re-masks the others."""
    P, L = len(prefix), len(target)
    seq = torch.full((1, P + L), mask_id)
    seq[0, :P] = torch.tensor(prefix)
    with torch.no_grad():
        for _ in range(L):
            mask_index = seq == mask_id
            logits = _official_logits(model, seq, P, mask_id, cfg)[mask_index]
            x0 = logits.argmax(-1)
            confidence = torch.softmax(logits.to(torch.float32), dim=-1).gather(-1, x0[:, None]).squeeze(-1)
            index = torch.sort(confidence, descending=True).indices
            x0[index[1:]] = mask_id
            seq[mask_index] = x0.clone()
    return bool((seq[0, P:] == torch.tensor(target)).all())


@pytest.fixture(scope="module")
def bf16_llada():
    return _llada().to(torch.bfloat16)


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
def test_official_precision_is_the_official_elbo_bit_for_bit_in_bf16(bf16_llada, w):
    model = bf16_llada
    mask_id = model.config.mask_token_id
    mc_num, mc_batch, seed = 16, 4, 5
    requests = [([5, 6, 7], [11, 12, 13, 14]), ([9, 8], [20, 21, 22]), ([30, 31, 32], [40, 41, 42, 43])]
    keys = ["a", "b", "c"]
    got = diffusion_elbo_tokens(model, requests, mask_id=mask_id, mc_num=mc_num, mc_batch=mc_batch, seed=seed,
                                keys=keys, cfg_scale=w, precision="official", batch_size=64)
    for (prompt, answer), key, (ll, _) in zip(requests, keys, got, strict=True):
        masks = elbo_masks(len(answer), mc_num, mc_batch, item_generator(seed, key))
        assert ll == _official_loglikelihood(model, prompt, answer, masks, mc_batch, mask_id, w)  # exact
    # The default guides and scores in float32: the formula in float64 on the same bf16 logits, up to float32
    # rounding (one item per call, so its forward passes and LM-head rows are the reference's).
    for (prompt, answer), key in zip(requests, keys, strict=True):
        (ll, _), = diffusion_elbo_tokens(model, [(prompt, answer)], mask_id=mask_id, mc_num=mc_num,
                                         mc_batch=mc_batch, seed=seed, keys=[key], cfg_scale=w, dedupe=False,
                                         batch_size=mc_batch)
        masks = elbo_masks(len(answer), mc_num, mc_batch, item_generator(seed, key))
        assert ll == pytest.approx(_float64_elbo(model, prompt, answer, masks, mc_batch, mask_id, w), rel=1e-5)


def _float64_elbo(model, prefix, target, masks, mc_batch, mask_id, w):
    """The ELBO formula in float64 on the model's logits at the masked positions, each mini-batch one forward
    pass (with its prompt-masked copy when w > 0) and the LM head applied to the masked rows, as the scorer
    runs them (so the bf16 logits are the same ones)."""
    from dllm_sparse.models.families import without_lm_head

    P, L = len(prefix), len(target)
    seq = torch.tensor(prefix + target)[None].repeat(mc_batch, 1)
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(masks), mc_batch):
            m = masks[s:s + mc_batch]
            is_mask = torch.cat([torch.zeros(mc_batch, P, dtype=torch.bool), m], dim=1)
            noisy = torch.where(is_mask, mask_id, seq)
            uncond = noisy.clone()
            uncond[:, :P] = mask_id
            x = noisy if w == 0 else torch.cat([noisy, uncond])
            bi, ti = is_mask.nonzero(as_tuple=True)
            with without_lm_head(model) as head:
                out = model(input_ids=x).logits
            sel = out[bi, ti] if w == 0 else torch.cat([out[:mc_batch][bi, ti], out[mc_batch:][bi, ti]])
            if head is not None:
                sel = F.linear(sel, head.weight, head.bias)
            lg = sel.double()
            if w > 0:
                cond, uncond = lg[:len(bi)], lg[len(bi):]
                lg = uncond + (w + 1) * (cond - uncond)
            ce = F.cross_entropy(lg, seq[bi, ti], reduction="none")
            total += sum(ce[bi == r].sum().item() * L / int(m[r].sum()) for r in range(mc_batch))
    return -total / len(masks)


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_official_precision_greedy_check_is_the_official_check_in_bf16(bf16_llada, w):
    model = bf16_llada
    mask_id = model.config.mask_token_id
    prompts = [[5, 6, 7], [9, 8, 7], [30, 31, 32], [3, 4, 5]]
    L = 4
    requests = []
    for p in prompts:  # the official decoding as the target (greedy), and the same target one token off
        decoded = _reference_decode_official(model, p, L, mask_id, w)
        requests += [(p, decoded), (p, decoded[:-1] + [(decoded[-1] + 1) % 100])]
    expected = [_official_greedy(model, p, a, mask_id, w) for p, a in requests]
    assert True in expected and False in expected
    assert iterative_greedy_check(model, requests, mask_id=mask_id, batch_size=8, cfg_scale=w,
                                  precision="official") == expected


def _reference_decode_official(model, prefix, L, mask_id, cfg):
    """What the official check decodes (its canvas after L passes), to build targets it accepts."""
    P = len(prefix)
    seq = torch.full((1, P + L), mask_id)
    seq[0, :P] = torch.tensor(prefix)
    with torch.no_grad():
        for _ in range(L):
            mask_index = seq == mask_id
            logits = _official_logits(model, seq, P, mask_id, cfg)[mask_index]
            x0 = logits.argmax(-1)
            confidence = torch.softmax(logits.to(torch.float32), dim=-1).gather(-1, x0[:, None]).squeeze(-1)
            x0[torch.sort(confidence, descending=True).indices[1:]] = mask_id
            seq[mask_index] = x0.clone()
    return seq[0, P:].tolist()


def test_precision_is_named_plumbed_and_in_the_scorer_identity():
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3)
    with pytest.raises(ValueError, match="precision must be one of"):
        Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        diffusion_elbo_tokens(model, [([5], [6])], mask_id=3, mc_num=2, mc_batch=2, precision="fp16")
    with pytest.raises(ValueError, match="diffusion-ELBO setting"):
        Scorer(build_tiny_model("llama", vocab_size=260), ByteTokenizer(), "ar", precision="official")
    plain = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, mc_num=4, mc_batch=2)
    official = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, mc_num=4, mc_batch=2, precision="official")
    assert plain.precision == "float32" and "precision" not in plain.identity()
    assert "/precision-official" in official.identity()
    pairs = [("hello", " world")]
    (ll, _), = official.loglikelihood(pairs)
    ids = official.encode_pair(*pairs[0])
    (ref, _), = diffusion_elbo_tokens(model, [ids], mask_id=3, mc_num=4, mc_batch=2, seed=official.seed,
                                      keys=None, precision="official")
    assert ll == ref
