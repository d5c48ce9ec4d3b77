"""SparsityConfig: text and dict forms, full-precision ids, validation, and one config through every entry point
(hooks, step sparsity, kernels, likelihood scorer, tasks, sweep cells, lm-eval model arguments)."""

from __future__ import annotations

import json

import pytest
import torch
from byte_tokenizer import ByteTokenizer
from conftest import build_tiny_model

from dllm_sparse import FFNSite, MaxP, SparsityConfig, SparsityStats, TopK, TopP, make_rule, sparsify
from dllm_sparse.eval.rows import read_rows
from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.eval.sweep.config import SweepConfig
from dllm_sparse.eval.sweep.run import run_sweep
from dllm_sparse.eval.sweep.store import upgrade_cell_keys
from dllm_sparse.eval.tasks.builtin import MCItem, MultipleChoiceTask, PerplexityTask
from dllm_sparse.kernels import accelerate_ffn, accelerated_ffn, restore_ffn
from dllm_sparse.models.loading import LoadedModel
from dllm_sparse.samplers import GenerationConfig, StepSparsity, generate
from dllm_sparse.sparsity.config import DENSE, slug
from dllm_sparse.sparsity.hooks import Sparsifier
from dllm_sparse.sparsity.rules import RULE_NAMES, rule_name

CONFIGS = [
    SparsityConfig("input", TopP(0.9)),
    SparsityConfig("gate", TopP(0.12345671, scope="sequence")),
    SparsityConfig("up", TopK(0.5)),
    SparsityConfig("intermediate", MaxP(0.05), layers=(0, 3)),
    SparsityConfig(FFNSite.UP, TopK(0.0, scope="sequence"), layers=(-1,)),
]


# --------------------------------------------------------------------------------------------------------
# Text, dict and id
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.id)
def test_parse_is_the_inverse_of_id_and_dicts_round_trip(cfg):
    assert SparsityConfig.parse(cfg.id) == cfg
    assert str(cfg) == cfg.id
    d = cfg.to_dict()
    assert SparsityConfig.from_dict(json.loads(json.dumps(d))) == cfg  # JSON-able, exact
    assert d["site"] == cfg.site.value and d["rule"] == cfg.rule.name and d["threshold"] == cfg.rule.threshold
    assert hash(SparsityConfig.parse(cfg.id)) == hash(cfg)


def test_id_format():
    assert SparsityConfig("input", TopP(0.9)).id == "input:top_p:0.9:token"
    assert SparsityConfig("up", TopK(0.5, scope="sequence")).id == "up:top_k:0.5:sequence"
    assert SparsityConfig("gate", MaxP(0.1), layers=[3, 0, 3]).id == "gate:max_p:0.1:token:layers=0/3"
    assert SparsityConfig("input", TopP(1)).id == "input:top_p:1.0:token"
    # the scope defaults to token; whitespace and case of names are forgiven
    assert SparsityConfig.parse(" INPUT:Top-P:0.9 ") == SparsityConfig("input", TopP(0.9))


@pytest.mark.parametrize("a, b", [(0.12345671, 0.12345674), (0.9999999, 1.0)])
def test_ids_keep_full_precision(a, b):
    assert f"{a:g}" == f"{b:g}"  # what the old ':g' ids did: both thresholds shared one id
    ca, cb = SparsityConfig("input", TopP(a)), SparsityConfig("input", TopP(b))
    assert ca.id != cb.id
    assert SparsityConfig.parse(ca.id).rule.p == a and SparsityConfig.parse(cb.id).rule.p == b


def test_site_is_normalised_and_layers_sorted():
    cfg = SparsityConfig("Intermediate", TopP(0.5), layers=range(3, -1, -1))
    assert cfg.site is FFNSite.INTERMEDIATE and cfg.layers == (0, 1, 2, 3)
    assert cfg == SparsityConfig(FFNSite.INTERMEDIATE, TopP(0.5), layers=[0, 1, 2, 3])
    assert SparsityConfig("up", TopP(0.5), layers=[torch.tensor(2).item()]).layers == (2,)


def test_is_identity_and_identity_constructor():
    assert SparsityConfig("input", TopP(1.0)).is_identity and SparsityConfig("input", TopK(0.0)).is_identity
    assert not SparsityConfig("input", TopP(0.99)).is_identity and not SparsityConfig("up", MaxP(0.001)).is_identity
    ident = SparsityConfig.identity("gate", scope="sequence")
    assert ident == SparsityConfig("gate", TopP(1.0, scope="sequence")) and ident.is_identity


def test_top_p_method_survives_the_dict_but_not_the_id():
    cfg = SparsityConfig("input", TopP(0.7, method="sort"))
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.id == SparsityConfig("input", TopP(0.7)).id  # every method gives the same masks


@pytest.mark.parametrize("text, needle", [
    ("input:top_p", "expected site:rule:threshold"),
    ("input:top_p:0.9:token:extra", "expected site:rule:threshold"),
    ("input::0.9", "expected site:rule:threshold"),
    ("inputs:top_p:0.9", "unknown FFN site 'inputs'"),
    ("input:top_q:0.9", "unknown rule 'top_q'"),
    ("input:top_p:ninety", "threshold 'ninety' is not a number"),
    ("input:top_p:1.5", "p must be in (0, 1]"),
    ("input:top_k:1.0", "sparsity must be in [0, 1)"),
    ("input:top_p:nan", "p must be in (0, 1]"),
    ("input:top_p:0.9:tokens", "scope 'tokens' is not one of"),
    ("input:top_p:0.9:token:layers=0,1", "indices joined by '/'"),
    ("input:top_p:0.9:layers=", "indices joined by '/'"),
])
def test_bad_strings_name_the_problem(text, needle):
    with pytest.raises(ValueError, match="cannot read sparsity config") as err:
        SparsityConfig.parse(text)
    assert needle in str(err.value) and repr(text) in str(err.value)


def test_bad_values_name_the_problem():
    with pytest.raises(TypeError, match="rule must be a SparsityRule"):
        SparsityConfig("input", "top_p")
    with pytest.raises(ValueError, match="unknown FFN site"):
        SparsityConfig("attention", TopP(0.9))
    with pytest.raises(ValueError, match="layers is empty"):
        SparsityConfig("input", TopP(0.9), layers=[])
    for bad in ([True], [1.0], [0, "1"]):
        with pytest.raises(TypeError, match="ints only"):
            SparsityConfig("input", TopP(0.9), layers=bad)
    for bad in ("0,1", 3):
        with pytest.raises(TypeError, match="sequence of layer indices"):
            SparsityConfig("input", TopP(0.9), layers=bad)
    with pytest.raises(ValueError, match="unknown"):
        SparsityConfig.from_dict({"site": "input", "rule": "top_p", "threshold": 0.9, "p": 0.9})
    with pytest.raises(ValueError, match="missing"):
        SparsityConfig.from_dict({"site": "input", "rule": "top_p"})
    with pytest.raises(TypeError, match="parse takes a string"):
        SparsityConfig.parse(0.9)


def test_rule_names_live_in_one_table():
    from dllm_sparse.sparsity import names, rules

    assert RULE_NAMES == ("top_p", "top_k", "max_p", "paper_top_p")
    # The torch-free list the command lines offer is the registry's, name for name and in order.
    assert names.RULE_NAMES is RULE_NAMES and tuple(rules._RULES) == names.RULE_NAMES
    assert [make_rule(n, 0.5).name for n in RULE_NAMES] == list(RULE_NAMES)
    assert rule_name("Top-K") == "top_k" and make_rule("MAX-P", 0.2) == MaxP(0.2)
    assert TopK(0.3).threshold == 0.3 and TopP(0.4).threshold == 0.4 and MaxP(0.1).threshold == 0.1
    assert TopK(0.3).to_dict() == {"rule": "top_k", "threshold": 0.3, "scope": "token"}
    with pytest.raises(ValueError, match=r"choose one of \['max_p', 'paper_top_p', 'top_k', 'top_p'\]"):
        rule_name("top")


def test_slug():
    assert slug("NVIDIA H200 (141 GB)") == "nvidia-h200-141-gb"
    assert slug("input:top_p:0.9:token") == "input-top-p-0-9-token"


# --------------------------------------------------------------------------------------------------------
# Entry points: the config form equals the keyword form
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_ids():
    g = torch.Generator().manual_seed(5)
    return build_tiny_model("llama", seed=4), torch.randint(3, 100, (2, 9), generator=g)


def test_sparsify_config_equals_keywords_and_a_hand_written_hook(llama_ids):
    model, ids = llama_ids
    cfg = SparsityConfig("input", TopP(0.5), layers=(1,))
    with torch.no_grad():
        dense = model(ids).logits
        with sparsify(model, cfg) as s_cfg:
            by_config = model(ids).logits
        with sparsify(model, site="input", rule=TopP(0.5), layers=[1]) as s_kw:
            by_keywords = model(ids).logits
        with sparsify(model, "input", TopP(0.5), [1]):
            positional = model(ids).logits
        # Independent reference: sparsify the MLP input of layer 1 by hand.
        handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda m, args: (TopP(0.5)(args[0]),))
        try:
            by_hand = model(ids).logits
        finally:
            handle.remove()
    assert torch.equal(by_config, by_keywords) and torch.equal(by_config, positional)
    torch.testing.assert_close(by_config, by_hand, rtol=0, atol=0)
    assert not torch.allclose(by_config, dense)
    assert s_cfg.records() == s_kw.records() and {r["layer"] for r in s_cfg.records()} == {1}
    assert Sparsifier(model, cfg).config == cfg == Sparsifier(model, "input", TopP(0.5), (1,)).config


def test_entry_points_refuse_both_forms_and_half_a_form(llama_ids):
    model, _ = llama_ids
    cfg = SparsityConfig("input", TopP(0.5))
    with pytest.raises(TypeError, match="either a SparsityConfig or site/rule/layers"):
        with sparsify(model, cfg, TopP(0.9)):
            pass
    with pytest.raises(TypeError, match="needs a SparsityConfig"):
        with sparsify(model, site="input"):
            pass
    with pytest.raises(TypeError, match="site is given twice"):
        StepSparsity("input", TopP(0.5), site="up")
    with pytest.raises(TypeError, match="either a SparsityConfig"):
        accelerate_ffn(model, cfg, layers=[0])
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_step_sparsity_config_equals_keywords(llada, llama, kind):
    model = llada if kind == "diffusion" else llama
    gen = GenerationConfig(gen_length=8, steps=4, block_length=4) if kind == "diffusion" else \
        GenerationConfig(max_new_tokens=5, stop_token_ids=())
    prompts = [[5, 17, 3, 42, 8], [7, 7, 1]]
    cfg = SparsityConfig("intermediate", TopP(0.6), layers=[0])
    a, b = StepSparsity(cfg), StepSparsity("intermediate", TopP(0.6), layers=[0])
    out_a = generate(model, None, prompts, gen, sparsity=a)
    out_b = generate(model, None, prompts, gen, sparsity=b)
    assert torch.equal(out_a.sequences, out_b.sequences)
    assert json.dumps(a.records()) == json.dumps(b.records())  # as text: empty groups hold NaN, and NaN != NaN
    assert a.tags() == b.tags() and a.config == b.config == cfg
    assert {r["layer"] for r in a.records()} == {0}
    assert a.describe()["id"] == cfg.id


def test_accelerate_ffn_config_equals_keywords_and_masking_path(llama_ids):
    model, ids = llama_ids
    cfg = SparsityConfig("intermediate", TopP(0.6), layers=[0])
    with torch.no_grad():
        with sparsify(model, cfg):
            masked = model(ids).logits
        accelerate_ffn(model, cfg, backend="torch")
        try:
            by_config = model(ids).logits
        finally:
            restore_ffn(model)
        with accelerated_ffn(model, site="intermediate", rule=TopP(0.6), layers=[0], backend="torch"):
            by_keywords = model(ids).logits
        with accelerated_ffn(model, backend="torch"):  # the defaults: input, TopP(0.5)
            default = model(ids).logits
        with accelerated_ffn(model, SparsityConfig("input", TopP(0.5)), backend="torch"):
            default_by_config = model(ids).logits
    assert torch.equal(by_config, by_keywords) and torch.equal(default, default_by_config)
    torch.testing.assert_close(by_config, masked, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Likelihood scorer and tasks: sparsity per call, the scorer left as it was
# --------------------------------------------------------------------------------------------------------

PAIRS = [("ab", " cd"), ("hello", " world"), ("", "x y")]
TEXTS = ["a short text to score", "another one"]


def _scorer(kind, **kw):
    if kind == "ar":
        return Scorer(build_tiny_model("llama", vocab_size=260, seed=3), ByteTokenizer(), "ar", batch_size=4, **kw)
    model = build_tiny_model("llada", vocab_size=260, embedding_size=260, mask_token_id=3, seed=2)
    return Scorer(model, ByteTokenizer(), "diffusion", mask_id=3, mc_num=4, mc_batch=2, **kw)


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_scorer_sparsified_block_equals_the_configured_scorer(kind):
    cfg = SparsityConfig("up", TopP(0.6))
    old_way = _scorer(kind, sparsity=cfg)
    ref_ll, ref_roll = old_way.loglikelihood(PAIRS), old_way.loglikelihood_rolling(TEXTS)
    old_way.sparsity = None
    dense = old_way.loglikelihood(PAIRS)

    scorer = _scorer(kind)
    stats = SparsityStats()
    with scorer.sparsified(cfg, stats) as measured:
        assert measured is stats and scorer.sparsity == [cfg] and scorer.measured_into is stats
        assert scorer.loglikelihood(PAIRS) == ref_ll
        assert scorer.loglikelihood_rolling(TEXTS) == ref_roll
        assert scorer.identity() == old_way.identity().replace("|dense|", f"|{cfg.id}|") != _scorer(kind).identity()
    assert ref_ll != dense  # the sparsity does change the numbers, so the equality above is informative
    assert scorer.sparsity == [] and scorer.stats is None  # nothing was left on the scorer
    assert stats.mean("up", tag="ar" if kind == "ar" else "elbo") > 0.2
    assert scorer.loglikelihood(PAIRS) == dense  # dense again after the block
    # and the other way round: a sparse scorer scored dense inside a dense block
    sparse = _scorer(kind, sparsity=cfg)
    with sparse.sparsified(None) as none:
        assert none is None and sparse.loglikelihood(PAIRS) == dense
    # a block without stats measures into a fresh SparsityStats, which it yields
    with scorer.sparsified(cfg) as fresh:
        assert scorer.loglikelihood(PAIRS) == ref_ll
    assert fresh is not stats and fresh.mean("up") > 0.2
    # what a block takes: a config, a list of them on distinct sites, or None; anything else is refused
    with pytest.raises(TypeError, match="SparsityConfig.parse"), scorer.sparsified("up:top_p:0.6"):
        pass
    with pytest.raises(ValueError, match="one SparsityConfig per site"), scorer.sparsified([cfg, cfg]):
        pass
    assert scorer.sparsity == []  # a refused block leaves nothing in force
    # blocks nest: the innermost wins, the outer one holds again after it
    with scorer.sparsified(cfg, stats):
        with scorer.sparsified(None):
            assert scorer.loglikelihood(PAIRS) == dense
        assert scorer.loglikelihood(PAIRS) == ref_ll


def test_tasks_score_with_the_sparsity_in_force():
    cfg = SparsityConfig("intermediate", TopP(0.5), layers=[1])
    items = [MCItem("a", "one two", ["three", "four"], 0), MCItem("b", "x y", ["z", "zz", "w"], 2)]
    for task in (MultipleChoiceTask("mc", items), PerplexityTask("ppl", [{"id": "p", "text": "a small passage"}])):
        ref = task.evaluate(_scorer("ar", sparsity=cfg))
        dense = task.evaluate(_scorer("ar"))
        scorer = _scorer("ar")
        with scorer.sparsified(cfg) as stats:
            res = task.evaluate(scorer)
        assert res.metrics == ref.metrics != dense.metrics and {r["layer"] for r in stats.records()} == {1}


def test_sweep_cells_are_sparsified_blocks_around_the_task(tmp_path):
    seen = []

    class Recording:
        def __init__(self, task):
            self.task, self.name, self.metric = task, task.name, task.metric

        def evaluate(self, scorer, limit=None):
            seen.append((scorer.sparsity, scorer.stats, scorer.measured_into))
            return self.task.evaluate(scorer, limit)

    lm = LoadedModel(build_tiny_model("llama", vocab_size=260, seed=1), ByteTokenizer(), "ar", "tiny-ar", None,
                     "llama")
    cfg = SweepConfig(models=[lm], output_dir=tmp_path, sites=["input"], rule="top-k", thresholds=[0.0, 0.5],
                      tasks=["ppl"], progress=False)
    assert cfg.rule == "top_k" and cfg.configs() == [SparsityConfig("input", TopK(0.0)),
                                                     SparsityConfig("input", TopK(0.5))]
    factory = lambda name: Recording(PerplexityTask("ppl", [{"id": "p", "text": "a small passage"}]))  # noqa: E731
    rows = run_sweep(cfg, task_factory=factory)
    # the scorer is never configured: the sweep opens each cell's sparsity around the task, with its own statistics
    assert all(st is None and measured is not None for _, st, measured in seen)
    assert [sp for sp, _, _ in seen] == [[SparsityConfig.identity("input")], [SparsityConfig("input", TopK(0.5))]]
    assert seen[0][2] is not seen[1][2]
    keys = {r["key"]: r for r in rows}
    assert {json.loads(k)[2] for k in keys} == {DENSE, "input:top_k:0.0:token", "input:top_k:0.5:token"}
    topk = next(r for r in rows if r["p"] == 0.5)
    assert topk["rule"] == "top_k" and topk["sparsity"] > 0.45  # "p" holds the rule threshold: top-k's sparsity


@pytest.mark.parametrize("form", ["site_rule_p", "no_batch_size"])
def test_old_sweep_folders_are_refused_then_upgraded(tmp_path, form):
    lm = LoadedModel(build_tiny_model("llama", vocab_size=260, seed=1), ByteTokenizer(), "ar", "tiny-ar", None,
                     "llama")
    cfg = SweepConfig(models=[lm], output_dir=tmp_path, sites=["up"], thresholds=[1.0, 0.7], tasks=["ppl"],
                      limit=1, batch_size=4, progress=False)
    factory = lambda name: PerplexityTask("ppl", [{"id": "p", "text": "a small passage"}])  # noqa: E731
    rows = run_sweep(cfg, task_factory=factory)
    # Rewrite the folder as earlier releases keyed it: [model, task, site, rule, p, scope, limit, ..., dtype], then
    # [model, task, config id, limit, ..., dtype]; neither held the batch size (the last field now).
    old = []
    for r in rows:
        k = json.loads(r["key"])
        assert k[-1] == 4
        head = [r["model"], r["task"], r["site"], r["rule"], r["p"], r["scope"]] if form == "site_rule_p" else k[:3]
        old.append({**r, "key": json.dumps([*head, *k[3:-1]], separators=(",", ":"))})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    with pytest.raises(RuntimeError, match="keyed the old way") as err:
        run_sweep(cfg, task_factory=factory)
    assert "upgrade_cell_keys" in str(err.value) and "sparsity config id" in str(err.value)
    assert "batch size 4 from its sweep_config.json" in str(err.value)
    # Without a record of the batch size the upgrade asks for it instead of guessing.
    (tmp_path / "sweep_config.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(ValueError, match=r"batch_size=N"):
        upgrade_cell_keys(tmp_path)
    (tmp_path / "elsewhere.json").rename(tmp_path / "sweep_config.json")
    assert upgrade_cell_keys(tmp_path) == len(rows)
    assert read_rows(tmp_path / "rows.jsonl") == rows  # keys as this version writes them, nothing else changed

    calls = []
    again = run_sweep(cfg, task_factory=lambda name: calls.append(name) or factory(name))
    assert calls == [] and again == rows


# --------------------------------------------------------------------------------------------------------
# lm-eval model arguments
# --------------------------------------------------------------------------------------------------------


def test_lm_eval_model_args_build_one_config():
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra")
    from dllm_sparse.eval.tasks.lm_eval_model import DllmSparseLM, sparsity_from_args

    want = SparsityConfig("input", TopP(0.9))
    assert sparsity_from_args("input:top_p:0.9") == want
    assert sparsity_from_args(want) == want
    assert sparsity_from_args(site="input", rule="top_p", p=0.9) == want
    assert sparsity_from_args(site="input", rule="top-p", threshold=0.9) == want
    assert sparsity_from_args(site="up", rule="top_k", threshold=0.25, scope="sequence").id == "up:top_k:0.25:sequence"
    assert sparsity_from_args(site="input").is_identity  # no threshold: p = 1, as before
    assert sparsity_from_args(site="input", rule="TOP-P").is_identity  # top-p by any spelling
    with pytest.raises(ValueError, match="rule='top_k' without a threshold"):  # 1.0 is not top-k's identity
        sparsity_from_args(site="input", rule="top-k")
    for dense in (None, "dense", "none", ""):
        assert sparsity_from_args(dense) is None and sparsity_from_args(site=dense) is None
    with pytest.raises(ValueError, match="not both"):
        sparsity_from_args("input:top_p:0.9", site="up")
    with pytest.raises(ValueError, match="disagree"):
        sparsity_from_args(site="input", threshold=0.9, p=0.8)
    with pytest.raises(ValueError, match="cannot read sparsity config"):
        sparsity_from_args("input:top_p")

    scorer = _scorer("ar")
    lm = DllmSparseLM.from_scorer(scorer, sparsity=want, stats=SparsityStats())
    assert lm.sparsity == [want] and "input:top_p:0.9:token" in lm.identity and scorer.sparsity == []
    assert lm.get_model_info()["sparsity"] == [want.to_dict()]
    with pytest.raises(TypeError, match="from_scorer"):
        DllmSparseLM(scorer=scorer, sparsity=want)
