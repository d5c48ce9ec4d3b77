"""The lm-evaluation-harness model class on a local task whose data the test writes itself (no hub)."""

from __future__ import annotations

import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[eval]'")

from byte_tokenizer import ByteTokenizer  # noqa: E402
from conftest import build_tiny_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import CachingLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dllm_sparse.eval.scoring.scorer import Scorer  # noqa: E402
from dllm_sparse.eval.tasks.builtin import MCItem, MultipleChoiceTask  # noqa: E402
from dllm_sparse.eval.tasks.lm_eval_model import DllmSparseLM  # noqa: E402
from dllm_sparse.sparsity.config import SparsityConfig  # noqa: E402
from dllm_sparse.sparsity.rules import TopP  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DOCS = [
    {"context": "ab", "choices": ["c", "dd", "e"], "gold": 0},
    {"context": "xy z", "choices": ["zz", "q"], "gold": 1},
    {"context": "hello", "choices": ["w", "o", "ld"], "gold": 2},
    {"context": "1 2 3", "choices": ["4", "5"], "gold": 0},
]


def _ar_scorer(**kw):
    model = build_tiny_model("llama", vocab_size=260, seed=3)
    return Scorer(model, ByteTokenizer(), "ar", name="tiny-llama", batch_size=4, **kw)


def _write_task(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return TaskManager(include_path=str(tmp_path), include_defaults=False)


def _run(lm, tm):
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=tm, bootstrap_iters=0,
                                  log_samples=False)
    return out["results"]["tiny_mc"]


def _reference_acc(scorer):
    items = [MCItem(str(i), d["context"], d["choices"], d["gold"]) for i, d in enumerate(DOCS)]
    return MultipleChoiceTask("ref", items).evaluate(scorer).metrics


def test_scores_a_local_task_dense_and_sparse(tmp_path):
    tm = _write_task(tmp_path)
    scorer = _ar_scorer()
    res = _run(DllmSparseLM.from_scorer(scorer), tm)
    ref = _reference_acc(scorer)
    assert res["acc,none"] == pytest.approx(ref["acc"])
    assert res["acc_norm,none"] == pytest.approx(ref["acc_norm"])

    sparse = _ar_scorer(sparsity=SparsityConfig("intermediate", TopP(0.5)))
    lm = DllmSparseLM.from_scorer(sparse)
    res_sp = _run(lm, tm)
    assert res_sp["acc,none"] == pytest.approx(_reference_acc(_ar_scorer(
        sparsity=SparsityConfig("intermediate", TopP(0.5))))["acc"])
    assert lm.stats is not None and 0.2 < lm.stats.mean("intermediate") < 1.0  # statistics were kept
    assert "intermediate:top_p:0.5" in lm.identity and "tiny-llama" in lm.identity


def test_diffusion_model_and_registry(tmp_path):
    tm = _write_task(tmp_path)
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3, eos_token_id=2,
                             pad_token_id=0)
    scorer = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, name="tiny-llada", mc_num=4, mc_batch=2,
                    greedy_check=True)
    res = _run(DllmSparseLM.from_scorer(scorer), tm)
    assert res["acc,none"] == pytest.approx(_reference_acc(scorer)["acc"])
    from lm_eval.api.registry import get_model

    assert get_model("dllm_sparse") is DllmSparseLM


def test_cache_refuses_other_configuration(tmp_path):
    db = str(tmp_path / "cache.db")
    dense = CachingLM(DllmSparseLM.from_scorer(_ar_scorer()), db)
    reqs = [Instance("loglikelihood", {}, ("ab", " c"), 0, ("t", 0, 1))]
    first = dense.loglikelihood(reqs)
    assert CachingLM(DllmSparseLM.from_scorer(_ar_scorer()), db).loglikelihood(reqs) == first  # same config: ok
    sparse = DllmSparseLM.from_scorer(_ar_scorer(sparsity=SparsityConfig("input", TopP(0.7))))
    with pytest.raises(RuntimeError, match="one cache path per configuration"):
        CachingLM(sparse, db)
    assert sparse.cache_slug != DllmSparseLM.from_scorer(_ar_scorer()).cache_slug


def test_rolling_and_generate_until():
    scorer = _ar_scorer()
    lm = DllmSparseLM.from_scorer(scorer)
    text = "some text to score"
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))])
    exact = scorer.loglikelihood_tokens([([ByteTokenizer.bos_token_id], ByteTokenizer().encode(text))])[0][0]
    assert ll == pytest.approx(exact, abs=1e-4)
    reqs = [Instance("generate_until", {}, ("ab", {"until": ["\n"], "max_gen_toks": 4}), 0, ("t", i, 1))
            for i in range(2)]
    outs = lm.generate_until(reqs)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    torch.testing.assert_close(torch.tensor(len(outs[0]) <= 8), torch.tensor(True))


def test_lm_eval_task_through_the_task_interface(tmp_path):
    from dllm_sparse.eval.tasks.lm_eval_tasks import LmEvalTask

    _write_task(tmp_path)
    scorer = _ar_scorer(sparsity=SparsityConfig("up", TopP(0.7)))
    res = LmEvalTask("tiny_mc", "acc_norm", str(tmp_path), include_defaults=False).evaluate(scorer)
    ref = _reference_acc(_ar_scorer(sparsity=SparsityConfig("up", TopP(0.7))))
    assert res.metric == "acc_norm" and res.value == pytest.approx(ref["acc_norm"]) and res.n == len(DOCS)
    assert res.higher_is_better["acc"] is True and scorer.stats.mean("up") > 0.2


def test_diffusion_generate_until():
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3, eos_token_id=2,
                             pad_token_id=0)
    scorer = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, name="tiny-llada",
                    sparsity=SparsityConfig("intermediate", TopP(0.8)))
    lm = DllmSparseLM.from_scorer(scorer, max_gen_toks=8, gen_steps=4, block_length=4)
    reqs = [Instance("generate_until", {}, ("ab", {"until": ["\n"]}), 0, ("t", i, 1)) for i in range(2)]
    outs = lm.generate_until(reqs)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert set(lm.stats.tags) >= {0, 1, 2, 3}  # per-step statistics of the 4 denoising steps


def _tiny_llada_scorer(**kw):
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3, eos_token_id=2,
                             pad_token_id=0)
    return Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, name="tiny-llada", **kw)


def test_preset_scores_each_task_with_its_official_guidance():
    scorer = _tiny_llada_scorer(mc_num=4, mc_batch=2)
    lm = DllmSparseLM.from_scorer(scorer, preset="llada-official")
    reqs = [Instance("loglikelihood", {}, ("ab", " cd"), 0, ("arc_challenge", 0, 1)),
            Instance("loglikelihood", {}, ("ab", " cd"), 0, ("winogrande", 0, 1)),
            Instance("loglikelihood", {}, ("ab", " cd"), 0, ("truthfulqa_mc2", 0, 1)),
            Instance("loglikelihood", {}, ("ab", " cd"), 0, ("mmlu_anatomy", 0, 1))]
    got = lm.loglikelihood(reqs)
    # The official arithmetic (precision="official"); the scorer's mc_num / mc_batch except on the MMLU-style
    # tasks, which the official script scores with mc_num 1, batch 1.
    official = _tiny_llada_scorer(mc_num=4, mc_batch=2, precision="official")
    one_row = _tiny_llada_scorer(mc_num=1, mc_batch=1, precision="official")
    for req, res, (ref, w) in zip(reqs, got, ((official, 0.5), (official, 0.0), (official, 2.0), (one_row, 0.0)),
                                  strict=True):
        assert res == ref.loglikelihood([req.args], keys=[lm._key(req)], cfg_scale=w)[0]
    assert got[0] != got[1] and got[3] != official.loglikelihood([reqs[3].args], keys=[lm._key(reqs[3])])[0]
    assert (scorer.precision, scorer.mc_num, scorer.mc_batch) == ("float32", 4, 2)  # restored after the call
    ident = json.loads(lm.identity)
    assert ident["preset"] == "llada-official" and ident["preset_settings"]["precision"] == "official"
    assert "preset_settings" not in json.loads(DllmSparseLM.from_scorer(scorer).identity)
    assert lm.preset.mc_num == 128 and lm.preset.greedy_check == "off"
    # An explicit mc_num / mc_batch is every task's: the MMLU-style request is then scored with the scorer's.
    explicit = DllmSparseLM.from_scorer(scorer, preset="llada-official", mc_num=4)
    assert explicit.loglikelihood(reqs[3:]) == official.loglikelihood([reqs[3].args], keys=[lm._key(reqs[3])])
    with pytest.raises(TypeError, match="mc_num would be ignored"):  # not the scorer's: it could not apply
        DllmSparseLM.from_scorer(scorer, preset="llada-official", mc_num=7)
    with pytest.raises(ValueError, match="unknown evaluation preset"):
        DllmSparseLM.from_scorer(scorer, preset="nope")


# ---- model arguments: read strictly, before a long load -----------------------------------------------------

MISSING = "/nonexistent/never-loaded"  # a refusal before loading is the only way these cases pass


def _from_args(args: str):
    return DllmSparseLM.create_from_arg_string(args, {"device": "cpu"})


@pytest.mark.parametrize("args, message", [
    ("sparsity=input:top_p:0.9,scope=step", r"not both \(got scope='step'\).*sparsity=input:top_p:0.9:step"),
    ("sparsity=input:top_p:0.9,rule=top_k", r"not both \(got rule='top_k'\)"),
    ("rule=top_k", r"rule='top_k' given without a site.*run dense"),
    ("scope=step", r"scope='step' given without a site.*run dense"),
    ("site=input,rule=top_k", r"site='input',rule='top_k' without a threshold: the default threshold \(1.0, "
                              r"top_p's p = 1.*applies to rule=top_p only.*target sparsity.*"
                              r"site=input,rule=top_k,threshold=0.5"),
    ("site=up,rule=max_p", r"rule='max_p' without a threshold.*keep \|v_i\| >= p max.*rule=max_p,threshold=0.1"),
    ("site=input,rule=paper_top_p", r"rule='paper_top_p' without a threshold.*percent.*threshold=90"),
    ("site=input,p=abc", r"p='abc': expected a finite number"),
    ("site=input,threshold=nan", r"threshold=nan: expected a finite number"),
    ("cfg=abc", r"cfg='abc': expected a finite number"),
    ("cfg=inf", r"cfg=inf: expected a finite number"),
    ("cfg=-1", r"cfg=-1: expected a finite number >= 0"),
    ("cfg_scale=nan", r"cfg_scale=nan: expected a finite number"),
    ("seed=abc", r"seed='abc': expected a whole number >= 0"),
    ("seed=1.5", r"seed=1.5: expected a whole number"),
    ("batch_size=0", r"batch_size=0: expected a whole number >= 1 \(or auto\)"),
    ("batch_size=-3", r"batch_size=-3: expected a whole number >= 1"),
    ("batch_size=2.7", r"batch_size=2.7: expected a whole number >= 1"),
    ("mc_num=0", r"mc_num=0: expected a whole number >= 1"),
    ("mc_batch=-2", r"mc_batch=-2: expected a whole number >= 1"),
    ("max_gen_toks=0", r"max_gen_toks=0: expected a whole number >= 1"),
    ("max_gen_toks=-5", r"max_gen_toks=-5: expected a whole number >= 1"),
    ("gen_steps=0", r"gen_steps=0: expected a whole number >= 1"),
    ("block_length=2.5", r"block_length=2.5: expected a whole number >= 1"),
    ("head_chunk=0", r"head_chunk=0: expected a whole number >= 1"),
    ("head_chunk=-8", r"head_chunk=-8: expected a whole number >= 1"),
    ("head_chunk=1.5", r"head_chunk=1.5: expected a whole number >= 1"),
    ("preset=llada-official,head_chunk=512", r"head_chunk=512 with preset=llada-official: .* official arithmetic"),
    ("add_bos_token=ture", r"add_bos_token='ture': expected a boolean: true or false"),
    ("shift_logits=flase", r"shift_logits='flase': expected a boolean"),
    ("trust_remote_code=maybe", r"trust_remote_code='maybe': expected a boolean"),
    ("progress=2", r"progress=2: expected a boolean"),
    ("data_parallel=yess", r"data_parallel='yess': expected a boolean"),
    ("kind=ar,cfg=2.0", r"cfg=2.0 is the guided ELBO of a diffusion model; this model is autoregressive"),
    ("kind=ar,preset=llada-official", r"preset=llada-official .* this model is autoregressive"),
])
def test_bad_model_args_are_refused_before_loading(args, message):
    with pytest.raises(ValueError, match=message):
        _from_args(f"pretrained={MISSING},{args}")


def test_good_model_args_are_read_as_meant():
    from dllm_sparse.eval.tasks.lm_eval_args import as_bool, as_optional_bool, as_positive_int

    for text, want in (("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True), ("false", False),
                       ("0", False), ("no", False), ("off", False), (True, True), (0, False)):
        assert as_bool("x", text) is want
    assert as_optional_bool("x", None) is None and as_optional_bool("x", "none") is None
    for text in (4, 4.0, "4", " 4 "):
        assert as_positive_int("x", text) == 4
    for bad in (True, 4.5, "4.5", "four", float("inf"), 0):
        with pytest.raises(ValueError, match="model argument x="):
            as_positive_int("x", bad)


@pytest.fixture
def tiny_ar_dir(tmp_path):
    from conftest import build_byte_hf_tokenizer

    path = tmp_path / "tiny-llama"
    build_tiny_model("llama", vocab_size=260, seed=3).save_pretrained(path)  # 2 layers
    build_byte_hf_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("args, message", [
    ("sparsity=input:top_p:0.9:layers=99", r"sparsity=input:top_p:0.9:token:layers=99: layer 99 out of range: the "
                                           r"model has 2 FFN layers"),
    ("sparsity=input:top_p:0.9:layers=-3", r"layer -3 out of range"),
    ("cfg=2.0", r"cfg=2.0 is the guided ELBO of a diffusion model; this model is autoregressive"),
    ("preset=llada-official", r"preset=llada-official holds the official settings of a diffusion model"),
])
def test_model_args_checked_against_the_loaded_model(tiny_ar_dir, args, message):
    with pytest.raises(ValueError, match=message):
        _from_args(f"pretrained={tiny_ar_dir},{args}")
    lm = _from_args(f"pretrained={tiny_ar_dir},sparsity=input:top_p:0.9:layers=1/-1,batch_size=2.0,cfg=0")
    assert lm.sparsity[0].layers == (-1, 1) and lm.scorer.batch_size == 2 and lm.scorer.cfg_scale == 0.0


def test_head_chunk_reaches_the_scorer_and_the_identity(tiny_ar_dir):
    plain = _from_args(f"pretrained={tiny_ar_dir},batch_size=2")
    chunked = _from_args(f"pretrained={tiny_ar_dir},batch_size=2,head_chunk=3")
    assert chunked.scorer.head_chunk == 3 and plain.scorer.head_chunk is None
    assert chunked.run_identity["head_chunk"] == 3 and "head_chunk" not in plain.run_identity.to_dict()
    want = plain.scorer.loglikelihood_rolling(["a window long enough to take several chunks of three rows"])
    got = chunked.scorer.loglikelihood_rolling(["a window long enough to take several chunks of three rows"])
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    with pytest.raises(TypeError, match="head_chunk would be ignored"):
        DllmSparseLM.from_scorer(plain.scorer, head_chunk=4)


def test_from_scorer_refuses_settings_it_would_drop():
    scorer = Scorer(build_tiny_model("llama", vocab_size=260, seed=3), ByteTokenizer(), "ar", name="t", batch_size=4)
    with pytest.raises(TypeError, match="mc_num, seed would be ignored"):
        DllmSparseLM.from_scorer(scorer, mc_num=8, seed=1)
    with pytest.raises(ValueError, match="layer 5 out of range"):
        DllmSparseLM.from_scorer(scorer, sparsity=SparsityConfig("input", TopP(0.9), layers=[5]))
    with pytest.raises(ValueError, match="preset=llada-official .* autoregressive"):
        DllmSparseLM.from_scorer(scorer, preset="llada-official")


def test_llada_official_preset_holds_the_official_scripts_values():
    """The values of ML-GSAI/LLaDA's eval_llada_lm_eval.sh (one command per task) and eval_llada.py."""
    from dllm_sparse.eval.scoring.presets import get_preset

    preset = get_preset("llada-official")
    script = {  # task: (num_fewshot, cfg, mc_num, batch_size) of its command
        "gpqa_main_n_shot": (5, 0.5, 128, 8), "truthfulqa_mc2": (0, 2.0, 128, 8), "arc_challenge": (0, 0.5, 128, 8),
        "hellaswag": (0, 0.5, 128, 8), "winogrande": (5, 0.0, 128, 8), "piqa": (0, 0.5, 128, 8),
        "mmlu": (5, 0.0, 1, 1), "cmmlu": (5, 0.0, 1, 1), "ceval-valid": (5, 0.0, 1, 1)}
    for task, (shots, cfg, mc_num, batch) in script.items():
        assert (preset.num_fewshot[task], preset.cfg_for(task), preset.mc_for(task)) == (shots, cfg, (mc_num, batch))
    assert preset.mc_for("mmlu_anatomy") == preset.mc_for("cmmlu_agronomy") == preset.mc_for("ceval-valid_law") \
        == (1, 1)
    assert preset.mc_for("arc_easy") == (128, 8) and preset.cfg_for("arc_easy") == 0.0  # not in the script
    assert preset.generation_tasks == ("bbh", "gsm8k", "minerva_math", "humaneval", "mbpp")
    assert (preset.gen_length, preset.steps, preset.block_length) == (1024, 1024, 1024)
    assert preset.greedy_check == "off" and preset.confidence == "official" and preset.precision == "official"


def test_generate_until_passes_the_guidance_and_the_presets_confidence_to_the_sampler(monkeypatch):
    import dllm_sparse.samplers as samplers

    seen = []
    real = samplers.generate

    def spy(model, tokenizer, prompts, config, **kw):  # records the config, then generates for real
        seen.append(config)
        return real(model, tokenizer, prompts, config, **kw)

    monkeypatch.setattr(samplers, "generate", spy)
    req = Instance("generate_until", {}, ("ab", {"until": ["\n"]}), 0, ("t", 0, 1))
    geom = dict(max_gen_toks=8, gen_steps=4, block_length=4)
    scorer = _tiny_llada_scorer(cfg_scale=0.5)
    forwards = []
    hook = scorer.model.register_forward_pre_hook(lambda m, a, k: forwards.append(k["input_ids"].shape[0]),
                                                  with_kwargs=True)
    try:
        out = DllmSparseLM.from_scorer(scorer, **geom).generate_until([req])
    finally:
        hook.remove()
    assert seen[-1].cfg_scale == 0.5 and seen[-1].confidence == "float64"
    assert forwards and set(forwards) == {2}  # guided: the unconditional row rides with the prompt's
    cfg = samplers.GenerationConfig(max_new_tokens=8, steps=4, block_length=4, mask_id=3, cfg_scale=0.5,
                                    stop_strings=["\n"], seed=scorer.seed)
    assert out == [t.split("\n")[0] for t in real(scorer.model, scorer.tokenizer, ["ab"], cfg).texts]
    # The preset: the task's official guidance (generation tasks: 0) and the official confidence.
    plain = _tiny_llada_scorer()
    gsm = Instance("generate_until", {}, ("ab", {"until": ["\n"]}), 0, ("gsm8k", 0, 1))
    DllmSparseLM.from_scorer(plain, preset="llada-official", **geom).generate_until([gsm])
    assert seen[-1].cfg_scale == 0.0 and seen[-1].confidence == "official"


def test_block_cache_reaches_the_sampler_and_the_identity():
    """block_cache=dual generates what the sampler gives with that cache, is part of the run identity (another
    cache key than without it), and is refused for an AR model or an unknown value."""
    from dllm_sparse.samplers import GenerationConfig, generate

    req = Instance("generate_until", {}, ("abcd", {"until": ["\n"]}), 0, ("t", 0, 1))
    geom = dict(max_gen_toks=8, gen_steps=8, block_length=4)
    scorer = _tiny_llada_scorer()
    cached = DllmSparseLM.from_scorer(scorer, block_cache="dual", **geom)
    out = cached.generate_until([req])
    cfg = GenerationConfig(max_new_tokens=8, steps=8, block_length=4, mask_id=3, stop_strings=["\n"],
                           seed=scorer.seed, block_cache="dual")
    assert out == [t.split("\n")[0] for t in generate(scorer.model, scorer.tokenizer, ["abcd"], cfg).texts]
    plain = DllmSparseLM.from_scorer(scorer, **geom)
    assert cached.run_identity["block_cache"] == "dual" and "block_cache" not in plain.run_identity.to_dict()
    assert cached.identity != plain.identity
    with pytest.raises(ValueError, match="block_cache='triple'"):
        DllmSparseLM.from_scorer(scorer, block_cache="triple")
    with pytest.raises(ValueError, match="autoregressive"):
        DllmSparseLM.from_scorer(_ar_scorer(), block_cache="prefix")


def test_confidence_threshold_reaches_the_sampler_and_the_identity():
    """confidence_threshold generates what the parallel sampler gives (steps = the task's tokens), is part of the
    run identity, and is refused for an AR model, with gen_steps, or when not a number > 0."""
    from dllm_sparse.samplers import GenerationConfig, generate

    req = Instance("generate_until", {}, ("abcd", {"until": ["\n"]}), 0, ("t", 0, 1))
    scorer = _tiny_llada_scorer()
    par = DllmSparseLM.from_scorer(scorer, confidence_threshold="0.05", max_gen_toks=8, block_length=4)
    out = par.generate_until([req])
    cfg = GenerationConfig(max_new_tokens=8, steps=8, block_length=4, mask_id=3, stop_strings=["\n"],
                           seed=scorer.seed, confidence_threshold=0.05)
    ref = generate(scorer.model, scorer.tokenizer, ["abcd"], cfg)
    assert out == [t.split("\n")[0] for t in ref.texts]
    plain = DllmSparseLM.from_scorer(scorer, max_gen_toks=8, block_length=4)
    assert par.run_identity["confidence_threshold"] == 0.05
    assert "confidence_threshold" not in plain.run_identity.to_dict() and par.identity != plain.identity
    for bad in ("0", "-1", "nan", "abc"):
        with pytest.raises(ValueError, match="confidence_threshold"):
            DllmSparseLM.from_scorer(scorer, confidence_threshold=bad)
    with pytest.raises(ValueError, match="no gen_steps"):
        DllmSparseLM.from_scorer(scorer, confidence_threshold=0.9, gen_steps=4)
    with pytest.raises(ValueError, match="autoregressive"):
        DllmSparseLM.from_scorer(_ar_scorer(), confidence_threshold=0.9)


# ---- lm-eval's own arguments (device, batch_size, max_batch_size) next to --model_args -----------------------------


@pytest.mark.parametrize("model_args, lm_eval_args, want", [
    # lm-eval's CLI passes device=cuda:0 and batch_size=1 when the flags are left out: --model_args wins over those
    ({"device": "cpu"}, {"device": "cuda:0", "batch_size": 1, "max_batch_size": None}, {"device": "cpu",
                                                                                         "batch_size": 1}),
    ({"device": "auto"}, {"device": "cuda:0"}, {"device": "auto"}),
    ({"batch_size": 4}, {"batch_size": 1, "device": "cuda:0"}, {"batch_size": 4, "device": "cuda:0"}),
    # the same value in both places, or in one place only
    ({"device": "cpu"}, {"device": "cpu"}, {"device": "cpu"}),
    ({"batch_size": 4}, {"batch_size": "4"}, {"batch_size": 4}),
    ({}, {"device": "cpu", "batch_size": "16", "max_batch_size": None}, {"device": "cpu", "batch_size": "16"}),
    ({"max_batch_size": 8}, {"max_batch_size": None}, {"max_batch_size": 8}),
])
def test_lm_eval_arguments_merge_with_model_args(model_args, lm_eval_args, want):
    from dllm_sparse.eval.tasks.lm_eval_model import merge_lm_eval_args

    assert merge_lm_eval_args({"pretrained": "m", **model_args}, lm_eval_args) == {"pretrained": "m", **want}


@pytest.mark.parametrize("model_args, lm_eval_args, message", [
    ({"device": "auto"}, {"device": "cpu"}, r"device is given twice .*device=auto and lm-eval's --device cpu"),
    ({"batch_size": 4}, {"batch_size": "16"},
     r"batch_size is given twice .*batch_size=4 and lm-eval's --batch_size 16"),
    ({"max_batch_size": 4}, {"max_batch_size": 8}, r"max_batch_size is given twice"),
])
def test_contradicting_lm_eval_arguments_are_refused(model_args, lm_eval_args, message):
    with pytest.raises(ValueError, match=message):
        DllmSparseLM.create_from_arg_obj({"pretrained": MISSING, **model_args}, lm_eval_args)


@pytest.mark.parametrize("args, message", [
    ("batch_size=16,max_batch_size=8", r"batch_size=16 is above max_batch_size=8"),
    ("max_batch_size=0", r"max_batch_size=0: expected a whole number >= 1"),
])
def test_bad_max_batch_size_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        _from_args(f"pretrained={MISSING},{args}")


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    """A tiny AR model and a tiny native LLaDA saved as `pretrained` directories with a Hugging Face tokenizer."""
    from conftest import build_byte_hf_tokenizer

    from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config

    root = tmp_path_factory.mktemp("cli-models")
    build_tiny_model("llama", vocab_size=260, seed=3).save_pretrained(root / "ar")
    torch.manual_seed(2)
    LLaDAModelLM(tiny_llada_config(vocab_size=260, embedding_size=260, mask_token_id=3)).eval().save_pretrained(
        root / "mdm")
    for d in ("ar", "mdm"):
        build_byte_hf_tokenizer().save_pretrained(root / d)
    return {"ar": root / "ar", "mdm": root / "mdm"}


def _cli_main(args: list[str], out, monkeypatch) -> dict:
    """The console script's main (lm-eval's own CLI) in this process; the identity of the model it built."""
    import glob
    import sys

    from dllm_sparse.eval.identity import RunIdentity
    from dllm_sparse.eval.tasks.lm_eval_model import main

    monkeypatch.setattr(sys, "argv", ["dllm-sparse-lm-eval"])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main([*args, "--output_path", str(out)])
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    config = json.loads(open(path).read())["config"]
    return RunIdentity.from_json(config["dllm_sparse_identity"]).to_dict()


# The README's command lines, each with pretrained= a tiny local model, the offline built-in task for the hub task
# and --limit 1 (mc_num=16 on the paper variant: its mc_num 128 at batch 1 takes a minute). lm-eval's CLI passes
# device=cuda:0 and batch_size=1 when the flags are left out.
README_COMMANDS = {
    "smoke": ("ar", "--model dllm_sparse --model_args pretrained={ar},sparsity=input:top_p:0.9 --tasks dllm_sparse_mc "
              "--limit 1 --batch_size 16 --device cpu", {"batch_size": 16, "sparsity": "input:top_p:0.9:token"}),
    "official": ("mdm", "--model dllm_sparse --tasks dllm_sparse_mc --num_fewshot 0 --model_args "
                 "pretrained={mdm},dtype=bf16,device=auto,preset=llada-official --batch_size 8 --limit 1",
                 {"batch_size": 8, "preset": "llada-official"}),
    "paper_variant": ("mdm", "--model dllm_sparse --tasks dllm_sparse_mc --model_args "
                      "pretrained={mdm},dtype=bf16,device=auto,sparsity=input:paper_top_p:90:sequence,mc_num=16 "
                      "--limit 1",
                      {"batch_size": 1, "sparsity": "input:paper_top_p:90.0:sequence"}),
    # the same argument in --model_args and as lm-eval's flag, or in --model_args over lm-eval's default
    "device_twice": ("ar", "--model dllm_sparse --model_args pretrained={ar},device=cpu --device cpu --tasks "
                     "dllm_sparse_mc --limit 1", {"batch_size": 1, "device_type": "cpu"}),
    "batch_in_model_args": ("ar", "--model dllm_sparse --model_args pretrained={ar},batch_size=4 --tasks "
                            "dllm_sparse_mc --limit 1", {"batch_size": 4}),
}


# Each run takes ~25 s on a 2-core CPU (most of it lm-eval indexing its tasks): two in the quick suite.
QUICK = ("official", "batch_in_model_args")


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow)
                                  for n in README_COMMANDS])
def test_readme_command_lines_run_through_the_console_script(name, cli_models, tmp_path, monkeypatch):
    _, line, want = README_COMMANDS[name]
    ident = _cli_main(line.format(**cli_models).split(), tmp_path / "out", monkeypatch)
    assert {k: ident.get(k) for k in want} == want


@pytest.mark.slow
def test_console_script_refuses_a_contradicting_pair(cli_models, tmp_path, monkeypatch):
    args = f"--model dllm_sparse --model_args pretrained={cli_models['ar']},batch_size=4 --batch_size 16 --tasks " \
           "dllm_sparse_mc --limit 1"
    with pytest.raises(ValueError, match=r"batch_size is given twice .*batch_size=4 and lm-eval's --batch_size 16"):
        _cli_main(args.split(), tmp_path / "out", monkeypatch)
