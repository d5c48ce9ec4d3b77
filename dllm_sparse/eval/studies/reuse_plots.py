"""Figures of the mask-reuse study (:mod:`dllm_sparse.eval.studies.reuse_study`, ``experiments/mask_reuse.py``).

Every function writes PNG files under ``fig_dir`` (matplotlib, Agg backend) and returns their paths:
overlap vs step gap (Jaccard and recall, per site and per layer), the step-by-step overlap matrix of the
``fresh`` runs, the tracker heatmaps (layer x step, vs the previous and the block-start step) and the
quality / cost trade-off of the policies.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

__all__ = ["plot_overlap", "plot_step_matrices", "plot_tracker_heatmaps", "plot_tradeoff"]


def _plt():
    import matplotlib.pyplot as plt  # the backend is the caller's choice (the scripts pick Agg)

    return plt


def plot_overlap(ov: list[dict], fig_dir: Path) -> list[str]:
    plt = _plt()
    paths = []
    sites = sorted({r["site"] for r in ov})
    for metric in ("jaccard", "recall"):
        fig, axes = plt.subplots(1, max(1, len(sites)), figsize=(5 * max(1, len(sites)), 3.8), squeeze=False)
        for ax, site in zip(axes[0], sites, strict=False):
            for kind, groups, style in (("diffusion", ("masked", "decoded", "newly_decoded"), "-"),
                                        ("ar", ("decoded",), "--")):
                for g in groups:
                    pts = {}
                    for r in ov:
                        if r["site"] == site and r["kind"] == kind and r["group"] == g:
                            pts.setdefault(int(r["gap"]), []).append((float(r[metric]), int(r["positions"])))
                    if not pts:
                        continue
                    xs = sorted(pts)
                    ys = [sum(v * n for v, n in pts[x]) / sum(n for _, n in pts[x]) for x in xs]
                    ax.plot(xs, ys, style, marker="o", label=f"{kind}: {g}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("step gap (AR: token gap)")
            ax.set_ylabel(metric)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"site {site}: {metric} vs gap (mean over tracked layers)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = fig_dir / f"overlap_vs_gap_{metric}.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(p))
    # per layer (diffusion, masked + decoded), one panel per site
    fig, axes = plt.subplots(1, max(1, len(sites)), figsize=(5 * max(1, len(sites)), 3.8), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=False):
        layers = sorted({int(r["layer"]) for r in ov if r["site"] == site and r["kind"] == "diffusion"})
        for layer in layers:
            for g, style in (("masked", "-"), ("decoded", ":")):
                pts = {}
                for r in ov:
                    if (r["site"], r["kind"], r["group"], int(r["layer"])) == (site, "diffusion", g, layer):
                        pts.setdefault(int(r["gap"]), []).append((float(r["jaccard"]), int(r["positions"])))
                xs = sorted(pts)
                if xs:
                    ys = [sum(v * n for v, n in pts[x]) / sum(n for _, n in pts[x]) for x in xs]
                    ax.plot(xs, ys, style, marker=".", label=f"L{layer} {g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("step gap")
        ax.set_ylabel("jaccard")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"diffusion, site {site}: per layer", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    p = fig_dir / "overlap_vs_gap_per_layer.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    paths.append(str(p))
    return paths


def plot_step_matrices(rows: list[dict], out_dir: Path, fig_dir: Path) -> list[str]:
    plt = _plt()
    paths = []
    for r in rows:
        if r.get("policy") != "fresh" or not r.get("step_matrix"):
            continue
        mat = np.load(out_dir / r["step_matrix"])
        fig, ax = plt.subplots(figsize=(5, 4.2))
        im = ax.imshow(mat, origin="lower", vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("step")
        ax.set_ylabel("step")
        _integer_ticks(ax)
        fig.colorbar(im, ax=ax, label="jaccard (generated positions)")
        ax.set_title(f"{r['site']}, layer {r['step_matrix_layer']}: mask overlap between steps", fontsize=9)
        fig.tight_layout()
        p = fig_dir / f"step_matrix_{r['site']}.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(p))
    return paths


def plot_tracker_heatmaps(rows: list[dict], out_dir: Path, fig_dir: Path) -> list[str]:
    plt = _plt()
    paths = []
    for r in rows:
        if r.get("policy") != "fresh" or not r.get("tracker_file") or r.get("kind") != "diffusion":
            continue
        data = list(csv.DictReader(open(out_dir / r["tracker_file"])))
        for ref in ("previous", "block_start"):
            sel = [d for d in data if d["reference"] == ref and d["group"] == "all" and d["jaccard"] not in ("", "nan")]
            if not sel:
                continue
            layers = sorted({int(d["layer"]) for d in sel})
            steps = sorted({int(d["step"]) for d in sel})
            m = np.full((len(layers), len(steps)), np.nan)
            for d in sel:
                m[layers.index(int(d["layer"])), steps.index(int(d["step"]))] = float(d["jaccard"])
            fig, ax = plt.subplots(figsize=(7, 2.5 + 0.3 * len(layers)))
            # The colour range spans the values shown (0-1 flattened the differences between layers).
            finite = m[np.isfinite(m)]
            vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if vmax - vmin < 1e-9:
                vmin, vmax = vmin - 0.01, vmax + 0.01
            im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", origin="lower", vmin=vmin, vmax=vmax,
                           cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(layers)), [str(x) for x in layers])
            ax.set_xticks(range(0, len(steps), max(1, len(steps) // 16)),
                          [str(steps[i]) for i in range(0, len(steps), max(1, len(steps) // 16))])
            ax.set_xlabel("step")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, label=f"jaccard (range {vmin:.3f}-{vmax:.3f})")
            ax.set_title(f"{r['site']}: jaccard vs {ref} step (all real positions)", fontsize=9)
            fig.tight_layout()
            p = fig_dir / f"heatmap_{r['site']}_{ref}.png"
            fig.savefig(p, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths.append(str(p))
    return paths


def plot_tradeoff(table: list[dict], fig_dir: Path) -> list[str]:
    """Quality (token agreement with ``fresh``) against cost, one marker per policy (legend), one colour per
    site: left, the fraction of token vectors the rule ran on; right, the FFN time per step and layer."""
    plt = _plt()
    diff = [t for t in table if t["kind"] == "diffusion" and t.get("agreement_vs_fresh") is not None]
    if not diff:
        return []
    sites = sorted({t["site"] for t in diff})
    policies = list(dict.fromkeys(t["policy"] for t in diff))
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    timed = False
    for si, site in enumerate(sites):
        for pi, pol in enumerate(policies):
            pts = [t for t in diff if t["site"] == site and t["policy"] == pol]
            style = {"color": colors[si % len(colors)], "marker": markers[pi % len(markers)], "s": 36,
                     "edgecolors": "black", "linewidths": 0.4}
            axes[0].scatter([t["selected_fraction"] for t in pts], [t["agreement_vs_fresh"] for t in pts], **style)
            tp = [t for t in pts if t.get("step_union_s")]
            if tp:
                timed = True
                axes[1].scatter([t["step_union_s"] * 1e3 for t in tp], [t["agreement_vs_fresh"] for t in tp],
                                **style)
    from matplotlib.lines import Line2D

    handles = ([Line2D([], [], color=colors[i % len(colors)], marker="o", ls="", label=f"site {s}")
                for i, s in enumerate(sites)]
               + [Line2D([], [], color="grey", marker=markers[i % len(markers)], ls="", label=p)
                  for i, p in enumerate(policies)])
    axes[0].set_xlabel("fraction of token vectors the rule ran on\n(1 = a fresh selection at every step)")
    axes[0].set_ylabel("token agreement with fresh")
    axes[0].set_title("selection work saved", fontsize=9)
    axes[1].set_xlabel("ms per step and layer, union-mask GEMM\n(CPU fallback kernels; matmul + selections)")
    axes[1].set_ylabel("token agreement with fresh")
    axes[1].set_title("FFN time" if timed else "FFN time (not measured in this run)", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="colour: site; "
               "marker: policy", title_fontsize=8)
    fig.suptitle("Mask reuse policies (diffusion twin): quality vs cost", fontsize=10)
    fig.tight_layout()
    p = fig_dir / "policy_tradeoff.png"
    fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [str(p)]


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
