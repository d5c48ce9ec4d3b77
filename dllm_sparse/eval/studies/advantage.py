"""The verdict rule of the advantage study (docs/advantage.md, stated there before any run), on paired bootstrap
replicates of critical sparsity.

    reps = critical_replicates(rows, boot)                      # dllm_sparse.eval.analysis.critical
    recs = site_comparisons(reps, boot, twin="smollm2-135m-mdm", parent="smollm2-135m",
                            controls={"smollm2-135m+noise:...": True, ...})   # name -> valid (calibrated)
    recs[0]["verdict"]                                          # one of VERDICTS

Per site, with D the twin, A the parent and C each control (every difference on the same bootstrap replicates, so
paired over the same items): Δ_D = crit(D) − crit(A), Δ_C = crit(C) − crit(A), δ_C = crit(D) − crit(C). "Above 0":
the whole 95 % percentile interval is > 0. With fewer than two valid controls: "undetermined at this size". Else

1. "tolerance exceeds matched-weakness controls": Δ_D above 0 and δ_C above 0 for every valid control;
2. "tolerance tracks weakness": Δ_C above 0 for every valid control and no δ_C above 0;
3. "undetermined at this size" otherwise.

A control is valid when its calibration is within tolerance and it has replicates at that site; invalid ones are
reported and take no part.

Bounds: a critical sparsity whose curve never fails a grid point is only a lower bound (docs/sparsification.md),
so a difference with such a side is a bound too (:func:`~dllm_sparse.eval.analysis.critical.difference_bound`).
"Above 0" counts only for an exact difference or a lower bound (a − b with a unbracketed); "no δ_C above 0" (rule 2)
needs each δ_C exact or an upper bound with its interval's lower end at or below 0; anything else leaves that
difference undetermined and the verdict says which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dllm_sparse.eval.analysis.critical import (
    AVG_CURVE,
    EXACT,
    LOWER_BOUND,
    UNDETERMINED_BOUND,
    UPPER_BOUND,
    difference_bound,
    ordered_sites,
)

__all__ = ["VERDICTS", "EXCEEDS", "TRACKS", "UNDETERMINED", "paired_difference", "verdict", "site_comparisons",
           "comparisons_markdown", "MIN_CONTROLS", "study_report", "plot_advantage"]

EXCEEDS = "tolerance exceeds matched-weakness controls"
TRACKS = "tolerance tracks weakness"
UNDETERMINED = "undetermined at this size"
VERDICTS = (EXCEEDS, TRACKS, UNDETERMINED)
MIN_CONTROLS = 2


def paired_difference(a: np.ndarray | None, b: np.ndarray | None, boot, a_bracketed=None,
                      b_bracketed=None) -> dict | None:
    """a − b on the same replicates: median, percentile interval, replicates with a value, P(a ≥ b), and what
    the difference is (``bound``, :func:`~dllm_sparse.eval.analysis.critical.difference_bound`: ``exact``, a ``lower
    bound`` where a's curve never failed a grid point, an ``upper bound`` where b's never did, ``undetermined``
    where both; ``a_bracketed`` / ``b_bracketed``: the replicates' ``bracketed`` flags, None = bracketed). None
    when either side has no replicates or no replicate has both values."""
    if a is None or b is None:
        return None
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    used = np.isfinite(d)
    finite = d[used]
    ci = boot.interval(finite)
    if ci is None:
        return None
    return {"median": float(np.median(finite)), "lo": ci[0], "hi": ci[1], "replicates": int(finite.size),
            "replicates_drawn": int(d.size), "p_at_least_0": float(np.mean(finite >= 0)),
            "bound": difference_bound(a_bracketed, b_bracketed, used)}


def _above(d: dict | None) -> bool:
    """The difference is shown to lie above 0: its interval is, and its replicates are exact or lower bounds (a
    percentile of lower bounds lies at or below the true one)."""
    return d is not None and d["lo"] > 0 and d.get("bound", EXACT) in (EXACT, LOWER_BOUND)


def _not_above(d: dict | None) -> bool:
    """The difference is not shown above 0, and would not be with the true values: its interval's lower end is
    at or below 0, and its replicates are exact or upper bounds."""
    return d is not None and not d["lo"] > 0 and d.get("bound", EXACT) in (EXACT, UPPER_BOUND)


def _state(d: dict | None) -> str:
    if _above(d):
        return "above 0"
    if _not_above(d):
        return "not above 0"
    return f"undetermined ({d.get('bound')}: a curve never failed a grid point)" if d is not None else "n/a"


def verdict(delta_twin: dict | None, delta_controls: Mapping[str, dict | None],
            twin_minus_controls: Mapping[str, dict | None]) -> tuple[str, str]:
    """(verdict, why) of one site from the differences of the *valid* controls (module docstring)."""
    names = [c for c in delta_controls if delta_controls[c] is not None and twin_minus_controls.get(c) is not None]
    if len(names) < MIN_CONTROLS:
        return UNDETERMINED, f"{len(names)} valid control(s) with intervals; the rule needs {MIN_CONTROLS}"
    if _above(delta_twin) and all(_above(twin_minus_controls[c]) for c in names):
        return EXCEEDS, "twin − parent and twin − every control lie above 0"
    if all(_above(delta_controls[c]) for c in names) and all(_not_above(twin_minus_controls[c]) for c in names):
        return TRACKS, "every control − parent lies above 0 and no twin − control does"
    parts = [f"twin − parent {_state(delta_twin)}"]
    parts += [f"{c}: control − parent {_state(delta_controls[c])}, twin − control {_state(twin_minus_controls[c])}"
              for c in names]
    return UNDETERMINED, "; ".join(parts)


def site_comparisons(reps: Mapping[tuple[str, str, str], Mapping[str, np.ndarray]], boot, *, twin: str,
                     parent: str, controls: Mapping[str, bool], variant: str = "interpolated",
                     task: str = AVG_CURVE) -> list[dict]:
    """One record per site: every difference of the rule with its interval, and the verdict. ``controls``: each
    control's name and whether it is valid (calibrated within tolerance); ``variant``: which critical-sparsity
    value of the replicates (``interpolated`` = the paper's highest passing, ``first_crossing``)."""
    def diff(m1, m2, site):  # crit(m1) - crit(m2) on the same replicates
        r1, r2 = reps.get((m1, site, task)), reps.get((m2, site, task))
        if r1 is None or r2 is None:
            return None
        return paired_difference(r1[variant], r2[variant], boot, r1.get("bracketed"), r2.get("bracketed"))

    out = []
    for site in ordered_sites(s for (_, s, t) in reps if t == task):
        d_twin = diff(twin, parent, site)
        d_c = {c: diff(c, parent, site) for c in controls}
        t_c = {c: diff(twin, c, site) for c in controls}
        valid = [c for c, ok in controls.items() if ok]
        v, why = verdict(d_twin, {c: d_c[c] for c in valid}, {c: t_c[c] for c in valid})
        out.append({"site": site, "variant": variant, "task": task, "twin_minus_parent": d_twin,
                    "control_minus_parent": d_c, "twin_minus_control": t_c, "valid_controls": valid,
                    "verdict": v, "why": why})
    return out


def _fmt(d: dict | None) -> str:
    if d is None:
        return "n/a"
    if d.get("bound") == UNDETERMINED_BOUND:
        return "undetermined (both ≥)"
    note = "" if d["replicates"] >= d["replicates_drawn"] else f" ({d['replicates']}/{d['replicates_drawn']})"
    mark = {LOWER_BOUND: "≥", UPPER_BOUND: "≤"}.get(d.get("bound", EXACT), "")
    return f"{mark}{100 * d['median']:+.1f} {mark}[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{note}"


def comparisons_markdown(recs: Sequence[dict], labels: Mapping[str, str] | None = None) -> str:
    """The study's table: per site, diffusion − AR, every degraded-AR − AR and diffusion − degraded-AR (points,
    median [95 % interval]) and the verdict. ``labels``: short names of the controls."""
    if not recs:
        return "(no sites with replicates)"
    controls = list(recs[0]["control_minus_parent"])
    labels = dict(labels or {})
    head = ["site", "diffusion − AR"]
    for c in controls:
        mark = "" if c in recs[0]["valid_controls"] else " (not valid)"
        head += [f"{labels.get(c, c)}{mark} − AR", f"diffusion − {labels.get(c, c)}"]
    head.append("verdict")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in recs:
        cells = [r["site"], _fmt(r["twin_minus_parent"])]
        for c in controls:
            cells += [_fmt(r["control_minus_parent"][c]), _fmt(r["twin_minus_control"][c])]
        cells.append(r["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The study's report and figure
# ---------------------------------------------------------------------------------------------------------


def _crit_cell(rec: dict | None, variant: str) -> str:
    if rec is None or rec.get(variant) is None:
        return "n/a" if rec is None else "none passes"
    text = ("" if rec.get("bracketed") else "≥") + f"{100 * rec[variant]:.1f}"
    lo, hi = rec.get(f"{variant}_lo"), rec.get(f"{variant}_hi")
    return text + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else "")


def _critical_lines(table: Sequence[dict], models: Sequence[str], ppl: Mapping[str, str]) -> list[str]:
    sites = ordered_sites(r["site"] for r in table)
    idx = {(r["model"], r["site"]): r for r in table if r["task"] == AVG_CURVE}
    lines = ["| model | held-out ppl | " + " | ".join(f"{s}: highest passing / first crossing" for s in sites) + " |",
             "|---|---:|" + "---|" * len(sites)]
    for m in models:
        cells = [f"{_crit_cell(idx.get((m, s)), 'interpolated')} / {_crit_cell(idx.get((m, s)), 'first_crossing')}"
                 for s in sites]
        lines.append(f"| {m} | {ppl.get(m, 'n/a')} | " + " | ".join(cells) + " |")
    return lines


def study_report(recs: Mapping[str, Sequence[dict]], labels: Mapping[str, str], calibrations: Mapping[str, dict],
                 trajectory: Mapping[str, dict], table: Sequence[dict], table_margin: Sequence[dict], target: float,
                 target_source: str, missing: Sequence[dict], twin: str, parent: str) -> str:
    """``advantage.md``: calibrations, critical sparsity of every model (highest passing and first crossing, with
    intervals), the comparisons and verdicts of each variant, the trajectory and the points it lacks."""
    parent_ppl = next((c["parent_ppl"] for c in calibrations.values()), None)
    ppl = {parent: "n/a" if parent_ppl is None else f"{parent_ppl:.3g} (exact)"}
    for c in calibrations.values():
        ppl[f"{parent}+{c['degradation']['id']}"] = f"{c['ppl']:.3g} (exact)"
    for name, t in trajectory.items():
        ppl[name] = f"{t['elbo_ppl']:.3g} (ELBO)"
    models = list(dict.fromkeys(r["model"] for r in table))
    out = ["# Is the advantage real? Matched-weakness controls and the twin's training trajectory", "",
           "Verdict rule: docs/advantage.md (stated before the run). Critical sparsity (%) of the task-averaged "
           "curve at 0.99, 95 % paired bootstrap intervals over items; differences in points, median [interval].",
           "", f"Calibration target: perplexity {target:.4g}, {target_source}.", "",
           "## Controls (calibrated on the held-out answers, exact AR perplexity)", "",
           "| control | setting | perplexity | / target | / parent | valid (±tolerance) | evaluations |",
           "|---|---|---:|---:|---:|---|---:|"]
    for method, c in calibrations.items():
        out.append(f"| {method} | `{c['degradation']['id']}` | {c['ppl']:.4g} | {c['ratio_to_target']:.3f} | "
                   f"{c['ratio_to_parent']:.2f} | {'yes' if c['within'] else 'no'} (±{100 * c['tolerance']:g} %) | "
                   f"{len(c['steps'])} |")
    out += ["", "## Critical sparsity of every model (accuracy / perplexity, the paper's criterion)", "",
            *_critical_lines(table, models, ppl), ""]
    titles = {"primary": "Primary: highest passing (the paper's definition), accuracy / perplexity",
              "first_crossing": "Secondary: first crossing, accuracy / perplexity",
              "margin": "Secondary: highest passing, the margin metric in place of accuracy on builtin_mc"}
    for variant, rs in recs.items():
        if not rs:
            continue
        out += [f"## {titles.get(variant, variant)}", "", comparisons_markdown(rs, labels), ""]
        out += [f"- {r['site']}: {r['verdict']} ({r['why']})" for r in rs] + [""]
    if table_margin:
        out += ["## Critical sparsity with the margin metric on builtin_mc", "",
                *_critical_lines(table_margin, models, ppl), ""]
    out += ["## Training trajectory of the twin", "", "| point | training tokens seen | held-out ELBO ppl | model |",
            "|---|---:|---:|---|"]
    for name, t in trajectory.items():
        tok = "n/a" if t.get("tokens") is None else f"{t['tokens']:,}"
        out.append(f"| {t['label']} | {tok} | {t['elbo_ppl']:.4g} | {name} |")
    if missing:
        out += ["", "Points not in this run:", ""] + [f"- {m['point']}: {m['why']}" for m in missing]
    out += [""]
    return "\n".join(out)


def _with_bars(r: Mapping) -> tuple[float, float, float]:
    """A critical-sparsity row's point (%) and the lengths of its error bar below and above."""
    v, v_lo, v_hi = r["interpolated"], r.get("interpolated_lo"), r.get("interpolated_hi")
    # A percentile interval need not contain the point estimate: the bar is clipped at the point.
    return (100 * v, 0.0 if v_lo is None else max(0.0, 100 * (v - v_lo)),
            0.0 if v_hi is None else max(0.0, 100 * (v_hi - v)))


def plot_advantage(table: Sequence[dict], trajectory: Mapping[str, dict], calibrations: Mapping[str, dict], *,
                   controls: Mapping[str, float], parent: str, parent_ppl: float | None, out_dir) -> list:
    """Critical sparsity per site against held-out perplexity (log axis): the trajectory points (ELBO
    perplexity), the controls and the parent (exact perplexity), with their 95 % intervals; the parent's value
    as a horizontal reference line. A second figure: the trajectory against training tokens."""
    import matplotlib.pyplot as plt

    from dllm_sparse.eval.analysis.plots import save_figure

    idx = {(r["model"], r["site"]): r for r in table if r["task"] == AVG_CURVE}
    sites = ordered_sites(r["site"] for r in table)
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 3.8), squeeze=False)
    groups = [("trajectory (twin, ELBO ppl)", "o-", "C0", [(n, t["elbo_ppl"]) for n, t in trajectory.items()]),
              ("degraded AR (exact ppl)", "s", "C3", list(controls.items())),
              ("AR parent (exact ppl)", "D", "k", [] if parent_ppl is None else [(parent, parent_ppl)])]
    for ax, site in zip(axes[0], sites, strict=True):
        for label, style, color, pts in groups:
            xs, ys, lo, hi = [], [], [], []
            for name, ppl in sorted(pts, key=lambda t: -t[1]):
                r = idx.get((name, site))
                if r is None or r.get("interpolated") is None:
                    continue
                y, y_lo, y_hi = _with_bars(r)
                xs.append(ppl)
                ys.append(y)
                lo.append(y_lo)
                hi.append(y_hi)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, color=color, capsize=3, ms=5, label=label)
        ref = idx.get((parent, site))
        if ref is not None and ref.get("interpolated") is not None:
            ax.axhline(100 * ref["interpolated"], color="k", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"site: {site}")
        ax.set_xlabel("held-out perplexity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("critical sparsity (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Critical sparsity vs held-out perplexity (bars: 95 % paired bootstrap; dashed: AR parent)",
                 fontsize=10)
    fig.tight_layout()
    paths = save_figure(fig, Path(out_dir) / "critical_vs_perplexity")
    pts = [(t["tokens"], n) for n, t in trajectory.items() if t.get("tokens") is not None]
    if len(pts) >= 2:
        fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 3.4), squeeze=False)
        for ax, site in zip(axes[0], sites, strict=True):
            xs, ys, lo, hi = [], [], [], []
            for tok, name in sorted(pts):
                r = idx.get((name, site))
                if r is not None and r.get("interpolated") is not None:
                    y, y_lo, y_hi = _with_bars(r)
                    xs.append(tok)
                    ys.append(y)
                    lo.append(y_lo)
                    hi.append(y_hi)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color="C0", capsize=3, ms=5)
            ref = idx.get((parent, site))
            if ref is not None and ref.get("interpolated") is not None:
                ax.axhline(100 * ref["interpolated"], color="k", ls="--", lw=0.8)
            ax.set_title(f"site: {site}")
            ax.set_xlabel("training tokens seen")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("critical sparsity (%)")
        fig.suptitle("Critical sparsity of the twin vs training tokens (bars: 95 % paired bootstrap; dashed: AR "
                     "parent)", fontsize=10)
        fig.tight_layout()
        paths += save_figure(fig, Path(out_dir) / "critical_vs_tokens")
    return paths
