"""The advantage study's parts (docs/advantage.md): the margin metric, the first crossing, the weight degradations
and their calibration, the verdict rule, trajectory points; each against an independent reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tiny_model

from dllm_sparse.eval.analysis.bootstrap import Bootstrap, item_scores
from dllm_sparse.eval.analysis.critical import critical_replicates, critical_sparsity, critical_table
from dllm_sparse.eval.studies.advantage import EXCEEDS, TRACKS, UNDETERMINED, site_comparisons, verdict
from dllm_sparse.eval.tasks.base import relative_performance
from dllm_sparse.eval.tasks.builtin import MCItem, choice_margin, score_multiple_choice
from dllm_sparse.models.degrade import Degradation, apply_degradation, block_linears, degraded_copy, quantize_groupwise

# ---------------------------------------------------------------------------------------------------------
# The margin metric
# ---------------------------------------------------------------------------------------------------------


def test_margin_is_gold_minus_mean_of_wrong_choices_on_every_enumerated_item():
    g = np.random.default_rng(0)
    items, lls = [], []
    for n_choices, gold in itertools.product((2, 3, 4), range(4)):
        if gold >= n_choices:
            continue
        items.append(MCItem(f"i{len(items)}", "ctx", [f"c{j}" for j in range(n_choices)], gold))
        lls.append(list(g.normal(-5, 2, n_choices)))
    metrics, details = score_multiple_choice(items, lls)
    ref = []
    for item, ll in zip(items, lls, strict=True):
        wrong = [ll[j] for j in range(len(ll)) if j != item.gold]
        ref.append(ll[item.gold] - sum(wrong) / len(wrong))
    assert [d["margin"] for d in details] == pytest.approx(ref, abs=1e-12)
    assert metrics["margin"] == pytest.approx(sum(ref) / len(ref), abs=1e-12)
    # it ranks with accuracy on two choices: margin > 0 exactly when the gold choice wins
    for d, item in zip(details, items, strict=True):
        if len(item.choices) == 2:
            assert (d["margin"] > 0) == (d["pred"] == item.gold)
    assert math.isnan(choice_margin([-1.0], 0))


def test_margin_replicates_equal_a_brute_force_recount_of_each_draw():
    g = np.random.default_rng(1)
    items = [MCItem(f"i{i}", "c", ["a", "b", "c"], i % 3) for i in range(12)]
    dense_ll = [list(g.normal(-4, 1, 3)) for _ in items]
    sparse_ll = [[x + g.normal(0, 0.3) for x in ll] for ll in dense_ll]
    rows = []
    for site, lls in (("dense", dense_ll), ("input", sparse_ll)):
        metrics, details = score_multiple_choice(items, lls)
        rows.append({"key": site, "model": "m", "kind": "ar", "task": "mc", "site": site, "p": 0.9,
                     "metric": "acc", "higher_is_better": True,
                     "higher_is_better_all": {"acc": True, "acc_norm": True, "margin": True},
                     "items": item_scores(details), "metrics": metrics})
    boot = Bootstrap(rows, n_boot=50, seed=3)
    rel = boot.relative(rows[1], "margin")
    w = boot.weights("mc")
    dm = np.array([d for d in rows[0]["items"]["margin"]])
    sm = np.array([d for d in rows[1]["items"]["margin"]])
    for b in range(50):  # each replicate: the drawn items' mean margin, sparse over dense
        idx = np.repeat(np.arange(len(items)), w[b].astype(int))
        d, s = dm[idx].mean(), sm[idx].mean()
        if d > 0:
            assert rel[b] == pytest.approx(s / d)
        else:
            assert math.isnan(rel[b])


def test_margin_relative_performance_needs_a_positive_dense_margin():
    assert relative_performance(0.5, 1.0, True, positive_dense=True) == 0.5
    assert math.isnan(relative_performance(-0.5, -1.0, True, positive_dense=True))  # not "0.5 kept"
    assert math.isnan(relative_performance(0.3, 0.0, True, positive_dense=True))


# ---------------------------------------------------------------------------------------------------------
# First crossing
# ---------------------------------------------------------------------------------------------------------


def _brute_crossings(points, thr=0.99, n=200001):
    """Walk the piecewise-linear curve on a fine grid: where it first drops below thr, and the last place it is
    at or above thr before a failing point."""
    xs, ys = zip(*sorted(points), strict=True)
    grid = np.linspace(xs[0], xs[-1], n)
    r = np.interp(grid, xs, ys)
    below = np.nonzero(r < thr)[0]
    first = None if below.size == 0 or below[0] == 0 else grid[below[0]]
    return first, grid[1] - grid[0]


@pytest.mark.parametrize("seed", range(25))
def test_first_crossing_matches_a_walk_along_the_curve(seed):
    g = np.random.default_rng(seed)
    s = np.sort(g.uniform(0, 0.6, 7))
    r = np.concatenate([[1.0], np.clip(1 - np.cumsum(g.normal(0.004, 0.01, 6)), 0.9, 1.0)])
    pts = list(zip(s.tolist(), r.tolist(), strict=True))
    c = critical_sparsity(pts)
    first, step = _brute_crossings(pts)
    if c.last_passing is None:
        return
    if first is None:  # nothing fails: both equal the last point (a lower bound)
        assert c.first_crossing == c.interpolated == c.last_passing and not c.bracketed
        return
    assert first is not None and c.first_crossing == pytest.approx(first, abs=2 * step)
    assert c.first_crossing <= c.interpolated + 1e-12


def test_first_crossing_lies_below_the_highest_passing_value_on_a_dip():
    c = critical_sparsity([(0.1, 1.0), (0.2, 0.97), (0.3, 0.995), (0.4, 0.95)])
    assert c.interpolated == pytest.approx(0.3 + 0.005 / 0.045 * 0.1)
    assert c.first_crossing == pytest.approx(0.1 + 0.01 / 0.03 * 0.1)
    assert critical_sparsity([(0.1, 0.9), (0.2, 1.0)]).first_crossing is None  # the first point fails
    c = critical_sparsity([(0.1, 1.0), (0.2, 0.98), (0.3, 1.0)])  # the last point passes, an earlier one fails
    assert not c.bracketed and c.interpolated == 0.3 and c.first_crossing == pytest.approx(0.15)


def _mc_rows(model, kind, acc_by_p, n=20, seed=0):
    """Rows of one model on one MC task: dense plus one row per (p, sparsity) with the given per-item hits."""
    rows = [{"key": f"{model}/dense", "model": model, "kind": kind, "task": "mc", "site": "dense", "p": 1.0,
             "metric": "acc", "higher_is_better": True, "items": {"ids": [str(i) for i in range(n)],
                                                                  "acc": [1] * n, "acc_norm": [1] * n},
             "sparsity_by_site": {"input": 0.0}}]
    g = np.random.default_rng(seed)
    for p, (sparsity, n_wrong) in acc_by_p.items():
        hits = [1] * n
        for i in g.choice(n, n_wrong, replace=False):
            hits[i] = 0
        rows.append({"key": f"{model}/{p}", "model": model, "kind": kind, "task": "mc", "site": "input", "p": p,
                     "rule": "top_p", "metric": "acc", "higher_is_better": True, "sparsity": sparsity,
                     "relative_performance": sum(hits) / n, "relative": {"acc": sum(hits) / n},
                     "items": {"ids": [str(i) for i in range(n)], "acc": hits, "acc_norm": hits}})
    return rows


def test_critical_table_carries_the_first_crossing_with_its_interval():
    rows = _mc_rows("m", "ar", {0.99: (0.1, 1), 0.95: (0.2, 0), 0.9: (0.3, 4)})
    boot = Bootstrap(rows, n_boot=200)
    rec = next(r for r in critical_table(rows, boot=boot) if r["task"] == "avg_curve")
    assert rec["first_crossing"] < rec["interpolated"]
    assert rec["first_crossing_lo"] <= rec["first_crossing"] <= rec["first_crossing_hi"]
    reps = critical_replicates(rows, boot)[("m", "input", "avg_curve")]
    assert np.all(reps["first_crossing"][np.isfinite(reps["first_crossing"])]
                  <= reps["interpolated"][np.isfinite(reps["first_crossing"])] + 1e-12)


# ---------------------------------------------------------------------------------------------------------
# Degradations
# ---------------------------------------------------------------------------------------------------------


def test_groupwise_quantisation_matches_a_per_group_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 70, generator=g)
    for bits, group in ((2, 32), (3, 7), (4, 70), (8, 1)):
        q = quantize_groupwise(w, bits, group)
        qmax = 2 ** (bits - 1) - 1
        ref = torch.empty_like(w)
        for i in range(w.shape[0]):
            for start in range(0, w.shape[1], group):
                seg = w[i, start:start + group].double()
                scale = seg.abs().max() / qmax
                ref[i, start:start + group] = (torch.round(seg / scale).clamp(-qmax, qmax) * scale).float()
        torch.testing.assert_close(q, ref, rtol=0, atol=1e-6)
        for i in range(w.shape[0]):  # at most 2^b - 1 levels per group
            assert len(torch.unique(q[i, :group])) <= 2 * qmax + 1
    assert torch.equal(quantize_groupwise(torch.zeros(2, 8), 3, 4), torch.zeros(2, 8))


def _loaded(model, name="tiny"):
    from dllm_sparse.models.loading import LoadedModel

    return LoadedModel(model.eval(), None, "ar", name, None, "llama")


def test_noise_touches_only_block_linears_is_seeded_and_sigma_zero_is_identity():
    base = build_tiny_model("llama")
    lm = _loaded(base)
    d = Degradation("noise", {"sigma": 0.1}, seed=3)
    a, b = degraded_copy(lm, d), degraded_copy(lm, d)
    assert a.name == "tiny+noise:sigma=0.1:seed=3" and a.kind == "ar"
    block_names = {f"model.layers.{i}.{n}.weight" for i, ls in enumerate(block_linears(base)) for n, _ in ls}
    assert len(block_names) == 2 * 7  # q k v o gate up down per block
    for name, t in base.state_dict().items():
        ta, tb = a.model.state_dict()[name], b.model.state_dict()[name]
        assert torch.equal(ta, tb)  # the same seed gives the same model
        if name in block_names:
            rel = (ta - t).pow(2).mean().sqrt() / t.pow(2).mean().sqrt()
            assert 0.05 < float(rel) < 0.2  # sigma * rms(W)
        else:
            assert torch.equal(ta, t), name  # embeddings, norms, head untouched
    c = degraded_copy(lm, Degradation("noise", {"sigma": 0.1}, seed=4))
    assert not torch.equal(c.model.model.layers[0].mlp.up_proj.weight, a.model.model.layers[0].mlp.up_proj.weight)
    zero = degraded_copy(lm, Degradation("noise", {"sigma": 0.0}))
    for name, t in base.state_dict().items():
        assert torch.equal(zero.model.state_dict()[name], t)
    assert type(a.model.model.layers[0].mlp.act_fn) is type(base.model.layers[0].mlp.act_fn)


def test_quant_k_blocks_at_b_bits_and_the_rest_at_b_plus_1():
    base = build_tiny_model("llama", num_hidden_layers=3)
    q = apply_degradation(build_tiny_model("llama", num_hidden_layers=3), Degradation("quant", {"bits": 2, "k": 1,
                                                                                              "group": 16}))
    for i, bits in enumerate((2, 3, 3)):
        torch.testing.assert_close(q.model.layers[i].mlp.up_proj.weight,
                                   quantize_groupwise(base.model.layers[i].mlp.up_proj.weight, bits, 16))


@pytest.mark.parametrize("method, params, match", [
    ("blur", {}, "not one of"), ("noise", {"sigma": -1.0}, "sigma"), ("noise", {}, "takes exactly"),
    ("quant", {"bits": 1, "k": 0, "group": 32}, "bits"), ("quant", {"bits": 3, "k": 0}, "takes exactly"),
])
def test_bad_degradations_are_refused(method, params, match):
    with pytest.raises(ValueError, match=match):
        Degradation(method, params)


def test_degrading_a_degraded_model_is_refused():
    lm = degraded_copy(_loaded(build_tiny_model("llama")), Degradation("noise", {"sigma": 0.1}))
    with pytest.raises(ValueError, match="already a degraded model"):
        degraded_copy(lm, Degradation("noise", {"sigma": 0.1}))


# ---------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parent():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    from dllm_sparse.models.loading import LoadedModel

    # Fit the held-out rows a little first: a random model sits at the uniform perplexity, which no degradation
    # can raise much (a real parent has far to fall).
    model = build_tiny_model("llama", tie_word_embeddings=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor([p + a for p, a in _rows()])
    for _ in range(60):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return LoadedModel(model.eval(), tok, "ar", "tiny", None, "llama")


def _rows(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(4, VOCAB, (5,), generator=g).tolist(), torch.randint(4, VOCAB, (7,), generator=g).tolist())
            for _ in range(n)]


def _reference_ppl(model, rows):
    """Exact perplexity of the answers given their prompts, one unpadded forward per row."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, a in rows:
            logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].double(), -1)
            nll -= sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
            n += len(a)
    return math.exp(nll / n)


@pytest.mark.parametrize("method", ["noise", "quant"])
def test_calibration_reaches_the_target_and_its_perplexity_is_the_degraded_models(tiny_parent, method):
    from dllm_sparse.eval.studies.heldout import CalibrationError, calibrate

    rows = _rows()
    parent = _reference_ppl(tiny_parent.model, rows)
    target = parent * 1.3
    try:
        cal = calibrate(tiny_parent, method, target, rows, search_rows=3, tolerance=0.15)
    except CalibrationError as e:
        assert method == "quant", e  # a random tiny model may not degrade this far under 2-bit quantisation
        assert "too mild" in str(e) or "closest setting" in str(e)
        return
    assert cal.within and abs(cal.ppl / target - 1) <= 0.15
    assert len({(st["setting"], st["answers"]) for st in cal.steps}) == len(cal.steps)  # nothing evaluated twice
    assert {"setting": cal.degradation.id, "ppl": cal.ppl, "answers": len(rows)} in cal.steps
    assert cal.parent_ppl == pytest.approx(parent, rel=1e-5)
    weak = degraded_copy(tiny_parent, cal.degradation)
    assert _reference_ppl(weak.model, rows) == pytest.approx(cal.ppl, rel=1e-5)  # the setting reproduces it
    assert _reference_ppl(tiny_parent.model, rows) == pytest.approx(parent)  # the parent is untouched


def test_calibration_refuses_bad_or_unreachable_targets(tiny_parent):
    from dllm_sparse.eval.studies.heldout import CalibrationError, calibrate

    rows = _rows()
    for bad in (0, -3.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="target perplexity must be a finite number > 0"):
            calibrate(tiny_parent, "noise", bad, rows)
    with pytest.raises(CalibrationError, match="noise range exhausted"):
        calibrate(tiny_parent, "noise", 1e30, rows, sigma_range=(1e-3, 1e-2))
    with pytest.raises(CalibrationError, match="nothing to degrade"):
        calibrate(tiny_parent, "noise", 1.0001, rows)
    with pytest.raises(CalibrationError, match="too mild"):
        calibrate(tiny_parent, "quant", 1e30, rows)


# ---------------------------------------------------------------------------------------------------------
# The verdict rule
# ---------------------------------------------------------------------------------------------------------


class _Boot:
    def interval(self, x):
        from dllm_sparse.eval.analysis.bootstrap import percentile_interval

        return percentile_interval(x, 0.95)


def _d(lo, hi):
    return {"median": (lo + hi) / 2, "lo": lo, "hi": hi, "replicates": 10, "replicates_drawn": 10}


@pytest.mark.parametrize("tw, cs, tcs, expected", [
    (_d(0.05, 0.2), [_d(-0.1, 0.1), _d(-0.05, 0.1)], [_d(0.01, 0.2), _d(0.02, 0.3)], EXCEEDS),
    (_d(0.05, 0.2), [_d(0.02, 0.2), _d(0.01, 0.3)], [_d(-0.1, 0.1), _d(-0.2, 0.05)], TRACKS),
    (_d(-0.01, 0.2), [_d(0.02, 0.2), _d(0.01, 0.3)], [_d(-0.1, 0.1), _d(-0.3, -0.05)], TRACKS),
    (_d(0.05, 0.2), [_d(0.02, 0.2), _d(-0.01, 0.3)], [_d(-0.1, 0.1), _d(-0.2, 0.05)], UNDETERMINED),
    (_d(0.05, 0.2), [_d(-0.1, 0.1), _d(-0.05, 0.1)], [_d(0.01, 0.2), _d(-0.02, 0.3)], UNDETERMINED),
    (_d(-0.01, 0.2), [_d(-0.1, 0.1), _d(-0.05, 0.1)], [_d(0.01, 0.2), _d(0.02, 0.3)], UNDETERMINED),
    (_d(0.05, 0.2), [_d(0.02, 0.2)], [_d(0.01, 0.2)], UNDETERMINED),  # one valid control is not enough
])
def test_verdict_rule_on_enumerated_cases(tw, cs, tcs, expected):
    names = [f"c{i}" for i in range(len(cs))]
    v, why = verdict(tw, dict(zip(names, cs, strict=True)), dict(zip(names, tcs, strict=True)))
    assert v == expected, why


def _b(lo, hi, bound):
    return {**_d(lo, hi), "bound": bound}


LB, UB, NONE = "lower bound", "upper bound", "undetermined"


@pytest.mark.parametrize("tw, cs, tcs, expected", [
    # lower bounds (the first side's curve never failed a grid point) can still show "above 0"
    (_b(0.05, 0.2, LB), [_d(-0.1, 0.1), _d(-0.05, 0.1)], [_b(0.01, 0.2, LB), _b(0.02, 0.3, LB)], EXCEEDS),
    # an upper bound above 0 shows nothing: the true difference may be lower
    (_b(0.05, 0.2, UB), [_d(-0.1, 0.1), _d(-0.05, 0.1)], [_d(0.01, 0.2), _d(0.02, 0.3)], UNDETERMINED),
    (_d(0.05, 0.2), [_d(-0.1, 0.1), _d(-0.05, 0.1)], [_d(0.01, 0.2), _b(0.02, 0.3, NONE)], UNDETERMINED),
    # "no twin - control above 0" holds for an upper bound at or below 0, not for a lower bound
    (_d(0.05, 0.2), [_d(0.02, 0.2), _d(0.01, 0.3)], [_b(-0.1, 0.1, UB), _d(-0.2, 0.05)], TRACKS),
    (_d(0.05, 0.2), [_d(0.02, 0.2), _d(0.01, 0.3)], [_b(-0.1, 0.1, LB), _d(-0.2, 0.05)], UNDETERMINED),
    (_d(0.05, 0.2), [_b(0.02, 0.2, UB), _d(0.01, 0.3)], [_d(-0.1, 0.1), _d(-0.2, 0.05)], UNDETERMINED),
])
def test_verdict_rule_with_unbracketed_curves(tw, cs, tcs, expected):
    names = [f"c{i}" for i in range(len(cs))]
    v, why = verdict(tw, dict(zip(names, cs, strict=True)), dict(zip(names, tcs, strict=True)))
    assert v == expected, why
    if expected == UNDETERMINED:
        assert "undetermined (" in why  # says which difference is only a bound


def test_site_comparisons_mark_a_difference_with_an_unbracketed_side():
    n = 50
    base = np.linspace(0.1, 0.2, n)
    closed, open_ = np.ones(n, bool), np.zeros(n, bool)
    reps = {("A", "input", "avg_curve"): {"interpolated": base, "bracketed": closed},
            ("D", "input", "avg_curve"): {"interpolated": base + 0.1, "bracketed": open_},
            ("C1", "input", "avg_curve"): {"interpolated": base + 0.05, "bracketed": open_},
            ("C2", "input", "avg_curve"): {"interpolated": base + 0.02, "bracketed": closed}}
    (rec,) = site_comparisons(reps, _Boot(), twin="D", parent="A", controls={"C1": True, "C2": True})
    assert rec["twin_minus_parent"]["bound"] == "lower bound"
    assert rec["twin_minus_control"]["C1"]["bound"] == "undetermined"  # two lower bounds
    assert rec["twin_minus_control"]["C2"]["bound"] == "lower bound"
    assert rec["control_minus_parent"]["C2"]["bound"] == "exact"
    assert rec["verdict"] == UNDETERMINED and "C1" in rec["why"]


def test_site_comparisons_pair_the_replicates_and_ignore_invalid_controls():
    g = np.random.default_rng(0)
    n = 400
    base = g.normal(0.1, 0.02, n)  # the same item draws move every model together (paired)
    reps = {("A", "input", "avg_curve"): {"interpolated": base},
            ("D", "input", "avg_curve"): {"interpolated": base + 0.10 + g.normal(0, 0.005, n)},
            ("C1", "input", "avg_curve"): {"interpolated": base + 0.01 + g.normal(0, 0.005, n)},
            ("C2", "input", "avg_curve"): {"interpolated": base + 0.00 + g.normal(0, 0.005, n)},
            ("C3", "input", "avg_curve"): {"interpolated": base + 0.20}}
    (rec,) = site_comparisons(reps, _Boot(), twin="D", parent="A", controls={"C1": True, "C2": True, "C3": False})
    assert rec["verdict"] == EXCEEDS and rec["valid_controls"] == ["C1", "C2"]
    d = reps[("D", "input", "avg_curve")]["interpolated"] - reps[("C1", "input", "avg_curve")]["interpolated"]
    assert rec["twin_minus_control"]["C1"]["lo"] == pytest.approx(np.percentile(d, 2.5))
    (rec,) = site_comparisons(reps, _Boot(), twin="D", parent="A", controls={"C1": True, "C3": True})
    assert rec["verdict"] == UNDETERMINED  # C3 gains more than the twin: no exceed, and C1 does not gain


# ---------------------------------------------------------------------------------------------------------
# Trajectory points
# ---------------------------------------------------------------------------------------------------------


def test_an_adapter_of_another_base_model_is_refused(tmp_path, tiny_parent):
    import json
    import shutil

    from dllm_sparse.models.adapt import ADAPTER_META, read_adapter_meta, write_adapter_meta
    from dllm_sparse.models.twin import SMOLLM2_MDM_ADAPTER, adapted_twin

    d = tmp_path / "adapter"
    d.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(SMOLLM2_MDM_ADAPTER / f, d / f)
    meta = json.loads((SMOLLM2_MDM_ADAPTER / ADAPTER_META).read_text())
    meta.pop("files")
    write_adapter_meta(d, {**meta, "base": "another-model"})
    assert read_adapter_meta(d)["base"] == "another-model"
    with pytest.raises(ValueError, match="adapter of base model 'another-model', not of 'tiny'"):
        adapted_twin(tiny_parent, d, "tiny-mdm@x")


def test_untrained_twin_is_the_converted_parent_with_a_mask_token(tiny_parent):
    from dllm_sparse.models.twin import untrained_twin

    lm = untrained_twin(tiny_parent)
    assert lm.kind == "diffusion" and lm.name == "tiny-mdm@untrained" and lm.mask_id == VOCAB
    assert tiny_parent.tokenizer.mask_token_id is None  # the parent's tokenizer is not changed
    assert lm.model.get_input_embeddings().weight.shape[0] == VOCAB + 1
