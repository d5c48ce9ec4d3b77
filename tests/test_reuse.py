"""Mask-reuse policies (dllm_sparse.samplers.reuse) on a tiny native LLaDA (and a tiny LLaMA for the AR semantics)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dllm_sparse import TopP
from dllm_sparse.samplers import GenerationConfig, MaskOverlapTracker, StepSparsity, generate
from dllm_sparse.samplers.reuse import Adaptive, BlockStart, Every, Fresh, make_policy, reuse_sparsity
from dllm_sparse.samplers.step_delta import StepDelta

PROMPTS = [[5, 17, 3, 42, 8], [7, 7, 1]]
# 2 blocks of 8 positions, 5 steps per block.
CFG = GenerationConfig(gen_length=16, steps=10, block_length=8, stop_token_ids=())
SPB, BLOCKS, LAYERS = 5, 2, 2



def _gen(model, policy, site="input", p=0.6, cfg=CFG, record=True, callbacks=()):
    sp, policy = reuse_sparsity(site, TopP(p), policy, record_masks=record)
    out = generate(model, None, PROMPTS, cfg, sparsity=sp, callbacks=[policy, *callbacks])
    return out, sp, policy


def _masks(sp):
    """{(step, layer): keep} recorded by the statistics."""
    return {(m["tag"], m["layer"]): m["keep"] for m in sp.stats.masks}


def _records(sp):
    """Statistics rows with NaN (empty groups) made comparable."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in sp.records()]


def _same_run(a, b):
    (oa, spa, _), (ob, spb, _) = a, b
    assert torch.equal(oa.sequences, ob.sequences)
    assert _records(spa) == _records(spb)
    ma, mb = _masks(spa), _masks(spb)
    assert ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("site", ["input", "intermediate"])
def test_every1_equals_fresh(llada, site):
    fresh = _gen(llada, Fresh(), site)
    every1 = _gen(llada, Every(1), site)
    _same_run(fresh, every1)
    # ... and fresh is exactly the plain step-aware sparsification (no selector)
    sp = StepSparsity(site, TopP(0.6), record_masks=True)
    out = generate(llada, None, PROMPTS, CFG, sparsity=sp)
    _same_run(fresh, (out, sp, None))
    for _, _, pol in (fresh, every1):
        assert pol.selections == {layer: BLOCKS * SPB for layer in range(LAYERS)}
        assert pol.report()["partial_selections"] == 0 and pol.report()["positions_reused"] == 0


@pytest.mark.parametrize("k", [2, 3, 5, 7])
@pytest.mark.parametrize("new_positions", ["fresh", "reuse"])
def test_every_k_selection_count(llada, k, new_positions):
    _, sp, pol = _gen(llada, Every(k, new_positions=new_positions))
    per_block = math.ceil(SPB / k)
    assert pol.selections == {layer: BLOCKS * per_block for layer in range(LAYERS)}
    rep = pol.report()
    assert rep["selections"] == LAYERS * BLOCKS * per_block
    assert rep["refresh_steps"] == [b * SPB + i for b in range(BLOCKS) for i in range(0, SPB, k)]
    assert rep["positions_total"] == rep["positions_reused"] + rep["positions_selected"]
    if new_positions == "reuse" or k == 1:
        assert rep["partial_selections"] == 0


def test_reused_masks_are_the_recorded_ones(llada):
    k = 2
    _, sp, pol = _gen(llada, Every(k, new_positions="reuse"))
    masks = _masks(sp)
    for (step, layer), keep in masks.items():
        ref = step - (step % SPB) % k  # the step this step's masks come from
        assert torch.equal(keep, masks[(ref, layer)])
    # the overlap tracker sees the reused masks: identical to the previous step's between refreshes
    tracker = MaskOverlapTracker()
    sp2, pol2 = reuse_sparsity("input", TopP(0.6), BlockStart(new_positions="reuse"), mask_observers=[tracker])
    generate(llada, None, PROMPTS, CFG, sparsity=sp2, callbacks=[pol2, tracker])
    for r in tracker.records():
        if r["reference"] == "previous" and r["step_in_block"] > 0 and r["positions"]:
            assert r["jaccard"] == 1.0 and r["recall"] == 1.0
        if r["reference"] == "block_start" and r["positions"]:
            assert r["jaccard"] == 1.0


def test_new_positions_fresh_reselects_decoded_positions_only(llada):
    out, sp, pol = _gen(llada, BlockStart(new_positions="fresh"))
    masks = _masks(sp)
    P = out.prompt_length
    # positions decoded at step t-1 (committed) get a fresh mask at step t; all others keep their cached mask.
    committed = {info.step: info for info in out.trace}
    decoded_since = torch.zeros(out.sequences.shape, dtype=torch.bool)
    for step in range(CFG.steps):
        blk, sib = divmod(step, SPB)
        if sib == 0:
            decoded_since.zero_()
            continue
        for r, positions in enumerate(committed[step - 1].committed):
            for pos in positions:
                decoded_since[r, P + pos] = True
        for layer in range(LAYERS):
            keep, prev = masks[(step, layer)], masks[(step - 1, layer)]
            same = ~decoded_since
            assert torch.equal(keep[same], masks[(blk * SPB, layer)][same])
            newly = torch.zeros_like(decoded_since)
            for r, positions in enumerate(committed[step - 1].committed):
                for pos in positions:
                    newly[r, P + pos] = True
            older = decoded_since & ~newly
            assert torch.equal(keep[older], prev[older])  # re-selected once, then reused
    rep = pol.report()
    assert rep["partial_selections"] > 0
    n_decoded_before_last_step = sum(len(p) for info in out.trace for p in info.committed
                                     if info.step % SPB != SPB - 1)
    assert rep["positions_selected"] == LAYERS * (BLOCKS * out.sequences.numel() + n_decoded_before_last_step)


@pytest.mark.parametrize("policy", ["fresh", "every2", "block_start", "adaptive0.5"])
@pytest.mark.parametrize("site", ["input", "gate"])
def test_p1_with_any_policy_equals_dense(llada, policy, site):
    dense = generate(llada, None, PROMPTS, CFG)
    out, _, _ = _gen(llada, make_policy(policy), site, p=1.0, record=False)
    assert torch.equal(out.sequences, dense.sequences)


def test_adaptive_forced_refresh(llada):
    fresh = _gen(llada, Fresh())
    always = _gen(llada, Adaptive(1.0))
    _same_run(fresh, always)
    assert always[2].decisions == []  # no probe needed
    block = _gen(llada, BlockStart())
    never = _gen(llada, Adaptive(0.0))
    _same_run(block, never)
    assert never[2].selections == block[2].selections == {layer: BLOCKS for layer in range(LAYERS)}


def test_adaptive_probe_decisions(llada):
    _, _, pol = _gen(llada, Adaptive(0.999, probe_layer=0))
    probed = [d for d in pol.decisions]
    assert probed and all(d["layer"] == 0 for d in probed)
    assert all(0.0 <= d["overlap"] <= 1.0 for d in probed)
    # a decision at each non-block-start step; refresh iff overlap < bound
    assert sorted(d["step"] for d in probed) == [s for s in range(CFG.steps) if s % SPB]
    assert all(d["refreshed"] == (d["overlap"] < 0.999) for d in probed)
    n_refresh = sum(d["refreshed"] for d in probed)
    assert pol.selections[0] == BLOCKS + n_refresh
    assert pol.probe_selections.get(0, 0) == len(probed) - n_refresh
    # a probe on a later layer: layers before it refresh at the next step
    _, _, late = _gen(llada, Adaptive(0.999, probe_layer=1))
    dec = {d["step"]: d["refreshed"] for d in late.decisions}
    expect0 = BLOCKS + sum(1 for s, r in dec.items() if r and (s + 1) % SPB and (s + 1) < CFG.steps)
    assert late.selections[1] == BLOCKS + sum(dec.values())
    assert late.selections[0] == expect0
    # default probe: the middle sparsified layer (of 2: layer 1); a sample of positions; all positions
    _, _, mid = _gen(llada, Adaptive(0.5))
    assert mid.decisions and {d["layer"] for d in mid.decisions} == {1}
    _, _, sampled = _gen(llada, Adaptive(0.5, probe_positions=3, probe_layer="first", probe_region="all"))
    assert sampled.decisions and {d["layer"] for d in sampled.decisions} == {0}
    assert sampled.probe_selections.get(0, 0) == sum(not d["refreshed"] for d in sampled.decisions)


def test_cfg_doubled_batch(llada):
    cfg = CFG.replace(cfg_scale=1.5)
    _same_run(_gen(llada, Fresh(), cfg=cfg), _gen(llada, Every(1), cfg=cfg))
    out, sp, pol = _gen(llada, Every(2, new_positions="reuse"), cfg=cfg)
    masks = _masks(sp)
    assert masks[(0, 0)].shape[0] == 2 * len(PROMPTS)
    assert torch.equal(masks[(1, 0)], masks[(0, 0)])
    assert pol.selections == {layer: BLOCKS * 3 for layer in range(LAYERS)}
    _, _, pol_f = _gen(llada, BlockStart(), cfg=cfg)
    assert pol_f.report()["partial_selections"] > 0


def test_autoregressive_reuses_last_token_mask():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    llama = LlamaForCausalLM(cfg).eval()
    gcfg = GenerationConfig(max_new_tokens=7, stop_token_ids=())
    sp, pol = reuse_sparsity("input", TopP(0.6), Every(3), record_masks=True)
    generate(llama, None, PROMPTS, gcfg, sparsity=sp, callbacks=[pol])
    masks = _masks(sp)
    for layer in range(2):
        assert pol.selections[layer] == 3  # prefill, steps 3 and 6
        assert torch.equal(masks[(1, layer)], masks[("prefill", layer)][:, -1:])
        assert torch.equal(masks[(2, layer)], masks[("prefill", layer)][:, -1:])
        assert torch.equal(masks[(4, layer)], masks[(3, layer)])
    sp2, pol2 = reuse_sparsity("input", TopP(0.6), Every(1), record_masks=True)
    sp3 = StepSparsity("input", TopP(0.6), record_masks=True)
    a = generate(llama, None, PROMPTS, gcfg, sparsity=sp2, callbacks=[pol2])
    b = generate(llama, None, PROMPTS, gcfg, sparsity=sp3)
    assert torch.equal(a.sequences, b.sequences) and _records(sp2) == _records(sp3)


@pytest.mark.parametrize("spec, problem", [
    ("every2.5", r"k must be a positive integer \(every<k>, e.g. every4\), got '2.5'"),
    ("every0.5", r"k must be a positive integer .*got '0.5'"),
    ("every0", r"k must be a positive integer .*got '0'"),
    ("every-1", r"k must be a positive integer .*got '-1'"),
    ("every", r"k must be a positive integer .*got ''"),
    ("everyday", r"k must be a positive integer .*got 'day'"),
    ("fresh4", "fresh takes no number"),
    ("block_start:2", "block_start takes no number"),
    ("adaptive0.7.3", r"the bound '0.7.3' is not a number"),
    ("sometimes", "unknown reuse policy"),
])
def test_policy_names_are_read_strictly(spec, problem):
    """Every refusal names the text and the accepted forms; nothing is rounded (every2.5 is not every2)."""
    with pytest.raises(ValueError, match=problem) as e:
        make_policy(spec)
    assert repr(spec) in str(e.value) and "use fresh, block_start, every<k> (k a positive integer" in str(e.value)
    with pytest.raises(ValueError, match=problem):  # StepDelta's refresh reads the same names
        StepDelta(refresh=spec)


def test_policy_names_that_are_read():
    assert make_policy(" Every:12 ").k == 12 and make_policy("every=3").k == 3 and make_policy("every1").k == 1
    assert isinstance(make_policy("blockstart"), BlockStart) and make_policy("adaptive").bound == 0.7
    assert make_policy("adaptive:0.85").bound == 0.85
    for k in (2.5, True, "3"):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            Every(k)


def test_make_policy_and_errors():
    assert isinstance(make_policy("fresh"), Fresh)
    assert make_policy("every4").k == 4 and make_policy("every:2").k == 2
    assert isinstance(make_policy("block_start"), BlockStart)
    a = make_policy("adaptive0.7", probe_layer=3)
    assert isinstance(a, Adaptive) and a.bound == 0.7 and a.probe_layer == 3
    with pytest.raises(ValueError):
        make_policy("sometimes")
    with pytest.raises(ValueError):
        Every(0)
    with pytest.raises(ValueError):
        Adaptive(0.5, probe_layer="last")
    with pytest.raises(ValueError):
        Fresh(new_positions="maybe")
    with pytest.raises(TypeError):
        reuse_sparsity("input", TopP(0.9), "fresh", select_mask=lambda *a: None)


def test_study_quality_helpers():
    from dllm_sparse.eval.studies.reuse_study import agreement, edit_similarity, first_divergence

    assert agreement([[1, 2, 3]], [[1, 5, 3]]) == pytest.approx(2 / 3)
    assert first_divergence([[1, 2, 3], [4, 5, 6]], [[1, 5, 3], [4, 5, 6]]) == 2.0
    assert edit_similarity([[1, 2, 3, 4]], [[9, 1, 2, 3]]) == pytest.approx(0.75)


def test_study_cell_teacher_forced_replay(llada, tmp_path):
    """A study cell replays the dense trajectory: dense predicts its own commits; p = 1 under any policy predicts
    exactly what dense predicts; a sparse policy changes the likelihood along the trajectory."""
    from dllm_sparse.eval.studies.reuse_study import StudySettings, run_cell
    from dllm_sparse.models.loading import LoadedModel
    from dllm_sparse.samplers import replay

    lm = LoadedModel(llada, None, "diffusion", "tiny", 99, "llada")
    dense_row = run_cell(lm, PROMPTS, CFG, None, None, StudySettings(teacher_forced=True), tmp_path, "d",
                         track=False, kernel_layers=[], kernel_steps=[])
    traj = dense_row["trajectory"]
    assert len(traj) == CFG.steps
    assert dense_row["generated"] == generate(lm, prompts=PROMPTS, config=CFG).generated.tolist()
    masked = torch.ones(len(PROMPTS), CFG.max_new_tokens, dtype=torch.bool)
    for step, (st, pred) in enumerate(zip(traj, dense_row["tf_pred"], strict=True)):
        s = (step // SPB) * CFG.block_length
        slots = masked[:, s:s + CFG.block_length].nonzero().tolist()
        assert len(slots) == len(pred)
        by_slot = {(r, s + c): t for (r, c), t in zip(slots, pred, strict=True)}
        for r, (cols, toks) in enumerate(zip(st["committed"], st["tokens"], strict=True)):
            for c, t in zip(cols, toks, strict=True):
                assert by_slot[(r, c)] == t == dense_row["generated"][r][c]
                masked[r, c] = False
    same = run_cell(lm, PROMPTS, CFG, "input", "every3", StudySettings(p=1.0, teacher_forced=True), tmp_path, "s",
                    track=False, kernel_layers=[], kernel_steps=[], dense_row=dense_row)
    assert same["tf_pred"] == dense_row["tf_pred"] and same["tf_agreement_vs_dense"] == 1.0
    sparse = run_cell(lm, PROMPTS, CFG, "input", "block_start", StudySettings(p=0.5, teacher_forced=True), tmp_path,
                      "b", track=False, kernel_layers=[], kernel_steps=[], dense_row=dense_row)
    assert 0.0 <= sparse["tf_agreement_vs_dense"] <= 1.0 and sparse["selections_per_layer"] == {0: BLOCKS, 1: BLOCKS}
    lp = replay(lm, PROMPTS, traj, CFG).log_likelihood
    sp, pol = reuse_sparsity("input", TopP(0.5), BlockStart())
    assert replay(lm, PROMPTS, traj, CFG, sparsity=sp, callbacks=[pol]).log_likelihood != lp


class _CharTokenizer:
    """Stands in for a real tokenizer: one id per character, inside the tiny model's vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 90 for c in text]}


def test_passage_trajectories_write_each_true_token_once_in_sampler_geometry(llada, tmp_path):
    from dllm_sparse.eval.studies.reuse_study import StudySettings, passage_trajectories, run_cell
    from dllm_sparse.eval.tasks.builtin import load_builtin_passages
    from dllm_sparse.models.loading import LoadedModel
    from dllm_sparse.samplers import num_transfer_tokens, replay

    tok = _CharTokenizer()
    prompts, traj = passage_trajectories(tok, CFG, n=3, prompt_len=5, seed=0)
    assert len(prompts) == 3 and all(len(p) == 5 for p in prompts) and len(traj) == CFG.steps
    texts = [p["text"] for p in load_builtin_passages() if len(p["text"]) >= 5 + CFG.max_new_tokens][:3]
    spb = CFG.steps // (CFG.max_new_tokens // CFG.block_length)
    expected_counts = num_transfer_tokens(torch.tensor([CFG.block_length]), spb)[0].tolist()
    for r, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        assert prompts[r] == ids[:5]
        written = {}
        for step, st in enumerate(traj):
            cols = st["committed"][r]
            assert len(cols) == expected_counts[step % spb]
            block = step // spb  # every position is written inside its own block
            assert all(block * CFG.block_length <= c < (block + 1) * CFG.block_length for c in cols)
            for c, t in zip(cols, st["tokens"][r], strict=True):
                assert c not in written
                written[c] = t
        assert [written[c] for c in range(CFG.max_new_tokens)] == ids[5:5 + CFG.max_new_tokens]
    # the likelihood along the trajectory: p = 1 under any policy equals dense, p < 1 changes it
    lm = LoadedModel(llada, None, "diffusion", "tiny", 99, "llada")
    dense = replay(lm, prompts, traj, CFG)
    lp_dense, n = dense.log_likelihood, dense.num_tokens
    assert n == 3 * CFG.max_new_tokens and lp_dense < 0
    sp, pol = reuse_sparsity("intermediate", TopP(1.0), Every(2))
    assert replay(lm, prompts, traj, CFG, callbacks=[sp, pol]).log_likelihood == lp_dense
    sp, pol = reuse_sparsity("intermediate", TopP(0.5), Every(2))
    assert replay(lm, prompts, traj, CFG, callbacks=[sp, pol]).log_likelihood != lp_dense
    # a study cell scores the same passages along the same order: NLL per token = -log-likelihood / tokens
    settings = StudySettings(p=0.5, passage_ids=prompts, passage_trajectory=traj)
    row = run_cell(lm, PROMPTS, CFG, None, None, settings, tmp_path, "d", track=False, kernel_layers=[],
                   kernel_steps=[])
    assert row["elbo_nll_per_token"] == -lp_dense / n
