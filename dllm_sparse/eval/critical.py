"""Critical sparsity (definitions: docs/sparsification.md) from sweep rows, as CSV and as a Table-1-shaped
Markdown table.

Critical sparsity = the highest *measured* sparsity whose relative performance is >= 0.99. Two values are
reported and always labelled:

* ``last_passing``: the measured sparsity of the grid point with the highest measured sparsity among those
  whose relative performance is >= 0.99 (a value actually observed);
* ``interpolated``: linear interpolation, on measured sparsity, between that point and the next grid point
  (in measured sparsity), which fails: s* = s1 + (r1 − 0.99)·(s2 − s1)/(r1 − r2). When no grid point fails
  the curve is not bracketed and ``interpolated`` = ``last_passing`` (a lower bound, shown with "≥").

Per (model, site, task), and over tasks in two ways: ``avg_curve`` (critical sparsity of the task-averaged
curve: at each threshold, the mean over tasks of the relative performance and the mean measured sparsity; this
is what the Markdown table shows) and ``mean_of_tasks`` (the mean of the per-task values).

Task averaging (``cap``): by default (``cap=True``) each task's relative performance is capped at 1 before the
average, so that one task scoring above dense (noise on a small set, often) cannot hide another task's loss.
The alternative, ``cap=False`` (``--no-cap`` in the experiment scripts), averages the raw ratios: gains then
offset losses, and the task-averaged critical sparsity can only be equal or higher. Which one a figure used
changes its numbers; the Markdown report says which.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dllm_sparse.eval.rows import atomic_write_csv, atomic_write_text
from dllm_sparse.sparsity.config import DENSE

__all__ = [
    "CriticalSparsity", "critical_sparsity", "curves", "critical_table", "markdown_table", "write_critical",
    "SITE_ORDER", "AVG_CURVE", "MEAN_OF_TASKS", "ordered_sites",
]

SITE_ORDER = ("intermediate", "input", "gate", "up")  # the paper's Table 1 column order
AVG_CURVE = "avg_curve"
MEAN_OF_TASKS = "mean_of_tasks"


@dataclass
class CriticalSparsity:
    last_passing: float | None  # measured sparsity of the last grid point that passes (None: none passes)
    interpolated: float | None  # linear interpolation at the threshold crossing
    bracketed: bool  # a failing point lies beyond the last passing one (else the values are lower bounds)
    n_points: int
    threshold: float = 0.99


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def critical_sparsity(points: Sequence[tuple[float, float]], threshold: float = 0.99) -> CriticalSparsity:
    """``points``: (measured sparsity, relative performance) pairs of one curve (any order)."""
    pts = sorted((float(s), float(r)) for s, r in points if _finite(s) and _finite(r))
    passing = [i for i, (_, r) in enumerate(pts) if r >= threshold]
    if not passing:
        return CriticalSparsity(None, None, False, len(pts), threshold)
    i = passing[-1]
    s1, r1 = pts[i]
    if i + 1 >= len(pts):
        return CriticalSparsity(s1, s1, False, len(pts), threshold)
    s2, r2 = pts[i + 1]  # fails, since i is the last passing index
    interp = s1 + (r1 - threshold) * (s2 - s1) / (r1 - r2) if r1 != r2 else s1
    return CriticalSparsity(s1, interp, True, len(pts), threshold)


def _dense_to_sparse(rule: str | None, threshold: float) -> float:
    """A sort key ordering a rule's thresholds from dense to sparse: larger p first for top-p, smaller
    threshold first for top-k (target sparsity) and max-p."""
    from dllm_sparse.sparsity.rules import RULE_NAMES, make_rule

    cls = type(make_rule(rule, 0.5)) if rule in RULE_NAMES else None
    return -threshold if cls is None or cls.denser_when_larger else threshold


def curves(rows: Sequence[dict], metric: str | None = None,
           cap: bool = True) -> dict[tuple[str, str, str], list[dict]]:
    """{(model, site, task): [points]} with points {p, sparsity, relative, per_layer}; adds the task-averaged
    curve under task ``avg_curve`` (each task's relative performance capped at 1 first unless ``cap=False``; see
    the module docstring). ``metric``: use another metric than each row's primary one."""
    dense = {(r["model"], r["task"]): r for r in rows if r["site"] == DENSE}
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["site"] == DENSE:
            continue
        rel = r.get("relative_performance") if metric is None else (r.get("relative") or {}).get(metric)
        if rel is None or r.get("sparsity") is None:
            continue
        out.setdefault((r["model"], r["site"], r["task"]), []).append(
            {"p": r["p"], "sparsity": r["sparsity"], "relative": rel, "per_layer": r.get("per_layer_sparsity"),
             "identity": r.get("source") == "dense_pass", "order": _dense_to_sparse(r.get("rule"), r["p"])})
    for (model, site, task), pts in out.items():  # no identity cell in the grid: add the dense pass itself
        d = dense.get((model, task))
        if d and not any(pt["identity"] for pt in pts):
            s = (d.get("sparsity_by_site") or {}).get(site)
            if s is not None:
                pts.append({"p": math.inf, "sparsity": s, "relative": 1.0,
                            "per_layer": (d.get("per_layer_by_site") or {}).get(site), "identity": True,
                            "order": -math.inf})
    for pts in out.values():
        pts.sort(key=lambda pt: (not pt["identity"], pt["order"], pt["sparsity"]))
    # Task-averaged curves: thresholds present for every task of the (model, site).
    by_ms: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for (model, site, task), pts in out.items():
        by_ms.setdefault((model, site), {})[task] = pts
    for (model, site), per_task in by_ms.items():
        tasks = list(per_task)
        common = set.intersection(*[{pt["p"] for pt in per_task[t]} for t in tasks])
        order = {pt["p"]: (not pt["identity"], pt["order"]) for t in tasks for pt in per_task[t]}
        avg = []
        for p in sorted(common, key=order.__getitem__):
            sel = [next(pt for pt in per_task[t] if pt["p"] == p) for t in tasks]
            layers = [pt["per_layer"] for pt in sel if pt.get("per_layer")]
            per_layer = [sum(v) / len(v) for v in zip(*layers, strict=True)] if layers else None
            avg.append({"p": p, "sparsity": sum(pt["sparsity"] for pt in sel) / len(sel),
                        "relative": sum(min(pt["relative"], 1.0) if cap else pt["relative"] for pt in sel) / len(sel),
                        "per_layer": per_layer,
                        "tasks": tasks})
        out[(model, site, AVG_CURVE)] = avg
    return out


def critical_table(rows: Sequence[dict], threshold: float = 0.99, metric: str | None = None,
                   cap: bool = True) -> list[dict]:
    """One record per (model, site, task) plus ``avg_curve`` and ``mean_of_tasks`` per (model, site);
    ``cap``: how the task-averaged curve averages (module docstring)."""
    kinds = {r["model"]: r.get("kind", "") for r in rows}
    table = []
    per_ms: dict[tuple[str, str], list[CriticalSparsity]] = {}
    for (model, site, task), pts in sorted(curves(rows, metric, cap).items()):
        c = critical_sparsity([(pt["sparsity"], pt["relative"]) for pt in pts], threshold)
        table.append({"model": model, "kind": kinds.get(model, ""), "site": site, "task": task, **asdict(c)})
        if task != AVG_CURVE:
            per_ms.setdefault((model, site), []).append(c)
    def mean(vals):  # None unless every task has a value
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    for (model, site), cs in sorted(per_ms.items()):
        table.append({"model": model, "kind": kinds.get(model, ""), "site": site, "task": MEAN_OF_TASKS,
                      "last_passing": mean([c.last_passing for c in cs]),
                      "interpolated": mean([c.interpolated for c in cs]),
                      "bracketed": all(c.bracketed for c in cs), "n_points": sum(c.n_points for c in cs),
                      "threshold": threshold})
    return table


def _fmt(rec: dict | None, variant: str) -> str:
    if rec is None:
        return "n/a"
    v = rec.get(variant)
    if v is None:
        return "none passes"
    return ("" if rec.get("bracketed") else "≥") + f"{100 * v:.1f}"


def ordered_sites(names: Iterable[str]) -> list[str]:
    """The distinct site names in the paper's column order (unknown names last, sorted)."""
    present = set(names)
    return [s for s in SITE_ORDER if s in present] + sorted(present - set(SITE_ORDER))


def markdown_table(table: Sequence[dict], task: str = AVG_CURVE, variant: str = "interpolated") -> str:
    """Rows: models; columns: sites (paper order); cells: critical sparsity in %."""
    sites = ordered_sites(r["site"] for r in table)
    models = list(dict.fromkeys(r["model"] for r in table))
    idx = {(r["model"], r["site"], r["task"]): r for r in table}
    lines = ["| model | kind | " + " | ".join(sites) + " |", "|---|---|" + "---:|" * len(sites)]
    for m in models:
        kind = next((r["kind"] for r in table if r["model"] == m), "")
        lines.append(f"| {m} | {kind} | " + " | ".join(_fmt(idx.get((m, s, task)), variant) for s in sites) + " |")
    return "\n".join(lines)


def markdown_report(table: Sequence[dict], threshold: float = 0.99, cap: bool = True) -> str:
    tasks = sorted({r["task"] for r in table} - {AVG_CURVE, MEAN_OF_TASKS})
    pct = f"{100 * threshold:g} %"
    parts = [
        f"# Critical sparsity (%): highest measured sparsity keeping ≥ {pct} of dense performance",
        "",
        f"Tasks: {', '.join(tasks)}. Over tasks: the task-averaged curve (at each threshold, the mean over tasks "
        f"of the relative performance {'capped at 1' if cap else 'uncapped (gains offset losses)'}, and the mean "
        "measured sparsity). Relative performance = "
        "metric_sparse / metric_dense (accuracy) or PPL_dense / PPL_sparse (perplexity; ELBO perplexity for "
        "diffusion models). '≥' = no grid point failed "
        "(a lower bound); 'none passes' = even the first grid point failed.",
        "",
        f"## Interpolated (linear, on measured sparsity, between the two grid points that bracket {threshold:g})",
        "",
        markdown_table(table, AVG_CURVE, "interpolated"),
        "",
        f"## Last passing grid point (highest measured sparsity with relative performance ≥ {threshold:g})",
        "",
        markdown_table(table, AVG_CURVE, "last_passing"),
        "",
        "## Per task (interpolated / last passing)",
        "",
    ]
    sites = ordered_sites(r["site"] for r in table)
    idx = {(r["model"], r["site"], r["task"]): r for r in table}
    parts += ["| model | task | " + " | ".join(sites) + " |", "|---|---|" + "---:|" * len(sites)]
    for m in dict.fromkeys(r["model"] for r in table):
        for t in tasks + [MEAN_OF_TASKS]:
            cells = [f"{_fmt(idx.get((m, s, t)), 'interpolated')} / {_fmt(idx.get((m, s, t)), 'last_passing')}"
                     for s in sites]
            parts.append(f"| {m} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


def write_critical(rows: Sequence[dict], out_dir: str | Path, threshold: float = 0.99,
                   metric: str | None = None, cap: bool = True) -> dict[str, Path]:
    """Write ``critical_sparsity.csv`` and ``critical_sparsity.md``; returns their paths and the table.
    ``cap``: how the task-averaged curve averages (module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = critical_table(rows, threshold, metric, cap)
    csv_path, md_path = out / "critical_sparsity.csv", out / "critical_sparsity.md"
    fields = ["model", "kind", "site", "task", "interpolated", "last_passing", "bracketed", "n_points", "threshold"]
    atomic_write_csv(csv_path, table, fields)
    atomic_write_text(md_path, markdown_report(table, threshold, cap))
    return {"csv": csv_path, "markdown": md_path}
