"""accelerate_ffn equals the masking path (dllm_sparse.sparsity.hooks) on every family, and restore_ffn undoes
it.

Tiny random models come from conftest.build_tiny_model (LLaMA, Qwen2, Mistral, Gemma3 text, Dream-like Qwen2,
native LLaDA), with a larger init so that sparsity changes the logits visibly. The "triton" backend runs in a
child pytest under TRITON_INTERPRET=1 on CPU-only machines (see tests/test_kernels.py for why).
"""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
import torch.nn as nn
from conftest import FAMILIES, build_tiny_model
from test_kernels import DEVICE, _triton_ready, run_triton_tests_in_interpreter

from dllm_sparse import MaxP, SparsityStats, TopK, TopP, find_ffns, sparsify
from dllm_sparse.kernels import SparsePart, accelerate_ffn, accelerated_ffn, is_accelerated, restore_ffn

SITES = ("input", "intermediate", "gate", "up")


def _model(family: str, dtype=torch.float32) -> nn.Module:
    init = {"init_std": 0.2} if family == "llada" else {"initializer_range": 0.2}
    return build_tiny_model(family, **init).to(device=DEVICE, dtype=dtype)


def _ids(batch: int, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 100 + tokens)
    return torch.randint(3, 120, (batch, tokens), generator=g).to(DEVICE)


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits.float()


@pytest.fixture(params=["torch", "triton"])
def be(request):
    if request.param == "triton" and (reason := _triton_ready()):
        pytest.skip(reason)
    return request.param


def test_triton_code_under_the_interpreter(request):
    run_triton_tests_in_interpreter(__file__, request)


# --------------------------------------------------------------------------------------------------------
# Equality with the masking path
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("shape", [(2, 5), (1, 1)], ids=["tokens", "decode"])
def test_equals_masking_path_every_family(family, site, shape):
    model = _model(family)
    ids = _ids(*shape)
    dense = _logits(model, ids)
    with sparsify(model, site, TopP(0.5)):
        masked = _logits(model, ids)
    with accelerated_ffn(model, site, TopP(0.5), backend="torch"):
        fast = _logits(model, ids)
    assert (masked - dense).abs().max() > 1e-2  # the rule really changes this model's output
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "llada"])
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("shape", [(1, 4), (1, 1)], ids=["tokens", "decode"])
def test_kernel_backends_equal_masking_path(be, family, site, shape):
    model = _model(family)
    ids = _ids(*shape)
    with sparsify(model, site, TopP(0.6)):
        masked = _logits(model, ids)
    with accelerated_ffn(model, site, TopP(0.6), backend=be):
        fast = _logits(model, ids)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("site", SITES)
def test_projection_biases(be, site):
    torch.manual_seed(0)
    model = build_tiny_model("llama", initializer_range=0.2, mlp_bias=True).to(DEVICE)
    for f in find_ffns(model):  # biases start at zero: make them count
        for lin in (f.gate, f.up, f.down):
            nn.init.normal_(lin.bias, std=0.5)
    ids = _ids(2, 3)
    with sparsify(model, site, TopP(0.6)):
        masked = _logits(model, ids)
    with accelerated_ffn(model, site, TopP(0.6), backend=be):
        fast = _logits(model, ids)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", [TopK(0.5), MaxP(0.3), TopP(0.7, scope="sequence"), TopP(1.0)], ids=str)
@pytest.mark.parametrize("site", SITES)
def test_other_rules(be, rule, site):
    model = _model("llama")
    ids = _ids(2, 4)
    with sparsify(model, site, rule):
        masked = _logits(model, ids)
    with accelerated_ffn(model, site, rule, backend=be):
        fast = _logits(model, ids)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-4)


BF16_CASES = [(f, "torch") for f in FAMILIES] + [("llama", "triton"), ("llada", "triton")]


@pytest.mark.parametrize("family,be_name", BF16_CASES)
@pytest.mark.parametrize("site", SITES)
def test_bf16_matches_fp32_reference_of_the_same_masks(family, be_name, site):
    """bf16 accelerated logits vs the same masked computation in fp32: masks recorded from the bf16 masking
    path are replayed on an fp32 copy. Layer 0 only, so both runs see bit-identical mask inputs."""
    if be_name == "triton" and (reason := _triton_ready()):
        pytest.skip(reason)
    be = be_name
    model = _model(family, torch.bfloat16)
    ids = _ids(1, 5) if be == "triton" else _ids(2, 5)
    with sparsify(model, site, TopP(0.5), layers=[0], record_masks=True) as stats:
        _logits(model, ids)
    recorded = defaultdict(list)
    for m in stats.masks:
        recorded[m["layer"]].append(m["keep"].to(DEVICE))
    ref_model = copy.deepcopy(model).float()
    with sparsify(ref_model, site, TopP(0.5), layers=[0], select_mask=lambda layer, s, x, r: recorded[layer].pop(0)):
        ref = _logits(ref_model, ids)
    dense = _logits(ref_model, ids)
    with accelerated_ffn(model, site, TopP(0.5), layers=[0], backend=be):
        fast = _logits(model, ids)
    err = (fast - ref).abs().max()
    assert err <= 0.05 * ref.abs().max(), f"bf16 error {err:.3g} vs logits up to {ref.abs().max():.3g}"
    assert (ref - dense).abs().max() > 2 * err  # the comparison can tell masked from dense


# --------------------------------------------------------------------------------------------------------
# The inverse, the context manager, options
# --------------------------------------------------------------------------------------------------------


def _roles(model):
    return [(f.gate, f.up, f.act, f.down) for f in find_ffns(model)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", SITES)
def test_restore_is_exact(family, site):
    model = _model(family)
    ids = _ids(2, 5)
    before = _logits(model, ids)
    modules = _roles(model)
    keys = list(model.state_dict())
    accelerate_ffn(model, site, TopP(0.5))
    assert is_accelerated(model)
    assert list(model.state_dict()) == keys  # transposed copies are non-persistent buffers
    assert not torch.equal(_logits(model, ids), before)
    assert restore_ffn(model) is model
    assert not is_accelerated(model)
    assert _roles(model) == modules  # the very same module objects are back
    assert not any(isinstance(m, SparsePart) for m in model.modules())
    assert torch.equal(_logits(model, ids), before)  # bit-identical


def test_context_manager_restores_on_error():
    model = _model("llada")
    modules = _roles(model)
    with pytest.raises(RuntimeError, match="boom"):
        with accelerated_ffn(model, "gate", TopP(0.5)) as m:
            assert m is model and is_accelerated(model)
            raise RuntimeError("boom")
    assert _roles(model) == modules


def test_layers_subset():
    model = _model("qwen2")
    accelerate_ffn(model, "intermediate", TopP(0.5), layers=[-1])
    ffns = find_ffns(model)
    assert not isinstance(ffns[0].down, SparsePart) and isinstance(ffns[1].down, SparsePart)
    restore_ffn(model)


def test_records_the_same_sparsity_as_the_masking_path():
    model = _model("llama")
    ids = _ids(2, 5)
    for site in SITES:
        with sparsify(model, site, TopP(0.6)) as masked_stats:
            _logits(model, ids)
        fast_stats = SparsityStats()
        with accelerated_ffn(model, site, TopP(0.6), stats=fast_stats):
            _logits(model, ids)
        assert fast_stats.per_layer(site) == pytest.approx(masked_stats.per_layer(site))


def test_kv_cached_greedy_decode_matches_masking_path():
    model = _model("llama")
    prompt = _ids(1, 4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with sparsify(model, "input", TopP(0.5)):
            masked = model.generate(prompt, **kw)
        with accelerated_ffn(model, "input", TopP(0.5)):
            fast = model.generate(prompt, **kw)
    assert torch.equal(fast, masked)


@pytest.mark.parametrize("site", SITES)
def test_torch_compile_fullgraph(site):
    """The custom ops have fake implementations, so dynamo traces the accelerated FFN in one graph
    (aot_eager: the CPU fallback path; inductor and CUDA graphs need a GPU to be worth testing)."""
    model = _model("llama")
    mlp = find_ffns(model)[0].owner
    x = torch.randn(1, 3, 32, device=DEVICE)
    with torch.no_grad(), sparsify(model, site, TopP(0.6)):
        ref = mlp(x)
    torch._dynamo.reset()
    with torch.no_grad(), accelerated_ffn(model, site, TopP(0.6)):
        out = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------------------------


def test_bad_arguments_are_rejected():
    model = _model("llama")
    with pytest.raises(ValueError, match="unknown FFN site"):
        accelerate_ffn(model, "attention", TopP(0.5))
    with pytest.raises(ValueError, match="SparsityRule"):
        accelerate_ffn(model, "input", 0.5)
    with pytest.raises(ValueError, match="out of range"):
        accelerate_ffn(model, "input", TopP(0.5), layers=[7])
    with pytest.raises(ValueError, match="unknown kernel backend"):
        accelerate_ffn(model, "input", TopP(0.5), backend="cuda")
    accelerate_ffn(model, "input", TopP(0.5))
    with pytest.raises(ValueError, match="already accelerated"):
        accelerate_ffn(model, "input", TopP(0.5))
    restore_ffn(model)


def test_non_linear_projection_is_rejected_before_any_swap():
    class Quantized(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = _model("mistral")
    mlp = find_ffns(model)[1].owner
    mlp.gate_proj = Quantized(mlp.gate_proj)
    with pytest.raises(ValueError, match="not nn.Linear"):
        accelerate_ffn(model, "input", TopP(0.5))
    assert not is_accelerated(model)  # layer 0 was not swapped either


# --------------------------------------------------------------------------------------------------------
# NaN is never hidden: it propagates exactly as in the dense model, in every path
# --------------------------------------------------------------------------------------------------------


def _poison_ffn_input(model, layer=0, token=(0, 2), feature=5):
    """A forward pre-hook on one FFN that puts a NaN into one token's input (a stand-in for a numerical fault)."""
    ffn = find_ffns(model)[layer]

    def hook(module, args):
        x = args[0].clone()
        x[token[0], token[1], feature] = float("nan")
        return (x, *args[1:])

    return ffn.owner.register_forward_pre_hook(hook)  # LlamaMLP: its input is the FFN input x


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("rule", [TopP(0.5), TopK(0.5), MaxP(0.2), TopP(0.5, scope="step")],
                         ids=["top_p", "top_k", "max_p", "top_p_step"])
def test_nan_propagates_like_dense(be, site, rule):
    model = _model("llama")
    ids = _ids(2, 5)
    handle = _poison_ffn_input(model)
    try:
        dense = _logits(model, ids)
        with sparsify(model, site, rule) as stats:
            masked = _logits(model, ids)
        with accelerated_ffn(model, site, rule, backend=be):
            fast = _logits(model, ids)
    finally:
        handle.remove()
    nan = torch.isnan(dense)
    assert nan.any() and not nan.all()  # the fault reached some outputs, not all
    assert torch.equal(torch.isnan(masked), nan)
    assert torch.equal(torch.isnan(fast), nan)
    assert stats.per_layer(site)[0] < 1.0  # the poisoned layer is not reported as 100 % sparse
