"""DiffusionGemma (uniform-noise block diffusion) and Gemma 4 as families: loading, steps, likelihood, bad input.

Tiny random models of the ``-mini`` shapes (dllm_sparse.models.gemma_shapes), saved to temporary directories."""

import json
import shutil
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dllm_sparse import load_model
from dllm_sparse.eval.scoring.common import item_generator
from dllm_sparse.eval.scoring.elbo import elbo_masks
from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.models.diffusion_gemma import share_encoder_ffns, text_stacks
from dllm_sparse.models.families import family_named, find_ffns
from dllm_sparse.models.gemma_shapes import build_moe_random, moe_config, moe_weight_bytes, save_moe_checkpoint
from dllm_sparse.samplers import GenerationConfig, MaskOverlapTracker, StepSparsity, generate
from dllm_sparse.sparsity.config import SparsityConfig
from dllm_sparse.sparsity.rules import TopP
from dllm_sparse.sparsity.stats import SparsityStats

DG, G4 = "diffusion-gemma-26b-a4b-mini", "gemma4-26b-a4b-mini"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma_pair")
    out = {}
    for name in (DG, G4):
        model, _ = build_moe_random(name, layers=2, seed=1)
        out[name] = save_moe_checkpoint(model, root / name, name)
    return out


@pytest.fixture(scope="module")
def dg(dirs):
    return load_model(dirs[DG])


def test_load_model_reads_both_families_natively(dirs, dg):
    assert (dg.kind, dg.family, dg.mask_id, type(dg.model).__name__) == (
        "diffusion", "diffusion_gemma", None, "DiffusionGemmaForBlockDiffusion")
    ar = load_model(dirs[G4])
    assert (ar.kind, ar.family, type(ar.model).__name__) == ("ar", "gemma4", "Gemma4ForConditionalGeneration")
    # The profile names the decoder's dense MLPs; the encoder runs through the same modules.
    ffns = find_ffns(dg.model)
    encoder, decoder = text_stacks(dg.model)
    assert [f.owner for f in ffns] == [layer.mlp for layer in decoder]
    assert all(e.mlp is d.mlp and e.experts is d.experts for e, d in zip(encoder, decoder, strict=True))
    assert [f.owner for f in find_ffns(ar.model)] == [layer.mlp for layer in ar.model.model.language_model.layers]


def test_sharing_the_encoder_ffns_changes_no_logit():
    model, _ = build_moe_random(DG, layers=2, seed=3)
    # build_moe_random shared them; a fresh model of the same weights without sharing is the reference.
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    canvas = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    assert not any(e.mlp is d.mlp for e, d in zip(*text_stacks(ref), strict=True))
    with torch.no_grad():
        want = ref(input_ids=ids, decoder_input_ids=canvas).logits
        got = model(input_ids=ids, decoder_input_ids=canvas).logits
    assert torch.equal(got, want)


class LiveBytes(TorchDispatchMode):
    """Bytes of the real (non-meta) tensor storages alive, and their peak, while the mode is on: every storage an op
    returns is counted until its last reference goes (a storage's Python object lives as long as the storage)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in self.live:
                    self.live[id(storage)] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, id(storage), None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _plain_build(name, layers, seed=0):
    """How build_moe_random built DiffusionGemma before: every module on the CPU, the encoder tied afterwards."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion._from_config(moe_config(name, layers))


def test_diffusion_gemma_is_built_with_one_copy_of_each_layer():
    with LiveBytes() as plain:
        ref = _plain_build(DG, layers=2)
    with LiveBytes() as mem:
        model, _ = build_moe_random(DG, layers=2, seed=1)
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    weights = sum(p.nbytes for p in unique)
    assert weights == moe_weight_bytes(DG, 2, torch.float32)["total"]  # the meta count, tied weights once
    assert sum(p.numel() for p in unique) == sum(p.numel() for p in ref.parameters())  # same parameters as before
    largest = max(p.nbytes for p in unique)
    # The plain build holds the encoder's own layers (and embedding) until they are tied: far over the weights.
    assert plain.peak > weights + 2 * moe_weight_bytes(DG, 2, torch.float32)["per_layer"]
    # This one never holds more than the model plus one parameter's worth of temporaries.
    assert weights <= mem.peak <= weights + sum(b.nbytes for b in model.buffers()) + largest
    # Every encoder text weight is the decoder's storage (the released checkpoint's tying).
    encoder, decoder = text_stacks(model)
    for enc, dec in zip(encoder, decoder, strict=True):
        e, d = dict(enc.named_parameters()), dict(dec.named_parameters())
        assert e and e.keys() <= d.keys()
        assert all(e[k].data_ptr() == d[k].data_ptr() for k in e)
    inner = model.model
    assert inner.encoder.language_model.embed_tokens.weight.data_ptr() == inner.decoder.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.data_ptr() == inner.decoder.embed_tokens.weight.data_ptr()


def test_the_one_copy_build_initialises_like_the_plain_build():
    """Same constants and buffers as the plain build, random weights of the same distribution (other draws: the
    random stream runs in another order), reproducible from the seed."""
    ref = _plain_build(DG, layers=2).state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = build_moe_random(DG, layers=2, seed=1, dtype=dtype)
        got = model.state_dict()
        assert got.keys() == ref.keys()
        for k, want in ref.items():
            assert got[k].dtype == (dtype if want.is_floating_point() and "inv_freq" not in k else want.dtype), k
            if want.numel() < 2 or want.min() == want.max():  # norms, scales, layer scalars: constants
                assert torch.equal(got[k].float(), want.float()), k
            else:  # normal(0, initializer_range) in both
                assert abs(got[k].float().std() / want.float().std() - 1) < 0.25, k
        assert all(b.device.type == "cpu" for b in model.buffers())
    again, _ = build_moe_random(DG, layers=2, seed=1, dtype=torch.bfloat16)
    other, _ = build_moe_random(DG, layers=2, seed=2, dtype=torch.bfloat16)
    key = "model.decoder.layers.0.experts.gate_up_proj"
    assert torch.equal(again.state_dict()[key], got[key]) and not torch.equal(other.state_dict()[key], got[key])


def test_untied_encoder_and_decoder_are_refused():
    config = moe_config(DG, layers=1)
    config.tie_word_embeddings = False
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion(config)
    with pytest.raises(ValueError, match="not tied"):
        share_encoder_ffns(model)


def test_vision_weights_without_vision_config_are_named(dirs, tmp_path):
    broken = tmp_path / "dg"
    shutil.copytree(dirs[DG], broken)
    config = json.loads((broken / "config.json").read_text())
    del config["vision_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"vision_config.*|vision tower.*vision_config") as e:
        load_model(broken)
    assert "model.encoder.vision_tower." in str(e.value)


def test_unknown_fields_handled_like_other_families(dirs, tmp_path):
    with pytest.raises(TypeError, match="canvas_lenght="):
        load_model(dirs[DG], canvas_lenght=4)
    assert load_model(dirs[DG], canvas_length=8).model.config.canvas_length == 8
    extra = tmp_path / "dg"
    shutil.copytree(dirs[DG], extra)
    config = json.loads((extra / "config.json").read_text())
    config["a_field_of_a_newer_release"] = 1
    (extra / "config.json").write_text(json.dumps(config))
    assert load_model(extra).model.config.a_field_of_a_newer_release == 1  # kept, as transformers keeps it


def test_steps_match_the_released_generate_and_are_tagged(dg):
    cfg = GenerationConfig(gen_length=32, steps=6, seed=7, stop_token_ids=())
    prompt = [[10, 11, 12, 13]]
    # The released generate, no hooks, same seed: the reference of every token.
    torch.manual_seed(7)
    with torch.no_grad():
        want = dg.model.generate(torch.tensor(prompt), max_new_tokens=32, max_denoising_steps=3, eos_token_id=None,
                                 pad_token_id=0, return_dict_in_generate=True).sequences
    seen = []
    out = generate(dg, prompts=prompt, config=cfg,  # dense, every step's place recorded at its end
                   callbacks=[lambda st: seen.append((st.tag, st.block, st.step_in_block))])
    assert torch.equal(out.sequences, want)
    tracker = MaskOverlapTracker(experts="skip")  # expert masks have no step-to-step overlap (docs/moe.md)
    sp = StepSparsity("input", TopP(0.9), mask_observers=[tracker])
    out = generate(dg, prompts=prompt, config=cfg, sparsity=sp, callbacks=[tracker])
    assert out.nfe == 6 and sp.tags() == ["prefill", 0, 1, 2, 3, 4, 5]
    assert seen == [("prefill", 0, 0), (0, 0, 0), (1, 0, 1), (2, 0, 2), ("prefill", 1, 0), (3, 1, 0), (4, 1, 1),
                     (5, 1, 2)]
    canvas = dg.model.config.canvas_length
    rows = {(r["tag"], r["group"], r["layer"]): r["tokens"] for r in sp.records() if "expert" not in r}
    # Prefill: the prompt, then the first canvas written into the cache; steps: the whole canvas.
    assert rows[("prefill", "all", 0)] == 4 + canvas
    assert all(rows[(t, "all", 1)] == canvas for t in range(6))
    assert rows[(0, "masked", 0)] == rows[(3, "masked", 0)] == canvas  # a canvas's first step: all noise
    for t in (1, 2, 4, 5):  # later steps: noise where the previous step did not accept
        assert rows.get((t, "masked", 0), 0) + rows.get((t, "decoded", 0), 0) == canvas
    assert tracker.records()
    # Expert rows: every token reaches top_k experts, in the encoder's forwards and the decoder's steps alike.
    top_k = dg.model.config.text_config.top_k_experts
    routed: dict = {}
    for r in sp.records():
        if "expert" in r and r["group"] == "all":
            routed[(r["tag"], r["layer"])] = routed.get((r["tag"], r["layer"]), 0) + r["tokens"]
    assert routed[("prefill", 0)] == top_k * (4 + canvas)
    assert all(routed[(t, 1)] == top_k * canvas for t in range(6))


def test_step_sparsity_equals_a_brute_force_top_p_of_the_decoder_inputs(dg):
    from dllm_sparse import top_p_mask_reference

    inputs, routed = [], []
    block = text_stacks(dg.model)[1][0]
    handles = [block.mlp.gate_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone())),
               # the experts' input and routing (hidden states [N, d], top-k indices [N, k]), before any rule
               block.experts.register_forward_pre_hook(lambda m, a: routed.append((a[0].clone(), a[1].clone())))]
    try:
        sp = StepSparsity("input", TopP(0.7), layers=[0])
        generate(dg, prompts=[[10, 11]], config=GenerationConfig(gen_length=16, steps=2, seed=1), sparsity=sp)
    finally:
        for h in handles:
            h.remove()
    # The hooks see the dense input before the rule zeroes it (registered before sparsify's). The input site's
    # vector of a (token, expert) pair is the token's routed hidden state, the same for its k experts.
    for tag, x, (h, index) in zip(["prefill", 0, 1], inputs, routed, strict=True):
        keep = top_p_mask_reference(x.float().reshape(-1, x.shape[-1]), 0.7)
        assert sp.stats.mean("input", tag=tag, part="dense") == pytest.approx(1 - keep.double().mean().item(),
                                                                             abs=1e-9)
        per_expert = sp.stats.per_expert("input", tag=tag)
        for e in index.unique().tolist():
            tokens = (index == e).any(dim=1)
            want = 1 - top_p_mask_reference(h[tokens].float(), 0.7).double().mean().item()
            assert per_expert[(0, e)]["tokens"] == int(tokens.sum())
            assert per_expert[(0, e)]["sparsity"] == pytest.approx(want, abs=1e-9)


def _reference_loglikelihood(model, context, answer, mc_num, mc_batch, seed, key):
    """The estimator written out: each canvas given the context and the earlier canvases, one full forward per
    noised row (encoder + decoder in the model's own forward)."""
    C, V = model.config.canvas_length, model.config.text_config.vocab_size
    total = 0.0
    for start in range(0, len(answer), C):
        target = torch.tensor(answer[start:start + C])
        L = len(target)
        gen = item_generator(seed, (key, start))
        masks = elbo_masks(L, mc_num, mc_batch, gen)
        noise = torch.randint(0, V, (mc_num, L), generator=gen)
        losses = []
        for r in range(mc_num):
            noisy = torch.where(masks[r], noise[r], target)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([context + answer[:start]]),
                               decoder_input_ids=noisy[None]).logits[0].float()
            ce = F.cross_entropy(logits, target, reduction="none")
            losses.append(float(ce[masks[r]].sum()) * L / int(masks[r].sum()))
        total -= sum(losses) / mc_num
    return total


def test_likelihood_equals_the_estimator_written_out(dg):
    requests = [([20, 21, 22], [30, 31, 32]), ([40], list(range(50, 50 + 21)))]  # the second spans two canvases
    scorer = Scorer.from_loaded(dg, mc_num=4, mc_batch=2, seed=5)
    stats = SparsityStats()
    with scorer.sparsified(SparsityConfig("input", TopP(1.0)), stats):
        got = scorer.loglikelihood_tokens(requests, keys=["a", "b"])
    for (ll, greedy), (ctx, ans), key in zip(got, requests, ["a", "b"], strict=True):
        assert greedy is False
        assert ll == pytest.approx(_reference_loglikelihood(dg.model, ctx, ans, 4, 2, 5, key), rel=1e-5)
    assert set(stats.tags) == {"prefill", "elbo"}


def test_likelihood_draws_are_common_to_dense_and_sparse(dg):
    scorer = Scorer.from_loaded(dg, mc_num=2, mc_batch=2)
    req = [([20, 21], [30, 31, 32])]
    dense = scorer.loglikelihood_tokens(req)
    assert scorer.loglikelihood_tokens(req) == dense  # same draws, same numbers
    with scorer.sparsified(SparsityConfig("up", TopP(0.5))):
        assert scorer.loglikelihood_tokens(req) != dense


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=0.5), "temperature"),
    (dict(cfg_scale=1.0), "cfg_scale"),
    (dict(block_length=4), "canvas"),
    (dict(steps=3), "multiple"),
])
def test_settings_the_released_sampler_lacks_are_refused(dg, bad, match):
    cfg = GenerationConfig(gen_length=32, steps=4).replace(**bad)
    with pytest.raises(ValueError, match=match):
        generate(dg, prompts=[[10, 11]], config=cfg)


def test_a_stop_request_is_refused(dg):
    with pytest.raises(RuntimeError, match="cannot stop"):
        generate(dg, prompts=[[10, 11]], config=GenerationConfig(gen_length=16, steps=2),
                 callbacks=[lambda state: True])


def test_weight_bytes_count_tied_weights_once_and_experts_dominate():
    w = moe_weight_bytes("diffusion-gemma-26b-a4b", 30, torch.bfloat16)
    assert family_named("diffusion_gemma").noise == "uniform"
    # The published model: ~25.8 B parameters (model card), the experts ~94 % of a layer.
    assert 25.0e9 < w["total"] / 2 < 26.5e9
    assert w["experts_per_layer"] / w["per_layer"] > 0.9


@pytest.mark.parametrize("how", ["peft", "compile", "cpu_offload"])
def test_wrapped_models_generate_and_score_like_the_plain_one(dirs, how):
    from conftest import wrapped_model

    plain = load_model(dirs[DG])
    if how == "peft":  # LoRA on the FFNs (named by their first path, the encoder's, which
        # shares them; conftest's targets include the vision tower)
        peft = pytest.importorskip("peft")
        target = r".*language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"
        wrapped = peft.get_peft_model(plain.model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=target))
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        import copy

        wrapped.eval()
        reference = copy.deepcopy(wrapped).merge_and_unload().eval()
    else:
        wrapped, reference = wrapped_model(plain.model, how)
    cfg = GenerationConfig(gen_length=16, steps=2, seed=3)
    sp, sp_ref = StepSparsity("input", TopP(0.8)), StepSparsity("input", TopP(0.8))
    if how == "cpu_offload":  # refused for generation (self-conditioning reads a weight the hooks do not load)
        with pytest.raises(ValueError, match="offloaded weights"):
            generate(wrapped, plain.tokenizer, [[10, 11, 12]], cfg, kind="diffusion")
    else:
        got = generate(wrapped, plain.tokenizer, [[10, 11, 12]], cfg, sparsity=sp, kind="diffusion")
        want = generate(reference, plain.tokenizer, [[10, 11, 12]], cfg, sparsity=sp_ref, kind="diffusion")
        assert torch.equal(got.sequences, want.sequences)
        assert sp.per_step() == pytest.approx(sp_ref.per_step(), abs=1e-6)
    req = [([20, 21], [30, 31, 32])]
    kw = dict(kind="diffusion", family="diffusion_gemma", mc_num=2, mc_batch=2)
    assert Scorer(wrapped, plain.tokenizer, **kw).loglikelihood_tokens(req)[0][0] == pytest.approx(
        Scorer(reference, plain.tokenizer, **kw).loglikelihood_tokens(req)[0][0], rel=1e-5)


@pytest.mark.slow
def test_compare_runs_the_pair_end_to_end(dirs, tmp_path):
    from dllm_sparse.cli import main

    out = tmp_path / "pair"
    # Two sites: a model with routed experts measures each site's identity cell in a dense pass of its own.
    assert main(["compare", "--diffusion-model", str(dirs[DG]), "--ar-model", str(dirs[G4]), "--sites", "input", "up",
                 "--limit", "2", "--mc-num", "2", "--thresholds", "1.0", "0.9", "--threads", "1", "--workers", "1",
                 "--n-boot", "0", "--no-progress", "--output-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {(r["model"], r["site"], r["p"]) for r in rows if r["site"] != "dense"} == {
        (str(dirs[m]), site, p) for m in (DG, G4) for site in ("input", "up") for p in (1.0, 0.9)}
    assert all(r["relative_performance"] == 1.0 for r in rows if r["p"] == 1.0)  # top-p 1 keeps every feature
    # Expert rows: every layer's 8 experts, and the experts' part of the pooled sparsity.
    for r in rows:
        if r["site"] != "dense":
            assert len(r["per_expert_sparsity"]) <= 2 * 8 and r["sparsity_experts"] == r["sparsity_experts"]
            assert (r["sparsity_experts"] > 0.0) == (r["p"] < 1.0)
    profile = json.loads((out / "step_profile.json").read_text())["rows"]
    assert {r["x"] for r in profile} and all(isinstance(r["x"], int) for r in profile)  # the decoder's steps


@pytest.mark.parametrize("setting", [dict(greedy_check="iterative"), dict(head_chunk=4), dict(cfg_scale=0.5),
                                     dict(precision="official")])
def test_masked_elbo_settings_are_refused_for_the_uniform_noise_score(dg, setting):
    scorer = Scorer.from_loaded(dg, mc_num=2, mc_batch=2, **setting)
    with pytest.raises(ValueError, match=next(iter(setting))):
        scorer.loglikelihood_tokens([([20, 21], [30, 31])])


def test_ratio_bins_group_the_decoder_rows_by_their_noised_fraction(dg):
    stats = SparsityStats()
    scorer = Scorer.from_loaded(dg, mc_num=4, mc_batch=2, ratio_bins=2)
    with scorer.sparsified(SparsityConfig("input", TopP(0.8)), stats):
        scorer.loglikelihood_tokens([([20, 21], [30, 31, 32, 33])], keys=["k"])
    g = item_generator(1234, ("k", 0))
    counts = elbo_masks(4, 4, 2, g).sum(dim=1)  # the rows' noised counts, as the scorer draws them
    rows = {r["group"]: r["tokens"] for r in stats.records()
            if r["tag"] == "elbo" and r["layer"] == 0 and "expert" not in r}
    assert rows["ratio0.00-0.50"] == 4 * int((counts <= 2).sum())  # every position of a row counts in its bin
    assert rows["ratio0.50-1.00"] == 4 * int((counts > 2).sum())


def test_bad_shape_input_is_named(tmp_path):
    from dllm_sparse.eval.scoring.block_diffusion import block_diffusion_loglikelihood
    from dllm_sparse.models.shapes import published_layers, shape_family

    with pytest.raises(ValueError, match="unknown MoE shape 'gemma4-27b'"):
        moe_config("gemma4-27b")
    with pytest.raises(ValueError, match="layers must be a whole number >= 1"):
        moe_config(DG, layers=0)
    assert (published_layers("diffusion-gemma-26b-a4b"), published_layers("llada-8b")) == (30, 32)
    assert (shape_family(DG), shape_family(G4), shape_family("llama-3.1-8b")) == ("diffusion_gemma", "gemma4", "llama")
    model, _ = build_moe_random(DG, layers=1)
    with pytest.raises(ValueError, match="1 keys for 2 requests"):
        block_diffusion_loglikelihood(model, [([1], [2]), ([3], [4])], draw=None, keys=["a"])
    # One memory table extrapolates to one published depth: the 8B shapes (32) and the pair (30) are refused together.
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "check_8b_shapes.py"
    spec = importlib.util.spec_from_file_location("check_8b_shapes", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit, match="one table extrapolates to one depth"):
        mod.memory_plan(mod.build_parser().parse_args(
            ["--memory-plan", "--plan-shapes", "llada-8b", "diffusion-gemma-26b-a4b", "--output-dir", str(tmp_path)]),
            [])


def test_committed_moe_memory_table_is_what_the_committed_runs_give(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    committed = root / "docs" / "results" / "shapes_moe" / "memory"
    for f in committed.glob("*-[12]l-bf16.json"):
        (tmp_path / f.name).write_text(f.read_text())
    spec = importlib.util.spec_from_file_location("check_8b_shapes", root / "experiments" / "check_8b_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--memory-plan", "--plan-shapes", "diffusion-gemma-26b-a4b", "gemma4-26b-a4b", "--plan-dtypes", "bf16",
              "--output-dir", str(tmp_path)])  # every run's file is there: nothing is measured again
    table = (tmp_path / "memory_plan.md").read_text()
    assert table == (committed / "memory_plan.md").read_text()
    assert table in (root / "docs" / "memory.md").read_text()
