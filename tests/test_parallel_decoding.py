"""Parallel decoding (Fast-dLLM's confidence-threshold and factor rules, ``GenerationConfig(confidence_threshold=t)`` /
``confidence_factor=f``) against a reference written here from Fast-dLLM's definition (``get_transfer_index`` /
``get_transfer_index_dynamic`` of its ``llada/generate.py``):

* threshold t: per row, rank the block's masked positions by confidence (``torch.topk`` over the row); commit the
  first, and every later one whose confidence is not below t;
* factor f: per row, walk the descending confidences c_1 >= c_2 >= ...; the walk stops at the first rank i >= 2
  with c_i < 1 - f / (i + 1); commit the ranks before it (at least one). Fast-dLLM's loop commits all n when
  the stop is at the last rank n (its loop index cannot tell that from "no stop"): ``official`` reproduces it;
* a block ends when no row has a masked position in it; every step is a forward over the whole canvas.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dllm_sparse import TopP
from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config
from dllm_sparse.samplers import (
    GenerationCallback,
    GenerationConfig,
    MaskedDiffusionGenerator,
    MaskOverlapTracker,
    StepSparsity,
    generate,
    replay,
)
from dllm_sparse.samplers.step_delta import StepDelta, step_delta

MASK = 99
PROMPTS = [[5, 17, 3, 42, 8], [7, 7, 1, 30, 2]]


@torch.no_grad()
def reference_generate(model, prompt, gen_length, block_length, mask_id, threshold=None, factor=None,
                       cfg_scale=0.0, official=False):
    """Fast-dLLM's loop for one prompt (a list of ids), greedy, float64 confidences. Returns (ids, forwards)."""
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    nfe = 0
    for lo in range(P, P + gen_length, block_length):
        hi = lo + block_length
        while (x[0, lo:hi] == mask_id).any():
            logits = model(input_ids=x).logits
            if cfg_scale > 0:
                un = x.clone()
                un[0, :P] = mask_id
                u = model(input_ids=un).logits
                logits = u + (cfg_scale + 1) * (logits - u)
            nfe += 1
            x0 = logits.argmax(-1)[0]
            p = F.softmax(logits.double(), dim=-1)[0].gather(-1, x0[:, None]).squeeze(-1)
            masked = x[0] == mask_id
            masked[hi:] = False
            conf = torch.where(masked, p, torch.tensor(-torch.inf, dtype=torch.float64))
            n = int(masked.sum())
            order = torch.topk(conf, k=n).indices.tolist()
            if threshold is not None:
                chosen = [order[0]] + [j for j in order[1:] if conf[j] >= threshold]
            else:
                k = n
                for i in range(1, n):  # rank i + 1 (1-based) must reach 1 - f / (i + 2)
                    if conf[order[i]] < 1 - factor / (i + 2):
                        k = n if (official and i == n - 1) else i
                        break
                chosen = order[:k]
            for j in chosen:
                x[0, j] = x0[j]
    return x[0, P:].tolist(), nfe


@pytest.fixture(scope="module")
def llada1():  # one layer: a block cache is exact (tests/test_block_cache.py)
    torch.manual_seed(1)
    return LLaDAModelLM(tiny_llada_config(init_std=0.2, n_layers=1)).eval()


def _cfg(**kw):
    return GenerationConfig(**{"gen_length": 16, "block_length": 8, "stop_token_ids": (), **kw})


# ---- parity with the reference -------------------------------------------------------------------------------

# rules that take between 3 and 15 steps on these prompts: several tokens per step on some steps, one on others
@pytest.mark.parametrize("cfg_scale, rule", [
    (0.0, dict(threshold=0.1)), (0.0, dict(threshold=0.15)), (0.0, dict(factor=3.0)), (0.0, dict(factor=4.0)),
    (1.5, dict(threshold=0.3)), (1.5, dict(threshold=0.5)), (1.5, dict(factor=1.0)), (1.5, dict(factor=2.0)),
], ids=str)
def test_parity_with_the_fast_dllm_reference(llada, rule, cfg_scale):
    """Each row of a batch equals the reference run alone (a row whose block is done commits nothing while the
    other row finishes); the batch takes as many forwards per block as its slowest row."""
    kw = ({"confidence_threshold": rule["threshold"]} if "threshold" in rule
          else {"confidence_factor": rule["factor"]})
    out = generate(llada, None, PROMPTS, _cfg(cfg_scale=cfg_scale, **kw))
    refs = [reference_generate(llada, p, 16, 8, MASK, cfg_scale=cfg_scale, **rule) for p in PROMPTS]
    for r, (ids, _) in enumerate(refs):
        assert out.generated[r].tolist() == ids, r
    per_block = [len({s.step for s in out.trace if s.block == b}) for b in range(2)]
    assert out.nfe == sum(per_block) * (2 if cfg_scale else 1)
    alone = [generate(llada, None, [p], _cfg(cfg_scale=cfg_scale, **kw)) for p in PROMPTS]
    for r, a in enumerate(alone):
        assert a.nfe == refs[r][1] * (2 if cfg_scale else 1)
        assert a.generated[0].tolist() == refs[r][0]
    assert max(a.nfe for a in alone) <= out.nfe
    assert 2 < len(out.trace) < 16  # the case tests the rule: neither one token per step nor a block per step


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_sampling_rows_of_a_batch_draw_what_they_draw_alone(llada, remasking):
    """At T > 0 a row whose block is done waits for the other rows without drawing random numbers, so each row of
    a batch is the same prompt generated alone with that row's seed, although the batch takes more steps."""
    kw = dict(temperature=1.0, remasking=remasking, confidence_threshold=0.5 if remasking == "random" else 0.2)
    batch = generate(llada, None, PROMPTS, _cfg(seed=[11, 12], **kw))
    alone = [generate(llada, None, [p], _cfg(seed=s, **kw)) for p, s in zip(PROMPTS, [11, 12], strict=True)]
    for r, a in enumerate(alone):
        assert batch.generated[r].tolist() == a.generated[0].tolist()
    # the case tests it: a row waited in the first block, so without the rule its later draws would shift
    assert any(s.block == 0 and not (s.committed[0] and s.committed[1]) for s in batch.trace)
    assert not (batch.generated == MASK).any()


def test_a_threshold_above_one_is_the_one_token_per_step_sampler(llada):
    for cache in (None, "prefix", "dual"):
        exact = generate(llada, None, PROMPTS, _cfg(steps=16, block_cache=cache))
        par = generate(llada, None, PROMPTS, _cfg(confidence_threshold=1.5, block_cache=cache))
        assert torch.equal(par.sequences, exact.sequences) and par.nfe == exact.nfe == 16
        assert [(s.block, s.committed, s.tokens) for s in par.trace] == \
               [(s.block, s.committed, s.tokens) for s in exact.trace]


def test_block_caches_with_a_threshold(llada1):
    """With one layer a cache is exact (keys/values depend on the token only), so a cached parallel sampler must
    give the uncached one's tokens and steps."""
    exact = generate(llada1, None, PROMPTS, _cfg(confidence_threshold=0.1))
    assert exact.nfe < 16
    for cache in ("prefix", "dual"):
        out = generate(llada1, None, PROMPTS, _cfg(confidence_threshold=0.1, block_cache=cache))
        assert torch.equal(out.sequences, exact.sequences) and out.nfe == exact.nfe


# ---- a model whose confidences are set by hand: the step counts are known -----------------------------------

V, SCRIPT_MASK = 64, 63  # wide enough that a confidence of 0.05 is still the argmax
# Per generated position: the probability of its predicted token (1 + position % 5), fixed whatever the canvas.
SCRIPT_CONF = [0.95, 0.8, 0.6, 0.4, 0.4, 0.95, 0.6, 0.8]  # two blocks of 4


class ScriptedConfidenceLM(torch.nn.Module):
    def __init__(self, conf, same_token=False):
        super().__init__()
        self.conf, self.same_token = conf, same_token
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        B, S = input_ids.shape
        G = len(self.conf)
        probs = torch.full((B, S, V), 1.0 / V, dtype=torch.float64)
        for j, c in enumerate(self.conf):
            probs[:, S - G + j] = (1 - c) / (V - 2)
            probs[:, S - G + j, SCRIPT_MASK] = 0
            probs[:, S - G + j, 1 if self.same_token else 1 + j % 5] = c
        return SimpleNamespace(logits=probs.clamp_min(1e-30).log().float())


def _scripted(conf=SCRIPT_CONF, same_token=False, **kw):
    model = ScriptedConfidenceLM(conf, same_token)
    gen = MaskedDiffusionGenerator(model, mask_id=SCRIPT_MASK, family="")
    return gen.generate([[0, 1]], GenerationConfig(gen_length=len(conf), block_length=4, mask_id=SCRIPT_MASK,
                                                   stop_token_ids=(), **kw))


@pytest.mark.parametrize("t, order", [
    (1.5, [[0], [1], [2], [3], [5], [7], [6], [4]]),
    (0.9, [[0], [1], [2], [3], [5], [7], [6], [4]]),
    (0.7, [[0, 1], [2], [3], [5, 7], [6], [4]]),
    (0.5, [[0, 1, 2], [3], [5, 6, 7], [4]]),
    (0.3, [[0, 1, 2, 3], [4, 5, 6, 7]]),
])
def test_forward_passes_fall_as_the_threshold_falls(t, order):
    """Per block, the first step commits every position with confidence >= t (at least the most confident); the
    rest stay below t, so they come one per step, most confident first."""
    out = _scripted(confidence_threshold=t)
    assert [sorted(s.committed[0]) for s in out.trace] == order
    assert out.nfe == len(order)
    assert out.generated[0].tolist() == [1 + j % 5 for j in range(8)]
    ref, ref_nfe = reference_generate(ScriptedConfidenceLM(SCRIPT_CONF), [0, 1], 8, 4, SCRIPT_MASK, threshold=t)
    assert ref_nfe == len(order) and ref == out.generated[0].tolist()


def test_ties_below_the_threshold_go_lowest_position_first():
    out = _scripted(conf=[0.6, 0.6, 0.6, 0.6], same_token=True, confidence_threshold=0.9)  # equal rows: exact ties
    assert [s.committed[0] for s in out.trace] == [[0], [1], [2], [3]]


@pytest.mark.parametrize("official", [False, True])
def test_factor_rule_and_fast_dllm_last_rank_quirk(official):
    """conf [0.99, 0.9, 0.1]: rank 2 passes (0.9 >= 1 - 1/3), rank 3 fails (0.1 < 1 - 1/4) at the last rank: the
    definition commits 2, Fast-dLLM's loop (confidence="official") all 3."""
    out = _scripted(conf=[0.99, 0.9, 0.1, 0.05], confidence_factor=1.0,
                    **({"confidence": "official"} if official else {}))
    ref, ref_nfe = reference_generate(ScriptedConfidenceLM([0.99, 0.9, 0.1, 0.05]), [0, 1], 4, 4, SCRIPT_MASK,
                                      factor=1.0, official=official)
    # step 1: 0.99, 0.9 pass, 0.1 fails at rank 3 of 4 (not the last) -> 2; step 2: n = 2, 0.05 fails at the
    # last rank -> 1 (definition) or 2 (quirk).
    assert [sorted(s.committed[0]) for s in out.trace] == ([[0, 1], [2, 3]] if official else [[0, 1], [2], [3]])
    assert out.nfe == ref_nfe and out.generated[0].tolist() == ref


def test_forward_passes_fall_as_the_factor_rises():
    counts = [_scripted(confidence_factor=f).nfe for f in (0.01, 0.5, 1.5, 3.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


# ---- the callbacks read the variable steps from the state ------------------------------------------------------

def _block_starts(trace):
    return [s.step for s in trace if s.step == 0 or trace[s.step - 1].block != s.block]


def test_callbacks_follow_the_variable_steps(llada):
    cfg = _cfg(confidence_threshold=0.1)
    tracker = MaskOverlapTracker()
    sp = StepSparsity("input", TopP(0.7, scope="step"), voters="block", mask_observers=[tracker])
    seen = []

    class Seen(GenerationCallback):
        def on_step_begin(self, state):
            seen.append((state.block, state.first_step_of_block, sp._sparsifier.voters.clone()))

        def on_step_end(self, state):
            seen[-1] += (state.last_step_of_block,)

    out = generate(llada, None, PROMPTS, cfg, sparsity=sp, callbacks=[tracker, Seen()])
    trace, P, S = out.trace, out.prompt_length, out.sequences.shape[1]
    starts = _block_starts(trace)
    assert len(trace) < 16 and len(starts) == 2
    block_of = [s.block for s in trace]
    refs = {(r["step"], r["ref_step"]) for r in tracker.records() if r["reference"] == "block_start"}
    assert refs == {(t, starts[block_of[t]]) for t in range(len(trace))}
    for t, (blk, first, voters, last) in enumerate(seen):
        assert blk == block_of[t] and first == (t in starts)
        assert last == (t + 1 == len(trace) or t + 1 in starts)
        want = torch.zeros(2, S, dtype=torch.bool)
        want[:, P + 8 * blk:P + 8 * blk + 8] = True
        assert torch.equal(voters, want)
    with step_delta(llada, StepDelta("input", 0.5, 0.5, refresh="block_start")) as delta:
        again = generate(llada, None, PROMPTS, cfg)
    assert [s["refresh"] for s in delta.steps] == [t in _block_starts(again.trace) for t in range(len(again.trace))]


def test_replay_of_a_parallel_trajectory(llada):
    """A recorded parallel trajectory replays its own variable steps: same steps and blocks, every recorded token
    the dense argmax."""
    rec = generate(llada, None, PROMPTS, _cfg(confidence_threshold=0.1, cfg_scale=1.0))
    rep = replay(llada, PROMPTS, rec)
    assert [s.block for s in rep.steps] == [s.block for s in rec.trace]
    assert [s.committed for s in rep.steps] == [s.committed for s in rec.trace]
    assert rep.commit_agreement == 1.0 and torch.equal(rep.result.sequences, rec.sequences)
    assert rep.result.nfe == rec.nfe


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["confidence_threshold", "confidence_factor"])
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, float("nan"), float("inf"), True, "0.9"])
def test_bad_rule_values_are_refused(name, bad):
    with pytest.raises(ValueError, match=name):
        GenerationConfig(**{name: bad})


def test_both_rules_at_once_are_refused(llada):
    with pytest.raises(ValueError, match="confidence_threshold=0.9 and confidence_factor=1.0"):
        generate(llada, None, PROMPTS, _cfg(confidence_threshold=0.9, confidence_factor=1.0))


@pytest.mark.parametrize("name", ["confidence_threshold", "confidence_factor"])
def test_steps_that_cannot_bound_a_block_are_refused(llada, name):
    with pytest.raises(ValueError, match=rf"steps \(8\) gives 4 steps per block.*{name}.*steps=16"):
        generate(llada, None, PROMPTS, _cfg(steps=8, **{name: 0.9}))


def test_an_autoregressive_model_refuses_the_rules(llama):
    for name in ("confidence_threshold", "confidence_factor"):
        with pytest.raises(ValueError, match=f"{name}=0.9: diffusion-only"):
            generate(llama, None, [[1, 5, 9]], GenerationConfig(max_new_tokens=4, **{name: 0.9}))
