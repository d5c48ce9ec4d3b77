"""Routed experts are sparsified as FFNs (docs/moe.md): tiny Gemma 4 (enable_moe_block), Qwen3-MoE and Mixtral
against a hand-written loop over each token's routed experts with brute-force top-p masks, p = 1 bit for bit
equal to the dense model, statistics per layer and per expert, wrapped models, and the refusals."""

import pytest
import torch
from conftest import WRAPPERS, wrapped_model
from test_adapters_sparsify import brute_top_p_mask

from dllm_sparse import FamilyProfile, TopP, find_ffns, sparsify
from dllm_sparse.models.families import find_experts
from dllm_sparse.sparsity.hooks import MaskEvent

transformers = pytest.importorskip("transformers")

SITES = ["input", "gate", "up", "intermediate"]


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # weights (and 3D expert weights); norms keep their init
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def gemma4(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=24, layer_types=["sliding_attention", "full_attention"])
    return _randomise(transformers.Gemma4ForCausalLM(cfg)).to(dtype)


def qwen3_moe(dtype=torch.float32, vocab_size=64):
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    return _randomise(transformers.Qwen3MoeForCausalLM(cfg)).to(dtype)


def mixtral(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    return _randomise(transformers.MixtralForCausalLM(cfg)).to(dtype)


MODELS = {"gemma4": gemma4, "qwen3_moe": qwen3_moe, "mixtral": mixtral}
IDS = torch.tensor([[5, 17, 3, 42, 8, 9, 60], [7, 7, 1, 9, 33, 4, 2]])


def reference_experts(module, hidden, top_k_index, top_k_weights, site, p):
    """Hand-written: for each token and each of its routed experts, the expert's FFN with the brute-force top-p
    mask of ``site`` applied by hand. Returns the output and {expert: [zero counts of its (token) vectors]}."""
    zeros = {}
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    act = module.act_fn
    for t in range(hidden.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            w_gate, w_up = module.gate_up_proj[e].chunk(2, dim=0)
            x = hidden[t]

            def cut(v):
                v = v * brute_top_p_mask(v, p)
                zeros.setdefault(e, []).append(int((v == 0).sum()))  # noqa: B023  (called within this iteration)
                return v

            x = cut(x) if site == "input" else x
            g, u = act(w_gate @ x), w_up @ x
            g = cut(g) if site == "gate" else g
            u = cut(u) if site == "up" else u
            h = g * u
            h = cut(h) if site == "intermediate" else h
            out[t] += (module.down_proj[e] @ h).double() * float(top_k_weights[t, k])
    return out, zeros


def _capture_experts_calls(model):
    calls = []
    handles = [f.experts.register_forward_hook(
        lambda m, args, out, layer=f.layer: calls.append((layer, m, [a.detach().clone() for a in args], out.detach())))
        for f in find_experts(model)]
    return calls, handles


def test_profiles_find_the_experts_and_the_dense_ffns():
    assert [f.layer for f in find_ffns(gemma4())] == [0, 1]  # Gemma 4: dense MLP and experts in every block
    assert [f.layer for f in find_experts(gemma4())] == [0, 1]
    assert [f.layer for f in find_ffns(qwen3_moe())] == [1]  # Qwen3-MoE: layer 1 is in mlp_only_layers
    assert [f.layer for f in find_experts(qwen3_moe())] == [0, 2]
    assert find_ffns(mixtral()) == [] and [f.layer for f in find_experts(mixtral())] == [0, 1]


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("site", SITES)
def test_experts_match_the_hand_written_reference(family, site):
    model, p = MODELS[family](), 0.7
    calls, handles = _capture_experts_calls(model)
    with torch.no_grad(), sparsify(model, site, TopP(p)) as stats:
        model(IDS)
    for h in handles:
        h.remove()
    assert [c[0] for c in calls] == [f.layer for f in find_experts(model)]
    layer_zeros, layer_entries = {}, {}
    for layer, module, (hidden, index, weights), got in calls:
        want, zeros = reference_experts(module, hidden, index, weights, site, p)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        per_expert = stats.per_expert(site)
        width = hidden.shape[-1] if site == "input" else module.intermediate_dim
        assert {e for (lay, e) in per_expert if lay == layer} == set(zeros)
        for e, z in zeros.items():
            row = per_expert[(layer, e)]
            assert row["tokens"] == len(z) == int((index == e).sum())  # every (token, expert) pair counted once
            assert row["sparsity"] == pytest.approx(sum(z) / (len(z) * width))
        layer_zeros[layer] = sum(sum(z) for z in zeros.values())
        layer_entries[layer] = index.numel() * width
        assert stats.per_layer(site, part="experts")[layer] == pytest.approx(layer_zeros[layer] / layer_entries[layer])
    assert 0 < stats.mean(site, part="experts") < 1


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_p_one_equals_dense_bit_for_bit(family, dtype, implementation):
    model = MODELS[family](dtype)
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        dense = model(IDS).logits
        for site in SITES:
            with sparsify(model, site, TopP(1.0)) as stats:
                got = model(IDS).logits
            assert torch.equal(got, dense), site
            assert stats.per_expert(site)  # the experts went through the sparse implementation
    assert model.config._experts_implementation == implementation  # restored


def test_bit_equality_sees_a_one_ulp_change_in_every_expert():
    """Constructed control for the p = 1 tests (not relying on eager and grouped_mm rounding differently, which
    depends on the CPU): one ulp added to every expert weight changes the bf16 logits, so torch.equal can fail."""
    a, b = gemma4(torch.bfloat16), gemma4(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)  # the same seed: the same model
        for f in find_experts(b):
            w = f.experts.gate_up_proj
            w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))
        assert not torch.equal(a(IDS).logits, b(IDS).logits)


def test_pooled_layer_sparsity_weighs_dense_and_expert_entries():
    model = gemma4()
    with torch.no_grad(), sparsify(model, "intermediate", TopP(0.6)) as stats:
        model(IDS)
    dense_width, expert_width = model.config.intermediate_size, model.config.moe_intermediate_size
    for layer, pooled in stats.per_layer("intermediate").items():
        d = stats.per_layer("intermediate", part="dense")[layer]
        e = stats.per_layer("intermediate", part="experts")[layer]
        n_tokens, n_pairs = IDS.numel(), IDS.numel() * model.config.top_k_experts
        want = ((d * n_tokens * dense_width + e * n_pairs * expert_width)
                / (n_tokens * dense_width + n_pairs * expert_width))
        assert pooled == pytest.approx(want)
    assert stats.forward_passes("intermediate") == 1
    records = [r for r in stats.records() if "expert" in r]
    assert sum(r["tokens"] for r in records if r["layer"] == 0) == IDS.numel() * 2


def test_padding_is_not_counted_for_experts():
    model = qwen3_moe()
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    calls, handles = _capture_experts_calls(model)
    with torch.no_grad(), sparsify(model, "input", TopP(0.8)) as stats:
        model(IDS, attention_mask=mask)
    for h in handles:
        h.remove()
    real = mask.reshape(-1).bool()
    for layer, _, (_, index, _), _ in calls:
        for (lay, e), row in stats.per_expert("input").items():
            if lay == layer:
                assert row["tokens"] == int((index[real] == e).sum())


def test_layers_select_experts_and_the_rest_run_as_before():
    model = qwen3_moe()
    with torch.no_grad():
        with sparsify(model, "input", TopP(0.5), layers=[1]) as dense_only:
            model(IDS)
        with sparsify(model, "input", TopP(0.5), layers=[-1]) as last:
            model(IDS)
    assert dense_only.per_layer("input") and not dense_only.expert_counts  # layer 1 is a dense MLP
    assert {lay for lay, _ in last.per_expert("input")} == {2} and not last.counts


def test_lm_eval_layer_check_counts_blocks_not_dense_ffns():
    from dllm_sparse import SparsityConfig
    from dllm_sparse.eval.tasks.lm_eval_args import check_layers_exist as _check_layers_exist

    model = qwen3_moe()  # one dense FFN (layer 1) among three blocks
    _check_layers_exist(model, [SparsityConfig("input", TopP(0.5), layers=(0, 2))])
    with pytest.raises(ValueError, match="layer 3 out of range: the model has 3 FFN layers"):
        _check_layers_exist(model, [SparsityConfig("input", TopP(0.5), layers=(3,))])


def test_record_masks_keeps_expert_masks_with_their_tokens():
    model = mixtral()
    seen = []
    calls, handles = _capture_experts_calls(model)
    with torch.no_grad(), sparsify(model, "input", TopP(0.6), record_masks=True,
                                   mask_observers=[seen.append]) as stats:
        model(IDS)
    for h in handles:
        h.remove()
    hidden = {layer: args[0] for layer, _, args, _ in calls}
    expert_masks = [m for m in stats.masks if "expert" in m]
    assert len(expert_masks) == sum(1 for e in seen if e.expert is not None) > 0
    for m in expert_masks:
        assert torch.equal(m["keep"], brute_top_p_mask(hidden[m["layer"]][m["tokens"]], 0.6))


def test_mask_tracker_refuses_expert_masks_or_skips_them():
    from dllm_sparse.samplers.tracking import MaskOverlapTracker

    event = MaskEvent(0, "input", torch.ones(3, 4, dtype=torch.bool), 0, None, expert=2, tokens=torch.arange(3))
    with pytest.raises(ValueError, match="routed expert 2 of layer 0.*experts='skip'"):
        MaskOverlapTracker()(event)
    tracker = MaskOverlapTracker(experts="skip")
    tracker(event)
    assert tracker.skipped_expert_events == 1
    with pytest.raises(ValueError, match="experts must be"):
        MaskOverlapTracker(experts="maybe")


@pytest.mark.parametrize("how", WRAPPERS)
def test_wrapped_moe_model_equals_the_plain_one(how):
    wrapped, reference = wrapped_model(qwen3_moe(), how)
    results = []
    for model in (wrapped, reference):
        with sparsify(model, "intermediate", TopP(0.6)) as stats, torch.no_grad():
            results.append((model(IDS).logits, stats.per_expert("intermediate")))
    (got, got_experts), (want, want_experts) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_experts == want_experts and got_experts


def test_hooks_and_implementation_are_restored_when_the_body_raises():
    model = gemma4()
    with torch.no_grad():
        dense = model(IDS).logits
        with pytest.raises(RuntimeError, match="boom"), sparsify(model, "input", TopP(0.3)):
            raise RuntimeError("boom")
        assert model.config._experts_implementation == "grouped_mm"
        assert torch.equal(model(IDS).logits, dense)


def test_sweep_rows_and_critical_sparsity_count_the_experts(tmp_path):
    from byte_tokenizer import ByteTokenizer

    from dllm_sparse.eval.analysis.critical import critical_sparsity, curves
    from dllm_sparse.eval.sweep.config import SweepConfig
    from dllm_sparse.eval.sweep.run import run_sweep
    from dllm_sparse.eval.tasks.builtin import MCItem, MultipleChoiceTask
    from dllm_sparse.models.loading import LoadedModel
    from dllm_sparse.sparsity.config import DENSE

    items = [MCItem("a", "one two", ["three", "four"], 0), MCItem("b", "x y", ["z", "zz", "w"], 2)]
    lm = LoadedModel(qwen3_moe(vocab_size=260), ByteTokenizer(), "ar", "tiny-moe", None, "qwen3_moe")
    cfg = SweepConfig(models=[lm], output_dir=tmp_path, sites=["intermediate"], thresholds=[1.0, 0.5],
                      tasks=["mc"], batch_size=8, progress=False)
    rows = run_sweep(cfg, task_factory=lambda name: MultipleChoiceTask("mc", items))
    dense = next(r for r in rows if r["site"] == DENSE)
    one, half = (next(r for r in rows if r["site"] == "intermediate" and r["p"] == p) for p in (1.0, 0.5))
    assert one["value"] == dense["value"]
    assert one["sparsity_experts"] == 0 < half["sparsity_experts"] and 0 < half["sparsity_dense"]
    # The row's sparsity is the mean over layers of each layer's pooled sparsity: layers 0 and 2 are experts only,
    # layer 1 the dense MLP only.
    assert half["sparsity"] == pytest.approx(sum(half["per_layer_sparsity"]) / 3)
    assert half["per_layer_sparsity"][1] == pytest.approx(half["sparsity_dense"])
    per_layer = half["per_layer_sparsity"]
    assert half["sparsity_experts"] == pytest.approx((per_layer[0] + per_layer[2]) / 2)
    seen = {k: tokens for k, (_, tokens) in half["per_expert_sparsity"].items()}
    assert {k.split("/")[0] for k in seen} == {"0", "2"}
    tokens_of_layer = [sum(t for k, t in seen.items() if k.startswith(f"{layer}/")) for layer in (0, 2)]
    assert tokens_of_layer[0] == tokens_of_layer[1]
    points = curves(rows)[("tiny-moe", "intermediate", "mc")]
    assert [pt["sparsity"] for pt in points] == [one["sparsity"], half["sparsity"]]
    crit = critical_sparsity([(pt["sparsity"], pt["relative"]) for pt in points])  # on the pooled x-axis
    assert crit.last_passing == max(pt["sparsity"] for pt in points if pt["relative"] >= 0.99)


def test_generation_counts_experts_per_step_prefill_and_cached_decode():
    from dllm_sparse.samplers import GenerationConfig, generate
    from dllm_sparse.samplers.step_sparsity import StepSparsity

    model = qwen3_moe()
    prompts = torch.tensor([[0, 5, 17, 3], [7, 7, 1, 9]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # row 0 left-padded
    sp = StepSparsity("intermediate", TopP(0.7))
    generate(model, None, prompts, GenerationConfig(max_new_tokens=3, stop_token_ids=()), attention_mask=mask,
             callbacks=[sp])
    tokens = {tag: sum(v["tokens"] for (layer, _), v in sp.stats.per_expert("intermediate", tag=tag).items()
                       if layer == 0) for tag in sp.stats.tags}
    top_k = model.config.num_experts_per_tok
    assert tokens == {"prefill": 7 * top_k, 1: 2 * top_k, 2: 2 * top_k}  # real prompt tokens, then one per row
    assert 0 < sp.stats.mean("intermediate", tag=2, part="experts") < 1


# ---- bad input ------------------------------------------------------------------------------------------------
def test_unsupported_experts_implementation_is_refused():
    model = qwen3_moe()
    model.config._experts_implementation_internal = "deepgemm"
    with pytest.raises(ValueError, match=r"Qwen3MoeExperts runs experts_implementation='deepgemm'.*grouped_mm"):
        with sparsify(model, "input", TopP(0.5)):
            pass


def test_an_experts_module_outside_the_experts_interface_is_refused():
    class HandRolledExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, 2))

    model = qwen3_moe()
    for f in find_experts(model):
        f.block.mlp.experts = HandRolledExperts()
    with pytest.raises(ValueError, match="HandRolledExperts does not dispatch through.*Qwen3MoeExperts"):
        sparsify(model, "gate", TopP(0.5)).__enter__()


def test_a_site_on_experts_without_that_projection_is_refused():
    model = mixtral()
    find_experts(model)[0].experts.has_gate = False
    with pytest.raises(ValueError, match=r"layer 0: experts module MixtralExperts.*no gate projection"):
        sparsify(model, "gate", TopP(0.5)).__enter__()


def test_shared_scopes_and_mask_selectors_are_refused_for_experts():
    model = gemma4()
    with pytest.raises(ValueError, match="scope 'step' is not defined for them"):
        sparsify(model, "input", TopP(0.5, scope="step")).__enter__()
    with pytest.raises(ValueError, match="mask selectors"):
        sparsify(model, "input", TopP(0.5), select_mask=lambda *a: None).__enter__()
    assert model.config._experts_implementation == "grouped_mm"


def test_an_activation_module_shared_by_dense_ffn_and_experts_is_refused_at_the_gate_site():
    model = gemma4()
    for layer in model.model.layers:
        layer.experts.act_fn = layer.mlp.act_fn
    with pytest.raises(ValueError, match="activation module is the dense FFN's"):
        sparsify(model, "gate", TopP(0.5)).__enter__()
    with torch.no_grad(), sparsify(model, "input", TopP(0.5)) as stats:  # other sites do not hook the activation
        model(IDS)
    assert stats.per_expert("input")


def test_nested_blocks_on_the_same_experts_are_refused():
    model = mixtral()
    with sparsify(model, "input", TopP(0.5)):
        with pytest.raises(ValueError, match="already sparsified"):
            sparsify(model, "up", TopP(0.5)).__enter__()
    assert model.config._experts_implementation == "grouped_mm"


def test_experts_the_profile_does_not_name_are_refused_not_left_dense():
    from dllm_sparse import register_family
    from dllm_sparse.kernels import accelerate_ffn
    from dllm_sparse.models.families import PROFILES

    saved = list(PROFILES)
    try:  # a Gemma 4 profile written before MoE: the dense MLP resolves, the experts are not named
        register_family(FamilyProfile("gemma4", ("gemma4_text",), layers="model.layers", ffn="mlp", gate="gate_proj",
                                      up="up_proj", down="down_proj", act="act_fn", activation="gelu_tanh"))
        model = gemma4()
        with pytest.raises(ValueError, match=r"routed experts the family profile 'gemma4' does not name "
                                             r"\(model.layers.0.experts \(Gemma4TextExperts\).*experts="):
            sparsify(model, "input", TopP(0.5)).__enter__()
        with pytest.raises(ValueError, match="does not name"):
            accelerate_ffn(model, site="input", rule=TopP(0.5), backend="torch")
    finally:
        PROFILES[:] = saved


def test_a_profile_without_experts_on_an_moe_model_names_the_missing_projections():
    dense_only = FamilyProfile("mixtral", ("mixtral",), layers="model.layers", ffn="mlp", gate="gate_proj",
                               up="up_proj", down="down_proj", act="act_fn")
    with pytest.raises(ValueError, match="family 'mixtral' does not fit MixtralForCausalLM.*gate_proj/up_proj"):
        find_ffns(mixtral(), dense_only)
    assert find_experts(mixtral(), dense_only) == []
