"""Paired bootstrap intervals (dllm_sparse.eval.analysis.bootstrap, critical.py): against brute-force recomputation from
explicitly resampled item lists, and a coverage check on data with a known relative performance."""

import json
import math

import numpy as np
import pytest

from dllm_sparse.eval.analysis.bootstrap import Bootstrap, item_scores, percentile_interval
from dllm_sparse.eval.analysis.critical import (
    AVG_CURVE,
    critical_replicates,
    critical_sparsity,
    critical_table,
    model_differences,
    write_critical,
)


def _row(model, kind, task, site, p, items, sparsity=None, metric="acc"):
    if metric == "acc":
        value = float(np.mean(items["acc"]))
    else:
        value = math.exp(-sum(items["ll"]) / sum(items["tokens"]))
    return {"key": json.dumps([model, task, site, p]), "model": model, "kind": kind, "task": task, "site": site,
            "rule": "dense" if site == "dense" else "top_p", "p": p, "metric": metric, "value": value,
            "metrics": {metric: value}, "higher_is_better": metric == "acc", "sparsity": sparsity,
            "sparsity_by_site": {"input": 0.0}, "items": items, "source": "measured", "relative_performance": None}


def _fill_relative(rows):
    dense = {(r["model"], r["task"]): r for r in rows if r["site"] == "dense"}
    for r in rows:
        d = dense[(r["model"], r["task"])]
        r["relative_performance"] = (r["value"] / d["value"] if r["higher_is_better"] else d["value"] / r["value"])
    return rows


def _mc(acc):
    return {"ids": [f"q{i}" for i in range(len(acc))], "acc": [int(a) for a in acc], "acc_norm": [int(a) for a in acc]}


def _ppl(ll, tokens):
    return {"ids": [f"d{i}" for i in range(len(ll))], "ll": [float(x) for x in ll], "tokens": [int(t) for t in tokens]}


def _pair_rows(rng, n=30, grid=((0.99, 0.1), (0.95, 0.25), (0.9, 0.4), (0.8, 0.6))):
    rows = []
    ll = -rng.uniform(50, 150, n)
    tokens = rng.integers(40, 64, n)
    for model, kind, harm in (("ar-m", "ar", 1.0), ("mdm", "diffusion", 0.4)):
        acc = rng.random(n) < 0.7
        rows.append(_row(model, kind, "mc", "dense", 1.0, _mc(acc)))
        rows.append(_row(model, kind, "ppl", "dense", 1.0, _ppl(ll, tokens), metric="ppl"))
        for p, s in grid:
            a = acc & ~(rng.random(n) < harm * s * 0.3)
            rows.append(_row(model, kind, "mc", "input", p, _mc(a), s))
            rows.append(_row(model, kind, "ppl", "input", p, _ppl(ll * (1 + harm * s * 0.05 * rng.uniform(0.5, 1.5, n)),
                                                                   tokens), s, metric="ppl"))
    return _fill_relative(rows)


def test_item_scores_from_task_details():
    mc = [{"id": "a", "lls": [-1, -2], "pred": 0, "pred_norm": 1, "gold": 0},
          {"id": "b", "lls": [-3, -1], "pred": 1, "pred_norm": 1, "gold": 0}]
    assert item_scores(mc) == {"ids": ["a", "b"], "acc": [1, 0], "acc_norm": [0, 0]}
    ppl = [{"id": "p0", "ll": -10.5, "tokens": 7}]
    assert item_scores(ppl) == {"ids": ["p0"], "ll": [-10.5], "tokens": [7]}
    assert item_scores([]) is None and item_scores([{"id": "x", "other": 1}]) is None


def test_replicates_equal_metrics_of_explicitly_resampled_items():
    rng = np.random.default_rng(0)
    rows = _pair_rows(rng)
    boot = Bootstrap(rows, n_boot=50, seed=3)
    for row in rows:
        w = boot.weights(row["task"])
        got = boot.metric(row)
        for b in (0, 17, 49):
            idx = np.repeat(np.arange(w.shape[1]), w[b].astype(int))  # the drawn items, each as often as drawn
            if row["metric"] == "acc":
                want = np.mean(np.asarray(row["items"]["acc"])[idx])
            else:
                want = math.exp(-np.sum(np.asarray(row["items"]["ll"])[idx]) /
                                np.sum(np.asarray(row["items"]["tokens"])[idx]))
            assert got[b] == pytest.approx(want, rel=1e-12)
    # Paired: every model and configuration of a task uses the same draw, and a dense row's relative is 1.
    assert all(boot.weights("mc").sum(axis=1) == 30)
    dense = next(r for r in rows if r["site"] == "dense")
    assert np.all(boot.relative(dense) == 1.0)


def test_identical_sparse_and_dense_items_give_a_degenerate_interval():
    rng = np.random.default_rng(1)
    acc = rng.random(25) < 0.6
    rows = _fill_relative([_row("m", "ar", "mc", "dense", 1.0, _mc(acc)),
                           _row("m", "ar", "mc", "input", 0.9, _mc(acc), 0.3)])
    boot = Bootstrap(rows, n_boot=200)
    assert boot.relative_interval(rows[1]) == (1.0, 1.0)
    # A row without per-item scores has no interval (nothing to resample), and neither has its curve.
    rows.append({**rows[1], "key": "other", "p": 0.8, "sparsity": 0.5, "items": None})
    boot = Bootstrap(rows, n_boot=20)
    assert boot.relative_interval(rows[2]) is None
    assert critical_replicates(rows, boot) == {}


def test_critical_replicates_recompute_the_curve_per_draw():
    rng = np.random.default_rng(2)
    rows = _pair_rows(rng)
    boot = Bootstrap(rows, n_boot=40, seed=5)
    reps = critical_replicates(rows, boot)
    for model in ("ar-m", "mdm"):
        dense = {t: next(r for r in rows if r["model"] == model and r["task"] == t and r["site"] == "dense")
                 for t in ("mc", "ppl")}
        sparse = sorted((r for r in rows if r["model"] == model and r["site"] == "input"), key=lambda r: -r["p"])
        for b in (0, 11, 39):
            pts = [(0.0, 1.0)]  # the dense pass's natural sparsity, relative 1
            for p in sorted({r["p"] for r in sparse}, reverse=True):
                rel = []
                for t in ("mc", "ppl"):
                    r = next(x for x in sparse if x["p"] == p and x["task"] == t)
                    w = boot.weights(t)[b]
                    if t == "mc":
                        v = w @ r["items"]["acc"] / 30
                        d = w @ dense[t]["items"]["acc"] / 30
                        rel.append(min(v / d, 1.0))
                    else:
                        def ppl(it, w=w):
                            return math.exp(-(w @ np.asarray(it["ll"])) / (w @ np.asarray(it["tokens"])))
                        rel.append(min(ppl(dense[t]["items"]) / ppl(r["items"]), 1.0))
                pts.append((r["sparsity"], sum(rel) / 2))
            want = critical_sparsity(pts)
            assert reps[(model, "input", AVG_CURVE)]["interpolated"][b] == pytest.approx(want.interpolated)
            assert reps[(model, "input", AVG_CURVE)]["last_passing"][b] == pytest.approx(want.last_passing)


def test_interval_covers_a_known_relative_performance():
    # Dense correct w.p. 0.7; sparse loses each correct item w.p. 0.1: relative performance 0.9 in expectation.
    rng = np.random.default_rng(7)
    covered, trials = 0, 80
    for _ in range(trials):
        acc = rng.random(200) < 0.7
        sparse = acc & ~(rng.random(200) < 0.1)
        rows = _fill_relative([_row("m", "ar", "mc", "dense", 1.0, _mc(acc)),
                               _row("m", "ar", "mc", "input", 0.9, _mc(sparse), 0.3)])
        lo, hi = Bootstrap(rows, n_boot=400, seed=int(rng.integers(1 << 30))).relative_interval(rows[1])
        covered += lo <= 0.9 <= hi
    assert 0.85 <= covered / trials <= 1.0  # nominal 0.95; a broken (e.g. unpaired or unseeded) one misses


def test_same_rows_same_intervals_and_verdicts(tmp_path):
    rows = _pair_rows(np.random.default_rng(3))
    a = critical_table(rows, boot=Bootstrap(rows, n_boot=300))
    b = critical_table(rows, boot=Bootstrap(rows, n_boot=300))
    assert a == b and all(r["interpolated_lo"] is not None for r in a)
    for r in a:
        assert r["interpolated_lo"] <= r["interpolated_hi"]
    paths = write_critical(rows, tmp_path, n_boot=300)
    assert paths["comparison"].is_file() and "diffusion − AR" in paths["markdown"].read_text()
    header = paths["csv"].read_text().splitlines()[0]
    assert "interpolated_pct" in header and "interpolated_lo_pct" in header  # the unit is in the column name


def test_difference_verdicts_claim_only_what_the_interval_allows():
    rng = np.random.default_rng(4)
    n = 60
    ll, tokens = -rng.uniform(50, 150, n), rng.integers(40, 64, n)
    grid = [(0.99, 0.1), (0.95, 0.2), (0.9, 0.3), (0.8, 0.4), (0.7, 0.5)]

    def model_rows(model, kind, slope):
        rows = [_row(model, kind, "ppl", "dense", 1.0, _ppl(ll, tokens), metric="ppl")]
        for p, s in grid:
            noise = rng.normal(0, 0.002, n)
            rows.append(_row(model, kind, "ppl", "input", p, _ppl(ll * (1 + slope * s + noise), tokens), s,
                             metric="ppl"))
        return rows

    # The diffusion model loses 0.4 %/10 points of sparsity, the AR model 4 %: clearly more tolerant.
    rows = _fill_relative(model_rows("mdm", "diffusion", 0.004) + model_rows("ar-m", "ar", 0.04))
    boot = Bootstrap(rows, n_boot=300)
    kinds = {"mdm": "diffusion", "ar-m": "ar"}
    (d,) = model_differences(critical_replicates(rows, boot), kinds, boot)
    assert d["verdict"] == "diffusion higher" and d["lo"] > 0
    # Two models with the same curves: the interval holds 0 and no direction is claimed.
    same = _fill_relative(model_rows("mdm", "diffusion", 0.02))
    twin = [{**r, "model": "ar-m", "kind": "ar", "key": r["key"] + "-ar"} for r in same]
    rows = same + twin
    boot = Bootstrap(rows, n_boot=300)
    (d,) = model_differences(critical_replicates(rows, boot), kinds, boot)
    assert d["verdict"] == "no detectable difference" and d["lo"] <= 0 <= d["hi"]


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_boot"):
        Bootstrap([], n_boot=0)
    rows = _pair_rows(np.random.default_rng(0))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"n_boot must be a whole number >= 0 \(0: no intervals\)"):
            write_critical(rows, tmp_path, n_boot=bad)
    paths = write_critical(rows, tmp_path, n_boot=0)  # documented: no intervals, no comparison
    assert paths["bootstrap"] is None and paths["differences"] == [] and paths["comparison"] is None
    with pytest.raises(ValueError, match="level"):
        Bootstrap([], level=95)
    assert percentile_interval([float("nan")]) is None


def test_replicates_without_a_value_are_counted_and_reported():
    """The dense model answers 1 item of 5: in about a third of the draws its score is 0, and where the sparse
    rows score on item 1 their relative performance x / 0 is undefined. Those replicates are left out of every
    interval, and the count is in the records, the Markdown and a warning (brute-force count from the draws)."""
    from dllm_sparse.eval.analysis.critical import markdown_report

    dense = _row("m", "ar", "mc", "dense", 1.0, _mc([1, 0, 0, 0, 0]))
    sparse = [_row("m", "ar", "mc", "input", 0.9, _mc([1, 1, 0, 0, 0]), 0.2),
              _row("m", "ar", "mc", "input", 0.5, _mc([0, 1, 0, 0, 0]), 0.6)]
    rows = _fill_relative([dense, *sparse])
    boot = Bootstrap(rows, n_boot=400, seed=1)
    w = boot.weights("mc")
    undefined = (w[:, 0] == 0) & (w[:, 1] > 0)  # dense 0 on the draw, a sparse row above 0 there
    used = int((~undefined).sum())
    assert 0 < used < 400
    with pytest.warns(UserWarning, match=rf"comes from {used} of 400 replicates: in the others the dense score"):
        ci = boot.relative_interval(sparse[1])
    assert ci == percentile_interval(boot.relative(sparse[1])[~undefined])
    with pytest.warns(UserWarning, match=r"critical-sparsity interval\(s\) come from fewer than the 400 replicates"):
        table = critical_table(rows, boot=boot)
    rec = next(r for r in table if r["task"] == "mc")
    # Every defined replicate has a passing point (the p = 0.9 row never scores below dense), so exactly the
    # undefined ones are left out.
    assert rec["interpolated_replicates"] == rec["last_passing_replicates"] == used and rec["replicates_drawn"] == 400
    md = markdown_report(table, boot=boot)
    assert f"({used}/400 replicates)" in md and "'(k/n replicates)': that interval comes from the k of n" in md


# ---- a side whose curve never fails a grid point is only a lower bound ---------------------------------------


def _curve_rows(model, kind, rel_by_sparsity, n=40, seed=0):
    """Rows of one MC task whose sparse rows lose a fixed set of items: relative performance exactly as given
    at each (measured) sparsity, identical in every replicate's draw only through the items lost."""
    rng = np.random.default_rng(seed)
    dense = _mc(np.ones(n, dtype=bool))
    rows = [_row(model, kind, "mc", "dense", 1.0, dense)]
    for i, (s, rel) in enumerate(rel_by_sparsity):
        acc = np.ones(n, dtype=bool)
        acc[rng.choice(n, round((1 - rel) * n), replace=False)] = False
        rows.append(_row(model, kind, "mc", "input", 0.99 - 0.01 * i, _mc(acc), s))
    return _fill_relative(rows)


ALL_PASS = [(0.1, 1.0), (0.2, 1.0)]  # no item lost anywhere: no replicate has a failing point


@pytest.mark.parametrize("diffusion, ar, verdict, is_", [
    # README `--limit 2` case: every point of both curves passes -> two lower bounds, nothing can be concluded
    (ALL_PASS, [(0.3, 1.0), (0.4, 1.0)], "undetermined: no grid point failed on either side", "undetermined"),
    # diffusion >= 0.2 against an AR value of ~0.3: "AR higher" may not be claimed from a lower bound
    (ALL_PASS, [(0.2, 1.0), (0.3, 1.0), (0.5, 0.5)], "undetermined: the diffusion side is a lower bound",
     "lower bound"),
    # diffusion >= 0.6 against an AR value of ~0.3: the lower bound already lies above it
    ([(0.5, 1.0), (0.6, 1.0)], [(0.2, 1.0), (0.3, 1.0), (0.5, 0.5)], "diffusion higher", "lower bound"),
    # AR >= 0.6 against a diffusion value of ~0.3: "AR higher" follows, "diffusion higher" never could
    ([(0.2, 1.0), (0.3, 1.0), (0.5, 0.5)], [(0.5, 1.0), (0.6, 1.0)], "AR higher", "upper bound"),
    ([(0.2, 1.0), (0.3, 1.0), (0.5, 0.5)], ALL_PASS, "undetermined: the AR side is a lower bound", "upper bound"),
])
def test_a_verdict_claims_only_what_an_unbracketed_side_allows(diffusion, ar, verdict, is_, tmp_path):
    rows = _curve_rows("mdm", "diffusion", diffusion) + _curve_rows("ar-m", "ar", ar)
    boot = Bootstrap(rows, n_boot=200)
    (d,) = model_differences(critical_replicates(rows, boot), {"mdm": "diffusion", "ar-m": "ar"}, boot)
    assert d["verdict"].startswith(verdict) and d["difference_is"] == is_
    if is_ == "undetermined":  # the difference of two lower bounds is no number at all
        assert d["difference_median"] is None and d["lo"] is None and d["p_diffusion_at_least_ar"] is None
    md = write_critical(rows, tmp_path, n_boot=200)["markdown"].read_text()
    section = md.split("## Diffusion vs AR", 1)[1]
    line = next(x for x in section.splitlines() if x.startswith("| input |"))
    assert d["verdict"] in line
    mark = {"lower bound": "≥", "upper bound": "≤"}.get(is_)
    assert (mark in line) if mark else ("| undetermined |" in line and "[" not in line)


@pytest.mark.parametrize("loc, n_a_open, n_b_open, expected", [
    (-8.0, 1, 0, "AR higher"),  # one raised replicate stays above the 97.5th percentile's neighbours
    (8.0, 0, 1, "diffusion higher"),
    (0.0, 1, 1, "no detectable difference"),  # the strict rule would have withheld this one
    (-8.0, 3, 0, "undetermined: the diffusion side is a lower bound (3 of 60 replicates)"),  # 3 of 60 > 2.5 %
    (8.0, 0, 3, "undetermined: the AR side is a lower bound (3 of 60 replicates)"),
    (0.0, 3, 2, "no detectable difference"),
])
def test_a_verdict_with_open_replicates_is_the_one_every_completion_gives(loc, n_a_open, n_b_open, expected):
    """Brute force: a replicate whose side has no failing grid point is only a lower bound of that side, so its true
    difference is anywhere at or above (diffusion side) or at or below (AR side) the recorded one. Enumerate every
    completion of the few open replicates to far values; the verdict must be the plain rule's verdict when all
    completions agree on it, and "undetermined" otherwise."""
    import itertools

    from dllm_sparse.eval.analysis.bootstrap import percentile_interval
    from dllm_sparse.eval.analysis.critical import _difference_verdict

    class Boot:
        interval = staticmethod(percentile_interval)

    def plain(values) -> str:
        lo, hi = percentile_interval(values)
        return "diffusion higher" if lo > 0 else "AR higher" if hi < 0 else "no detectable difference"

    rng = np.random.default_rng(0)
    d = rng.normal(loc=loc, scale=3.0, size=60)
    a_open, b_open = np.zeros(60, bool), np.zeros(60, bool)
    a_open[rng.choice(60, n_a_open, replace=False)] = True
    b_open[rng.choice(60, n_b_open, replace=False)] = True
    open_ = np.flatnonzero(a_open | b_open)
    # A diffusion lower bound may make the difference far higher, an AR lower bound far lower, both either way.
    moves = [[0.0] + [1000.0] * bool(a_open[i]) + [-1000.0] * bool(b_open[i]) for i in open_]
    verdicts = set()
    for shift in itertools.product(*moves):
        v = d.copy()
        v[open_] += shift
        verdicts.add(plain(v))
    got = _difference_verdict(d, a_open, b_open, Boot())
    if len(verdicts) == 1:
        assert got == verdicts.pop()
    else:
        assert got.startswith("undetermined: the "), (got, verdicts)
    assert got == expected


def test_difference_bound_of_each_pair_of_sides():
    from dllm_sparse.eval.analysis.critical import difference_bound

    used = np.array([True, True, False])
    closed, open_in_unused, open_ = np.array([1, 1, 1], bool), np.array([1, 1, 0], bool), np.array([1, 0, 1], bool)
    assert difference_bound(closed, closed, used) == "exact"
    assert difference_bound(open_in_unused, closed, used) == "exact"  # a replicate without a value does not count
    assert difference_bound(open_, closed, used) == "lower bound"
    assert difference_bound(closed, open_, used) == "upper bound"
    assert difference_bound(open_, open_, used) == "undetermined"
    assert difference_bound(None, None, used) == "exact"


# ---- per-item scores that do not line up are refused ------------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda it: it.update(acc=it["acc"][:-1]), r"items\['acc'\] holds 4 values but items\['ids'\] holds 5 ids"),
    (lambda it: it.update(ids=it["ids"] + ["extra"]), r"items\['acc'\] holds 5 values but items\['ids'\] holds 6"),
    (lambda it: it.update(acc_norm="11011"), r"items\['acc_norm'\] holds a str"),
    (lambda it: it["acc"].__setitem__(2, "1"), r"items\['acc'\]\[2\] is '1', not a finite number"),
    (lambda it: it["acc"].__setitem__(0, float("nan")), r"items\['acc'\]\[0\] is nan, not a finite number"),
    (lambda it: it.pop("ids"), r"its items are dict .* not \{\"ids\""),
])
def test_per_item_scores_that_do_not_line_up_are_refused(edit, message):
    rows = _fill_relative([_row("m", "ar", "mc", "dense", 1.0, _mc([1, 0, 1, 1, 0])),
                           _row("m", "ar", "mc", "input", 0.9, _mc([1, 0, 0, 1, 0]), 0.3)])
    Bootstrap(rows, n_boot=10)  # as written: fine
    edit(rows[1]["items"])
    with pytest.raises(ValueError, match=r"row .* \(m / mc / input p=0.9\): " + message):
        Bootstrap(rows, n_boot=10)


def test_a_log_likelihood_may_be_minus_infinity_but_not_nan():
    rows = [_row("m", "ar", "ppl", "dense", 1.0, _ppl([-3.0, -4.0], [2, 2]), metric="ppl")]
    rows.append({**rows[0], "site": "input", "key": "k2", "items": _ppl([-3.0, -math.inf], [2, 2])})
    Bootstrap(rows, n_boot=10)
    rows[1]["items"]["ll"][1] = float("nan")
    with pytest.raises(ValueError, match=r"items\['ll'\]\[1\] is nan, not a finite number \(or -inf\)"):
        Bootstrap(rows, n_boot=10)
