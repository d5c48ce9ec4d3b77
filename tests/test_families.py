"""Family profiles: a new family in one registration call, fused gate_up FFNs, and the diffusion facts
(mask id, logit shift, end ids, LM head) reaching the samplers and the likelihood scorer from the profile.

The fused-FFN model is transformers' own ``Phi3ForCausalLM`` (``mlp.gate_up_proj`` -> [gate; up],
``mlp.activation_fn``, ``mlp.down_proj``), tiny and random. Each site is checked against the FFN computed
by hand from the very same modules with the masked vector (a brute-force top-p in exact arithmetic).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import FFN, HIDDEN, LAYERS, VOCAB, _common, build_tiny_model
from test_adapters_sparsify import brute_top_p_mask, hook_count
from test_kernels import DEVICE, _triton_ready, run_triton_tests_in_interpreter
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from dllm_sparse import (
    PROFILES,
    FamilyProfile,
    TopP,
    detect_family,
    family_named,
    find_ffns,
    register_family,
    sparsify,
    without_lm_head,
)
from dllm_sparse.eval.scoring.elbo import diffusion_elbo_tokens
from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.kernels import accelerated_ffn, restore_ffn
from dllm_sparse.models.loading import LoadedModel
from dllm_sparse.samplers import GenerationConfig, MaskedDiffusionGenerator, generate
from dllm_sparse.samplers.common import resolve_stop_ids
from dllm_sparse.samplers.diffusion import resolve_mask_id

SITES = ("input", "gate", "up", "intermediate")


@pytest.fixture
def registry():
    """Registrations made by a test are undone afterwards."""
    saved = list(PROFILES)
    yield PROFILES
    PROFILES[:] = saved


def tiny_phi3(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(**_common(initializer_range=0.2))).double().eval()


def ids_for(seed: int = 0, shape=(2, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB - 8, shape, generator=g)


def register_phi3() -> FamilyProfile:
    # The acceptance check of the issue: a new family, fused projection included, in a single call.
    return register_family(FamilyProfile("phi3", ("phi3",), layers="model.layers", ffn="mlp",
                                         gate_up="gate_up_proj", down="down_proj", act="activation_fn"))


# --------------------------------------------------------------------------------------------------------------
# Fused gate_up: the masking path
# --------------------------------------------------------------------------------------------------------------


def test_phi3_is_unknown_until_registered_then_resolves(registry):
    model = tiny_phi3()
    with pytest.raises(ValueError, match="register_family"):
        detect_family(model)
    profile = register_phi3()
    assert detect_family(model) is profile and profile.fused and profile.kind == "ar"
    ffns = find_ffns(model)
    assert [f.layer for f in ffns] == list(range(LAYERS))
    for f, layer in zip(ffns, model.model.layers, strict=True):
        assert (f.gate_up, f.down, f.act, f.owner, f.block) == (layer.mlp.gate_up_proj, layer.mlp.down_proj,
                                                                 layer.mlp.activation_fn, layer.mlp, layer)
        assert f.gate is None and f.up is None
        assert f.gate_up.weight.shape == (2 * FFN, HIDDEN)


def _by_hand(mlp: nn.Module, x: torch.Tensor, site: str, p: float) -> torch.Tensor:
    """Phi-3's FFN written out, with the site's vector replaced by its brute-force top-p."""

    def masked(v):
        return v.masked_fill(~brute_top_p_mask(v, p), 0)

    if site == "input":
        x = masked(x)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    act = mlp.activation_fn(gate)
    if site == "gate":
        act = masked(act)
    if site == "up":
        up = masked(up)
    h = up * act
    if site == "intermediate":
        h = masked(h)
    return mlp.down_proj(h)


@pytest.mark.parametrize("site", SITES)
def test_fused_sites_equal_the_ffn_by_hand(registry, site):
    register_phi3()
    model = tiny_phi3()
    ids = ids_for()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    # Hooks on the FFN owner see its real input and its real (sparsified) output.
    handles = [layer.mlp.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out)))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad(), sparsify(model, site, TopP(0.6)) as stats:
            sparse = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(LAYERS)) and sorted(stats.per_layer()) == list(range(LAYERS))
    for i, layer in enumerate(model.model.layers):
        x, out = seen[i]
        with torch.no_grad():
            assert torch.equal(out, _by_hand(layer.mlp, x, site, 0.6)), f"layer {i}"
            assert not torch.equal(out, _by_hand(layer.mlp, x, "none", 1.0))  # the rule really acted
    assert 0.2 < stats.mean() < 0.95 and not torch.equal(sparse, dense)
    # The model is bit-identical afterwards: no hook left, same logits.
    assert hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense)


def test_fused_top_p_one_is_dense(registry):
    register_phi3()
    model = tiny_phi3()
    ids = ids_for(1)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        for site in SITES:
            with sparsify(model, site, TopP(1.0)):
                assert torch.equal(model(input_ids=ids).logits, dense), site


# --------------------------------------------------------------------------------------------------------------
# Fused gate_up: the accelerated FFN
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("shape", [(2, 5), (1, 1)], ids=["tokens", "decode"])
def test_fused_accelerate_ffn_equals_masking_path(registry, site, shape):
    register_phi3()
    model = tiny_phi3().float()
    ids = ids_for(2, shape)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with sparsify(model, site, TopP(0.5)):
            masked = model(input_ids=ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with accelerated_ffn(model, site, TopP(0.5), backend="torch"):
            fast = model(input_ids=ids).logits
            assert model.state_dict().keys() == state.keys()  # the swap keeps the checkpoint layout
        restored = model(input_ids=ids).logits
    assert (masked - dense).abs().max() > 1e-2
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)
    assert torch.equal(restored, dense)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert restore_ffn(model) is model


@pytest.fixture(params=["torch", "triton"])
def be(request):
    if request.param == "triton" and (reason := _triton_ready()):
        pytest.skip(reason)
    return request.param


def test_triton_code_under_the_interpreter(request):
    run_triton_tests_in_interpreter(__file__, request)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("rule", [TopP(0.5), TopP(0.5, scope="step")], ids=["token", "step"])
def test_fused_kernel_backends_equal_masking_path(registry, be, site, rule):
    # The kernels read the gate and up halves of gate_up as row views of one weight (a shared keep-set at the
    # input site: one packed matrix per half, or the gathered GEMM on Triton).
    register_phi3()
    model = tiny_phi3().float().to(DEVICE)
    ids = ids_for(4, (2, 3)).to(DEVICE)
    with torch.no_grad():
        with sparsify(model, site, rule):
            masked = model(input_ids=ids).logits
        with accelerated_ffn(model, site, rule, backend=be):
            fast = model(input_ids=ids).logits
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Profile validation
# --------------------------------------------------------------------------------------------------------------


NAMES = dict(layers="model.layers", ffn="mlp", down="down_proj", act="act_fn")


@pytest.mark.parametrize("fields,message", [
    (dict(gate="g"), "gate and up projections"),
    (dict(gate="g", up="u", gate_up="gu"), "fused projection replaces both"),
    (dict(gate_up="gu", kind="masked"), "kind must be one of"),
    (dict(gate_up="gu", mask_id=5), "kind='diffusion'"),
    (dict(gate_up="gu", down=""), "down projection"),
])
def test_profile_errors_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        FamilyProfile("bad", ("bad",), **{**NAMES, **fields})
    with pytest.raises(TypeError, match="FamilyProfile"):
        register_family(dict(family="bad"))


def test_profile_normalises_hand_written_fields():
    p = FamilyProfile("Odd", "MyArch", **NAMES, gate_up="gu", kind="diffusion", end_ids=[7, 9])
    assert p.family == "odd" and p.model_types == ("myarch",) and p.end_ids == (7, 9)
    assert hash(p) == hash(FamilyProfile("Odd", ("myarch",), **NAMES, gate_up="gu", kind="diffusion",
                                         end_ids=(7, 9)))  # frozen, comparable


def test_builtin_diffusion_facts():
    llada, dream = family_named("llada"), family_named("dream")
    assert (llada.kind, llada.mask_id, llada.logit_shift, llada.end_ids) == ("diffusion", 126336, False,
                                                                              (126081, 126348))
    assert (dream.kind, dream.mask_id, dream.logit_shift, dream.end_ids) == ("diffusion", 151666, True, ())
    assert all(family_named(f).mask_id is None and not family_named(f).logit_shift
               for f in ("llama", "qwen2", "mistral", "gemma3"))
    assert family_named("gemma3_text") is family_named("gemma3")  # a model type names its family too
    assert family_named("") is None and family_named("nope") is None


# --------------------------------------------------------------------------------------------------------------
# A new diffusion family: its facts reach the sampler and the scorer
# --------------------------------------------------------------------------------------------------------------


class ToyDiffusionConfig(LlamaConfig):
    """LLaMA module names under a model type of its own; the config names no mask token."""

    model_type = "toydiff"


TOY_MASK, TOY_END = VOCAB - 1, VOCAB - 3


def toy_diffusion_model() -> nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(ToyDiffusionConfig(**_common(initializer_range=0.3))).eval()
    assert getattr(model.config, "mask_token_id", None) is None
    return model


def register_toy() -> FamilyProfile:
    return register_family(FamilyProfile("toydiff", ("toydiff",), layers="model.layers", ffn="mlp",
                                         gate="gate_proj", up="up_proj", down="down_proj", act="act_fn",
                                         kind="diffusion", mask_id=TOY_MASK, logit_shift=True, end_ids=(TOY_END,)))


def test_new_diffusion_family_reaches_the_sampler(registry):
    model = toy_diffusion_model()
    register_toy()
    gen = MaskedDiffusionGenerator(model)  # family detected from the model
    assert gen.family == "toydiff" and resolve_mask_id(model, None, None, gen.family) == TOY_MASK
    assert TOY_END in resolve_stop_ids(GenerationConfig(), model, None, gen.family)
    assert TOY_END not in resolve_stop_ids(GenerationConfig(), model, None, "")

    canvases = []
    cfg = GenerationConfig(gen_length=8, steps=8, block_length=8)
    prompt = [[5, 6, 7, 8]]
    out = gen.generate(prompt, cfg, callbacks=[lambda s: canvases.append(s.canvas.clone())])
    # The first committed step leaves 7 positions holding the profile's mask id.
    assert int((canvases[0][0, 4:] == TOY_MASK).sum()) == 7
    # The default shift is the profile's: the same tokens as with logit_shift=True, others without it.
    cut = GenerationConfig(gen_length=8, steps=8, block_length=8, stop_token_ids=())
    shifted = gen.generate(prompt, cut, logit_shift=True).sequences
    assert torch.equal(gen.generate(prompt, cut).sequences, shifted)
    assert not torch.equal(gen.generate(prompt, cut, logit_shift=False).sequences, shifted)
    # Generation cuts its output at the profile's end id.
    row = out.sequences[0, 4:].tolist()
    expected = row[:row.index(TOY_END)] if TOY_END in row else row
    assert out.ids[0] == expected
    # The same through generate() and a LoadedModel that carries only the family name.
    lm = LoadedModel(model, None, "diffusion", "toy", family="toydiff")
    assert torch.equal(generate(lm, prompts=prompt, config=cut).sequences, shifted)


def test_new_diffusion_family_reaches_the_scorer(registry):
    model = toy_diffusion_model()
    register_toy()
    reqs = [([5, 6, 7], [8, 9, 10]), ([11, 12], [13, 14, 15, 16])]
    scorer = Scorer.from_loaded(LoadedModel(model, None, "diffusion", "toy", family="toydiff"), mc_num=8,
                                mc_batch=4)
    assert scorer.mask_id == TOY_MASK and scorer.shift_logits
    got = scorer.loglikelihood_tokens(reqs)
    explicit = diffusion_elbo_tokens(model, reqs, mask_id=TOY_MASK, mc_num=8, mc_batch=4, seed=scorer.seed,
                                     shift_logits=True)
    unshifted = diffusion_elbo_tokens(model, reqs, mask_id=TOY_MASK, mc_num=8, mc_batch=4, seed=scorer.seed,
                                      shift_logits=False)
    assert got == explicit and got != unshifted
    with pytest.raises(ValueError, match="mask_id"):
        Scorer(model, None, "diffusion")  # no family, no config or tokenizer mask id: a clear error


# --------------------------------------------------------------------------------------------------------------
# The LM head split off the forward (likelihood and adaptation share it)
# --------------------------------------------------------------------------------------------------------------


def test_without_lm_head_on_native_llada():
    model = build_tiny_model("llada")
    head = model.model.transformer.ff_out
    ids = ids_for(3)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with without_lm_head(model) as got:
            assert got is head and isinstance(model.model.transformer.ff_out, nn.Identity)
            hidden = model(input_ids=ids).logits
        assert model.model.transformer.ff_out is head
        assert hidden.shape[-1] == HIDDEN and torch.equal(head(hidden), logits)


def test_without_lm_head_keeps_the_head_where_unsafe():
    llada = build_tiny_model("llada")
    llada.config.scale_logits = True  # work after the head: the profile's head_unless
    with without_lm_head(llada) as head:
        assert head is None and isinstance(llada.model.transformer.ff_out, nn.Linear)
    llada.config.scale_logits = False
    remote_cls = type("LLaDAModelLM", (type(llada),), {"__module__": "transformers_modules.GSAI.modeling_llada"})
    llada.__class__ = remote_cls  # a checkpoint's own code: what follows its head is unknown
    with without_lm_head(llada) as head:
        assert head is None
    gemma = build_tiny_model("gemma3")  # soft-capping follows its head: the profile names none
    with without_lm_head(gemma) as head:
        assert head is None and isinstance(gemma.lm_head, nn.Linear)
    with without_lm_head(nn.Linear(2, 2)) as head:  # unknown architecture
        assert head is None


def test_without_lm_head_splits_the_head_of_llama_style_ar_models():
    """Llama, Qwen2 and Mistral end their forward with the head: split off, the forward returns the final hidden
    states, and the head applied to them gives the forward's logits; the head is back after the block."""
    for family in ("llama", "qwen2", "mistral"):
        model = build_tiny_model(family).eval()
        ids, original = torch.tensor([[3, 9, 27, 4]]), model.lm_head
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            with without_lm_head(model) as head:
                assert head is original and isinstance(model.lm_head, nn.Identity)
                hidden = model(input_ids=ids).logits
                assert hidden.shape[-1] == model.config.hidden_size
            torch.testing.assert_close(torch.nn.functional.linear(hidden, head.weight, head.bias), logits)
        assert model.lm_head is original
