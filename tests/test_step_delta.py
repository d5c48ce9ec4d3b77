"""Step-delta FFN (samplers/step_delta.py) against a reference written from the definition in
docs/sparsification.md ("Step-delta FFN"): per position and feature loops in float64, sets chosen by sorting the
definition's scores, on the very FFN inputs the sampler produced."""

import dataclasses
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_kernels import DEVICE, _triton_ready, run_triton_tests_in_interpreter

from dllm_sparse.kernels import accelerate_ffn, is_accelerated, restore_ffn
from dllm_sparse.kernels import gathered as gathered_module
from dllm_sparse.models.families import find_ffns
from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config
from dllm_sparse.samplers import GenerationConfig, generate, replay
from dllm_sparse.samplers.reuse import Adaptive
from dllm_sparse.samplers.step_delta import StepDelta, apply_step_delta, step_delta
from dllm_sparse.steps import StepState

CFG = GenerationConfig(gen_length=16, steps=16, block_length=8, stop_token_ids=())
PROMPTS = [[5, 17, 3, 9, 40], [7, 7, 21, 2, 11]]


@pytest.fixture(scope="module")
def llada64():
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_llada_config()).eval().double()  # float64: no ties in the scores, no rounding


class Recorder:
    """Captures, per step, each layer's FFN input (at the swapped gate) and output (at the swapped down), and the
    sampler's masked positions."""

    def __init__(self, model):
        self.x, self.y, self.masked = {}, {}, []
        self.handles = []
        for f in find_ffns(model):
            self.handles.append(f.gate.register_forward_hook(
                lambda m, a, out, i=f.layer: self.x.setdefault(i, []).append(a[0].detach().clone())))
            self.handles.append(f.down.register_forward_hook(
                lambda m, a, out, i=f.layer: self.y.setdefault(i, []).append(out.detach().clone())))

    def on_step_begin(self, state):
        self.masked.append(state.groups["masked"].clone())

    def remove(self):
        for h in self.handles:
            h.remove()


def _dense(ffn, x):
    g, u = ffn.gate(x), ffn.up(x)
    h = F.silu(g) * u
    return g, u, h, ffn.down(h)


def reference(ffn, xs, masked, config: StepDelta, refresh_steps, exact_block_slices=None):
    """The definition, one sample, position and feature at a time. xs[t]: [B, T, d] float64."""
    Wg, Wu, Wd = (m.weight.detach() for m in (ffn.original_gate, ffn.original_up, ffn.original_down))
    d_ff, d = Wg.shape
    in_norm = (Wg.pow(2).sum(0) + Wu.pow(2).sum(0)).sqrt()
    down_norm = Wd.pow(2).sum(0).sqrt()
    outs, cache = [], None
    for t, x in enumerate(xs):
        B, T, _ = x.shape
        if t in refresh_steps:
            g, u = x @ Wg.T, x @ Wu.T
            h = F.silu(g) * u
            cache = {"x": x.clone(), "g": g, "u": u, "h": h, "y": h @ Wd.T}
            outs.append(cache["y"].clone())
            if config.select == "held":  # S from the refresh's h over the positions the deltas will cover
                out_of_block = set(range(T)) - set(range(T)[exact_block_slices[t]] if exact_block_slices else ())
                k = math.ceil(config.fraction * d_ff)
                held = [sorted(range(d_ff), key=lambda f, b=b: -sum(abs(float(h[b, i, f])) for i in out_of_block)
                               * float(down_norm[f]))[:k] for b in range(B)]
            continue
        exact = masked[t - 1] & ~masked[t]
        if exact_block_slices is not None:
            exact[:, exact_block_slices[t]] = True
        for b in range(B):
            votes = [i for i in range(T) if not exact[b, i]]
            c = {k: v[b] for k, v in cache.items()}  # views: updated in place
            if config.variant == "input":
                dx = x[b] - c["x"]
                score = [sum(abs(float(dx[i, j])) for i in votes) * float(in_norm[j]) for j in range(d)]
                s_x = sorted(range(d), key=lambda j: -score[j])[: math.ceil(config.fraction * d)]
                for j in s_x:
                    c["g"] += dx[:, j:j + 1] * Wg[:, j]
                    c["u"] += dx[:, j:j + 1] * Wu[:, j]
                    c["x"][:, j] = x[b, :, j]
                h = F.silu(c["g"]) * c["u"]
                k_h = math.ceil(config.down_fraction * d_ff)
            else:
                h = None
                score = [sum(abs(float(c["h"][i, f])) for i in votes) * float(down_norm[f]) for f in range(d_ff)]
                k_h = math.ceil(config.fraction * d_ff)
            if h is not None:
                dh = h - c["h"]
                score = [sum(abs(float(dh[i, f])) for i in votes) * float(down_norm[f]) for f in range(d_ff)]
            s_h = held[b] if config.select == "held" else sorted(range(d_ff), key=lambda f: -score[f])[:k_h]
            for f in s_h:
                if h is None:  # intermediate variant: h_t[S] from x_t
                    new = F.silu(x[b] @ Wg[f]) * (x[b] @ Wu[f])
                else:
                    new = h[:, f]
                c["y"] += (new - c["h"][:, f])[:, None] * Wd[:, f]
                c["h"][:, f] = new
            for i in range(T):
                if exact[b, i]:
                    g, u = x[b, i] @ Wg.T, x[b, i] @ Wu.T
                    c["x"][i], c["g"][i], c["u"][i] = x[b, i], g, u
                    c["h"][i] = F.silu(g) * u
                    c["y"][i] = c["h"][i] @ Wd.T
        outs.append(cache["y"].clone())
    return outs


def _originals(ffn):
    """The FFN's original projections behind the swapped parts (for the reference)."""
    return SimpleNamespace(original_gate=ffn.gate.original, original_up=ffn.up.original,
                           original_down=ffn.down.original)


@pytest.mark.parametrize("config", [
    StepDelta("input", fraction=0.25, down_fraction=0.5),
    StepDelta("input", fraction=0.5, down_fraction=0.25, refresh="every4"),
    StepDelta("intermediate", fraction=0.3),
    StepDelta("intermediate", fraction=0.3, exact_block=True),
    StepDelta("intermediate", fraction=0.3, select="held"),
    StepDelta("intermediate", fraction=0.3, select="held", refresh="every4"),
    StepDelta("intermediate", fraction=0.3, select="held", exact_block=True),
], ids=lambda c: c.name)
def test_step_delta_equals_the_definition(llada64, config):
    with step_delta(llada64, config) as delta:
        rec = Recorder(llada64)
        try:
            generate(llada64, None, PROMPTS, CFG, callbacks=[rec, delta])
        finally:
            rec.remove()
        ffns = find_ffns(llada64)
        refresh = {i for i, s in enumerate(delta.steps) if s["refresh"]}
        assert refresh == ({0, 8} if config.refresh == "block_start" else {0, 4, 8, 12})
        P = len(PROMPTS[0])
        blocks = {t: slice(P + (t // 8) * 8, P + (t // 8 + 1) * 8) for t in range(16)} if config.exact_block else None
        for ffn in ffns:
            ref = reference(_originals(ffn), rec.x[ffn.layer], rec.masked, config, refresh, blocks)
            got = rec.y[ffn.layer]
            assert len(got) == len(ref) == 16
            for t, (a, b) in enumerate(zip(got, ref, strict=True)):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"layer {ffn.layer} step {t}")
    assert not is_accelerated(llada64)


def test_the_delta_is_not_the_dense_ffn(llada64):
    """The reference test above would pass for a dense FFN only if the delta were exact: show it is not (some
    step drifts), and that recomputing every feature is exact."""
    with step_delta(llada64, StepDelta("input", 0.25, 0.25), measure=True) as delta:
        generate(llada64, None, PROMPTS, CFG, callbacks=[delta])
    assert delta.report()["drift_max"] > 1e-3
    with step_delta(llada64, StepDelta("input", 1.0, 1.0), measure=True) as full:
        generate(llada64, None, PROMPTS, CFG, callbacks=[full])
    assert full.report()["drift_max"] < 1e-10


@pytest.mark.parametrize("variant", ["input", "intermediate"])
def test_recomputing_every_feature_gives_the_dense_tokens(llada64, variant):
    dense = generate(llada64, None, PROMPTS, CFG.replace(cfg_scale=0.5))
    config = StepDelta(variant, 1.0, 1.0)
    with step_delta(llada64, config, measure=True) as delta:
        out = generate(llada64, None, PROMPTS, CFG.replace(cfg_scale=0.5), callbacks=[delta])
    assert torch.equal(out.sequences, dense.sequences)
    assert delta.report()["drift_max"] < 1e-10


def test_decoded_positions_are_recomputed_exactly(llada64):
    """A position decoded at step t-1 gets exactly the dense FFN output of its input at step t."""
    with step_delta(llada64, StepDelta("intermediate", 0.1)) as delta:
        rec = Recorder(llada64)
        try:
            generate(llada64, None, PROMPTS, CFG, callbacks=[rec, delta])
        finally:
            rec.remove()
        ffn = find_ffns(llada64)[1]
        checked = 0
        for t in range(1, 16):
            if delta.steps[t]["refresh"]:
                continue
            decoded = rec.masked[t - 1] & ~rec.masked[t]
            x = rec.x[1][t][decoded]
            y = _dense(_originals_as_ffn(ffn), x)[3]
            torch.testing.assert_close(rec.y[1][t][decoded], y, rtol=1e-12, atol=1e-12)
            checked += int(decoded.sum())
    assert checked >= 20


def _originals_as_ffn(ffn):
    return SimpleNamespace(gate=ffn.gate.original, up=ffn.up.original, down=ffn.down.original)


def test_work_is_counted_from_the_set_sizes(llada64):
    d, d_ff = 64, find_ffns(llada64)[0].down.weight.shape[1]
    config = StepDelta("input", fraction=0.25, down_fraction=0.5)
    with step_delta(llada64, config) as delta:
        out = generate(llada64, None, PROMPTS, CFG, callbacks=[delta])
    rows = len(PROMPTS) * out.sequences.shape[1]
    per_row = (2 * d_ff * math.ceil(0.25 * d) + d * math.ceil(0.5 * d_ff)) / (3 * d * d_ff)
    for t, s in enumerate(delta.steps):
        if s["refresh"]:
            assert s["macs"] == s["dense_macs"]
        else:
            decoded = int(CFG.gen_length // CFG.steps) * len(PROMPTS)  # one token per row per step here
            expected = (per_row * rows + decoded) / rows
            assert s["macs"] / s["dense_macs"] == pytest.approx(expected, rel=1e-12), t


def test_fresh_refresh_is_the_dense_model(llada64):
    dense = generate(llada64, None, PROMPTS, CFG)
    with step_delta(llada64, StepDelta("intermediate", 0.05, refresh="fresh")) as delta:
        out = generate(llada64, None, PROMPTS, CFG, callbacks=[delta])
    assert torch.equal(out.sequences, dense.sequences)
    assert delta.report()["ffn_work"] == 1.0


def test_replay_and_outside_generation(llada64):
    dense = generate(llada64, None, PROMPTS, CFG)
    ids = torch.tensor([PROMPTS[0] + [99] * 4])
    with torch.no_grad():
        ref = llada64(ids).logits
    with step_delta(llada64, StepDelta("input", 1.0, 1.0)) as delta:
        rep = replay(llada64, PROMPTS, dense, callbacks=[delta])
        with torch.no_grad():  # outside a generation step: the plain FFN, nothing cached
            plain = llada64(ids).logits
    assert rep.commit_agreement == 1.0
    torch.testing.assert_close(plain, ref, rtol=0, atol=0)


# ---- the run is the model's while its FFNs are swapped -------------------------------------------------------


def test_generations_inside_the_block_run_the_delta_without_callbacks(llada64):
    """No callbacks=[delta]: the swapped FFNs bring their run, so the generation is the one the definition test
    above checks with callbacks=[rec, delta] (same tokens, same counts), not the dense model; giving the run too
    runs it once."""
    config = StepDelta("input", fraction=0.25, down_fraction=0.5)
    dense = generate(llada64, None, PROMPTS, CFG)
    with step_delta(llada64, config) as given:
        explicit = generate(llada64, None, PROMPTS, CFG, callbacks=[given])
    with step_delta(llada64, config) as implicit:
        out = generate(llada64, None, PROMPTS, CFG)
    assert torch.equal(out.sequences, explicit.sequences)
    assert len(given.steps) == len(implicit.steps) == CFG.steps  # once per step, given or not
    assert implicit.steps == given.steps and implicit.report()["ffn_work"] < 0.8
    with step_delta(llada64, config, measure=True) as measured:
        generate(llada64, None, PROMPTS, CFG)
        replay(llada64, PROMPTS, dense)  # a replay of the model drives it too
    assert len(measured.steps) == 2 * CFG.steps and measured.report()["drift_max"] > 1e-3  # not the dense FFN


def test_a_wrapped_model_brings_the_run_of_the_model_it_wraps(llada64):
    """torch.compile's wrapper and a PeftModel hold the swapped FFNs as submodules: generating through them drives the
    run the plain model's generation drives (the compiled wrapper is checked without compiling: what the generator
    collects, not what inductor makes of it)."""
    from peft import LoraConfig, get_peft_model

    from dllm_sparse.steps import attached_callbacks

    config = StepDelta("input", fraction=0.25, down_fraction=0.5)
    with step_delta(llada64, config) as plain_run:
        plain = generate(llada64, None, PROMPTS, CFG)
        assert attached_callbacks(torch.compile(llada64)) == [plain_run]
    peft_model = get_peft_model(llada64, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True))
    try:
        with step_delta(peft_model, config) as run:
            out = generate(peft_model, None, PROMPTS, CFG)
        assert len(run.steps) == CFG.steps and torch.equal(out.sequences, plain.sequences)  # LoRA B = 0: same model
    finally:
        peft_model.unload()


def test_apply_step_delta_runs_until_restored(llada64):
    dense = generate(llada64, None, PROMPTS, CFG)
    run = apply_step_delta(llada64, StepDelta("intermediate", 0.1))
    try:
        delta = generate(llada64, None, PROMPTS, CFG)
    finally:
        restore_ffn(llada64)
    assert len(run.steps) == CFG.steps and run.report()["ffn_work"] < 0.5
    assert torch.equal(generate(llada64, None, PROMPTS, CFG).sequences, dense.sequences)  # restored: dense again
    assert len(run.steps) == CFG.steps
    assert not torch.equal(delta.sequences, dense.sequences)  # f = 0.1 changes the tokens of this tiny model


def test_a_report_without_a_generation_is_refused(llada64):
    with step_delta(llada64, StepDelta()) as delta:
        pass
    for ask in (delta.report, delta.ffn_work):
        with pytest.raises(RuntimeError, match=r"no generation step ran with this step-delta run "
                                               r"\(delta-input:0.25/0.5@block_start\), so there is nothing to "
                                               r"report: generate LLaDAModelLM .*inside the `with step_delta"):
            ask()


def test_another_models_generation_or_a_restored_run_is_refused(llada64):
    torch.manual_seed(1)
    other = LLaDAModelLM(tiny_llada_config()).eval().double()
    name_a, name_b = (re.escape(f"LLaDAModelLM (id {id(m):#x})") for m in (llada64, other))
    with step_delta(llada64, StepDelta()) as delta:
        with pytest.raises(ValueError, match=rf"belongs to {name_a}, but the generation runs {name_b}, which does not "
                                             r"hold its FFNs: that model would run dense"):
            generate(other, None, PROMPTS, CFG, callbacks=[delta])
        assert not delta.steps
    with pytest.raises(ValueError, match=rf"was restored: its FFNs are no longer in {name_a} .*so {name_a} would "
                                         "run dense. Generate inside the with block"):
        generate(llada64, None, PROMPTS, CFG, callbacks=[delta])
    with pytest.raises(ValueError, match="was restored"):
        generate(other, None, PROMPTS, CFG, callbacks=[delta])


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"fraction": 0.0}, "fraction must be a number in \\(0, 1\\]"),
    ({"fraction": 1.5}, "fraction"),
    ({"fraction": float("nan")}, "fraction"),
    ({"fraction": True}, "fraction"),
    ({"down_fraction": -0.1}, "down_fraction"),
    ({"variant": "gate"}, "variant must be one of"),
    ({"variant": "input", "select": "oracle"}, "not a selector of the input variant"),
    ({"refresh": "every0"}, "k must be a positive integer"),
    ({"refresh": "sometimes"}, "unknown reuse policy"),
    ({"refresh": Adaptive(0.5)}, "fresh mask probe"),
    ({"exact_block": "yes"}, "exact_block must be True or False"),
    ({"backend": "cuda"}, "cuda"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepDelta(**kwargs)


def test_ar_models_and_ar_generations_are_refused(tiny_llama, llada64):
    with pytest.raises(ValueError, match="masked-diffusion models"):
        apply_step_delta(tiny_llama, StepDelta())
    assert not is_accelerated(tiny_llama)
    with step_delta(llada64, StepDelta()) as delta:
        with pytest.raises(ValueError, match="needs a masked-diffusion sampler"):
            delta.on_generation_begin(StepState(kind="ar", model=None, config=None, batch_size=1, prompt_length=1,
                                                num_steps=1))


def test_a_swapped_model_is_refused(llada64):
    from dllm_sparse import TopP
    accelerate_ffn(llada64, "input", TopP(0.5))
    try:
        with pytest.raises(ValueError, match="already swapped"):
            apply_step_delta(llada64, StepDelta())
    finally:
        restore_ffn(llada64)
    with step_delta(llada64, StepDelta()), pytest.raises(ValueError, match="already swapped"):
        apply_step_delta(llada64, StepDelta())
    assert not is_accelerated(llada64)


def test_a_cache_for_another_canvas_or_dtype_is_refused(llada64):
    """Inside a generation the cache continues one canvas: another shape or dtype is an error, not a silent run."""
    with step_delta(llada64, StepDelta("input", 0.5, 0.5)) as delta:
        class Switch:
            def __init__(self, model):
                self.model = model

            def on_step_begin(self, state):
                if state.step == 2:
                    self.model.float()  # a different dtype from the cached one

        with pytest.raises(ValueError, match="dtype torch.float32 vs the cached torch.float64"):
            generate(llada64, None, PROMPTS, CFG, callbacks=[delta, Switch(llada64)])
        llada64.double()
        state = StepState(kind="diffusion", model=llada64, config=CFG, batch_size=1, prompt_length=2, num_steps=2)
        delta.on_generation_begin(state)
        delta.on_step_begin(state)
        delta.ffns[0].forward_ffn(torch.zeros(1, 6, 64, dtype=torch.float64))  # step 0: a refresh fills the cache
        state.step = state.step_in_block = 1
        delta.on_step_begin(state)
        with pytest.raises(ValueError, match=r"shape \(1, 7, 64\) vs the cached \(1, 6, 64\)"):
            delta.ffns[0].forward_ffn(torch.zeros(1, 7, 64, dtype=torch.float64))
    assert not is_accelerated(llada64)


# ---- the Triton backend (the gathered kernels read the kept rows in place) ------------------------------------


def test_triton_code_under_the_interpreter(request):
    run_triton_tests_in_interpreter(__file__, request)


@pytest.mark.parametrize("config", [
    StepDelta("input", fraction=0.25, down_fraction=0.5),
    StepDelta("intermediate", fraction=0.3, exact_block=True),
    StepDelta("intermediate", fraction=0.3, select="held", exact_block=True),
], ids=lambda c: c.name)
def test_triton_backend_equals_the_torch_backend(config, monkeypatch):
    """Backend "triton" (colsparse_gemm / rowsparse kernels) gives the tokens and, step by step, the FFN outputs of
    the torch backend (gathered weight copies and bmm), in float32 with prompts of two rows."""
    if reason := _triton_ready():
        pytest.skip(reason)
    torch.manual_seed(0)
    model = LLaDAModelLM(tiny_llada_config()).eval().to(DEVICE)
    launches = []
    for op in ("colsparse_gemm_op", "rowsparse_op"):
        real = getattr(gathered_module, op)
        monkeypatch.setattr(gathered_module, op, lambda *a, _real=real, _op=op: launches.append(_op) or _real(*a))
    outputs = {}
    for be in ("torch", "triton"):
        with step_delta(model, dataclasses.replace(config, backend=be)) as delta:
            rec = Recorder(model)
            try:
                outputs[be] = (generate(model, None, PROMPTS, CFG, callbacks=[rec, delta]).sequences, rec.y)
            finally:
                rec.remove()
    assert torch.equal(outputs["torch"][0], outputs["triton"][0])
    if config.select == "held":  # packed at the refresh: dense matmuls on every backend, no gathered kernel
        assert not launches
    else:  # every delta step of every layer ran the kernels (2 rows: one launch per row and product)
        per_step = {"input": 3, "intermediate": 3}[config.variant] * 2 * (2 if config.exact_block else 1)
        assert len(launches) >= per_step * 2 * (CFG.steps - 2) // 2
    for layer, ys in outputs["torch"][1].items():
        for t, (a, b) in enumerate(zip(ys, outputs["triton"][1][layer], strict=True)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"layer {layer} step {t}")


# ---- wrapped models ----------------------------------------------------------------------------------------------


def _wrapped(kind: str):
    torch.manual_seed(0)
    model = LLaDAModelLM(tiny_llada_config()).eval()
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    if kind == "dispatch":
        from accelerate import dispatch_model

        return dispatch_model(model, device_map={"": "cpu"})
    return torch.compile(model)


@pytest.mark.parametrize("kind", ["peft", "dispatch", pytest.param("compile", marks=pytest.mark.slow)])
def test_wrapped_models(kind):
    """A PeftModel (LoRA not merged), accelerate's dispatched model and a compiled model: with every feature
    recomputed the wrapped model's own dense tokens, and a partial delta runs and restores the wrapper."""
    model = _wrapped(kind)
    dense = generate(model, None, PROMPTS, CFG)
    with step_delta(model, StepDelta("input", 1.0, 1.0)) as delta:
        out = generate(model, None, PROMPTS, CFG, callbacks=[delta])
    assert torch.equal(out.sequences, dense.sequences)
    assert len(delta.ffns) == 2 and delta.report()["ffn_work"] > 1.0  # the decoded rows are recomputed too
    with step_delta(model, StepDelta("intermediate", 0.25)) as delta:
        generate(model, None, PROMPTS, CFG, callbacks=[delta])
    assert delta.report()["ffn_work"] < 0.5
    assert not is_accelerated(model)
