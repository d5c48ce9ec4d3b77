"""accelerate_ffn on mixture-of-experts models: each expert's gathered, column- / row-sparse products equal the
masking path (sparsify, tested against a hand-written loop in test_experts.py), the statistics count the same
experts, restore_ffn gives the dense model back bit for bit, and what the kernels cannot run is refused."""

import pytest
import torch
from test_experts import IDS, MODELS, SITES, gemma4, mixtral, qwen3_moe
from test_kernels import DEVICE, _triton_ready, run_triton_tests_in_interpreter

from dllm_sparse import SparsityStats, TopK, TopP, sparsify
from dllm_sparse.kernels import accelerate_ffn, accelerated_ffn, is_accelerated, restore_ffn
from dllm_sparse.models.families import find_experts


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("rule", [TopP(0.6), TopK(0.5)], ids=["top_p", "top_k"])
def test_kernels_equal_the_masking_path(family, site, rule):
    model = MODELS[family]()
    with torch.no_grad():
        with sparsify(model, site, rule) as want_stats:
            want = model(IDS).logits
        got_stats = SparsityStats()
        with accelerated_ffn(model, site=site, rule=rule, stats=got_stats, backend="torch"):
            assert is_accelerated(model)
            got = model(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got_experts, want_experts = got_stats.per_expert(site), want_stats.per_expert(site)
    assert got_experts.keys() == want_experts.keys() and got_experts
    for k, row in want_experts.items():
        assert got_experts[k]["tokens"] == row["tokens"]
        assert got_experts[k]["sparsity"] == pytest.approx(row["sparsity"], abs=0.02)  # ties at the threshold


@pytest.fixture(params=["torch", "triton"])
def be(request):
    if request.param == "triton" and (reason := _triton_ready()):
        pytest.skip(reason)
    return request.param


def test_triton_code_under_the_interpreter(request):
    run_triton_tests_in_interpreter(__file__, request)


@pytest.mark.parametrize("site", SITES)
def test_each_backend_equals_the_masking_path(site, be):
    model = mixtral().to(DEVICE)
    ids = IDS.to(DEVICE)
    with torch.no_grad():
        dense = model(ids).logits
        with sparsify(model, site, TopP(0.6)):
            want = model(ids).logits
        with accelerated_ffn(model, site=site, rule=TopP(0.6), backend=be):
            got = model(ids).logits
    assert (want - dense).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_restore_gives_the_dense_model_back_bit_for_bit():
    model = gemma4(torch.bfloat16)
    with torch.no_grad():
        dense = model(IDS).logits
        accelerate_ffn(model, site="intermediate", rule=TopP(0.5), backend="torch")
        assert not torch.equal(model(IDS).logits, dense)
        restore_ffn(model)
        assert not is_accelerated(model) and model.config._experts_implementation == "grouped_mm"
        assert torch.equal(model(IDS).logits, dense)


def test_layers_pick_experts_by_block_index():
    model = qwen3_moe()  # layer 1 is a dense MLP, layers 0 and 2 are MoE
    stats = SparsityStats()
    with torch.no_grad(), accelerated_ffn(model, site="input", rule=TopP(0.5), layers=[2], stats=stats,
                                          backend="torch"):
        model(IDS)
    assert {layer for layer, _ in stats.per_expert("input")} == {2} and not stats.counts


def test_shared_scope_and_reuse_are_refused_for_experts():
    from dllm_sparse.samplers.reuse import Every

    model = mixtral()
    with pytest.raises(ValueError, match="scope 'step' is not defined for routed experts"):
        accelerate_ffn(model, site="input", rule=TopP(0.5, scope="step"), backend="torch")
    with pytest.raises(ValueError, match="reuse is not defined for routed experts"):
        accelerate_ffn(model, site="input", rule=TopP(0.5, scope="step"), reuse=Every(2), backend="torch")
    assert not is_accelerated(model)


def test_a_peft_adapter_on_the_expert_weights_is_refused():
    from conftest import lora_model

    wrapped, _ = lora_model(qwen3_moe())
    assert any("ParamWrapper" in type(m).__name__ for m in wrapped.modules())
    with pytest.raises(ValueError, match="Qwen3MoeExperts is wrapped.*merge_and_unload"):
        accelerate_ffn(wrapped, site="gate", rule=TopP(0.5), layers=[0], backend="torch")
    assert not is_accelerated(wrapped)


def test_kernels_on_a_compiled_moe_model_equal_the_plain_one():
    model = qwen3_moe()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        with accelerated_ffn(model, site="input", rule=TopP(0.6), backend="torch"):
            want = model(IDS).logits
        with accelerated_ffn(compiled, site="input", rule=TopP(0.6), backend="torch"):
            got = compiled(IDS).logits
        dense = model(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense)


@pytest.mark.parametrize("argv, why", [
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--top-k", "9", "--experts", "8"], "cannot exceed --experts"),
    (["--p", "0"], "--p must be in"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_moe_bench_refuses_bad_arguments(argv, why, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "moe_bench.py"
    spec = importlib.util.spec_from_file_location("moe_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert why in capsys.readouterr().err


def test_offloaded_expert_weights_are_refused():
    accelerate = pytest.importorskip("accelerate")
    model = mixtral()
    accelerate.cpu_offload(model, execution_device="cpu")
    assert find_experts(model)[0].experts.gate_up_proj.is_meta
    with pytest.raises(ValueError, match="gate_up_proj weights are on the meta device"):
        accelerate_ffn(model, site="input", rule=TopP(0.5), backend="torch")
