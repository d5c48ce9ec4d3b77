"""The built-in offline suite and the task metrics (acc, acc_norm, perplexity) with a fake scorer."""

from __future__ import annotations

import math

import pytest

from dllm_sparse.eval.tasks.base import apply_limit, relative_performance
from dllm_sparse.eval.tasks.builtin import (
    MCItem,
    MultipleChoiceTask,
    PerplexityTask,
    load_builtin_mc,
    load_builtin_passages,
    score_multiple_choice,
)
from dllm_sparse.eval.tasks.registry import BUILTIN_TASKS, get_task


class FakeScorer:
    """Known log-likelihoods: ``table[(context, continuation)]``; rolling: ``rolling[text] = (ll, n)``."""

    def __init__(self, table=None, rolling=None):
        self.table, self.rolling, self.calls = table or {}, rolling or {}, []

    def loglikelihood(self, pairs, keys=None):
        self.calls.append(list(keys or []))
        return [(self.table[p], False) for p in pairs]

    def loglikelihood_rolling(self, texts, keys=None):
        return [self.rolling[t] for t in texts]


def test_builtin_suite_loads():
    items = load_builtin_mc()
    assert len(items) == 64
    cats = {it.category for it in items}
    assert len(cats) == 8 and all(sum(it.category == c for it in items) == 8 for c in cats)
    assert {it.category for it in items[:8]} == cats  # interleaved: every prefix is balanced
    for it in items:
        assert 0 <= it.gold < len(it.choices) and len(set(it.choices)) == len(it.choices)
        assert not it.choices[0].startswith(" ")
    passages = load_builtin_passages()
    assert len(passages) == 48
    assert all(p["text"] and p["source"]["seed"] is not None for p in passages)
    assert set(BUILTIN_TASKS) == {"builtin_mc", "builtin_ppl"}
    assert get_task("builtin_mc", scoring="builtin").items[0].id == items[0].id


def test_acc_and_acc_norm_for_known_scores():
    items = [
        MCItem("a", "Q1", ["x", "yyyy"], 1),  # acc picks x (-2 > -3, wrong); acc_norm: -2/1 < -3/4 -> yyyy (right)
        MCItem("b", "Q2", ["p", "q", "r"], 2),  # r has the highest ll: right under both
        MCItem("c", "Q3", ["long answer", "s"], 0),  # acc right (-2 > -2.5); norm: -2/11 vs -2.5 -> right
    ]
    table = {("Q1", " x"): -2.0, ("Q1", " yyyy"): -3.0,
             ("Q2", " p"): -4.0, ("Q2", " q"): -3.0, ("Q2", " r"): -1.0,
             ("Q3", " long answer"): -2.0, ("Q3", " s"): -2.5}
    res = MultipleChoiceTask("t", items).evaluate(FakeScorer(table))
    assert res.metrics["acc"] == pytest.approx(2 / 3)  # a wrong (x), b right, c right
    assert res.metrics["acc_norm"] == pytest.approx(3 / 3)  # a: -2/1 < -3/4 -> yyyy right
    assert res.metric == "acc" and res.value == res.metrics["acc"] and res.n == 3
    assert [d["pred"] for d in res.details] == [0, 2, 0]


def test_keys_name_items_and_choices():
    items = [MCItem("a", "Q1", ["x", "y"], 0)]
    fake = FakeScorer({("Q1", " x"): -1.0, ("Q1", " y"): -2.0})
    MultipleChoiceTask("t", items).evaluate(fake)
    assert fake.calls == [["t/a/0", "t/a/1"]]


def test_score_multiple_choice_ties_and_errors():
    metrics, _ = score_multiple_choice([MCItem("a", "c", ["u", "v"], 0)], [[-1.0, -1.0]])
    assert metrics["acc"] == 1.0  # ties go to the first choice (numpy argmax)
    with pytest.raises(ValueError):
        score_multiple_choice([MCItem("a", "c", ["u", "v"], 0)], [[-1.0]])


def test_perplexity_task():
    passages = [{"id": "p0", "text": "aa"}, {"id": "p1", "text": "bbb"}]
    fake = FakeScorer(rolling={"aa": (-4.0, 2), "bbb": (-2.0, 3)})
    res = PerplexityTask("ppl", passages).evaluate(fake)
    assert res.value == pytest.approx(math.exp(6.0 / 5))
    assert res.higher_is_better["ppl"] is False
    assert res.metrics["bits_per_byte"] == pytest.approx(6.0 / 5 / math.log(2))
    assert PerplexityTask("ppl", passages).evaluate(fake, limit=1).value == pytest.approx(math.exp(2.0))


def test_relative_performance_and_limit():
    assert relative_performance(0.5, 0.8, True) == pytest.approx(0.625)
    assert relative_performance(12.0, 10.0, False) == pytest.approx(10 / 12)  # PPL_dense / PPL_sparse
    assert apply_limit(range(10), 3) == [0, 1, 2]
    assert apply_limit(range(10), 0.25) == [0, 1, 2]
    assert apply_limit(range(4), None) == [0, 1, 2, 3]
    pytest.importorskip("lm_eval")
    from dllm_sparse.eval.tasks.lm_eval_tasks import LmEvalTask

    t = get_task("arc_easy:acc_norm")
    assert isinstance(t, LmEvalTask) and t.name == "arc_easy" and t.metric == "acc_norm"


def test_builtin_scoring_without_lm_eval(monkeypatch):
    import dllm_sparse.eval.tasks.registry as tasks

    monkeypatch.setattr(tasks, "lm_eval_available", lambda: False)
    assert isinstance(get_task("builtin_mc"), MultipleChoiceTask)
    assert isinstance(get_task("builtin_ppl"), PerplexityTask)
    with pytest.raises(ImportError, match="eval"):
        get_task("builtin_mc", scoring="lm_eval")
    with pytest.raises(ValueError, match="scoring"):
        get_task("builtin_mc", scoring="harness")


def test_perplexity_metrics_follow_lm_eval_definitions():
    # lm-eval: word_perplexity = exp(-sum ll / sum words) with words = len(re.split(r"\s+", text)); bytes UTF-8
    m = PerplexityTask("ppl", [{"id": "a", "text": "one two"}, {"id": "b", "text": "é x "}]).evaluate(
        FakeScorer(rolling={"one two": (-3.0, 2), "é x ": (-1.0, 3)})).metrics
    assert m["word_perplexity"] == pytest.approx(math.exp(4.0 / (2 + 3)))  # "é x " splits into ["é", "x", ""]
    assert m["byte_perplexity"] == pytest.approx(math.exp(4.0 / (7 + 5)))
    assert m["bits_per_byte"] == pytest.approx(4.0 / 12 / math.log(2))
    assert m["ppl"] == pytest.approx(math.exp(4.0 / 5)) and m["nll_per_token"] == pytest.approx(0.8)
