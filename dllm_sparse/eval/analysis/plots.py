"""Figures (matplotlib, Agg backend; every figure saved as PNG and PDF).

* :func:`plot_relative_performance`: relative performance vs *measured* sparsity, one panel per site, all
  models on the same axes, the 99 % line and a marker at each model's interpolated critical sparsity (and a
  second one at its first crossing where a non-monotone curve crosses lower).
* :func:`plot_layer_heatmaps`: per site, per-layer measured sparsity (layer × threshold), one panel per model.
* :func:`plot_step_sparsity`: measured sparsity against the denoising step of a diffusion generation, or,
  when only likelihood passes are available, against the mask ratio of the ELBO passes; the axis label says
  which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

# The backend is the user's choice (notebooks keep theirs); the experiment scripts pick Agg for files.
import matplotlib.pyplot as plt

from dllm_sparse.eval.analysis.critical import AVG_CURVE, critical_sparsity, curves, ordered_sites

__all__ = ["plot_relative_performance", "plot_layer_heatmaps", "plot_step_sparsity", "save_figure"]


def save_figure(fig, path_stem: str | Path) -> list[Path]:
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _label(model: str, kinds: dict[str, str]) -> str:
    kind = kinds.get(model, "")
    return f"{model} ({'diffusion' if kind == 'diffusion' else 'AR'})" if kind else model


def plot_relative_performance(rows: Sequence[dict], out_dir: str | Path, task: str = AVG_CURVE,
                              threshold: float = 0.99, metric: str | None = None, boot=None,
                              cap: bool = True) -> list[Path]:
    """One figure for ``task`` (``avg_curve`` = the task-averaged curve, averaged as the table averages it:
    ``cap``). Top row: the whole curve; bottom row: the same, zoomed on the band around ``threshold`` where the
    critical sparsity is decided. With ``boot`` (a :class:`~dllm_sparse.eval.analysis.bootstrap.Bootstrap` of the same
    rows): shaded 95 % bands of the relative performance and the interval of the interpolated critical
    sparsity as a horizontal bar through the star. Returns the written paths."""
    from dllm_sparse.eval.analysis.critical import critical_replicates, point_replicates

    cv = {k: v for k, v in curves(rows, metric, cap).items() if k[2] == task and v}
    if not cv:
        return []
    reps = point_replicates(rows, boot, metric, cap) if boot is not None else {}
    crit_reps = critical_replicates(rows, boot, threshold, metric, cap) if boot is not None else {}
    kinds = {r["model"]: r.get("kind", "") for r in rows}
    sites = ordered_sites(k[1] for k in cv)
    models = list(dict.fromkeys(k[0] for k in cv))
    fig, axes = plt.subplots(2, len(sites), figsize=(4.2 * len(sites), 6.4), sharey="row", squeeze=False,
                             gridspec_kw={"height_ratios": [1.0, 0.8]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lo = 1.0
    for col, site in enumerate(sites):
        for mi, model in enumerate(models):
            raw = cv.get((model, site, task), [])
            if not raw:
                continue
            order = sorted(range(len(raw)), key=lambda i: raw[i]["sparsity"])
            pts = [raw[i] for i in order]
            point_reps = reps.get((model, site, task))
            xs = [100 * pt["sparsity"] for pt in pts]
            ys = [pt["relative"] for pt in pts]
            lo = min(lo, min(ys))
            c = colors[mi % len(colors)]
            band = None
            if point_reps and all(r is not None for r in point_reps):
                band = [boot.interval(point_reps[i][1]) for i in order]
            crit = critical_sparsity([(pt["sparsity"], pt["relative"]) for pt in pts], threshold)
            crit_ci = None
            if (model, site, task) in crit_reps:
                crit_ci = boot.interval(crit_reps[(model, site, task)]["interpolated"])
            for ax in axes[:, col]:
                ax.plot(xs, ys, "o-", color=c, ms=3.5, lw=1.3, label=_label(model, kinds))
                if band is not None:
                    ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], color=c, alpha=0.15, lw=0)
                if crit.interpolated is not None:
                    ax.axvline(100 * crit.interpolated, color=c, ls=":", lw=1)
                    if crit_ci is not None:
                        ax.errorbar([100 * crit.interpolated], [threshold], xerr=_bar(crit.interpolated, crit_ci),
                                    color=c, capsize=3, lw=1.2, zorder=4)
                    ax.plot([100 * crit.interpolated], [threshold], marker="*", color=c, ms=11, mec="black",
                            mew=0.5, zorder=5)
                first = crit.first_crossing
                if first is not None and crit.interpolated is not None and first < crit.interpolated - 1e-9:
                    # A non-monotone curve: where it first falls below the threshold, with its own interval.
                    first_ci = (boot.interval(crit_reps[(model, site, task)]["first_crossing"])
                                if (model, site, task) in crit_reps else None)
                    if first_ci is not None:
                        ax.errorbar([100 * first], [threshold], xerr=_bar(first, first_ci), color=c, capsize=2,
                                    lw=0.8, ls="none", zorder=4)
                    ax.plot([100 * first], [threshold], marker="v", color=c, ms=7, mec="black", mew=0.5, zorder=5)
        for ax in axes[:, col]:
            ax.axhline(threshold, color="grey", ls="--", lw=1)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"site: {site}")
        axes[1][col].set_xlabel("measured sparsity (%)")
    axes[0][0].set_ylabel("relative performance\n(sparse / dense)")
    axes[1][0].set_ylabel(f"zoom near {threshold:g}")
    axes[0][0].set_ylim(max(0.0, min(lo, threshold) - 0.05), 1.02 if lo > 0.5 else None)
    span = max(0.02, 1.0 - threshold)
    axes[1][0].set_ylim(threshold - 2.5 * span, 1.0 + 0.6 * span)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    what = "mean over tasks" if task == AVG_CURVE else task
    bands = "; bands and bars: 95 % paired bootstrap intervals over items" if boot is not None else ""
    fig.suptitle(f"Relative performance vs measured sparsity ({what}); ★ = interpolated critical sparsity "
                 f"(highest passing), ▼ = first crossing where it lies lower, dashed = {100 * threshold:g} %{bands}",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(out_dir) / f"relative_performance_{task}")


def _bar(value: float, ci: tuple[float, float]) -> list[list[float]]:
    """Error-bar extents (in %) of ``ci`` around ``value``; a percentile interval need not contain the point
    estimate (few items, a step-like curve), and the bar is then clipped at the point."""
    return [[max(0.0, 100 * (value - ci[0]))], [max(0.0, 100 * (ci[1] - value))]]


def plot_layer_heatmaps(rows: Sequence[dict], out_dir: str | Path, task: str = AVG_CURVE) -> list[Path]:
    """One figure per site: per-layer measured sparsity, rows = thresholds, columns = layers, panel per model."""
    cv = {k: v for k, v in curves(rows).items() if k[2] == task and v}
    kinds = {r["model"]: r.get("kind", "") for r in rows}
    paths: list[Path] = []
    for site in ordered_sites(k[1] for k in cv):
        models = [k[0] for k in cv if k[1] == site]
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
        im = None
        # One colour range per figure, spanning the values it shows (0-100 % hid the variation between layers).
        values = [100 * v for m in models for pt in cv[(m, site, task)] if pt.get("per_layer")
                  for v in pt["per_layer"] if v == v]
        vmin, vmax = (min(values), max(values)) if values else (0.0, 100.0)
        if vmax - vmin < 1e-9:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        for ax, model in zip(axes[0], models, strict=True):
            pts = [pt for pt in cv[(model, site, task)] if pt.get("per_layer")]
            pts.sort(key=lambda pt: pt["sparsity"])
            if not pts:
                ax.set_axis_off()
                continue
            data = [[100 * v for v in pt["per_layer"]] for pt in pts]
            im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                           interpolation="nearest")
            ax.set_yticks(range(len(pts)))
            ax.set_yticklabels(["dense" if math.isinf(pt["p"]) else f"{pt['p']:g}" for pt in pts], fontsize=7)
            ax.set_xlabel("layer")
            ax.set_ylabel("threshold")
            ax.set_title(_label(model, kinds), fontsize=9)
        if im is not None:
            fig.colorbar(im, ax=axes[0].tolist(), label=f"measured sparsity (%), range {vmin:.1f}-{vmax:.1f}")
        fig.suptitle(f"Per-layer sparsity, site {site} ({'mean over tasks' if task == AVG_CURVE else task})",
                     fontsize=10)
        paths += save_figure(fig, Path(out_dir) / f"layer_sparsity_{site}")
    return paths


def plot_step_sparsity(profile: Sequence[dict], out_dir: str | Path, name: str = "sparsity_vs_step") -> list[Path]:
    """``profile``: rows {model, site, x, sparsity, source} with source ``generation`` (x = denoising step)
    or ``elbo_mask_ratio`` (x = fraction of the answer masked in the ELBO pass, bin centre)."""
    if not profile:
        return []
    sources = sorted({r["source"] for r in profile})
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    from matplotlib.lines import Line2D

    for ax, source in zip(axes[0], sources, strict=True):
        sel = [r for r in profile if r["source"] == source]
        sites = list(dict.fromkeys(r["site"] for r in sel))
        labels = list(dict.fromkeys(r.get("label", "") for r in sel))
        for (model, site, label) in dict.fromkeys((r["model"], r["site"], r.get("label", "")) for r in sel):
            pts = sorted((r["x"], r["sparsity"]) for r in sel
                         if r["model"] == model and r["site"] == site and r.get("label", "") == label)
            ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", ms=3,
                    color=colors[sites.index(site) % len(colors)], ls=styles[labels.index(label) % len(styles)])
        # Two legends: the colour is the FFN site, the line style what was measured (generation: which token
        # positions are averaged; ELBO passes: which task), so neither can be mistaken for the other.
        site_legend = ax.legend([Line2D([], [], color=colors[i % len(colors)], lw=2) for i in range(len(sites))],
                                sites, title="site (colour)", fontsize=7, title_fontsize=7, loc="upper left")
        ax.add_artist(site_legend)
        what = "positions averaged (line)" if source == "generation" else "task and rule (line)"
        ax.legend([Line2D([], [], color="black", ls=styles[i % len(styles)]) for i in range(len(labels))], labels,
                  title=what, fontsize=7, title_fontsize=7, loc="lower right")
        if source == "generation":
            ax.set_xlabel("denoising step (LLaDA sampler, one forward pass per step)")
        else:
            ax.set_xlabel("mask ratio of the ELBO pass (fraction of answer tokens masked)\n"
                          "likelihood passes, not a generation")
        ax.set_ylabel("measured sparsity (%)")
        ax.set_title(", ".join(sorted({r["model"] for r in sel})), fontsize=9)
        ax.grid(alpha=0.3)
        if source == "generation":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    fig.suptitle("Diffusion model: measured sparsity per step", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(out_dir) / name)
