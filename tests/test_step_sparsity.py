"""Step-aware sparsification during generation: per-step / per-group statistics, p = 1 equals dense."""

import pytest
import torch

from dllm_sparse import TopP, find_ffns
from dllm_sparse.samplers import GenerationConfig, StepSparsity, generate

PROMPTS = [[5, 17, 3, 42, 8], [7, 7, 1]]
SITES = ["input", "gate", "up", "intermediate"]




DIFF = dict(gen_length=8, steps=4, block_length=4)


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_p1_equals_dense_diffusion(llada, site, cfg_scale):
    cfg = GenerationConfig(cfg_scale=cfg_scale, **DIFF)
    dense = generate(llada, None, PROMPTS, cfg)
    sp = StepSparsity(site, TopP(1.0))
    sparse = generate(llada, None, PROMPTS, cfg, sparsity=sp)
    assert torch.equal(dense.sequences, sparse.sequences)
    assert sparse.stats is sp.stats and sp.tags() == [0, 1, 2, 3]
    assert n_hooks(llada) == 0


@pytest.mark.parametrize("site", ["input", "intermediate"])
def test_p1_equals_dense_ar(llama, site):
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=())
    dense = generate(llama, None, PROMPTS, cfg)
    sp = StepSparsity(site, TopP(1.0))
    assert torch.equal(generate(llama, None, PROMPTS, cfg, sparsity=sp).sequences, dense.sequences)
    assert sp.tags() == ["prefill", 1, 2, 3, 4, 5]
    assert n_hooks(llama) == 0


def _by(records, **kw):
    return [r for r in records if all(r[k] == v for k, v in kw.items())]


@pytest.mark.parametrize("site", ["input", "intermediate"])
def test_per_step_statistics_diffusion(llada, site):
    sp = StepSparsity(site, TopP(0.7))
    out = generate(llada, None, PROMPTS, GenerationConfig(**DIFF), sparsity=sp)
    n_layers = len(find_ffns(llada))
    P, B, S = out.prompt_length, 2, out.sequences.shape[1]
    real = B * S - (P - len(PROMPTS[1]))  # row 1 is left-padded by 2
    assert sp.tags() == [0, 1, 2, 3]
    recs = sp.records()
    masked_before = B * DIFF["gen_length"]
    for step in range(4):
        for layer in range(n_layers):
            row = {g: _by(recs, tag=step, layer=layer, group=g)[0] for g in ("all", "prompt", "masked", "decoded")}
            assert row["all"]["tokens"] == real
            assert row["prompt"]["tokens"] == len(PROMPTS[0]) + len(PROMPTS[1])
            assert row["masked"]["tokens"] == masked_before
            assert row["decoded"]["tokens"] == B * DIFF["gen_length"] - masked_before
            assert 0.0 < row["all"]["sparsity"] < 1.0
        masked_before -= sum(len(c) for c in out.trace[step].committed)
    per_step = sp.per_step()
    assert len(set(round(v, 12) for v in per_step.values())) > 1  # steps differ
    assert all(v == v for v in sp.per_step("masked").values())
    assert sp.per_step("decoded")[0] != sp.per_step("decoded")[0]  # nothing decoded at step 0: NaN
    assert sp.per_step_layer()[0].keys() == set(range(n_layers))
    assert sp.mean() > 0.0


def test_per_step_statistics_cfg(llada):
    sp = StepSparsity("input", TopP(0.8))
    out = generate(llada, None, [PROMPTS[0]], GenerationConfig(cfg_scale=1.0, **DIFF), sparsity=sp)
    S = out.sequences.shape[1]
    rec = _by(sp.records(), tag=0, layer=0)
    assert _by(rec, group="all")[0]["tokens"] == 2 * S  # conditional + unconditional rows
    assert _by(rec, group="prompt")[0]["tokens"] == 2 * len(PROMPTS[0])


def test_per_step_statistics_ar(llama):
    sp = StepSparsity("intermediate", TopP(0.6), layers=[1])
    out = generate(llama, None, PROMPTS, GenerationConfig(max_new_tokens=5, stop_token_ids=()), sparsity=sp)
    assert out.nfe == 5
    recs = sp.records()
    assert {r["layer"] for r in recs} == {1}
    assert _by(recs, tag="prefill", group="all")[0]["tokens"] == 8  # real prompt tokens only
    assert _by(recs, tag="prefill", group="prompt")[0]["tokens"] == 8
    for t in range(1, 5):
        assert _by(recs, tag=t, group="all")[0]["tokens"] == 2
        assert _by(recs, tag=t, group="decoded")[0]["tokens"] == 2
    per_step = sp.per_step()
    assert list(per_step) == ["prefill", 1, 2, 3, 4]
    assert len(set(round(v, 12) for v in per_step.values())) > 1


def test_finished_rows_leave_the_statistics(llama):
    free = generate(llama, None, PROMPTS, GenerationConfig(max_new_tokens=6, stop_token_ids=()))
    eos = free.generated[1, 1].item()
    assert eos not in free.generated[0].tolist()
    sp = StepSparsity("input", TopP(1.0))
    generate(llama, None, PROMPTS, GenerationConfig(max_new_tokens=6, stop_token_ids=[eos]), sparsity=sp)
    recs = sp.records()
    # step 2 feeds the token of step 1 (row 1's eos, still real); from step 3 on row 1 is out.
    assert [_by(recs, tag=t, group="all", layer=0)[0]["tokens"] for t in range(1, 6)] == [2, 2, 1, 1, 1]


def test_hooks_removed_when_generation_raises(llada):
    def boom(state):
        raise RuntimeError("boom")

    sp = StepSparsity("input", TopP(0.5))
    with pytest.raises(RuntimeError, match="boom"):
        generate(llada, None, PROMPTS, GenerationConfig(**DIFF), sparsity=sp, callbacks=[boom])
    assert n_hooks(llada) == 0
    assert sp.stats.tag == "default"  # the step tag was left too
    generate(llada, None, PROMPTS, GenerationConfig(**DIFF), sparsity=sp)  # reusable afterwards


def test_stats_accumulate_when_given(llada):
    from dllm_sparse import SparsityStats

    stats = SparsityStats()
    sp = StepSparsity("input", TopP(0.9), stats=stats)
    generate(llada, None, [PROMPTS[0]], GenerationConfig(**DIFF), sparsity=sp)
    first = _by(stats.records(), tag=0, group="all", layer=0)[0]["tokens"]
    generate(llada, None, [PROMPTS[0]], GenerationConfig(**DIFF), sparsity=sp)
    assert _by(stats.records(), tag=0, group="all", layer=0)[0]["tokens"] == 2 * first
    with pytest.raises(TypeError, match="SparsityRule"):
        StepSparsity("input", 0.9)
