"""The lm-evaluation-harness model class on a local task whose data the test writes itself (no hub)."""

from __future__ import annotations

import json
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[eval]'")

from conftest import build_tiny_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import CachingLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dllm_sparse.eval.likelihood import ByteTokenizer, Scorer, SparsityConfig  # noqa: E402
from dllm_sparse.eval.lm_eval_model import DllmSparseLM  # noqa: E402
from dllm_sparse.eval.tasks import MCItem, MultipleChoiceTask  # noqa: E402
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
    from dllm_sparse.eval.tasks import LmEvalTask

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


def test_preset_scores_each_task_with_its_official_guidance():
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3, eos_token_id=2,
                             pad_token_id=0)
    scorer = Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, name="tiny-llada", mc_num=4, mc_batch=2)
    lm = DllmSparseLM.from_scorer(scorer, preset="llada-official")
    reqs = [Instance("loglikelihood", {}, ("ab", " cd"), 0, ("arc_challenge", 0, 1)),
            Instance("loglikelihood", {}, ("ab", " cd"), 0, ("winogrande", 0, 1)),
            Instance("loglikelihood", {}, ("ab", " cd"), 0, ("truthfulqa_mc2", 0, 1))]
    got = lm.loglikelihood(reqs)
    for req, res, w in zip(reqs, got, (0.5, 0.0, 2.0), strict=True):
        assert res == scorer.loglikelihood([req.args], keys=[lm._key(req)], cfg_scale=w)[0]
    assert got[0] != got[1] and json.loads(lm.identity)["preset"] == "llada-official"
    assert lm.preset.mc_num == 128 and lm.preset.greedy_check == "off"
    with pytest.raises(ValueError, match="unknown evaluation preset"):
        DllmSparseLM.from_scorer(scorer, preset="nope")
