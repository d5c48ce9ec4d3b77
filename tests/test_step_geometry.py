"""The step state's geometry (``StepState.geometry``, ``block``, ``step_in_block``, ``block_slice``,
``first_step_of_block``, ``last_step_of_block``, ``rows``, ``for_forward``) against hand-written expectations, for
the diffusion sampler (fixed schedule, guidance, block caches, and a sampler whose blocks take a variable number of
steps) and the autoregressive loop; and the callbacks that read it (step delta, mask tracking, step sparsity)."""

import pytest
import torch

from dllm_sparse import TopP
from dllm_sparse.samplers import (
    GenerationCallback,
    GenerationConfig,
    Geometry,
    MaskOverlapTracker,
    StepSparsity,
    fit_geometry,
    generate,
)
from dllm_sparse.samplers import diffusion as diffusion_module
from dllm_sparse.samplers.step_delta import StepDelta, step_delta
from dllm_sparse.steps import StepState

MASK = 99
PROMPTS = [[5, 17, 3, 42, 8], [7, 7, 1]]  # left-padded to P = 5


class GeometryRecorder(GenerationCallback):
    """Records what the state says about the geometry at every step begin and end."""

    def __init__(self):
        self.begin, self.end = [], []

    def on_step_begin(self, state):
        self.begin.append(dict(
            geometry=state.geometry, step=state.step, block=state.block, sib=state.step_in_block,
            block_slice=state.block_slice, start=state.block_start, end=state.block_end,
            first=state.first_step_of_block, last=state.last_step_of_block, rows=state.rows,
            fwd=state.forward_batch, groups={k: v.clone() for k, v in state.groups.items()},
            prompt_fwd=state.for_forward(state.prompt_mask), prompt_rows=state.for_forward(state.prompt_mask,
                                                                                           computed_rows=True)))

    def on_step_end(self, state):
        self.end.append(dict(step=state.step, block=state.block, last=state.last_step_of_block,
                             committed=state.committed.clone()))


def expected_diffusion_steps(P, gen_length, steps, block_length, block_cache=None):
    """Per step (block, step in block, block columns, first, last, rows), written out from the definition of the
    fixed schedule: steps / (gen_length / block_length) steps per block; a block cache computes every row at a
    block's first step, then from the block's start to the canvas' end (prefix) or the block's end (dual)."""
    S = P + gen_length
    out = []
    step_count = 0
    for blk in range(gen_length // block_length):
        lo, hi = P + blk * block_length, P + (blk + 1) * block_length
        per_block = steps // (gen_length // block_length)
        for i in range(per_block):
            if block_cache is None or i == 0:
                rows = None
            else:
                rows = slice(lo, S if block_cache == "prefix" else hi)
            out.append(dict(step=step_count, block=blk, sib=i, block_slice=slice(lo, hi), first=i == 0,
                            last=i == per_block - 1, rows=rows))
            step_count += 1
    return out


GEOMETRIES = [
    dict(gen_length=8, steps=8, block_length=8),  # one block
    dict(gen_length=12, steps=6, block_length=4),  # 3 blocks x 2 steps
    dict(gen_length=12, steps=3, block_length=4),  # 3 blocks of 1 step
    dict(gen_length=4, steps=4, block_length=1),  # blocks of one position, one step each
]


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
@pytest.mark.parametrize("block_cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "g{gen_length}-s{steps}-b{block_length}".format(**g))
def test_diffusion_geometry_on_the_state(llada, geom, cfg_scale, block_cache):
    rec = GeometryRecorder()
    out = generate(llada, None, PROMPTS, GenerationConfig(cfg_scale=cfg_scale, block_cache=block_cache,
                                                          stop_token_ids=(), **geom), callbacks=[rec])
    P, B = 5, 2
    assert out.prompt_length == P
    S = P + geom["gen_length"]
    want = expected_diffusion_steps(P, block_cache=block_cache, **geom)
    assert len(rec.begin) == len(rec.end) == len(want)
    nb = geom["gen_length"] // geom["block_length"]
    prompt = torch.zeros(B, S, dtype=torch.bool)
    prompt[0, :P] = True
    prompt[1, P - len(PROMPTS[1]):P] = True
    for b, e, w in zip(rec.begin, rec.end, want, strict=True):
        assert b["geometry"] == Geometry(gen_length=geom["gen_length"], block_length=geom["block_length"],
                                         num_blocks=nb, steps=geom["steps"], steps_per_block=geom["steps"] // nb)
        for k in ("step", "block", "sib", "block_slice", "first", "last", "rows"):
            assert b[k] == w[k], (k, b[k], w[k])
        assert (b["start"], b["end"]) == (w["block_slice"].start, w["block_slice"].stop)
        assert e["step"] == w["step"] and e["block"] == w["block"] and e["last"] == w["last"]
        # the step wrote inside the block the state named, and nowhere else
        outside = e["committed"].clone()
        outside[:, w["block_slice"]] = False
        assert e["committed"].any() and not outside.any()
        # masks laid out as the forward batch: guidance repeats the conditional rows, a cache cuts to its rows
        fwd = torch.cat([prompt, prompt]) if cfg_scale else prompt
        assert b["fwd"] == fwd.shape[0]
        assert torch.equal(b["prompt_fwd"], fwd)
        cut = fwd if w["rows"] is None else fwd[:, w["rows"]]
        assert torch.equal(b["prompt_rows"], cut)
        assert torch.equal(b["groups"]["prompt"], cut)


def test_ar_geometry_on_the_state(llama):
    """The autoregressive loop is one block of max_new_tokens positions, one token per step; its last step is the
    planned last at step begin, and at step end the step after which the loop stops."""
    rec = GeometryRecorder()
    n = 5
    out = generate(llama, None, [[1, 5, 9, 4], [1, 8]], GenerationConfig(max_new_tokens=n, stop_token_ids=()),
                   callbacks=[rec])
    P = out.prompt_length
    assert P == 4 and len(rec.begin) == n
    for t, (b, e) in enumerate(zip(rec.begin, rec.end, strict=True)):
        assert b["geometry"] == Geometry(gen_length=n, block_length=n, num_blocks=1, steps=n, steps_per_block=n)
        assert (b["step"], b["block"], b["sib"]) == (t, 0, t)
        assert b["block_slice"] == slice(P, P + n)
        assert b["first"] == (t == 0) and b["last"] == (t == n - 1) and e["last"] == (t == n - 1)
        assert b["rows"] is None and b["fwd"] == 2


def test_ar_last_step_when_every_row_stops_early(llama):
    rec = GeometryRecorder()
    first = generate(llama, None, [[1, 5, 9, 4]], GenerationConfig(max_new_tokens=1, stop_token_ids=()))
    stop = first.ids[0][0]  # the greedy first token: as a stop id, generation ends after step 0
    generate(llama, None, [[1, 5, 9, 4]], GenerationConfig(max_new_tokens=6, stop_token_ids=(stop,)),
             callbacks=[rec])
    assert len(rec.end) == 1
    assert rec.begin[0]["last"] is False and rec.end[0]["last"] is True


# ---- a sampler whose blocks take a variable number of steps ---------------------------------------------------

GEOM = dict(gen_length=12, steps=12, block_length=4)  # fixed schedule: 3 blocks x 4 steps, one token per step
EXTRA_AT = {0, 7}  # sampler calls that commit one token more: block 0's first step and block 2's first step
# Hand-written: block 0 takes 3 steps (2 + 1 + 1), block 1 four (1 each), block 2 three (2 + 1 + 1).
VAR_BLOCKS = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
VAR_SIB = [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]
VAR_FIRST = [0, 3, 7]  # the steps that start a block
VAR_LAST = [2, 6, 9]  # the steps that end a block


@pytest.fixture
def variable_steps(monkeypatch):
    """The sampler with a step rule that commits two tokens on some steps: those blocks end early."""
    calls = []
    own = diffusion_module.commit_step

    def commit_more(block_logits, block_masked, k, config, gens, **kw):
        extra = 1 if len(calls) in EXTRA_AT else 0
        calls.append(extra)
        return own(block_logits, block_masked, k + extra, config, gens, **kw)

    monkeypatch.setattr(diffusion_module, "commit_step", commit_more)
    return calls


def test_variable_steps_per_block_on_the_state(llada, variable_steps):
    rec = GeometryRecorder()
    out = generate(llada, None, PROMPTS, GenerationConfig(stop_token_ids=(), **GEOM), callbacks=[rec])
    P = out.prompt_length
    assert len(variable_steps) == len(rec.begin) == 10 and out.nfe == 10
    assert not (out.sequences[:, P:] == MASK).any()  # every block was finished
    assert [b["block"] for b in rec.begin] == VAR_BLOCKS == [s.block for s in out.trace]
    assert [b["sib"] for b in rec.begin] == VAR_SIB
    assert [b["step"] for b in rec.begin] == list(range(10))
    assert [t for t, b in enumerate(rec.begin) if b["first"]] == VAR_FIRST
    assert [t for t, e in enumerate(rec.end) if e["last"]] == VAR_LAST
    for b, e in zip(rec.begin, rec.end, strict=True):
        lo = P + 4 * b["block"]
        assert b["block_slice"] == slice(lo, lo + 4)
        outside = e["committed"].clone()
        outside[:, lo:lo + 4] = False
        assert not outside.any()


def test_variable_steps_per_block_reach_the_callbacks(llada, variable_steps):
    """Step delta refreshes at each block's first step, the tracker's block-start reference is each block's first
    step, and step sparsity's block voters are the current block, whatever the number of steps per block."""
    cfg = GenerationConfig(stop_token_ids=(), **GEOM)
    tracker = MaskOverlapTracker()
    sp = StepSparsity("input", TopP(0.7, scope="step"), voters="block", mask_observers=[tracker])
    voters = []

    class Voters(GenerationCallback):
        def on_step_begin(self, state):
            voters.append(sp._sparsifier.voters.clone())

    out = generate(llada, None, PROMPTS, cfg, sparsity=sp, callbacks=[tracker, Voters()])
    P, S = out.prompt_length, out.sequences.shape[1]
    block_start_of = [VAR_FIRST[blk] for blk in VAR_BLOCKS]
    refs = {(r["step"], r["ref_step"]) for r in tracker.records() if r["reference"] == "block_start"}
    assert refs == {(t, block_start_of[t]) for t in range(10)}
    assert [s["step_in_block"] for s in tracker.steps] == VAR_SIB
    for t, v in enumerate(voters):
        want = torch.zeros(2, S, dtype=torch.bool)
        want[:, P + 4 * VAR_BLOCKS[t]:P + 4 * VAR_BLOCKS[t] + 4] = True
        assert torch.equal(v, want)

    variable_steps.clear()
    with step_delta(llada, StepDelta("input", 0.5, 0.5, refresh="block_start")) as delta:
        generate(llada, None, PROMPTS, cfg)
    assert [s["refresh"] for s in delta.steps] == [t in VAR_FIRST for t in range(10)]


# ---- helpers ------------------------------------------------------------------------------------------------


def test_for_forward_refuses_a_mask_that_is_not_one_row_per_prompt():
    state = StepState(kind="diffusion", model=None, config=None, batch_size=2, prompt_length=1, num_steps=1,
                      forward_batch=4)
    assert torch.equal(state.for_forward(torch.tensor([[True], [False]])),
                       torch.tensor([[True], [False], [True], [False]]))
    with pytest.raises(ValueError, match="one row per prompt"):
        state.for_forward(torch.ones(3, 1, dtype=torch.bool))


@pytest.mark.parametrize("args,want", [
    ((32, None, None), (32, 32)),  # defaults: one block, one token per step
    ((32, 64, 8), (32, 8)),  # capped at one token per step
    ((32, 10, 8), (8, 8)),  # rounded down to a multiple of 4 blocks
    ((32, 2, 8), (4, 8)),  # at least one step per block
    ((30, 16, 8), (16, 30)),  # a block that does not divide gen_length becomes gen_length
    ((8, 8, 16), (8, 8)),  # a block longer than gen_length too
])
def test_fit_geometry(args, want):
    assert fit_geometry(*args) == want
    steps, block = want
    assert args[0] % block == 0 and steps % (args[0] // block) == 0 and steps <= args[0]
