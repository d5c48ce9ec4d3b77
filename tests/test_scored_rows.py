"""The likelihood scorers project the LM head onto the scored positions only (the ELBO's masked positions, the AR
continuation): the log-likelihoods equal those of the full head over every position, with and without Dream's
logit shift, with guidance, under a sparsity config and through a PeftModel."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_tiny_model

import dllm_sparse.eval.scoring.autoregressive as autoregressive
import dllm_sparse.eval.scoring.masked_forward as masked_forward
from dllm_sparse.eval.scoring.autoregressive import ar_loglikelihood_tokens
from dllm_sparse.eval.scoring.elbo import diffusion_elbo_tokens
from dllm_sparse.models.families import without_lm_head
from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.hooks import sparsify
from dllm_sparse.sparsity.rules import TopP

MASK = VOCAB - 1
REQUESTS = [([5, 17, 3, 42], [8, 9, 10]), ([7, 9], [11, 4, 6, 12, 13]), ([20, 21, 22], [23]),
            ([30, 31, 32, 33], [34, 35, 36])]


@contextmanager
def full_head():
    """The reference: the forward computes logits at every position (the head is not split off)."""

    @contextmanager
    def keep_head(model, profile=None):
        yield None

    modules = (autoregressive, masked_forward)  # where the scorers split the head off
    saved = [m.without_lm_head for m in modules]
    for m in modules:
        m.without_lm_head = keep_head
    try:
        yield
    finally:
        for m, s in zip(modules, saved, strict=True):
            m.without_lm_head = s


def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    return wrapped.eval()


def _elbo_models():
    llada = build_tiny_model("llada", init_std=0.2)
    shifted = build_tiny_model("llada", init_std=0.2, logit_shift=True)  # shifts inside its own forward
    return {"llada": llada, "llada-shifts-itself": shifted,
            "peft(llada)": _lora(build_tiny_model("llada", init_std=0.2), ["ff_proj", "up_proj"])}


# Dream's shift outside the model (shift_logits=True), a model shifting inside its forward (never shifted again:
# the Scorer refuses that), and neither.
@pytest.mark.parametrize(("name", "shift_logits"), [("llada", False), ("llada", True), ("llada-shifts-itself", False),
                                                    ("peft(llada)", False), ("peft(llada)", True)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("sparse", [False, True])
def test_elbo_with_the_head_on_masked_positions_equals_the_full_head(name, shift_logits, cfg_scale, sparse):
    model = _elbo_models()[name]
    with without_lm_head(model) as head:
        assert head is not None  # the split path really runs for these models
    kw = dict(mask_id=MASK, mc_num=8, mc_batch=4, batch_size=6, seed=3, shift_logits=shift_logits,
              cfg_scale=cfg_scale, greedy_check="one_pass")

    def run():
        if not sparse:
            return diffusion_elbo_tokens(model, REQUESTS, **kw)
        with sparsify(model, SparsityConfig("intermediate", TopP(0.7))) as stats:
            out = diffusion_elbo_tokens(model, REQUESTS, stats=stats, **kw)
        return out, stats.mean("intermediate")

    split = run()
    with full_head():
        full = run()
    if sparse:
        (split, s_split), (full, s_full) = split, full
        assert s_split == pytest.approx(s_full, abs=1e-12)
    assert [g for _, g in split] == [g for _, g in full]
    assert [ll for ll, _ in split] == pytest.approx([ll for ll, _ in full], rel=1e-6, abs=1e-5)


def _ar_reference(model, ctx, cont):
    """log p(cont | ctx) from the full logits of one unpadded forward."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = F.log_softmax(logits, -1)
    n = len(ctx)
    return sum(logp[n - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("wrap", ["plain", "peft"])
def test_ar_continuation_logits_only_equal_the_full_logits(wrap):
    model = build_tiny_model("llama")
    if wrap == "peft":
        model = _lora(model, ["gate_proj", "up_proj"])
    assert autoregressive.accepts(model, "logits_to_keep")  # PeftModel: looked through to the base model's forward
    reqs = [([5, 6, 7, 8, 9], [10, 11]), ([3], [4]), ([20, 21], [22, 23, 24, 25]), ([9, 9, 9], [1])]
    ref = [_ar_reference(model, c, x) for c, x in reqs]
    out = ar_loglikelihood_tokens(model, reqs, batch_size=4)
    assert [o[0] for o in out] == pytest.approx(ref, rel=1e-6, abs=1e-5)


# ---- AR multiple choice: one forward pass per distinct context ----------------------------------------------

# Three items with 2-4 choices each (one- and multi-token continuations, contexts of different lengths, one
# context that a max_length cut shortens) and a lone request.
MC_REQUESTS = ([([5, 6, 7, 8, 9], c) for c in ([10], [11, 12], [13, 14, 15], [16])]
               + [([3], c) for c in ([4], [40, 41])]
               + [([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], c) for c in ([22, 23], [24], [25, 26, 27])]
               + [([50, 51], [52, 53])])


def _scored(model, share, sparsity=None, max_length=None, batch_size=3):
    from byte_tokenizer import ByteTokenizer

    from dllm_sparse.eval.scoring.scorer import Scorer

    scorer = Scorer(model, ByteTokenizer(), "ar", batch_size=batch_size, max_length=max_length,
                    share_context=share, sparsity=sparsity)
    out = scorer.loglikelihood_tokens(MC_REQUESTS)
    return out, scorer.stats


def _counting_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("max_length", [None, 10])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_context_equals_one_pass_per_request(max_length, batch_size):
    model = build_tiny_model("llama")
    calls, handle = _counting_forwards(model)
    shared, _ = _scored(model, True, max_length=max_length, batch_size=batch_size)
    shared_calls = list(calls)
    calls.clear()
    alone, _ = _scored(model, False, max_length=max_length, batch_size=batch_size)
    handle.remove()
    assert [g for _, g in shared] == [g for _, g in alone]
    assert [ll for ll, _ in shared] == pytest.approx([ll for ll, _ in alone], rel=1e-6, abs=1e-5)
    # The work really is shared: fewer tokens fed; uncut, the 2 shared contexts of >= 2 tokens fill the first pass
    assert sum(b * t for b, t in shared_calls) < sum(b * t for b, t in calls)
    if max_length is None:
        assert shared_calls[0][0] == min(batch_size, 2)


@pytest.mark.parametrize("site", ["input", "gate", "up", "intermediate"])
def test_shared_context_keeps_per_token_sparsity_and_its_statistics(site):
    model = build_tiny_model("llama")
    cfg = SparsityConfig(site, TopP(0.6))
    shared, s_stats = _scored(model, True, sparsity=cfg)
    alone, a_stats = _scored(model, False, sparsity=cfg)
    assert [ll for ll, _ in shared] == pytest.approx([ll for ll, _ in alone], rel=1e-5, abs=1e-4)
    for group in ("all", "context", "continuation"):
        tokens = {r["layer"]: r["tokens"] for r in s_stats.records() if r["group"] == group}
        assert tokens == {r["layer"]: r["tokens"] for r in a_stats.records() if r["group"] == group}
        assert s_stats.mean(site, group=group) == pytest.approx(a_stats.mean(site, group=group), abs=1e-3)
    dense, _ = _scored(model, True)
    assert [ll for ll, _ in shared] != pytest.approx([ll for ll, _ in dense], abs=1e-3)  # sparsity acted


@pytest.mark.parametrize("scope", ["sequence", "step"])
def test_scopes_that_see_the_whole_sequence_keep_one_pass_per_request(scope):
    model = build_tiny_model("llama")
    cfg = SparsityConfig("intermediate", TopP(0.6, scope=scope))
    calls, handle = _counting_forwards(model)
    shared, _ = _scored(model, True, sparsity=cfg)
    n_shared = list(calls)
    calls.clear()
    alone, _ = _scored(model, False, sparsity=cfg)
    handle.remove()
    assert n_shared == calls  # the very same passes
    assert shared == alone


def test_a_model_without_a_kv_cache_keyword_keeps_one_pass_per_request():
    from dllm_sparse.eval.scoring.autoregressive import _ar_shared_context

    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    model = NoCache(build_tiny_model("llama"))
    assert _ar_shared_context(model, [([5, 6, 7], 1)], batch_size=2, pad_id=0, stats=None, progress=False) is None
    shared, _ = _scored(model, True)
    alone, _ = _scored(model, False)
    assert shared == alone
