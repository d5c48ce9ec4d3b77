"""Critical sparsity on synthetic curves with known answers, the tables, and the figures."""

from __future__ import annotations

import csv

import pytest

from dllm_sparse.eval.analysis.critical import (
    AVG_CURVE,
    MEAN_OF_TASKS,
    critical_sparsity,
    critical_table,
    curves,
    markdown_table,
    write_critical,
)
from dllm_sparse.eval.analysis.plots import plot_layer_heatmaps, plot_relative_performance, plot_step_sparsity


def test_bracketed_curve_both_variants():
    pts = [(0.0, 1.0), (0.2, 0.999), (0.4, 0.995), (0.5, 0.98), (0.6, 0.9)]
    c = critical_sparsity(pts[::-1])  # order does not matter
    assert c.last_passing == pytest.approx(0.4)
    assert c.interpolated == pytest.approx(0.4 + 0.005 / 0.015 * 0.1)
    assert c.bracketed


def test_exact_hit_unbracketed_and_none():
    assert critical_sparsity([(0.1, 1.0), (0.3, 0.99), (0.5, 0.5)]).interpolated == pytest.approx(0.3)
    c = critical_sparsity([(0.1, 1.0), (0.3, 0.995)])
    assert (c.last_passing, c.interpolated, c.bracketed) == (0.3, 0.3, False)
    c = critical_sparsity([(0.1, 0.9), (0.3, 0.8)])
    assert c.last_passing is None and c.interpolated is None


def test_non_monotone_curve_uses_the_highest_passing_point():
    c = critical_sparsity([(0.1, 1.0), (0.2, 0.98), (0.3, 0.995), (0.4, 0.95)])
    assert c.last_passing == pytest.approx(0.3)
    assert c.interpolated == pytest.approx(0.3 + 0.005 / 0.045 * 0.1)


def _rows():
    rows = []
    # model A: task t1 and t2; site input; relative performance falls linearly with sparsity.
    for model, kind, slope in [("A", "ar", 0.1), ("B", "diffusion", 0.05)]:
        for task, shift in [("t1", 0.0), ("t2", 0.1)]:
            rows.append({"model": model, "kind": kind, "site": "dense", "rule": "dense", "p": 1.0, "task": task,
                         "sparsity_by_site": {"input": 0.0, "intermediate": 0.0}, "relative_performance": 1.0})
            for site in ("input", "intermediate"):
                for p, s in [(1.0, 0.0), (0.9, 0.1), (0.7, 0.3), (0.5, 0.5)]:
                    rel = 1.0 - slope * s if p < 1.0 else 1.0
                    rows.append({"model": model, "kind": kind, "site": site, "rule": "top_p", "p": p, "task": task,
                                 "sparsity": s + (shift if p < 1.0 else 0.0), "relative_performance": rel,
                                 "per_layer_sparsity": [s, s + 0.01, s + 0.02],
                                 "source": "dense_pass" if p == 1.0 else "measured"})
    return rows


def test_table_and_task_average():
    table = critical_table(_rows())
    idx = {(r["model"], r["site"], r["task"]): r for r in table}
    # A, t1: rel = 1 - 0.1 s at s = 0.1, 0.3, 0.5 -> 0.99, 0.97, 0.95: last passing 0.1 (exactly 0.99).
    assert idx[("A", "input", "t1")]["last_passing"] == pytest.approx(0.1)
    # t2 has the same relative performance at sparsities shifted by 0.1.
    assert idx[("A", "input", "t2")]["last_passing"] == pytest.approx(0.2)
    # Task-averaged curve: sparsity 0.15 / 0.35 / 0.55, relative 0.99 / 0.97 / 0.95 -> 0.15.
    assert idx[("A", "input", AVG_CURVE)]["interpolated"] == pytest.approx(0.15)
    assert idx[("A", "input", MEAN_OF_TASKS)]["interpolated"] == pytest.approx(0.15)
    # B: rel 1 - 0.05 s: 0.995 at 0.1, 0.985 at 0.3 -> interpolated 0.1 + 0.005/0.01 * 0.2 = 0.2 (t1).
    assert idx[("B", "input", "t1")]["interpolated"] == pytest.approx(0.2)
    md = markdown_table(table)
    assert md.splitlines()[0] == "| model | kind | intermediate | input |"  # the paper's column order
    assert "| A | ar | 15.0 | 15.0 |" in md


def test_write_critical_and_figures(tmp_path):
    rows = _rows()
    paths = write_critical(rows, tmp_path)
    with open(paths["csv"]) as f:
        recs = list(csv.DictReader(f))
    assert {r["task"] for r in recs} == {"t1", "t2", AVG_CURVE, MEAN_OF_TASKS}
    text = paths["markdown"].read_text()
    assert "Interpolated" in text and "Last passing" in text
    figs = plot_relative_performance(rows, tmp_path) + plot_layer_heatmaps(rows, tmp_path)
    figs += plot_step_sparsity([{"model": "B", "site": "input", "x": i, "sparsity": 0.1 * i, "source": "generation"}
                                for i in range(4)], tmp_path)
    assert figs and all(p.is_file() and p.stat().st_size > 0 for p in figs)
    assert {p.suffix for p in figs} == {".png", ".pdf"}


def test_task_average_caps_each_task_at_one():
    rows = []
    for task, rels in [("t1", [1.0, 2.0]), ("t2", [1.0, 0.5])]:  # t1 "beats" dense, t2 collapses
        for (p, s), rel in zip([(1.0, 0.0), (0.5, 0.5)], rels, strict=True):
            rows.append({"model": "M", "kind": "ar", "site": "input", "rule": "top_p", "p": p, "task": task,
                         "sparsity": s, "relative_performance": rel, "source": "dense_pass" if p == 1 else ""})
    avg = {r["task"]: r for r in critical_table(rows)}
    assert avg[AVG_CURVE]["last_passing"] == 0.0  # (min(2, 1) + 0.5) / 2 = 0.75 fails; uncapped 1.25 would pass
    uncapped = {r["task"]: r for r in critical_table(rows, cap=False)}
    assert uncapped[AVG_CURVE]["last_passing"] == 0.5  # (2 + 0.5) / 2 = 1.25 passes: the gain hides the loss
    assert [pt["relative"] for pt in curves(rows, cap=False)[("M", "input", AVG_CURVE)]] == [1.0, 1.25]


@pytest.mark.parametrize("rule,grid", [("top_k", [0.0, 0.1, 0.3, 0.5]), ("max_p", [0.001, 0.01, 0.05, 0.1]),
                                       ("top_p", [1.0, 0.95, 0.8, 0.6])])
def test_curves_run_from_dense_to_sparse_for_every_rule(rule, grid):
    # Sparsity grows along each grid as listed (the rules disagree on which way their threshold points).
    sparsities = [0.0, 0.1, 0.3, 0.5]
    rows = [{"model": "A", "kind": "ar", "site": "dense", "rule": "dense", "p": 1.0, "task": "t",
             "sparsity_by_site": {"input": 0.0}, "relative_performance": 1.0}]
    for i, (thr, s) in enumerate(zip(grid, sparsities, strict=True)):
        rows.append({"model": "A", "kind": "ar", "site": "input", "rule": rule, "p": thr, "task": "t",
                     "sparsity": s, "relative_performance": 1.0 - 0.1 * s,
                     "source": "dense_pass" if i == 0 else "measured"})
    got = curves(rows)
    for task in ("t", AVG_CURVE):  # figures draw the points in this order
        assert [pt["p"] for pt in got[("A", "input", task)]] == grid
    assert {r["task"]: r for r in critical_table(rows)}["t"]["last_passing"] == pytest.approx(0.1)
