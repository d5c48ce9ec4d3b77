"""Critical sparsity (definitions: docs/sparsification.md) from sweep rows, as CSV and as a Table-1-shaped
Markdown table.

Critical sparsity = the highest *measured* sparsity whose relative performance is >= 0.99. Two values are
reported and always labelled:

* ``last_passing``: the measured sparsity of the grid point with the highest measured sparsity among those
  whose relative performance is >= 0.99 (a value actually observed);
* ``interpolated``: linear interpolation, on measured sparsity, between that point and the next grid point
  (in measured sparsity), which fails: s* = s1 + (r1 − 0.99)·(s2 − s1)/(r1 − r2). When no grid point fails
  the curve is not bracketed and ``interpolated`` = ``last_passing`` (a lower bound, shown with "≥").
* ``first_crossing``: where the curve, followed from dense towards sparse (increasing measured sparsity), first
  falls below 0.99: the same interpolation between the first failing point and the point before it. On a
  monotone curve it equals ``interpolated``; on a non-monotone one (a dip below 0.99 and a recovery) it lies
  below it. None when the first point already fails; = ``interpolated`` when no point fails. The paper's
  definition is the highest passing one (``interpolated``); this one says how much a claim depends on a dip.

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
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dllm_sparse.eval.analysis.bootstrap import finite_count, replicates_note
from dllm_sparse.eval.rows import atomic_write_csv, atomic_write_text
from dllm_sparse.sparsity.config import DENSE

__all__ = [
    "CriticalSparsity", "critical_sparsity", "curves", "critical_table", "markdown_table", "write_critical",
    "SITE_ORDER", "AVG_CURVE", "MEAN_OF_TASKS", "ordered_sites", "point_replicates", "critical_replicates",
    "model_differences", "differences_markdown", "CSV_FIELDS", "VARIANTS", "metric_for", "difference_bound",
    "EXACT", "LOWER_BOUND", "UPPER_BOUND", "UNDETERMINED_BOUND",
]

SITE_ORDER = ("intermediate", "input", "gate", "up")  # the paper's Table 1 column order
#: The critical-sparsity values of a curve (module docstring), each with its interval.
VARIANTS = ("interpolated", "last_passing", "first_crossing")
AVG_CURVE = "avg_curve"
MEAN_OF_TASKS = "mean_of_tasks"


@dataclass
class CriticalSparsity:
    last_passing: float | None  # measured sparsity of the last grid point that passes (None: none passes)
    interpolated: float | None  # linear interpolation at the threshold crossing
    bracketed: bool  # a failing point lies beyond the last passing one (else the values are lower bounds)
    n_points: int
    threshold: float = 0.99
    first_crossing: float | None = None  # interpolated first fall below the threshold (module docstring)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def critical_sparsity(points: Sequence[tuple[float, float]], threshold: float = 0.99) -> CriticalSparsity:
    """``points``: (measured sparsity, relative performance) pairs of one curve (any order)."""
    pts = sorted((float(s), float(r)) for s, r in points if _finite(s) and _finite(r))
    passing = [i for i, (_, r) in enumerate(pts) if r >= threshold]
    if not passing:
        return CriticalSparsity(None, None, False, len(pts), threshold)

    def crossing(i: int) -> float:  # between passing point i and failing point i + 1
        (s1, r1), (s2, r2) = pts[i], pts[i + 1]
        return s1 + (r1 - threshold) * (s2 - s1) / (r1 - r2) if r1 != r2 else s1

    i = passing[-1]
    s1 = pts[i][0]
    first_fail = next((j for j, (_, r) in enumerate(pts) if r < threshold), None)
    first = s1 if first_fail is None else None if first_fail == 0 else crossing(first_fail - 1)
    if i + 1 >= len(pts):
        return CriticalSparsity(s1, s1, False, len(pts), threshold, first)
    return CriticalSparsity(s1, crossing(i), True, len(pts), threshold, first)


def _dense_to_sparse(rule: str | None, threshold: float) -> float:
    """A sort key ordering a rule's thresholds from dense to sparse: larger p first for top-p, smaller
    threshold first for top-k (target sparsity) and max-p."""
    from dllm_sparse.sparsity.rules import RULE_NAMES, make_rule

    cls = type(make_rule(rule, 0.5)) if rule in RULE_NAMES else None
    return -threshold if cls is None or cls.denser_when_larger else threshold


def metric_for(metric: str | dict[str, str] | None, task: str) -> str | None:
    """The metric a task's curve uses: ``metric`` (one name for every task), ``metric[task]`` (a {task: name}
    dict; tasks not in it keep their primary metric), or None (each row's primary metric)."""
    return metric.get(task) if isinstance(metric, dict) else metric


def curves(rows: Sequence[dict], metric: str | dict[str, str] | None = None,
           cap: bool = True) -> dict[tuple[str, str, str], list[dict]]:
    """{(model, site, task): [points]} with points {p, sparsity, relative, per_layer}; adds the task-averaged
    curve under task ``avg_curve`` (each task's relative performance capped at 1 first unless ``cap=False``; see
    the module docstring). ``metric``: use another metric than each row's primary one (:func:`metric_for`: one
    name, or a {task: name} dict such as ``{"builtin_mc": "margin"}``)."""
    dense = {(r["model"], r["task"]): r for r in rows if r["site"] == DENSE}
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["site"] == DENSE:
            continue
        m = metric_for(metric, r["task"])
        rel = r.get("relative_performance") if m is None else (r.get("relative") or {}).get(m)
        if rel is None or r.get("sparsity") is None:
            continue
        out.setdefault((r["model"], r["site"], r["task"]), []).append(
            {"p": r["p"], "sparsity": r["sparsity"], "relative": rel, "per_layer": r.get("per_layer_sparsity"),
             "identity": r.get("source") == "dense_pass", "order": _dense_to_sparse(r.get("rule"), r["p"]),
             "key": r.get("key")})
    for (model, site, task), pts in out.items():  # no identity cell in the grid: add the dense pass itself
        d = dense.get((model, task))
        if d and not any(pt["identity"] for pt in pts):
            s = (d.get("sparsity_by_site") or {}).get(site)
            if s is not None:
                pts.append({"p": math.inf, "sparsity": s, "relative": 1.0,
                            "per_layer": (d.get("per_layer_by_site") or {}).get(site), "identity": True,
                            "order": -math.inf, "key": d.get("key")})
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
                        "tasks": tasks, "keys": [pt["key"] for pt in sel]})
        out[(model, site, AVG_CURVE)] = avg
    return out


def point_replicates(rows: Sequence[dict], boot, metric: str | None = None,
                     cap: bool = True) -> dict[tuple[str, str, str], list[tuple[float, np.ndarray] | None]]:
    """Bootstrap replicates ([n_boot] relative performances) of every point of :func:`curves`, in the same
    order, with the point's fixed measured sparsity: ``{(model, site, task): [(sparsity, replicates) | None]}``.
    The task-averaged curve's points average the tasks' capped replicates of the same draw. None: a point
    without per-item scores of its metric (:data:`~dllm_sparse.eval.analysis.bootstrap.RESAMPLABLE` metrics only)."""
    by_key = {r["key"]: r for r in rows if r.get("key") is not None}
    out: dict[tuple[str, str, str], list] = {}
    cv = curves(rows, metric, cap)
    for (model, site, task), pts in cv.items():
        if task == AVG_CURVE:
            continue
        reps = []
        for pt in pts:
            row = by_key.get(pt["key"])
            rep = None if row is None else _relative_replicates(boot, row, metric_for(metric, task))
            reps.append(None if rep is None else (pt["sparsity"], rep))
        out[(model, site, task)] = reps
    for (model, site, task), pts in cv.items():
        if task != AVG_CURVE:
            continue
        reps = []
        for pt in pts:
            per_task = []
            for key in pt["keys"]:
                row = by_key.get(key)
                rep = None if row is None else _relative_replicates(boot, row, metric_for(metric, row["task"]))
                per_task.append(None if rep is None else (np.minimum(rep, 1.0) if cap else rep))
            reps.append(None if any(r is None for r in per_task) else (pt["sparsity"], np.mean(per_task, axis=0)))
        out[(model, site, task)] = reps
    return out


def _relative_replicates(boot, row: dict, metric: str | None):
    from dllm_sparse.eval.analysis.bootstrap import RESAMPLABLE

    if metric is not None and metric not in RESAMPLABLE:
        return None
    return boot.relative(row, metric)


def critical_replicates(rows: Sequence[dict], boot, threshold: float = 0.99, metric: str | None = None,
                        cap: bool = True) -> dict[tuple[str, str, str], dict[str, np.ndarray]]:
    """Per (model, site, task) (and ``avg_curve``): the critical sparsity of every bootstrap replicate,
    ``{"last_passing": [n_boot], "interpolated": [n_boot], "first_crossing": [n_boot], "bracketed": [n_boot]}``
    (NaN where no point passes; ``bracketed`` False where no point of that replicate's curve fails, so its
    values are lower bounds). Curves with a point
    that cannot be resampled are left out. Computed once per ``boot`` and settings (``Bootstrap.memo``)."""
    if rows is not boot.rows:  # other rows than the bootstrap's own: nothing to share
        return _critical_replicates(rows, boot, threshold, metric, cap)
    metric_key = tuple(sorted(metric.items())) if isinstance(metric, dict) else metric
    return boot.memo(("critical", threshold, metric_key, cap),
                     lambda: _critical_replicates(rows, boot, threshold, metric, cap))


def _critical_replicates(rows, boot, threshold, metric, cap) -> dict:
    out = {}
    for key, reps in point_replicates(rows, boot, metric, cap).items():
        if not reps or any(r is None for r in reps):
            continue
        xs = [s for s, _ in reps]
        ys = np.stack([rep for _, rep in reps], axis=1)  # [n_boot, points]
        last, interp, first = (np.full(len(ys), np.nan) for _ in range(3))
        bracketed = np.zeros(len(ys), dtype=bool)
        for b, row in enumerate(ys):
            if not np.isfinite(row).all():  # an undefined point (dense 0 on the drawn items): no value, counted
                continue
            c = critical_sparsity(list(zip(xs, row.tolist(), strict=True)), threshold)
            last[b] = np.nan if c.last_passing is None else c.last_passing
            interp[b] = np.nan if c.interpolated is None else c.interpolated
            first[b] = np.nan if c.first_crossing is None else c.first_crossing
            bracketed[b] = c.bracketed
        out[key] = {"last_passing": last, "interpolated": interp, "first_crossing": first, "bracketed": bracketed}
    return out


#: What a difference a − b of two critical sparsities is, replicate by replicate (:func:`difference_bound`).
EXACT, LOWER_BOUND, UPPER_BOUND, UNDETERMINED_BOUND = "exact", "lower bound", "upper bound", "undetermined"


def difference_bound(a_bracketed, b_bracketed, used) -> str:
    """What the replicates ``used`` (a boolean mask) of a − b are. A critical sparsity whose curve has no failing
    grid point is only a lower bound (the true value is at or above it), so a − b is: ``exact`` when both sides
    are bracketed in every used replicate; a ``lower bound`` when only a is unbracketed somewhere (then only
    "a higher" can be shown: a percentile of lower bounds lies at or below the true one); an ``upper bound`` when
    only b is (only "b higher" can be shown); ``undetermined`` when both are (no direction can be shown). None for
    a side means bracketed everywhere (replicates made without that record)."""
    used = np.asarray(used, dtype=bool)
    a_open = a_bracketed is not None and bool((~np.asarray(a_bracketed, dtype=bool) & used).any())
    b_open = b_bracketed is not None and bool((~np.asarray(b_bracketed, dtype=bool) & used).any())
    return {(False, False): EXACT, (True, False): LOWER_BOUND, (False, True): UPPER_BOUND,
            (True, True): UNDETERMINED_BOUND}[(a_open, b_open)]


def model_differences(reps: dict[tuple[str, str, str], dict[str, np.ndarray]], kinds: dict[str, str], boot,
                      task: str = AVG_CURVE, variant: str = "interpolated") -> list[dict]:
    """For every site and every (diffusion model, AR model) pair: the critical sparsity difference diffusion − AR
    (points of sparsity, on the paired replicates) with its interval and a verdict that claims only what the
    interval allows: "diffusion higher" (interval above 0), "AR higher" (below 0), or "no detectable difference"
    (the interval holds 0). A side whose curve never fails a grid point (in some replicate) has only a lower bound
    there, and the verdict is one that every true value at or above those bounds gives (:func:`_difference_verdict`),
    else "undetermined" with the reason; ``difference_is`` says which sides are bounds somewhere
    (:func:`difference_bound`), and the median, interval and P(diffusion ≥ AR) are then bounds in that direction.
    With no grid point failing on either side in any replicate, median, interval and probability are None."""
    out = []
    diff_models = [m for m, k in kinds.items() if k == "diffusion"]
    ar_models = [m for m, k in kinds.items() if k == "ar"]
    sites = ordered_sites(s for (_, s, t) in reps if t == task)
    for site in sites:
        for dm in diff_models:
            for am in ar_models:
                a, b = reps.get((dm, site, task)), reps.get((am, site, task))
                if a is None or b is None:
                    continue
                d = a[variant] - b[variant]
                used = np.isfinite(d)
                finite = d[used]
                ci = boot.interval(finite)
                if finite.size < d.size:
                    warnings.warn(f"bootstrap: the {site} difference {dm} - {am} comes from {finite.size} of "
                                  f"{d.size} replicates: {_WHY_NO_VALUE}", stacklevel=2)
                bound = difference_bound(a.get("bracketed"), b.get("bracketed"), used)
                est = float(np.median(finite)) if finite.size else None
                p_at_least = float(np.mean(finite >= 0)) if finite.size else None
                a_open, b_open = (_open(side.get("bracketed"), d.shape)[used] for side in (a, b))
                verdict = _difference_verdict(finite, a_open, b_open, boot)
                if a_open.all() and b_open.all():  # two lower bounds in every replicate: their difference says nothing
                    est, ci, p_at_least = None, None, None
                out.append({"site": site, "diffusion_model": dm, "ar_model": am, "task": task, "variant": variant,
                            "difference_median": est, "lo": None if ci is None else ci[0],
                            "hi": None if ci is None else ci[1], "verdict": verdict, "difference_is": bound,
                            "p_diffusion_at_least_ar": p_at_least,
                            "replicates": int(finite.size), "replicates_drawn": int(d.size)})
    return out


#: Stands in for an unbounded end of a replicate's difference: it keeps the percentiles' order and, interpolated
#: with a finite neighbour, stays far beyond any sparsity difference (in points, |d| <= 100).
_FAR = 1e300


def _open(bracketed, shape) -> np.ndarray:
    """Where a side's replicates are only lower bounds (no failing grid point); none when it was not recorded."""
    return np.zeros(shape, dtype=bool) if bracketed is None else ~np.asarray(bracketed, dtype=bool)


def _difference_verdict(d: np.ndarray, a_open: np.ndarray, b_open: np.ndarray, boot) -> str:
    """The verdict on diffusion − AR (``d``, one value per replicate) that holds whatever the true values of the
    unbracketed replicates are. A diffusion value that is only a lower bound can make its replicate's difference
    arbitrarily high, an AR one arbitrarily low, so each replicate lies in [lo, hi] with lo = -inf where the AR side
    is open and hi = +inf where the diffusion side is. A verdict is given only when every completion gives it:
    "diffusion higher" when the interval of the lows lies above 0, "AR higher" when that of the highs lies below 0,
    "no detectable difference" when the lowest possible upper end and the highest possible lower end still hold 0
    (the interval of the highs starts at or below 0 and that of the lows ends at or above 0). With every replicate
    bracketed, lo = hi = d and this is the plain rule on the interval of d."""
    lo_ci = boot.interval(np.where(b_open, -_FAR, d))
    hi_ci = boot.interval(np.where(a_open, _FAR, d))
    if lo_ci is None or hi_ci is None:
        return "no interval"
    if lo_ci[0] > 0:
        return "diffusion higher"
    if hi_ci[1] < 0:
        return "AR higher"
    if hi_ci[0] <= 0 <= lo_ci[1]:
        return "no detectable difference"
    if a_open.all() and b_open.all():
        return "undetermined: no grid point failed on either side"
    sides = [(name, int(o.sum())) for name, o in (("diffusion", a_open), ("AR", b_open)) if o.any()]
    names = " and the ".join(name for name, _ in sides)
    counts = " and ".join(str(n) for _, n in sides)
    return (f"undetermined: the {names} side{'s are lower bounds' if len(sides) > 1 else ' is a lower bound'} "
            f"({counts} of {d.size} replicates)")


def critical_table(rows: Sequence[dict], threshold: float = 0.99, metric: str | None = None,
                   cap: bool = True, boot=None) -> list[dict]:
    """One record per (model, site, task) plus ``avg_curve`` and ``mean_of_tasks`` per (model, site);
    ``cap``: how the task-averaged curve averages (module docstring). ``boot``: a
    :class:`~dllm_sparse.eval.analysis.bootstrap.Bootstrap` of the same rows adds the percentile intervals
    ``interpolated_lo`` / ``interpolated_hi`` / ``last_passing_lo`` / ``last_passing_hi`` (None where the rows
    hold no per-item scores)."""
    kinds = {r["model"]: r.get("kind", "") for r in rows}
    reps = critical_replicates(rows, boot, threshold, metric, cap) if boot is not None else {}
    table = []
    per_ms: dict[tuple[str, str], list[CriticalSparsity]] = {}
    per_ms_reps: dict[tuple[str, str], list] = {}
    for (model, site, task), pts in sorted(curves(rows, metric, cap).items()):
        c = critical_sparsity([(pt["sparsity"], pt["relative"]) for pt in pts], threshold)
        table.append({"model": model, "kind": kinds.get(model, ""), "site": site, "task": task, **asdict(c),
                      **_intervals(reps.get((model, site, task)), boot)})
        if task != AVG_CURVE:
            per_ms.setdefault((model, site), []).append(c)
            per_ms_reps.setdefault((model, site), []).append(reps.get((model, site, task)))
    def mean(vals):  # None unless every task has a value
        return None if any(v is None for v in vals) else sum(vals) / len(vals)

    for (model, site), cs in sorted(per_ms.items()):
        rs = per_ms_reps[(model, site)]
        mean_reps = None if any(r is None for r in rs) else {
            v: np.mean([r[v] for r in rs], axis=0) for v in VARIANTS}
        table.append({"model": model, "kind": kinds.get(model, ""), "site": site, "task": MEAN_OF_TASKS,
                      "last_passing": mean([c.last_passing for c in cs]),
                      "interpolated": mean([c.interpolated for c in cs]),
                      "first_crossing": mean([c.first_crossing for c in cs]),
                      "bracketed": all(c.bracketed for c in cs), "n_points": sum(c.n_points for c in cs),
                      "threshold": threshold, **_intervals(mean_reps, boot)})
    _warn_dropped(table)
    return table


_WHY_NO_VALUE = ("in the others no grid point reaches the threshold, or a point's relative performance is "
                 "undefined (the dense score of the drawn items is 0)")


def _intervals(reps: dict | None, boot) -> dict:
    """The percentile intervals of a record and how many replicates each comes from (``*_replicates``, of
    ``replicates_drawn``)."""
    out = {}
    for v in VARIANTS:
        ci = None if reps is None or boot is None else boot.interval(reps[v])
        out[f"{v}_lo"], out[f"{v}_hi"] = (None, None) if ci is None else ci
        out[f"{v}_replicates"] = None if reps is None or boot is None else finite_count(reps[v])
    out["replicates_drawn"] = None if reps is None or boot is None else boot.n_boot
    return out


def _warn_dropped(table: Sequence[dict]) -> None:
    short = [f"{r['model']} / {r['site']} / {r['task']}: {r['interpolated_replicates']}"
             for r in table if replicates_note(r.get("interpolated_replicates"), r.get("replicates_drawn"))]
    if short:
        drawn = next(r["replicates_drawn"] for r in table if r.get("replicates_drawn"))
        warnings.warn(f"bootstrap: {len(short)} critical-sparsity interval(s) come from fewer than the {drawn} "
                      f"replicates drawn ({'; '.join(short[:6])}{' ...' if len(short) > 6 else ''}): "
                      f"{_WHY_NO_VALUE}", stacklevel=3)


def _fmt(rec: dict | None, variant: str, with_interval: bool = True) -> str:
    if rec is None:
        return "n/a"
    v = rec.get(variant)
    if v is None:
        return "none passes"
    text = ("" if rec.get("bracketed") else "≥") + f"{100 * v:.1f}"
    lo, hi = rec.get(f"{variant}_lo"), rec.get(f"{variant}_hi")
    if with_interval and lo is not None and hi is not None:
        text += f" [{100 * lo:.1f}, {100 * hi:.1f}]" + replicates_note(rec.get(f"{variant}_replicates"),
                                                                       rec.get("replicates_drawn"))
    return text


def ordered_sites(names: Iterable[str]) -> list[str]:
    """The distinct site names in the paper's column order (unknown names last, sorted)."""
    present = set(names)
    return [s for s in SITE_ORDER if s in present] + sorted(present - set(SITE_ORDER))


def markdown_table(table: Sequence[dict], task: str = AVG_CURVE, variant: str = "interpolated",
                   with_interval: bool = True) -> str:
    """Rows: models; columns: sites (paper order); cells: critical sparsity in % with its bootstrap interval
    ``[lo, hi]`` when the table has one."""
    sites = ordered_sites(r["site"] for r in table)
    models = list(dict.fromkeys(r["model"] for r in table))
    idx = {(r["model"], r["site"], r["task"]): r for r in table}
    lines = ["| model | kind | " + " | ".join(sites) + " |", "|---|---|" + "---:|" * len(sites)]
    for m in models:
        kind = next((r["kind"] for r in table if r["model"] == m), "")
        cells = [_fmt(idx.get((m, s, task)), variant, with_interval) for s in sites]
        lines.append(f"| {m} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_markdown(diffs: Sequence[dict], level: float = 0.95) -> str:
    """The diffusion − AR comparison, one line per site, with its interval and what it allows one to claim."""
    if not diffs:
        return "(no diffusion / AR pair with per-item scores in these rows)"
    lines = [f"| site | diffusion − AR (points, median) | {100 * level:g} % interval | verdict | "
             "P(diffusion ≥ AR) |", "|---|---:|---|---|---:|"]
    for d in diffs:
        # '≥' / '≤': a bound (one side's curve never failed a grid point), see difference_bound
        mark = {LOWER_BOUND: "≥", UPPER_BOUND: "≤"}.get(d.get("difference_is", EXACT), "")
        none = "undetermined" if d.get("difference_is") == UNDETERMINED_BOUND else "n/a"
        med = none if d["difference_median"] is None else f"{mark}{100 * d['difference_median']:+.1f}"
        ci = none if d["lo"] is None else (f"{mark}[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
                                           + replicates_note(d.get("replicates"), d.get("replicates_drawn")))
        pr = none if d["p_diffusion_at_least_ar"] is None else f"{mark}{d['p_diffusion_at_least_ar']:.2f}"
        lines.append(f"| {d['site']} | {med} | {ci} | {d['verdict']} | {pr} |")
    return "\n".join(lines)


def markdown_report(table: Sequence[dict], threshold: float = 0.99, cap: bool = True,
                    diffs: Sequence[dict] = (), boot=None) -> str:
    tasks = sorted({r["task"] for r in table} - {AVG_CURVE, MEAN_OF_TASKS})
    pct = f"{100 * threshold:g} %"
    ci_note = ("" if boot is None else
               f" Brackets: {100 * boot.level:g} % paired bootstrap interval over items ({boot.n_boot} replicates, "
               f"seed {boot.seed}; items per task: {boot.describe()['items']}).")
    dropped = any(replicates_note(r.get(f"{v}_replicates"), r.get("replicates_drawn"))
                  for r in table for v in VARIANTS)
    dropped |= any(replicates_note(d.get("replicates"), d.get("replicates_drawn")) for d in diffs)
    if dropped:
        ci_note += f" '(k/n replicates)': that interval comes from the k of n replicates with a value; {_WHY_NO_VALUE}."
    parts = [
        f"# Critical sparsity (%): highest measured sparsity keeping ≥ {pct} of dense performance",
        "",
        f"Tasks: {', '.join(tasks)}. Over tasks: the task-averaged curve (at each threshold, the mean over tasks "
        f"of the relative performance {'capped at 1' if cap else 'uncapped (gains offset losses)'}, and the mean "
        "measured sparsity). Relative performance = "
        "metric_sparse / metric_dense (accuracy) or PPL_dense / PPL_sparse (perplexity; ELBO perplexity for "
        "diffusion models). '≥' = no grid point failed "
        "(a lower bound); 'none passes' = even the first grid point failed." + ci_note
        + ("" if boot is None else " In the diffusion − AR comparison, '≥' / '≤' mark a difference that is only a "
           "bound because one side's curve never failed a grid point (in some replicates); a verdict is given only "
           "when every true value at or above those bounds gives it, else 'undetermined' says which side is a bound "
           "in how many replicates, and a grid reaching sparser thresholds decides it."),
        "",
        f"## Interpolated (linear, on measured sparsity, between the two grid points that bracket {threshold:g})",
        "",
        markdown_table(table, AVG_CURVE, "interpolated"),
        "",
        f"## Last passing grid point (highest measured sparsity with relative performance ≥ {threshold:g})",
        "",
        markdown_table(table, AVG_CURVE, "last_passing"),
        "",
        f"## First crossing (interpolated where the curve first falls below {threshold:g}, from dense towards "
        "sparse; equals the interpolated value on a monotone curve)",
        "",
        markdown_table(table, AVG_CURVE, "first_crossing"),
        "",
    ]
    if boot is not None:
        parts += ["## Diffusion vs AR (task-averaged curve, interpolated; paired over the same items)", "",
                  differences_markdown(diffs, boot.level), ""]
    parts += ["## Per task (interpolated / last passing)", ""]
    sites = ordered_sites(r["site"] for r in table)
    idx = {(r["model"], r["site"], r["task"]): r for r in table}
    parts += ["| model | task | " + " | ".join(sites) + " |", "|---|---|" + "---:|" * len(sites)]
    for m in dict.fromkeys(r["model"] for r in table):
        for t in tasks + [MEAN_OF_TASKS]:
            cells = [f"{_fmt(idx.get((m, s, t)), 'interpolated')} / {_fmt(idx.get((m, s, t)), 'last_passing')}"
                     for s in sites]
            parts.append(f"| {m} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


#: Columns of critical_sparsity.csv: critical sparsities in percent (the Markdown's unit), said in the name.
CSV_FIELDS = ["model", "kind", "site", "task", "interpolated_pct", "interpolated_lo_pct", "interpolated_hi_pct",
              "last_passing_pct", "last_passing_lo_pct", "last_passing_hi_pct", "first_crossing_pct",
              "first_crossing_lo_pct", "first_crossing_hi_pct", "bracketed", "n_points", "threshold"]


def _csv_record(rec: dict) -> dict:
    out = {k: rec.get(k) for k in ("model", "kind", "site", "task", "bracketed", "n_points", "threshold")}
    for v in VARIANTS:
        for suffix in ("", "_lo", "_hi"):
            x = rec.get(v + suffix)
            out[f"{v}{suffix}_pct"] = None if x is None else round(100 * x, 4)
    return out


def write_critical(rows: Sequence[dict], out_dir: str | Path, threshold: float = 0.99,
                   metric: str | None = None, cap: bool = True, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Write ``critical_sparsity.csv`` (percent), ``critical_sparsity.md`` and, with a diffusion / AR pair,
    ``model_comparison.csv``; returns ``{"csv", "markdown", "comparison", "table", "differences", "bootstrap"}``.
    ``cap``: how the task-averaged curve averages (module docstring). ``n_boot``: bootstrap replicates of the
    intervals (:mod:`dllm_sparse.eval.analysis.bootstrap`; 0 = no intervals)."""
    from dllm_sparse.eval.analysis.bootstrap import Bootstrap

    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be a whole number >= 0 (0: no intervals), got {n_boot!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    boot = Bootstrap(rows, n_boot=n_boot, seed=seed, level=level) if n_boot else None
    table = critical_table(rows, threshold, metric, cap, boot=boot)
    diffs = []
    if boot is not None:
        kinds = {r["model"]: r.get("kind", "") for r in rows}
        diffs = model_differences(critical_replicates(rows, boot, threshold, metric, cap), kinds, boot)
    csv_path, md_path = out / "critical_sparsity.csv", out / "critical_sparsity.md"
    atomic_write_csv(csv_path, [_csv_record(r) for r in table], CSV_FIELDS)
    atomic_write_text(md_path, markdown_report(table, threshold, cap, diffs, boot))
    paths = {"csv": csv_path, "markdown": md_path, "comparison": None, "table": table, "differences": diffs,
             "bootstrap": boot}
    if diffs:
        paths["comparison"] = out / "model_comparison.csv"
        atomic_write_csv(paths["comparison"], [
            {k: (round(100 * v, 4) if k in ("difference_median", "lo", "hi") and v is not None else v)
             for k, v in d.items()} for d in diffs],
            ["site", "diffusion_model", "ar_model", "task", "variant", "difference_median", "lo", "hi", "verdict",
             "difference_is", "p_diffusion_at_least_ar"])
    return paths
