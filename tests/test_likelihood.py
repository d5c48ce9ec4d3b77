"""Likelihood scorers: exact AR log-likelihood and the masked-diffusion Monte-Carlo ELBO."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from byte_tokenizer import ByteTokenizer
from conftest import build_tiny_model

from dllm_sparse.eval.scoring.autoregressive import ar_loglikelihood_tokens
from dllm_sparse.eval.scoring.common import item_generator
from dllm_sparse.eval.scoring.elbo import diffusion_elbo_tokens, elbo_mask_counts, elbo_masks
from dllm_sparse.eval.scoring.scorer import Scorer, rolling_windows
from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.rules import TopP


class TableLM(torch.nn.Module):
    """Logits depend on the position only (a fixed per-position table), never on the tokens: a factorised model
    whose exact log p(answer | prompt) is the sum of the answer tokens' log-probabilities."""

    def __init__(self, T=16, V=11, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(T, V, generator=g) * 2)

    def forward(self, input_ids, **_):
        B, T = input_ids.shape
        return SimpleNamespace(logits=self.table[:T].expand(B, T, -1))

    def exact(self, prompt, answer, shift=False):
        logp = F.log_softmax(self.table.double(), -1)
        P = len(prompt)
        return sum(logp[P + i - (1 if shift else 0), a].item() for i, a in enumerate(answer))


def _mean_se(xs):
    xs = torch.tensor(xs, dtype=torch.float64)
    return xs.mean().item(), (xs.std() / math.sqrt(len(xs))).item()


# ---- the Monte-Carlo design ----------------------------------------------------------------------------------


def test_mask_counts_follow_the_stratified_design():
    g = item_generator(0, "x")
    counts = elbo_mask_counts(8, 64, 4, g)
    assert counts.shape == (16, 4)
    for row in counts.tolist():  # k, k+2, k+4, k+6 wrapped into 1..8
        k = row[0]
        assert row == [((k + 2 * j - 1) % 8) + 1 for j in range(4)]
    masks = elbo_masks(8, 64, 4, item_generator(0, "x"))
    assert masks.sum(1).tolist() == counts.reshape(-1).tolist()
    with pytest.raises(ValueError, match="multiple"):
        elbo_mask_counts(8, 10, 4, g)


def test_common_random_numbers():
    a = elbo_masks(6, 16, 4, item_generator(7, ("task", 3)))
    b = elbo_masks(6, 16, 4, item_generator(7, ("task", 3)))
    c = elbo_masks(6, 16, 4, item_generator(7, ("task", 4)))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- unbiasedness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
def test_elbo_is_unbiased_for_a_factorised_model(shift):
    model = TableLM()
    prompt, answer = [1, 2, 3], [4, 0, 7, 7, 9]
    exact = model.exact(prompt, answer, shift)
    n = 400
    est = diffusion_elbo_tokens(model, [(prompt, answer)] * n, mask_id=10, mc_num=4, mc_batch=2, seed=1,
                                keys=list(range(n)), shift_logits=shift)
    mean, se = _mean_se([ll for ll, _ in est])
    assert se > 1e-3  # the estimator really is random
    assert abs(mean - exact) < 3 * se, (mean, exact, se)


def test_elbo_matches_its_enumerated_expectation_on_a_tiny_llada():
    model = build_tiny_model("llada")
    mask = model.config.mask_token_id
    prompt, answer = [5, 6, 7], [8, 9]
    L = len(answer)
    seq = torch.tensor([prompt + answer])

    def loss(subset):  # sum of CE over the masked subset x L / |subset|
        x = seq.clone()
        for i in subset:
            x[0, len(prompt) + i] = mask
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=x).logits[0].double(), -1)
        return -sum(logp[len(prompt) + i, answer[i]].item() for i in subset) * L / len(subset)

    # E[row loss] with n ~ U{1..L} and a uniformly random subset of size n.
    expected = sum(sum(loss(s) for s in itertools.combinations(range(L), n)) / math.comb(L, n)
                   for n in range(1, L + 1)) / L
    n = 300
    est = diffusion_elbo_tokens(model, [(prompt, answer)] * n, mask_id=mask, mc_num=2, mc_batch=2, seed=3,
                                keys=list(range(n)), batch_size=64)
    mean, se = _mean_se([ll for ll, _ in est])
    assert abs(mean - (-expected)) < 3 * se + 1e-9, (mean, -expected, se)


def test_dedupe_and_packing_do_not_change_the_estimate():
    model = build_tiny_model("llada")
    mask = model.config.mask_token_id
    reqs = [([5, 6], [7]), ([5, 6, 9], [8, 9, 10]), ([3], [4, 5, 6, 7]), ([1, 2], [3, 4])]
    kw = dict(mask_id=mask, mc_num=8, mc_batch=4, seed=5, keys=["a", "b", "c", "d"])
    a = diffusion_elbo_tokens(model, reqs, dedupe=True, batch_size=32, **kw)
    b = diffusion_elbo_tokens(model, reqs, dedupe=False, batch_size=3, **kw)
    for (x, _), (y, _) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-5)
    # L = 1: every row masks the only answer token, so the ELBO is the exact log-likelihood.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, mask]])).logits
    assert a[0][0] == pytest.approx(F.log_softmax(logits[0, 2].double(), -1)[7].item(), abs=1e-5)


def _probe_elbo(model, prompt, answer, masks, mask_id, mc_batch):
    """The ELBO loop experiments/mdm_probe.py used to carry, fed with given answer masks [mc_num, L]: per
    mini-batch, float32 CE x L / masked count summed over the rows / b; mean over mini-batches; negated."""
    seq = torch.tensor(prompt + answer)
    P, L = len(prompt), len(answer)
    losses = []
    for start in range(0, len(masks), mc_batch):
        is_mask = torch.zeros(mc_batch, P + L, dtype=torch.bool)
        is_mask[:, P:] = masks[start:start + mc_batch]
        counts = is_mask.sum(dim=1)
        noisy = torch.where(is_mask, torch.full_like(seq, mask_id), seq.expand(mc_batch, -1))
        with torch.no_grad():
            logits = model(noisy).logits.float()
        ce = F.cross_entropy(logits[is_mask], seq.expand(mc_batch, -1)[is_mask], reduction="none")
        weight = (L / counts.float())[:, None].expand(mc_batch, P + L)[is_mask]
        losses.append(float((ce * weight).sum()) / mc_batch)
    return -sum(losses) / len(losses)


def test_library_elbo_equals_the_former_probe_loop_on_the_same_masks():
    model = build_tiny_model("llada", seed=2)
    mask = model.config.mask_token_id
    reqs = [([5, 6, 7], [8, 9, 10, 11, 12]), ([3, 4], [13, 14, 15])]
    keys, seed, mc_num, mc_batch = ["a", "b"], 4, 8, 4
    lib = diffusion_elbo_tokens(model, reqs, mask_id=mask, mc_num=mc_num, mc_batch=mc_batch, seed=seed, keys=keys)
    for (prompt, answer), key, (ll, _) in zip(reqs, keys, lib, strict=True):
        masks = elbo_masks(len(answer), mc_num, mc_batch, item_generator(seed, key))
        ref = _probe_elbo(model, prompt, answer, masks, mask, mc_batch)
        assert ll == pytest.approx(ref, rel=1e-5)  # float32 (old loop) vs float64 sums: rounding only


@pytest.mark.parametrize("mode", [True, "iterative", "one_pass"])
def test_greedy_check(mode):
    model = TableLM()
    greedy_answer = model.table[3:6].argmax(-1).tolist()
    (ll, g), (_, g2) = diffusion_elbo_tokens(model, [([1, 2, 3], greedy_answer), ([1, 2, 3], [0, 0, 0])],
                                             mask_id=10, mc_num=4, mc_batch=2, greedy_check=mode)
    assert g is True and (g2 is False or [0, 0, 0] == greedy_answer)
    ((_, g3),) = diffusion_elbo_tokens(model, [([1, 2, 3], greedy_answer)], mask_id=10, mc_num=4, mc_batch=2)
    assert g3 is False  # documented: without the check, is_greedy is False


# ---- autoregressive -------------------------------------------------------------------------------------------


def _manual_ar(model, ctx, cont):
    full = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=full).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_ar_exact_batched_left_and_right_padding():
    model = build_tiny_model("llama")
    reqs = [([5, 6, 7, 8, 9], [10, 11]), ([3], [4]), ([20, 21], [22, 23, 24, 25]), ([9, 9, 9], [1])]
    ref = [_manual_ar(model, c, x) for c, x in reqs]
    for side in ("left", "right"):
        out = ar_loglikelihood_tokens(model, reqs, batch_size=4, padding_side=side)
        assert [o[0] for o in out] == pytest.approx(ref, abs=1e-4)
    single = ar_loglikelihood_tokens(model, reqs, batch_size=1)
    assert [o[0] for o in single] == pytest.approx(ref, abs=1e-4)
    # is_greedy: the argmax continuation is greedy.
    with torch.no_grad():
        nxt = model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1].argmax().item()
    assert ar_loglikelihood_tokens(model, [([5, 6, 7], [nxt])])[0][1] is True


def test_stats_skip_padding_tokens():
    model = build_tiny_model("llama")
    scorer = Scorer(model, ByteTokenizer(), "ar", batch_size=4, sparsity=SparsityConfig("up", TopP(0.9)))
    reqs = [([5, 6, 7, 8, 9], [10, 11]), ([3], [4])]
    scorer.loglikelihood_tokens(reqs)
    rec = [r for r in scorer.stats.records() if r["group"] == "all" and r["layer"] == 0]
    assert rec[0]["tokens"] == (7 - 1) + (2 - 1)  # model inputs are the sequences without their last token
    cont = [r for r in scorer.stats.records() if r["group"] == "continuation" and r["layer"] == 0]
    assert cont[0]["tokens"] == 2 + 1 - 2  # continuation tokens that are model inputs (last one is not)


# ---- sparsity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "llada"])
def test_sparse_p1_equals_dense_and_sparsity_changes_scores(family):
    model = build_tiny_model(family, vocab_size=260, **({"embedding_size": 260, "mask_token_id": 3}
                                                         if family == "llada" else {}))
    kind = "diffusion" if family == "llada" else "ar"
    kw = dict(mask_id=3 if kind == "diffusion" else None, mc_num=4, mc_batch=2, batch_size=4)
    pairs = [("hello", " world"), ("abc", "de"), ("", "empty context")]
    dense = Scorer(model, ByteTokenizer(), kind, **kw).loglikelihood(pairs)
    for site in ("input", "gate", "up", "intermediate"):
        s = Scorer(model, ByteTokenizer(), kind, sparsity=SparsityConfig(site, TopP(1.0)), **kw)
        assert s.loglikelihood(pairs) == dense
        assert s.stats.mean(site) < 0.05
    s = Scorer(model, ByteTokenizer(), kind, sparsity=SparsityConfig("intermediate", TopP(0.5)), **kw)
    sparse = s.loglikelihood(pairs)
    assert sparse != dense and s.stats.mean("intermediate") > 0.3
    if kind == "diffusion":
        groups = {r["group"] for r in s.stats.records()}
        assert {"all", "prompt", "answer", "masked"} <= groups
    # every site at once with identity rules (the sweep's dense pass) is still exactly dense
    allsites = Scorer(model, ByteTokenizer(), kind, **kw,
                      sparsity=[SparsityConfig(x, TopP(1.0)) for x in ("input", "gate", "up", "intermediate")])
    assert allsites.loglikelihood(pairs) == dense


def test_ratio_bins_and_config_id():
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3)
    s = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, mc_num=8, mc_batch=4, ratio_bins=4,
               sparsity=SparsityConfig("input", TopP(0.8)))
    s.loglikelihood([("hi", " there you")])
    groups = {r["group"] for r in s.stats.records()}
    assert {"ratio0.00-0.25", "ratio0.75-1.00"} <= groups
    assert "input:top_p:0.8" in s.config_id and "mc8/b4" in s.config_id


# ---- rolling --------------------------------------------------------------------------------------------------


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(10, 33))
    wins = rolling_windows(tokens, 1, 8)
    predicted = [t for _, cont in wins for t in cont]
    assert predicted == tokens
    for ctx, cont in wins:
        assert len(ctx) + len(cont) - 1 <= 8 and len(ctx) >= 1
    model = build_tiny_model("llama", vocab_size=260)
    s = Scorer(model, ByteTokenizer(), "ar", batch_size=4)
    (ll, n), = s.loglikelihood_rolling(["short text"])
    assert n == len("short text")
    assert ll == pytest.approx(_manual_ar(model, [1], ByteTokenizer().encode("short text")), abs=1e-4)
