"""Is the diffusion twin's higher sparsity tolerance real, or the mark of a weaker model? (docs/advantage.md)

    python experiments/advantage_study.py                 # default run, embedded pair, CPU (time in the README)
    python experiments/advantage_study.py --smoke         # every stage on a few items (a minute; the tests run it)
    python experiments/advantage_study.py --trajectory stage1=runs/mdm-stage1 s2-100=runs/mdm-s2/adapters/step-100

Steps, each resumable (rerun the same command after a kill: finished work is read back, nothing is recomputed):

1. Matched-weakness AR controls: the AR parent degraded by each ``--controls`` method (``noise``, ``quant``;
   :mod:`dllm_sparse.models.degrade`) and calibrated to ``--target-ppl`` on the held-out answers
   (:mod:`dllm_sparse.eval.studies.heldout`; default target: the twin's ELBO perplexity from its model card). A
   method that cannot reach the target stops the run with an error naming what it reached; nothing of it is written. The
   calibrations are stored in ``calibration.json`` with their identity (parent weights, target, tolerance,
   held-out rows, seeds); a rerun with other settings into the same folder is refused, naming what differs.
2. Training trajectory of the twin: the converted model before training, every ``--trajectory`` adapter, and the
   shipped twin, each with its held-out ELBO perplexity (``trajectory.json``, keyed the same way).
3. One sweep (:mod:`dllm_sparse.eval.sweep`, ``rows.jsonl``) of every model: the parent, the twin, the controls
   (named ``<parent>+<degradation id>``, so the degradation and its calibrated setting key their rows) and the
   trajectory points, on the same tasks, sites, grid and items.
4. Tables and verdicts: critical sparsity of every model (``critical_sparsity.md``, with the first crossing), the
   same with the continuous multiple-choice metric (``critical_sparsity_margin.md``), and per site the paired
   differences diffusion − AR, degraded-AR − AR, diffusion − degraded-AR with the verdict of the pre-stated rule
   (``advantage.md``, ``advantage.json``, ``comparison.csv``); figures under ``figures/``; ``summary.json`` with the
   time breakdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Only light modules before the arguments are parsed (--help answers without importing torch).
from dllm_sparse.hardware import machine_description
from dllm_sparse.sparsity.sites import ALL_SITES, SitesAction

REPO = Path(__file__).resolve().parents[1]
MODEL_CARD_EVAL = REPO / "dllm_sparse" / "data" / "smollm2-135m-mdm" / "eval_mc32.json"
DEFAULT_AR, DEFAULT_TWIN = "smollm2-135m", "smollm2-135m-mdm"
#: Stage-1 / stage-2 points of the shipped twin's training that were not kept (docs/advantage.md).
MISSING_POINTS = [
    {"point": "stage-1 adapter (205 steps, 221 k tokens)", "why": "only its logs were kept "
     "(dllm_sparse/data/smollm2-135m-mdm/history/stage1/); re-create it with `python experiments/"
     "adapt_ar_to_diffusion.py --corpus runs/corpus256 --max-steps 205 --export runs/mdm-stage1` (~30 min, 1 core) "
     "and pass --trajectory stage1=runs/mdm-stage1"},
    {"point": "checkpoints inside stage 2", "why": "stage 2 saved no intermediate adapters; re-run it with "
     "`--init-adapter runs/mdm-stage1 --max-steps 238 --no-bf16 --save-adapter-every 60 --run-dir runs/mdm-s2` "
     "(~60 min, 1 core) and pass each runs/mdm-s2/adapters/step-N as --trajectory s2-N=..."},
]


def model_card_target() -> tuple[float, str]:
    data = json.loads(MODEL_CARD_EVAL.read_text())
    p = data["perplexity"]
    return float(p["diffusion_elbo"]), (f"the twin's held-out ELBO perplexity from {MODEL_CARD_EVAL.relative_to(REPO)}"
                                       f" (mc_num {p['mc_num']}, {p['heldout_answers']} answers)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="runs/advantage", help="results folder (default: runs/advantage; a "
                                                                    "rerun resumes it)")
    ap.add_argument("--ar-model", default=DEFAULT_AR, help=f"the AR parent (default: {DEFAULT_AR})")
    ap.add_argument("--twin", default=DEFAULT_TWIN, help=f"the shipped diffusion twin (default: {DEFAULT_TWIN})")
    ap.add_argument("--controls", nargs="+", default=["noise", "quant"], choices=["noise", "quant"],
                    help="degradations of the parent, each calibrated to the target (default: noise quant)")
    ap.add_argument("--target-ppl", type=float, default=None,
                    help="held-out perplexity the controls are calibrated to (default: the twin's ELBO perplexity "
                         "in its model card, 31.541)")
    ap.add_argument("--tolerance", type=float, default=0.15,
                    help="a control is valid within this relative distance of the target (default: 0.15)")
    ap.add_argument("--heldout-rows", type=int, default=64, help="held-out answers scored (default: all 64)")
    ap.add_argument("--search-rows", type=int, default=16,
                    help="held-out answers the calibration search runs on before the full check (default: 16)")
    ap.add_argument("--noise-seed", type=int, default=0, help="seed of the noise control's ε (default: 0)")
    ap.add_argument("--sigma-max", type=float, default=1.0,
                    help="upper end of the noise control's σ search range, in units of each matrix's rms "
                         "(default: 1.0; the lower end is 1e-3)")
    ap.add_argument("--quant-group", type=int, default=32, help="group size of the quant control (default: 32)")
    ap.add_argument("--trajectory", nargs="*", default=[], metavar="LABEL=ADAPTER_DIR",
                    help="adapters of the twin's training to add to the trajectory (default: none; the converted "
                         "model and the shipped twin are always in it)")
    ap.add_argument("--ppl-mc-num", type=int, default=4,
                    help="ELBO samples per answer of the trajectory perplexities (default: 4)")
    ap.add_argument("--sites", nargs="+", action=SitesAction, default=[s.value for s in ALL_SITES],
                    help="FFN sites (default: all four)")
    ap.add_argument("--thresholds", nargs="+", type=float, default=None,
                    help="top-p thresholds (default: the quick grid 1 0.995 0.99 0.98 0.95 0.9)")
    ap.add_argument("--tasks", nargs="+", default=["builtin_mc", "builtin_ppl"],
                    help="tasks (default: builtin_mc builtin_ppl)")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--mc-num", type=int, default=2, help="ELBO samples per item in the sweep (default: 2, as "
                                                          "the main experiment on a CPU)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default: 16)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the sweep's ELBO masks (default: 1234)")
    ap.add_argument("--n-boot", type=int, default=1000,
                    help="bootstrap replicates (default: 1000; at least 1: the verdicts are read from the intervals)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--smoke", action="store_true",
                    help="every stage on a few items: 2 items per task, input site, thresholds 1 and 0.9, 4 "
                         "held-out answers, 200 replicates (default: off)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.limit = 2 if args.limit is None else args.limit  # a given --limit (0 too) is checked below
        args.sites = ["input"] if args.sites == [s.value for s in ALL_SITES] else args.sites
        args.thresholds = args.thresholds or [1.0, 0.9]
        args.heldout_rows, args.search_rows = min(args.heldout_rows, 4), min(args.search_rows, 2)
        args.n_boot = min(args.n_boot, 200)
        args.ppl_mc_num = min(args.ppl_mc_num, 2)
    for name in ("heldout_rows", "search_rows", "ppl_mc_num", "mc_num", "batch_size", "threads", "quant_group"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(args, name)}")
    if args.n_boot < 1:
        ap.error(f"--n-boot must be a whole number >= 1 (got {args.n_boot}): the study's verdicts are read from the "
                 "bootstrap intervals, so a run without them would have none (e.g. --n-boot 1000)")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be a whole number >= 1 (got {args.limit}); leave it out to use every item")
    if not args.sigma_max > 1e-3:
        ap.error(f"--sigma-max must be > 1e-3 (the lower end of the range), got {args.sigma_max}")
    if args.target_ppl is not None and not args.target_ppl > 0:
        ap.error(f"--target-ppl must be > 0 (got {args.target_ppl}); e.g. the twin's ELBO perplexity 31.5")
    traj = []
    for spec in args.trajectory:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path or "+" in label or "@" in label:
            ap.error(f"--trajectory takes LABEL=ADAPTER_DIR (a label without '+' or '@'), got {spec!r}")
        traj.append((label, Path(path)))
    args.trajectory = traj
    return args


def _stored(path: Path, identity: dict, what: str):
    """The entries of a cache file made with ``identity``; None when absent; an error naming the differences
    when it was made with other settings."""
    from dllm_sparse.eval.identity import describe_differences
    from dllm_sparse.eval.rows import read_json_or_none

    data = read_json_or_none(path)
    if data is None:
        return None
    diffs = describe_differences(data.get("identity", {}), identity)
    if diffs:
        raise SystemExit(f"{path} holds {what} made with other settings ({'; '.join(diffs)}); rerun with those "
                         "settings or use a fresh --output-dir")
    return data["entries"]


def _check_twin_base(args) -> None:
    """The embedded twin says which base it was trained from: the controls must degrade that parent."""
    if args.twin != DEFAULT_TWIN:
        return
    from dllm_sparse.models.adapt import read_adapter_meta
    from dllm_sparse.models.twin import SMOLLM2_MDM_ADAPTER

    base = read_adapter_meta(SMOLLM2_MDM_ADAPTER).get("base")
    if base != args.ar_model:
        raise SystemExit(f"--twin {DEFAULT_TWIN} was trained from {base!r}, not from --ar-model "
                         f"{args.ar_model!r}: the controls must degrade the twin's own parent")


def _load_parent_and_twin(args):
    """The AR parent and its diffusion twin (fp32), each checked for its kind before any work."""
    from dllm_sparse.models.loading import load_model

    parent = load_model(args.ar_model, dtype="fp32")
    if parent.kind != "ar":
        raise SystemExit(f"--ar-model {args.ar_model!r} is a {parent.kind} model; the parent must be autoregressive")
    twin = load_model(args.twin, dtype="fp32")  # before any work: the study compares a diffusion twin with its parent
    if twin.kind != "diffusion":
        raise SystemExit(f"--twin {args.twin!r} is an {twin.kind} model; the twin must be a masked-diffusion model "
                         f"(e.g. {DEFAULT_TWIN}, the diffusion twin of {DEFAULT_AR})")
    return parent, twin


def _calibrate_controls(args, out: Path, parent, parent_hash: str, rows_held, target: float, target_source: str,
                        phases: dict[str, float]) -> tuple[dict, dict]:
    """1. The controls, calibrated to the target perplexity (or read back), each stored as soon as it has
    succeeded. Returns (calibrations by method, {control name: (degraded copy, Calibration)})."""
    from dllm_sparse.eval.rows import atomic_write_json
    from dllm_sparse.eval.studies.heldout import Calibration, CalibrationError, calibrate
    from dllm_sparse.models.degrade import degraded_copy

    cal_identity = {"parent": args.ar_model, "parent_weights": parent_hash, "target": target,
                    "tolerance": args.tolerance, "heldout_rows": len(rows_held), "search_rows": args.search_rows,
                    "noise_seed": args.noise_seed, "quant_group": args.quant_group, "sigma_max": args.sigma_max}
    cal_path = out / "calibration.json"
    calibrations = dict(_stored(cal_path, cal_identity, "calibrations") or {})
    for method in args.controls:
        if method in calibrations:
            continue
        t = time.perf_counter()
        print(f"calibrating {method} to perplexity {target:.4g} ({target_source}) ...", flush=True)
        try:
            cal = calibrate(parent, method, target, rows_held, tolerance=args.tolerance,
                            search_rows=args.search_rows, seed=args.noise_seed, group=args.quant_group,
                            sigma_range=(1e-3, args.sigma_max))
        except CalibrationError as e:
            raise SystemExit(f"control {method!r} cannot be calibrated: {e}. Nothing of it was written.") from None
        calibrations[method] = {**cal.to_dict(), "seconds": time.perf_counter() - t}
        phases[f"calibrating {method}"] = time.perf_counter() - t
        # Kept at once (a complete entry; a kill in the next calibration does not lose this one). A control that
        # failed above wrote nothing, and a fresh folder is made only once a calibration has succeeded.
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cal_path, {"identity": cal_identity, "target_source": target_source,
                                     "entries": calibrations})
        print(f"  {cal.degradation.id}: perplexity {cal.ppl:.4g} ({100 * (cal.ppl / target - 1):+.1f} % from the "
              f"target; parent {cal.parent_ppl:.4g}) in {len(cal.steps)} evaluations", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cal_path, {"identity": cal_identity, "target_source": target_source, "entries": calibrations})
    controls = {}
    for method in args.controls:
        cal = Calibration.from_dict(calibrations[method])
        lm = degraded_copy(parent, cal.degradation)
        controls[lm.name] = (lm, cal)
    return calibrations, controls


def _trajectory_points(args, parent, twin) -> list:
    """The twin's training trajectory: (model, info) from the converted untrained twin to the shipped one."""
    from dllm_sparse.models.adapt import read_adapter_meta
    from dllm_sparse.models.twin import adapted_twin, untrained_twin

    points = [(untrained_twin(parent), {"label": "converted, untrained", "tokens": 0})]
    for label, path in args.trajectory:
        try:
            lm = adapted_twin(parent, path, f"{args.twin}@{label}")
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--trajectory {label}={path}: {e}") from None
        meta = read_adapter_meta(path)
        # tokens_total: all stages (a stage-2 adapter counts the stage-1 tokens it started from)
        points.append((lm, {"label": label, "tokens": meta.get("tokens_total", meta.get("tokens")),
                            "step": meta.get("step")}))
    points.append((twin, {"label": "shipped (stage 2)", "tokens": _shipped_tokens()}))
    return points


def _trajectory_perplexities(args, out: Path, points: list, rows_held, parent_hash: str) -> dict:
    """2. The held-out ELBO perplexity of every trajectory point (kept per point; reused when its weights match)."""
    from dllm_sparse.eval.identity import weights_hash
    from dllm_sparse.eval.rows import atomic_write_json
    from dllm_sparse.eval.studies.heldout import heldout_perplexity

    traj_identity = {"heldout_rows": len(rows_held), "mc_num": args.ppl_mc_num, "mc_batch": min(8, args.ppl_mc_num),
                     "seed": 0, "parent_weights": parent_hash}
    traj_path = out / "trajectory.json"
    traj = dict(_stored(traj_path, traj_identity, "trajectory perplexities") or {})
    for lm, info in points:
        h = weights_hash(lm.model)
        if lm.name in traj and traj[lm.name]["weights"] == h:
            traj[lm.name] = {**traj[lm.name], **info}  # the perplexity is kept; label and tokens are this run's
            continue
        print(f"held-out ELBO perplexity of {lm.name} (mc_num {args.ppl_mc_num}) ...", flush=True)
        p = heldout_perplexity(lm, rows_held, mc_num=args.ppl_mc_num, mc_batch=min(8, args.ppl_mc_num), seed=0)
        traj[lm.name] = {**info, "weights": h, "elbo_ppl": p}
        atomic_write_json(traj_path, {"identity": traj_identity, "entries": traj})
        print(f"  {p:.4g}", flush=True)
    atomic_write_json(traj_path, {"identity": traj_identity, "entries": traj})
    return traj


def _sweep_rows(args, out: Path, models: list) -> tuple[list[dict], dict[str, float]]:
    """3. The sweep of every model: its rows, and the cell seconds per model."""
    from dllm_sparse.eval.sweep.config import SweepConfig, grid, planned_keys
    from dllm_sparse.eval.sweep.run import run_sweep

    cfg = SweepConfig(models=models, output_dir=out, sites=args.sites, thresholds=args.thresholds or grid("quick"),
                      tasks=args.tasks, limit=args.limit, mc_num=args.mc_num, mc_batch=min(16, args.mc_num),
                      batch_size=args.batch_size, seed=args.seed, dtype="fp32", device="cpu",
                      progress=not args.no_progress)
    rows = [r for r in run_sweep(cfg) if r["key"] in planned_keys(cfg)]
    per_model: dict[str, float] = {}
    for r in rows:
        per_model[r["model"]] = per_model.get(r["model"], 0.0) + (r.get("seconds") or 0.0)
    return rows, per_model


def _comparisons(args, out: Path, rows: list[dict], controls: dict, twin, parent) -> tuple[dict, dict, dict, list]:
    """4a. Critical sparsity tables (with the margin metric on builtin_mc) and the twin-vs-parent-vs-controls
    comparisons. Returns (comparisons by variant, control labels, write_critical's paths, margin table)."""
    from dllm_sparse.eval.analysis.critical import (
        critical_replicates,
        critical_table,
        markdown_report,
        model_differences,
        write_critical,
    )
    from dllm_sparse.eval.rows import atomic_write_text
    from dllm_sparse.eval.studies.advantage import site_comparisons

    paths = write_critical(rows, out, n_boot=args.n_boot)
    boot = paths["bootstrap"]
    margin = {"builtin_mc": "margin"} if "builtin_mc" in args.tasks else None
    table_m = critical_table(rows, metric=margin, boot=boot) if margin else []
    reps = critical_replicates(rows, boot)
    reps_m = critical_replicates(rows, boot, metric=margin) if margin else {}
    if margin:
        kinds = {r["model"]: r.get("kind", "") for r in rows}
        atomic_write_text(out / "critical_sparsity_margin.md",
                          markdown_report(table_m, boot=boot, diffs=model_differences(reps_m, kinds, boot)).replace(
                              "# Critical sparsity", "# Critical sparsity with the margin metric on builtin_mc", 1))
    valid = {name: cal.within for name, (_, cal) in controls.items()}
    labels = {name: name.split("+", 1)[1].split(":")[0] for name in controls}
    kw = {"twin": twin.name, "parent": parent.name, "controls": valid}
    recs = {"primary": site_comparisons(reps, boot, variant="interpolated", **kw),
            "first_crossing": site_comparisons(reps, boot, variant="first_crossing", **kw),
            "margin": site_comparisons(reps_m, boot, variant="interpolated", **kw) if margin else []}
    return recs, labels, paths, table_m


def _comparison_rows(recs: dict, labels: dict, controls: dict) -> list[dict]:
    """4b. One row per variant, site and comparison (percent points), for comparison.csv."""
    flat = []
    for variant, rs in recs.items():
        for r in rs:
            for what, d in [("twin - parent", r["twin_minus_parent"]),
                            *[(f"{labels[c]} - parent", r["control_minus_parent"][c]) for c in controls],
                            *[(f"twin - {labels[c]}", r["twin_minus_control"][c]) for c in controls]]:
                flat.append({"variant": variant, "site": r["site"], "comparison": what,
                             **({k: (round(100 * v, 4) if k in ("median", "lo", "hi") else v) for k, v in d.items()}
                                if d else {}), "verdict": r["verdict"]})
    return flat


def main(argv=None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import torch

    torch.set_num_threads(args.threads)
    import dllm_sparse  # noqa: F401  (registers the embedded models)
    from dllm_sparse.eval.analysis.plots import plot_relative_performance
    from dllm_sparse.eval.identity import weights_hash
    from dllm_sparse.eval.rows import atomic_write_csv, atomic_write_json, atomic_write_text
    from dllm_sparse.eval.studies.advantage import comparisons_markdown, plot_advantage, study_report
    from dllm_sparse.eval.studies.heldout import check_target, heldout_answers

    out = Path(args.output_dir)
    _check_twin_base(args)
    phases: dict[str, float] = {}
    target, target_source = (args.target_ppl, "--target-ppl") if args.target_ppl else model_card_target()
    target = check_target(target)
    t = time.perf_counter()
    parent, twin = _load_parent_and_twin(args)
    rows_held = heldout_answers(parent.tokenizer, limit=args.heldout_rows)
    parent_hash = weights_hash(parent.model)
    phases["loading the parent and the twin"] = time.perf_counter() - t
    calibrations, controls = _calibrate_controls(args, out, parent, parent_hash, rows_held, target, target_source,
                                                 phases)
    t = time.perf_counter()
    points = _trajectory_points(args, parent, twin)
    phases["loading the trajectory points"] = time.perf_counter() - t
    t = time.perf_counter()
    traj = _trajectory_perplexities(args, out, points, rows_held, parent_hash)
    phases["trajectory perplexities"] = time.perf_counter() - t
    t = time.perf_counter()
    models = [parent, twin, *[lm for lm, _ in controls.values()], *[lm for lm, _ in points if lm is not twin]]
    rows, per_model = _sweep_rows(args, out, models)
    phases["sweep (all models)"] = time.perf_counter() - t

    # 4. Tables, verdicts, figures.
    t = time.perf_counter()
    recs, labels, paths, table_m = _comparisons(args, out, rows, controls, twin, parent)
    missing = [] if args.trajectory else MISSING_POINTS  # points passed: the table lists what the run holds
    report = study_report(recs, labels, calibrations, traj, paths["table"], table_m, target, target_source,
                          missing, twin.name, parent.name)
    atomic_write_text(out / "advantage.md", report)
    atomic_write_json(out / "advantage.json", {"comparisons": recs, "calibration": calibrations,
                                               "trajectory": traj, "missing_points": missing,
                                               "target": target, "target_source": target_source})
    atomic_write_csv(out / "comparison.csv", _comparison_rows(recs, labels, controls),
                     ["variant", "site", "comparison", "median", "lo", "hi", "replicates", "replicates_drawn",
                      "p_at_least_0", "bound", "verdict"])
    phases["tables + bootstrap + verdicts"] = time.perf_counter() - t
    t = time.perf_counter()
    figs = plot_advantage(paths["table"], traj, calibrations, controls={n: c.ppl for n, (_, c) in controls.items()},
                          parent=parent.name, parent_ppl=next(iter(calibrations.values()))["parent_ppl"]
                          if calibrations else None, out_dir=out / "figures")
    figs += plot_relative_performance(rows, out / "figures", boot=paths["bootstrap"])
    phases["figures"] = time.perf_counter() - t
    wall = time.perf_counter() - t0
    summary = {"wall_seconds": wall, "phases_seconds": phases, "sweep_cell_seconds_per_model": per_model,
               "machine": machine_description(args.threads), "smoke": args.smoke,
               "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
               "figures": [str(p) for p in figs]}
    atomic_write_json(out / "summary.json", summary)
    print()
    for variant in ("primary", "first_crossing", "margin"):
        if recs[variant]:
            print(f"[{variant}]")
            print(comparisons_markdown(recs[variant], labels))
            print()
    print(f"report: {out / 'advantage.md'}\nwall time {wall / 60:.1f} min; phases (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    return 0


def _shipped_tokens() -> int | None:
    """Training tokens seen by the shipped twin: stage 1 + stage 2 (their logs)."""
    base = REPO / "dllm_sparse" / "data" / "smollm2-135m-mdm"
    try:
        return sum(json.loads(p.read_text())["tokens"] for p in (base / "history" / "stage1" / "train_log.json",
                                                                  base / "train_log.json"))
    except (OSError, KeyError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
