"""The fast path of the shared keep-sets: accelerate_ffn with scope "step" / "step_wina" (packed kept rows, plain
matmuls) equals the masking path (sparsify hooks) on every family, and with a reuse policy the packed weights are
reused between refreshes with the same tokens and logits as the masking path driven by the same policy. On the
Triton backend a fresh selection runs the gathered GEMM instead of packing (a child pytest under TRITON_INTERPRET=1
on CPU-only machines, as in tests/test_kernels.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import FAMILIES, build_tiny_model
from test_kernels import DEVICE, _triton_ready, run_triton_tests_in_interpreter

from dllm_sparse import SparsityStats, TopP, find_ffns, sparsify
from dllm_sparse.kernels import PackedKeepSet, accelerate_ffn, accelerated_ffn, restore_ffn, sparse_ffn
from dllm_sparse.samplers import GenerationConfig, StepSparsity, generate
from dllm_sparse.samplers.reuse import Adaptive, BlockStart, Every

PROMPTS = [[5, 17, 3, 42, 8]]
CFG = GenerationConfig(gen_length=16, steps=8, block_length=8, stop_token_ids=())


def _model(family: str) -> nn.Module:
    init = {"init_std": 0.2} if family == "llada" else {"initializer_range": 0.2}
    return build_tiny_model(family, **init)


def _ids(batch: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 100 + tokens)
    return torch.randint(3, 120, (batch, tokens), generator=g)


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ["input", "intermediate"])
@pytest.mark.parametrize("scope", ["step", "step_wina"])
@pytest.mark.parametrize("shape", [(1, 6), (2, 5)], ids=["one", "batch"])
def test_shared_fast_path_equals_masking_path(family, site, scope, shape):
    model = _model(family)
    ids = _ids(*shape)
    dense = _logits(model, ids)
    rule = TopP(0.5, scope=scope)
    with sparsify(model, site, rule):
        masked = _logits(model, ids)
    with accelerated_ffn(model, site, rule, backend="torch"):
        fast = _logits(model, ids)
    assert (masked - dense).abs().max() > 1e-2  # the rule really changes this model's output
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_triton_code_under_the_interpreter(request):
    run_triton_tests_in_interpreter(__file__, request)


@pytest.mark.parametrize("family", ["llama", "llada"])
@pytest.mark.parametrize("site", ["input", "intermediate"])
@pytest.mark.parametrize("shape", [(1, 6), (2, 5)], ids=["one", "batch"])
def test_triton_fresh_selection_runs_the_gathered_gemm(family, site, shape, monkeypatch):
    """Backend "triton": a fresh shared keep-set goes to the gathered tl.dot GEMM (no PackedKeepSet is built) with
    the masking path's result; a reuse policy still packs (the copy pays for itself over the reusing steps)."""
    if reason := _triton_ready():
        pytest.skip(reason)
    model = _model(family).to(DEVICE)
    ids = _ids(*shape).to(DEVICE)
    rule = TopP(0.5, scope="step")
    with sparsify(model, site, rule):
        masked = _logits(model, ids)
    packed = []
    real_init = PackedKeepSet.__init__
    monkeypatch.setattr(PackedKeepSet, "__init__", lambda self, *a: packed.append(1) or real_init(self, *a))
    launches = []
    real_gemm = sparse_ffn.column_sparse_matmul
    monkeypatch.setattr(sparse_ffn, "column_sparse_matmul", lambda *a, **k: launches.append(1) or real_gemm(*a, **k))
    with accelerated_ffn(model, site, rule, backend="triton"):
        fast = _logits(model, ids)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-4)
    n_layers = len(find_ffns(model))
    assert packed == [] and len(launches) == n_layers * (2 if site == "input" else 1)
    if family == "llada":
        policy = BlockStart()
        with accelerated_ffn(model, site, rule, backend="triton", reuse=policy):
            generate(model, None, PROMPTS, CFG, callbacks=[policy])
        assert len(packed) > 0


def test_packed_keep_set_reads_only_kept_rows():
    keep = torch.tensor([[[True, False, True, False]], [[True, False, False, False]]])
    w = torch.arange(12.0).reshape(4, 3)
    pk = PackedKeepSet(keep, {"w": w})
    assert pk.idx.tolist() == [0, 2] and pk.kept == 2
    assert torch.equal(pk.weights["w"], w[[0, 2]]) and pk.weights["w"].is_contiguous()
    v = torch.ones(2, 3, 4)
    g = pk.gather(v)
    assert torch.equal(g[0], torch.ones(3, 2)) and torch.equal(g[1], torch.tensor([[1.0, 0.0]] * 3))
    assert torch.equal(pk.scatter(g, 4), v.masked_fill(~keep, 0))
    one = PackedKeepSet(keep[:1], {"w": w})
    assert one.row_keep is None  # one sample: its set is the union, no per-row masking


def test_stats_equal_the_masking_path():
    model = _model("llama")
    ids = _ids(1, 6)
    rule = TopP(0.5, scope="step")
    for site in ("input", "intermediate"):
        a, b = SparsityStats(), SparsityStats()
        with sparsify(model, site, rule, stats=a):
            _logits(model, ids)
        with accelerated_ffn(model, site, rule, backend="torch", stats=b):
            _logits(model, ids)
        assert a.per_layer(site) == pytest.approx(b.per_layer(site))


class _Logits:
    """Records the block logits of every step."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, state):
        self.steps.append(state.logits.clone())


@pytest.mark.parametrize("site", ["input", "intermediate"])
@pytest.mark.parametrize("make", [lambda: Every(3), BlockStart], ids=["every3", "block_start"])
def test_reuse_on_the_fast_path_equals_the_masking_path(llada, site, make):
    rule = TopP(0.5, scope="step")
    masking_policy, log_a = make(), _Logits()
    sp = StepSparsity(site, rule, select_mask=masking_policy)
    a = generate(llada, None, PROMPTS, CFG, sparsity=sp, callbacks=[masking_policy, log_a])
    fast_policy, log_b = make(), _Logits()
    accelerate_ffn(llada, site, rule, backend="torch", reuse=fast_policy)
    try:
        b = generate(llada, None, PROMPTS, CFG, callbacks=[fast_policy, log_b])
    finally:
        restore_ffn(llada)
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(log_a.steps, log_b.steps, strict=True):
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    ra, rb = masking_policy.report(), fast_policy.report()
    assert ra["selections"] == rb["selections"] and ra["refresh_steps"] == rb["refresh_steps"]
    assert rb["positions_reused"] > 0 and rb["selections"] < CFG.steps * len(find_ffns(llada))
    # and reuse really changed something relative to fresh shared masks
    fresh = generate(llada, None, PROMPTS, CFG, sparsity=StepSparsity(site, rule), callbacks=[log_c := _Logits()])
    assert any((x - y).abs().max() > 1e-4 for x, y in zip(log_a.steps, log_c.steps, strict=True)) \
        or not torch.equal(fresh.sequences, a.sequences)


def test_reused_intermediate_set_skips_gate_and_up_rows(llada):
    """On a reuse step the gate and up projections return only the kept rows (compact), packed once."""
    policy = BlockStart()
    accelerate_ffn(llada, "intermediate", TopP(0.5, scope="step"), backend="torch", reuse=policy)
    widths = []
    ffn0 = find_ffns(llada)[0]
    handle = ffn0.gate.register_forward_hook(lambda m, a, out: widths.append(out.shape[-1]))
    try:
        generate(llada, None, PROMPTS, CFG, callbacks=[policy])
    finally:
        handle.remove()
        restore_ffn(llada)
    d_ff = ffn0.down.weight.shape[1]
    assert widths[0] == d_ff  # the refresh step runs gate densely
    assert all(w < d_ff for w in widths[1:4])  # reuse steps: only the kept rows
    packed = [e.payload for e in policy._cache.values()]  # cleared at generation end
    assert packed == []


def test_bad_reuse_arguments_are_refused(llada):
    with pytest.raises(ValueError, match="Adaptive"):
        accelerate_ffn(llada, "input", TopP(0.5, scope="step"), reuse=Adaptive(0.5))
    with pytest.raises(ValueError, match="shared scope"):
        accelerate_ffn(llada, "input", TopP(0.5), reuse=Every(2))
    with pytest.raises(ValueError, match="input and intermediate"):
        accelerate_ffn(llada, "gate", TopP(0.5, scope="step"), reuse=Every(2))
    assert not any(type(m).__name__ == "SparsePart" for m in llada.modules())


def test_frontier_helpers():
    import dllm_sparse.eval.studies.step_frontier as sf

    assert sf.ideal_ffn_speedup("input", 0.5, False) == pytest.approx(1.5)
    assert sf.ideal_ffn_speedup("intermediate", 0.5, True) == pytest.approx(2.0)
    assert sf.ideal_ffn_speedup("intermediate", 0.5, False) == pytest.approx(1.2)
    pts = [(0.25, 0.9), (0.5, 1.1), (0.75, 1.5)]
    assert sf.break_even(pts, 1.0) == pytest.approx(0.375)
    assert sf.break_even(pts, 1.5) == pytest.approx(0.75)
    assert sf.break_even(pts, 2.0) is None
    assert sf.strategy_names(["every4"]) == ["token", "step", "step+every4"]
    assert sf.refresh_interval("step+every4", 32) == 4 and sf.refresh_interval("step+block_start", 32) == 32
    # speedup ranges pair each repeat's cell with the same repeat's dense timing
    samples = {"dense": [{"ffn": 1.0, "step": 2.0}, {"ffn": 3.0, "step": 2.0}],
               "c": [{"ffn": 0.5, "step": 4.0, "ffn_reuse": 0.25}, {"ffn": 1.0, "step": 1.0, "ffn_reuse": 1.5}]}
    assert sf.speedup_range(samples, "c", "ffn") == [2.0, 3.0]  # unpaired min/max would give [1.0, 6.0]
    assert sf.speedup_range(samples, "c", "step") == [0.5, 2.0]
    assert sf.speedup_range(samples, "c", "ffn_reuse") == [2.0, 4.0]
