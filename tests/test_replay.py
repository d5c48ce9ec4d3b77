"""Teacher-forced replay (dllm_sparse.samplers.replay) against the sampler and an independent forward loop."""

import pytest
import torch
from conftest import VOCAB, build_tiny_model

from dllm_sparse import TopP
from dllm_sparse.samplers import (
    GenerationCallback,
    GenerationConfig,
    generate,
    prediction_agreement,
    replay,
    trajectory_of,
)
from dllm_sparse.samplers.reuse import BlockStart, Every, reuse_sparsity

PROMPTS = [[5, 17, 3, 42, 8], [7, 7, 1]]  # left-padded batch
CFG = GenerationConfig(gen_length=16, steps=10, block_length=8, stop_token_ids=())
SPB = 5


def _reference_replay(model, prompts, trajectory, G, block_length, steps_per_block, mask_id, pad_id, shift=False):
    """Independent replay: build every step's canvas by hand, one plain forward, read argmax and log-probs."""
    P = max(len(p) for p in prompts)
    B = len(prompts)
    canvas = torch.full((B, P + G), mask_id, dtype=torch.long)
    am = torch.ones((B, P + G), dtype=torch.long)
    for r, p in enumerate(prompts):
        canvas[r, :P - len(p)] = pad_id
        am[r, :P - len(p)] = 0
        canvas[r, P - len(p):P] = torch.tensor(p)
    padded = bool((am == 0).any())
    preds, logps = [], []
    for step, st in enumerate(trajectory):
        blk = step // steps_per_block
        s, e = P + blk * block_length, P + (blk + 1) * block_length
        with torch.no_grad():
            logits = (model(input_ids=canvas, attention_mask=am) if padded else model(input_ids=canvas)).logits
        if shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        masked = canvas[:, s:e] == mask_id
        preds.append(logits[:, s:e].argmax(-1)[masked].tolist())
        logp = torch.log_softmax(logits.float(), dim=-1)
        step_lp = []
        for r, (cols, toks) in enumerate(zip(st["committed"], st["tokens"], strict=True)):
            for c, t in zip(cols, toks, strict=True):
                step_lp.append(float(logp[r, P + c, t]))
                canvas[r, P + c] = t
        logps.append(step_lp)
    return preds, logps


def test_dense_greedy_replay_reproduces_the_samplers_argmax(llada):
    dense = generate(llada, None, PROMPTS, CFG)
    rep = replay(llada, PROMPTS, dense)  # config from the result
    assert len(rep.steps) == CFG.steps and rep.commit_agreement == 1.0
    P = dense.prompt_length
    for st, info in zip(rep.steps, dense.trace, strict=True):
        assert st.committed == info.committed and st.tokens == info.tokens
        for r in range(len(PROMPTS)):
            by_pos = dict(zip(st.positions[r], st.argmax[r], strict=True))
            for c, t in zip(st.committed[r], st.tokens[r], strict=True):
                assert by_pos[c] == t == int(dense.sequences[r, P + c])  # the sampler's own argmax, exactly
    assert torch.equal(rep.result.sequences, dense.sequences) and rep.result.nfe == dense.nfe
    # independent reference: the same canvases built by hand, one plain forward per step
    preds, logps = _reference_replay(llada, PROMPTS, trajectory_of(dense), 16, 8, SPB, 99, 2)
    assert rep.predictions() == preds
    got = [lp for s in rep.steps for row in s.logprobs for lp in row]
    assert got == pytest.approx([lp for s in logps for lp in s], abs=1e-6)
    assert rep.num_tokens == len(PROMPTS) * CFG.gen_length and rep.log_likelihood < 0
    assert rep.nll_per_token == pytest.approx(-rep.log_likelihood / rep.num_tokens)


def test_replay_of_a_logit_shift_model_equals_the_sampler():
    """Dream family: the sampler shifts the logits; the replay must shift them the same way."""
    model = build_tiny_model("dream", seed=3, initializer_range=0.3)
    mask_id = VOCAB - 1
    cfg = GenerationConfig(gen_length=8, steps=8, block_length=4, mask_id=mask_id, stop_token_ids=())
    prompts = [[5, 17, 3, 42, 8]]
    out = generate(model, None, prompts, cfg, kind="diffusion")
    rep = replay(model, prompts, out)
    assert rep.commit_agreement == 1.0 and torch.equal(rep.result.sequences, out.sequences)
    ref_shift, _ = _reference_replay(model, prompts, trajectory_of(out), 8, 4, 4, mask_id, 0, shift=True)
    ref_plain, _ = _reference_replay(model, prompts, trajectory_of(out), 8, 4, 4, mask_id, 0, shift=False)
    assert rep.predictions() == ref_shift
    assert ref_plain != ref_shift  # the check above would fail if the replay skipped the shift
    unshifted = replay(model, prompts, out, logit_shift=False)
    assert unshifted.predictions() == ref_plain and unshifted.commit_agreement < 1.0


class _StateLog(GenerationCallback):
    """What a callback sees, step by step (clones: the sampler reuses the state object)."""

    def __init__(self):
        self.begin, self.end = [], []

    def on_step_begin(self, state):
        self.begin.append((state.step, state.block, state.step_in_block, state.tag, state.forward_batch,
                           state.canvas.clone(), state.masked.clone(),
                           {k: v.clone() for k, v in state.groups.items()}))

    def on_step_end(self, state):
        self.end.append((state.step, state.canvas.clone(), state.committed.clone(), state.nfe, state.logits.shape))


def _same_log(a, b):
    assert len(a.begin) == len(b.begin) and len(a.end) == len(b.end)
    for x, y in zip(a.begin, b.begin, strict=True):
        assert x[:5] == y[:5] and torch.equal(x[5], y[5]) and torch.equal(x[6], y[6])
        assert x[7].keys() == y[7].keys() and all(torch.equal(x[7][k], y[7][k]) for k in x[7])
    for x, y in zip(a.end, b.end, strict=True):
        assert x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) and x[3:] == y[3:]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_callbacks_see_the_same_step_states(llada, cfg_scale):
    cfg = CFG.replace(cfg_scale=cfg_scale)
    live, again = _StateLog(), _StateLog()
    out = generate(llada, None, PROMPTS, cfg, callbacks=[live])
    rep = replay(llada, PROMPTS, out, callbacks=[again])
    _same_log(live, again)
    assert rep.commit_agreement == 1.0  # guidance applied as the sampler applies it
    assert [s[4] for s in live.begin] == [2 * len(PROMPTS) if cfg_scale else len(PROMPTS)] * CFG.steps


def test_sparsity_and_reuse_policies_attach_unchanged(llada):
    # A sparse generation with a reuse policy, replayed with a fresh copy of the same policy, predicts its own
    # commits exactly and records the same statistics and selections.
    sp, pol = reuse_sparsity("input", TopP(0.6), Every(2), record_masks=True)
    out = generate(llada, None, PROMPTS, CFG, sparsity=sp, callbacks=[pol])
    sp2, pol2 = reuse_sparsity("input", TopP(0.6), Every(2), record_masks=True)
    rep = replay(llada, PROMPTS, out, sparsity=sp2, callbacks=[pol2])
    assert rep.commit_agreement == 1.0 and rep.result.stats is sp2.stats
    assert _nan_equal(sp2.records(), sp.records())
    assert pol2.report() == pol.report()
    for a, b in zip(sp.stats.masks, sp2.stats.masks, strict=True):
        assert (a["tag"], a["layer"]) == (b["tag"], b["layer"]) and torch.equal(a["keep"], b["keep"])
    # on a dense trajectory: p = 1 predicts what dense predicts, p < 1 with block-start reuse differs somewhere
    dense = generate(llada, None, PROMPTS, CFG)
    base = replay(llada, PROMPTS, dense)
    sp3, pol3 = reuse_sparsity("input", TopP(1.0), Every(3))
    same = replay(llada, PROMPTS, dense, sparsity=sp3, callbacks=[pol3])
    assert same.predictions() == base.predictions() and same.log_likelihood == base.log_likelihood
    sp4, pol4 = reuse_sparsity("input", TopP(0.5), BlockStart())
    sparse = replay(llada, PROMPTS, dense, sparsity=sp4, callbacks=[pol4])
    assert pol4.selections == {0: 2, 1: 2} and sparse.log_likelihood != base.log_likelihood
    assert 0.0 <= prediction_agreement(sparse.predictions(), base.predictions()) <= 1.0


def _nan_equal(a, b):
    norm = lambda rows: [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]  # noqa: E731
    return norm(a) == norm(b)


def test_partial_trajectory_and_json_dicts(llada):
    dense = generate(llada, None, PROMPTS, CFG)
    traj = trajectory_of(dense)[:3]  # e.g. read back from JSON
    rep = replay(llada, PROMPTS, traj, CFG)
    assert [s.step for s in rep.steps] == [0, 1, 2] and rep.result.finish_reasons == ["callback"] * 2
    assert rep.predictions() == replay(llada, PROMPTS, dense).predictions()[:3]


def test_prediction_agreement():
    assert prediction_agreement([[1, 2], [3]], [[1, 5], [3]]) == pytest.approx(2 / 3)
    assert prediction_agreement([[1]], [[1, 2]]) != prediction_agreement([[1]], [[1, 2]])  # NaN: other positions
    assert prediction_agreement([], []) != prediction_agreement([], [])


def test_bad_trajectories_are_clear_errors(llada, llama):
    dense = generate(llada, None, PROMPTS, CFG)
    traj = trajectory_of(dense)
    with pytest.raises(ValueError, match="GenerationConfig"):
        replay(llada, PROMPTS, traj)
    with pytest.raises(ValueError, match="outside the current block"):
        replay(llada, PROMPTS, [{"committed": [[12], [0]], "tokens": [[5], [5]]}], CFG)
    bad = [traj[0], traj[0]]
    with pytest.raises(ValueError, match="already written"):
        replay(llada, PROMPTS, bad, CFG)
    with pytest.raises(ValueError, match="rows"):
        replay(llada, PROMPTS[:1], traj, CFG)
    with pytest.raises(ValueError, match="steps"):
        replay(llada, PROMPTS, traj * 2, CFG)
    with pytest.raises(ValueError, match="mask id"):
        replay(llada, PROMPTS, [{"committed": [[0], [0]], "tokens": [[99], [5]]}], CFG)
    with pytest.raises(TypeError, match="committed"):
        replay(llada, PROMPTS, [[1, 2]], CFG)
    ar = generate(llama, None, [[5, 6]], GenerationConfig(max_new_tokens=3, stop_token_ids=()))
    with pytest.raises(ValueError, match="masked-diffusion"):
        replay(llada, [[5, 6]], ar)
