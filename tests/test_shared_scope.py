"""Shared keep-sets (scope "step" / "step_wina"): the rules against a brute-force reference, the config spelling,
and which tokens vote in the hooks (padding, AR context vs continuation, explicit voters)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from dllm_sparse import MaxP, SparsityConfig, SparsityStats, TopK, TopP, find_ffns, sparsify
from dllm_sparse.sparsity.hooks import column_norms


def _brute_keep_set(x: torch.Tensor, voters: torch.Tensor, p: float, norm: torch.Tensor | None = None):
    """Per sample: a_j = sum over voting tokens of |x_tj| (x ||W_:j|| for wina), sorted descending in Python,
    running sum until p of the total is reached; keep every a_j >= the entry reached (ties kept), never 0."""
    B, T, d = x.shape
    out = torch.zeros(B, d, dtype=torch.bool)
    for b in range(B):
        a = [0.0] * d
        for t in range(T):
            if voters[b, t]:
                for j in range(d):
                    a[j] += abs(float(x[b, t, j]))
        if norm is not None:
            a = [a[j] * float(norm[j]) for j in range(d)]
        total = sum(sorted(a, reverse=True))
        run, tau = 0.0, None
        for v in sorted(a, reverse=True):
            run += v
            if run >= p * total:
                tau = v
                break
        tau = tau if tau is not None else min(a)
        out[b] = torch.tensor([a[j] >= tau and a[j] != 0 for j in range(d)])
    return out


def _x(B=3, T=5, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64).float()
    x[0, 1, 3] = 0.0  # an exact zero is never kept
    if B > 1:
        x[1, :, 4] = x[1, :, 5]  # tied columns are kept together
    return x


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8, 1.0])
def test_step_top_p_equals_brute_force(p):
    x = _x()
    voters = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    keep = TopP(p, scope="step").mask(x, voters=voters)
    ref = _brute_keep_set(x, voters, p)
    assert torch.equal(keep, ref[:, None, :] & (x != 0))
    if p < 1:
        assert (~keep).any()  # it really drops features
    # every token of a sample shares one set (up to its own exact zeros)
    assert torch.equal(keep[2, 1:], ref[2].expand(4, -1) & (x[2, 1:] != 0))


def test_step_wina_equals_brute_force_with_column_norms():
    x = _x(seed=3)
    norm = torch.linspace(0.1, 3.0, x.shape[-1], dtype=torch.float64)
    voters = torch.ones(x.shape[:2], dtype=torch.bool)
    keep = TopP(0.6, scope="step_wina").mask(x, voters=voters, column_norm=norm)
    ref = _brute_keep_set(x, voters, 0.6, norm)
    assert torch.equal(keep, ref[:, None, :] & (x != 0))
    assert not torch.equal(keep, TopP(0.6, scope="step").mask(x))  # the weights change the choice here


def test_per_sample_independent_of_the_batch():
    x = _x(B=4, seed=5)
    rule = TopP(0.5, scope="step")
    whole = rule.mask(x)
    for b in range(4):
        assert torch.equal(whole[b], rule.mask(x[b:b + 1])[0])


def test_non_voting_nan_does_not_reach_the_score_and_a_nan_token_keeps_its_row():
    x = _x(B=1, seed=7)
    voters = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    clean = TopP(0.5, scope="step").mask(x, voters=voters)
    x[0, 4, 0] = float("nan")
    keep = TopP(0.5, scope="step").mask(x, voters=voters)
    assert torch.equal(keep[0, :4], clean[0, :4])  # the non-voter's NaN changed no one's set
    assert bool(keep[0, 4].all())  # its own row is kept whole, so the NaN propagates as in the dense model


def test_token_positions_take_the_per_token_mask_and_do_not_vote():
    x = _x(B=2, seed=9)
    cont = torch.zeros(2, 5, dtype=torch.bool)
    cont[:, 3:] = True
    keep = TopP(0.5, scope="step").mask(x, token_positions=cont)
    ref = _brute_keep_set(x, ~cont, 0.5)
    assert torch.equal(keep[:, :3], ref[:, None, :].expand(2, 3, -1) & (x[:, :3] != 0))
    assert torch.equal(keep[:, 3:], TopP(0.5).mask(x[:, 3:]))


@pytest.mark.parametrize("rule", [TopK(0.5, scope="step"), MaxP(0.4, scope="step")], ids=str)
def test_other_rules_select_on_the_aggregate(rule):
    x = _x(seed=11)
    score = x.abs().double().sum(dim=1)
    base = type(rule)(rule.threshold)  # the per-token rule, applied to the aggregate vectors
    assert torch.equal(rule.mask(x), base.mask(score)[:, None, :] & (x != 0))


def test_config_spelling_round_trips_and_bad_use_is_refused():
    for text in ("input:top_p:0.5:step", "intermediate:top_p:0.7:step_wina", "up:top_k:0.5:step:layers=0"):
        cfg = SparsityConfig.parse(text)
        assert cfg.id == text and SparsityConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="scope"):
        SparsityConfig.parse("input:top_p:0.5:steps")
    with pytest.raises(ValueError, match="column_norm"):
        TopP(0.5, scope="step_wina").mask(_x())
    with pytest.raises(ValueError, match="shared scopes"):
        TopP(0.5).mask(_x(), voters=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="voters has shape"):
        TopP(0.5, scope="step").mask(_x(), voters=torch.ones(3, 4, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------
# The hooks: who votes
# --------------------------------------------------------------------------------------------------------


def _capture_inputs(model):
    """Dense FFN inputs of every layer (a pre-hook registered before sparsify's runs first)."""
    seen = {}
    handles = [f.gate.register_forward_pre_hook(lambda m, a, i=f.layer: seen.__setitem__(i, a[0].detach().clone()))
               for f in find_ffns(model)]
    return seen, handles


@pytest.mark.parametrize("scope", ["step", "step_wina"])
def test_hooks_padding_does_not_vote(scope):
    model = build_tiny_model("llama", initializer_range=0.2)
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 6, dtype=torch.long)
    am[1, :2] = 0  # left padding in row 1
    seen, handles = _capture_inputs(model)
    events = []
    with torch.no_grad(), sparsify(model, "input", TopP(0.5, scope=scope), mask_observers=[events.append]):
        model(ids, attention_mask=am)
    for h in handles:
        h.remove()
    ffns = find_ffns(model)
    for ev in events:
        x = seen[ev.layer]
        norm = column_norms(ffns[ev.layer], "input") if scope == "step_wina" else None
        ref = _brute_keep_set(x, am.bool(), 0.5, norm)
        assert torch.equal(ev.keep, ref[:, None, :] & (x != 0))
    assert len(events) == len(ffns)


def test_hooks_ar_context_votes_continuation_is_per_token():
    model = build_tiny_model("llama", initializer_range=0.2)
    ids = torch.randint(3, 120, (1, 7), generator=torch.Generator().manual_seed(1))
    context = torch.zeros(1, 7, dtype=torch.bool)
    context[:, :4] = True
    seen, handles = _capture_inputs(model)
    events = []
    stats = SparsityStats()
    with torch.no_grad(), sparsify(model, "input", TopP(0.5, scope="step"), stats=stats,
                                   mask_observers=[events.append]):
        with stats.tagged("ar", {"context": context, "continuation": ~context}):
            model(ids)
    for h in handles:
        h.remove()
    for ev in events:
        x = seen[ev.layer]
        ref = _brute_keep_set(x, context, 0.5)
        assert torch.equal(ev.keep[:, :4], ref[:, None, :].expand(1, 4, -1) & (x[:, :4] != 0))
        assert torch.equal(ev.keep[:, 4:], TopP(0.5).mask(x[:, 4:]))


def test_hooks_explicit_voters_override():
    model = build_tiny_model("llama", initializer_range=0.2)
    ids = torch.randint(3, 120, (1, 6), generator=torch.Generator().manual_seed(2))
    voters = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    seen, handles = _capture_inputs(model)
    events = []
    from dllm_sparse.sparsity.hooks import Sparsifier

    sp = Sparsifier(model, "input", TopP(0.5, scope="step"), mask_observers=[events.append]).attach()
    sp.voters = voters
    try:
        with torch.no_grad():
            model(ids)
    finally:
        sp.detach()
        for h in handles:
            h.remove()
    for ev in events:
        ref = _brute_keep_set(seen[ev.layer], voters, 0.5)
        assert torch.equal(ev.keep, ref[:, None, :] & (seen[ev.layer] != 0))


@pytest.mark.parametrize("voters", ["masked", "block", "all"])
def test_step_sparsity_voters_in_the_diffusion_sampler(voters):
    from dllm_sparse.samplers import GenerationConfig, StepSparsity, generate

    model = build_tiny_model("llada", init_std=0.2)
    cfg = GenerationConfig(gen_length=8, steps=4, block_length=4, stop_token_ids=(), mask_id=127)
    seen, handles = _capture_inputs(model)
    checked = []

    class Check:
        def __init__(self):
            self.state = None

        def on_step_begin(self, state):
            self.state = state

        def __call__(self, ev):
            st, x = self.state, seen[ev.layer]
            if voters == "masked":
                vote = st.masked
            elif voters == "block":
                vote = torch.zeros_like(st.masked)
                vote[:, st.prompt_length + 4 * st.block:st.prompt_length + 4 * (st.block + 1)] = True
            else:
                vote = torch.ones_like(st.masked)
            ref = _brute_keep_set(x, vote, 0.5)
            assert torch.equal(ev.keep, ref[:, None, :] & (x != 0))
            checked.append(ev.layer)

    check = Check()
    sp = StepSparsity("input", TopP(0.5, scope="step"), mask_observers=[check], voters=voters)
    try:
        generate(model, None, [[5, 6, 7]], cfg, sparsity=sp, callbacks=[check])
    finally:
        for h in handles:
            h.remove()
    assert len(checked) == 4 * 2
    with pytest.raises(ValueError, match="shared keep-set"):
        StepSparsity("input", TopP(0.5), voters="masked")


def test_ar_scorer_shares_over_context_only():
    """AR scoring: the context tokens vote (padding does not), continuation tokens keep per-token masks. With a
    one-token context the shared set is that token's own top-p set, so step equals token exactly."""
    from byte_tokenizer import ByteTokenizer

    from dllm_sparse.eval.scoring.scorer import Scorer

    model = build_tiny_model("llama", initializer_range=0.2, vocab_size=260)
    step, token = SparsityConfig("input", TopP(0.5, scope="step")), SparsityConfig("input", TopP(0.5))
    one = [([5], [10, 11, 12]), ([7], [4, 9])]
    # One pass per request for both scopes (a per-token rule would otherwise share the context pass: the same
    # masks, other float rounding).
    s = Scorer(model, ByteTokenizer(), "ar", batch_size=4, share_context=False)

    def scores(requests, config):
        with s.sparsified(config):
            return s.loglikelihood_tokens(requests)

    assert scores(one, step) == scores(one, token)
    longer = [([5, 6, 7, 8, 9], [10, 11]), ([3, 4], [20, 21, 22])]
    batched = scores(longer, step)  # left-padded batch of two
    alone = [scores([r], step)[0] for r in longer]
    assert [b[0] for b in batched] == pytest.approx([a[0] for a in alone], abs=1e-4)
    assert [b[0] for b in batched] != pytest.approx([t[0] for t in scores(longer, token)], abs=1e-6)

def test_sweep_scripts_accept_the_shared_scopes():
    from test_cli_conventions import _script

    for scope in ("step", "step_wina"):
        assert _script("llada_vs_llama").parse_args(["--scope", scope]).scope == scope
        assert _script("mask_reuse").parse_args(["--scope", scope]).scope == scope
    from dllm_sparse.eval.studies.reuse_study import StudySettings

    assert StudySettings(p=0.7, scope="step").rule == TopP(0.7, scope="step")
