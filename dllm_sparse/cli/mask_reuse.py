"""Mask reuse across denoising steps: how stable are FFN keep-masks, and what does reusing them cost and buy?

    dllm-sparse mask-reuse                                   # offline default, < 10 min on a CPU
    dllm-sparse mask-reuse --model /ckpt/LLaDA-8B-Instruct --ar-model /ckpt/Llama-3.1-8B-Instruct \\
        --device cuda --dtype bf16 --gen-length 128 --steps 128 --block-length 32 --prompts 8 \\
        --track-layers 0,8,16,24,31 --output-dir runs/mask_reuse_llada8b

Two studies, one site and one top-p threshold per cell (``docs/sparsification.md``, "Mask reuse across
denoising steps"; policies in :mod:`dllm_sparse.samplers.reuse`):

1. **Overlap vs step gap.** The ``fresh`` run of every site carries a :class:`MaskOverlapTracker` on a few
   layers; the stored masks give, for every pair of steps (t - g, t), the per-position Jaccard |A∩B|/|A∪B|
   and recall of the fresh mask |A∩B|/|A|, for gaps g = 1, 2, 4, 8, ... per layer and position group:
   ``masked`` (mask token at both steps), ``decoded`` (same token at both steps), ``newly_decoded`` (decoded
   in between: its input changed), ``prompt``. For the AR twin the same numbers compare the masks of decoded
   tokens g apart (what "reuse the last decoded token's mask" would reuse). Heatmaps and line plots (PNG).
2. **Policy sweep.** For every policy and site at the same p: greedy generations, token agreement with the
   ``fresh`` policy (and with dense), measured sparsity, number of mask selections, and with the kernels
   (:func:`dllm_sparse.kernels.column_sparse_matmul`) the time per step of the FFN matrices the site can skip,
   on the masks actually recorded at a few layers and steps: one gathered GEMM over the union of the step's
   masks (what a mask shared by all tokens of a step allows) vs one GEMV per token with its own mask, plus
   the selection cost on the steps where the policy selects. On a CPU these are PyTorch-fallback timings
   (labelled so), useful for the ratios, not as GPU numbers.

ELBO quality is not measured: :class:`dllm_sparse.eval.scoring.scorer.Scorer` attaches its sparsity without a mask
selector, and its Monte-Carlo forwards are independent single passes with no denoising trajectory to reuse
masks along.

Outputs (``--output-dir``, default ``runs/mask_reuse``): ``cells.jsonl`` (one row per finished cell, appended
atomically; a rerun skips finished cells), ``policies.csv`` (tidy, with the relative quality filled in),
``overlap.csv`` (overlap vs gap), ``overlap_steps/*.csv`` (tracker rows per step), ``figures/*.png``,
``summary.md``. Models: ``--model`` defaults to the embedded ``smollm2-135m-mdm``; when its adapter is not
installed the script falls back to the *untrained* converted twin of SmolLM2-135M (bidirectional attention,
mask token added, no adaptation) and says so in every output.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dllm_sparse.models.loading import LoadedModel

# Only light modules here, so that --help answers at once; torch and the study's modules are imported after
# the arguments are parsed.
from dllm_sparse.sparsity.sites import SitesAction

# This file is the command line: the study itself (cells, recorders, overlap analysis, kernel timing, the policy
# table) is dllm_sparse.eval.studies.reuse_study, the figures dllm_sparse.eval.studies.reuse_plots, the
# teacher-forced replay dllm_sparse.samplers.replay, the resumable cells.jsonl dllm_sparse.eval.rows.
PROBE = Path(__file__).resolve().parents[1] / "data" / "capability_probe.jsonl"  # installed with the package
DEFAULT_POLICIES = "fresh,every2,every4,block_start,adaptive0.7,adaptive0.8"
GROUPS = ("all", "masked", "decoded", "newly_decoded", "prompt")


# ----------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-mdm",
                    help="diffusion model: embedded name, local dir or hub id (default: %(default)s; falls back to "
                         "the untrained converted SmolLM2-135M twin when the embedded adapter is missing)")
    ap.add_argument("--ar-model", default="smollm2-135m",
                    help="AR model for the contrast ('none' to skip; default: %(default)s)")
    ap.add_argument("--no-fallback", action="store_true",
                    help="fail instead of falling back to the untrained twin when --model cannot be loaded")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: %(default)s)")
    ap.add_argument("--dtype", default=None, help="model dtype: float32, bf16, fp16 (default: as stored)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--sites", nargs="+", action=SitesAction, default=["input", "intermediate"],
                    help="FFN sites, space-separated (default: input intermediate)")
    ap.add_argument("--p", type=float, default=0.9, help="top-p threshold of every cell (default: %(default)s)")
    ap.add_argument("--scope", choices=("token", "step", "step_wina"), default="token",
                    help="top-p scope: per token (default), or one keep-set per sample and step shared by its "
                         "tokens (step; step_wina weighs it by weight-column norms), which the policies then reuse")
    ap.add_argument("--policies", default=DEFAULT_POLICIES,
                    help="reuse policies: fresh, every<k>, block_start, adaptive<bound> (default: %(default)s)")
    ap.add_argument("--new-positions", choices=("fresh", "reuse"), default="fresh",
                    help="positions decoded since their cached mask: fresh selection or reuse (default: %(default)s)")
    ap.add_argument("--probe-layer", default="middle",
                    help="Adaptive: probe layer: 'middle' (median sparsified layer), 'first' or an index "
                         "(default: %(default)s)")
    ap.add_argument("--probe-region", choices=("generated", "all"), default="generated",
                    help="Adaptive: positions the probe compares (default: %(default)s)")
    ap.add_argument("--probe-positions", type=int, default=None,
                    help="Adaptive: compare only this many positions (default: all reusable positions)")
    ap.add_argument("--probe-metric", choices=("jaccard", "recall"), default="jaccard",
                    help="Adaptive: overlap metric (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=2,
                    help="number of prompts from dllm_sparse/data/capability_probe.jsonl (default: %(default)s)")
    ap.add_argument("--prompt-file", default=None, help="JSONL with a 'prompt' field per line instead")
    ap.add_argument("--no-chat-template", action="store_true", help="feed raw prompts (default: chat template)")
    ap.add_argument("--gen-length", type=int, default=32,
                    help="diffusion canvas / AR new tokens (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=16, help="denoising steps (default: %(default)s)")
    ap.add_argument("--block-length", type=int, default=16, help="block length (default: %(default)s)")
    ap.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (default: %(default)s)")
    ap.add_argument("--track-layers", default=None,
                    help="layers of the overlap tracker, comma-separated (default: 4 evenly spaced layers)")
    ap.add_argument("--gaps", default="1,2,4,8,16", help="step gaps of the overlap analysis (default: %(default)s)")
    ap.add_argument("--kernel-layers", default=None,
                    help="layers whose recorded masks are timed with the kernels (default: 2 tracked layers; "
                         "'none' skips the timing)")
    ap.add_argument("--kernel-steps", type=int, default=0,
                    help="steps whose masks are timed, from the start of the 2nd block (default: 0 = the whole "
                         "block, so each policy's mix of selecting and reusing steps is timed)")
    ap.add_argument("--kernel-repeats", type=int, default=3, help="timing repeats, median (default: %(default)s)")
    ap.add_argument("--ar-policies", default="fresh,every2,every4,block_start",
                    help="policies also run on the AR model ('none' to skip; default: %(default)s)")
    ap.add_argument("--teacher-forced", action="store_true",
                    help="also replay the dense run's trajectory with every policy and report the per-step argmax "
                         "agreement at still-masked positions with dense and fresh (one extra pass per cell)")
    ap.add_argument("--passages", type=int, default=4,
                    help="built-in held-out passages for the likelihood check (diffusion; 0 to skip): each "
                         "configuration scores the same passages along the same random reveal order (default: "
                         "%(default)s)")
    ap.add_argument("--passage-prompt-len", type=int, default=8,
                    help="tokens of each passage given as the prompt (default: %(default)s)")
    ap.add_argument("--output-dir", default="runs/mask_reuse", help="output folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (default: %(default)s)")
    return ap.parse_args(argv)


def _probe_layer(v: str) -> int | str:
    return int(v) if str(v).lstrip("-").isdigit() else str(v)


def _csv_list(s: str | None) -> list[str]:
    return [] if s is None or s.strip().lower() in ("", "none") else [t.strip() for t in s.split(",") if t.strip()]


# ----------------------------------------------------------------------------------------------------------------
# models and prompts
# ----------------------------------------------------------------------------------------------------------------


def load_diffusion(name: str, dtype, device, allow_fallback: bool) -> tuple[LoadedModel, str]:
    from dllm_sparse.models.loading import LoadedModel, load_model

    """(model, note). Falls back to the untrained converted SmolLM2-135M twin when the embedded adapter is absent."""
    try:
        lm = load_model(name, dtype=dtype, device=None if device == "cpu" else device)
        if lm.kind != "diffusion":
            raise ValueError(f"{name} loaded as a {lm.kind!r} model; --model must be a masked-diffusion LM")
        return lm, ""
    except (FileNotFoundError, OSError) as e:
        if not allow_fallback or name != "smollm2-135m-mdm":
            raise
        from dllm_sparse.models.adapt import add_mask_token, convert_causal_lm

        base = load_model("smollm2-135m", dtype=dtype)
        model = convert_causal_lm(base.model).eval()
        mask_id = add_mask_token(model, base.tokenizer)
        if device not in (None, "cpu", "auto"):
            model = model.to(device)
        note = (f"FALLBACK: load_model('smollm2-135m-mdm') failed ({type(e).__name__}: {str(e)[:160]}). Using the "
                "UNTRAINED converted twin of SmolLM2-135M (bidirectional attention, mean-embedding mask token, no "
                "adaptation): its generations are not meaningful text, so token agreement measures the stability "
                "of the sampler's trajectory, not task quality.")
        return LoadedModel(model, base.tokenizer, "diffusion", "smollm2-135m-mdm[untrained-fallback]", mask_id,
                           "llada"), note


def load_prompts(args) -> tuple[list[str], list[list[str]] | None]:
    """Prompts, and their keywords when the file has them (the capability probe does: the task metric)."""
    path = Path(args.prompt_file) if args.prompt_file else PROBE
    rows = [json.loads(line) for line in path.open() if line.strip()][: args.prompts]
    keywords = [r["keywords"] for r in rows] if all("keywords" in r for r in rows) else None
    return [r["prompt"] for r in rows], keywords


def encode(tok, prompts: list[str], chat: bool) -> list[list[int]]:
    out = []
    for p in prompts:
        if chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tok(p, add_special_tokens=True)["input_ids"]
        out.append([int(i) for i in ids])
    return out


def _f(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_summary(out_dir: Path, args, notes: list[str], table: list[dict], ov: list[dict], figs: list[str],
                  wall: float, cells_s: float = float("nan")) -> None:
    from dllm_sparse.eval.rows import atomic_write_text
    from dllm_sparse.samplers import validate_geometry

    L = ["# Mask reuse across denoising steps", ""]
    L += [f"Settings: p = {args.p} (top-p), sites {args.sites}, gen_length {args.gen_length}, steps {args.steps}, "
          f"block_length {args.block_length}, cfg {args.cfg_scale}, {args.prompts} prompt(s), new positions: "
          f"{args.new_positions}, tracked layers {args.track_layers_list}. Wall time of this invocation: "
          f"{wall:.0f} s (finished cells of earlier runs are not recomputed); sum of the cells' own times "
          f"{cells_s:.0f} s.", ""]
    for n in notes:
        L += [f"> **{n}**", ""]
    L += ["## Overlap vs step gap (fresh masks, mean over tracked layers, position-weighted)", "",
          "| model kind | site | group | " + " | ".join(f"gap {g}" for g in args.gaps_list) + " |",
          "|---|---|---|" + "---|" * len(args.gaps_list)]
    for kind in ("diffusion", "ar"):
        for site in sorted({r["site"] for r in ov}):
            for g in ("masked", "decoded", "newly_decoded") if kind == "diffusion" else ("decoded",):
                cells = []
                for gap in args.gaps_list:
                    pts = [r for r in ov if r["kind"] == kind and r["site"] == site and r["group"] == g
                           and int(r["gap"]) == gap]
                    n = sum(int(r["positions"]) for r in pts)
                    if n:
                        j = sum(float(r["jaccard"]) * int(r["positions"]) for r in pts) / n
                        rc = sum(float(r["recall"]) * int(r["positions"]) for r in pts) / n
                        cells.append(f"{j:.3f} / {rc:.3f}")
                    else:
                        cells.append("–")
                if any(c != "–" for c in cells):
                    L.append(f"| {kind} | {site} | {g} | " + " | ".join(cells) + " |")
    L += ["", "Cells: Jaccard / recall of the fresh mask, pooled over all step pairs (t - g, t); gaps of "
          f"{validate_geometry(args.gen_length, args.steps, args.block_length)[1]} steps or more cross a block "
          "boundary (reuse policies restart at each block). AR: masks of decoded tokens g tokens apart.", "",
          "## Policy sweep", "",
          "| kind | site | policy | agree vs fresh | edit-sim vs fresh | same prefix | agree vs dense "
          "| edit-sim vs dense | sparsity | selections/layer | partial | probe | rule ran on | ms/step union "
          "| ms/step per-token | ms dense | union / dense | per-token / dense | selection / dense |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        ms = (lambda v: _f(v * 1e3 if v is not None else None, 2))
        L.append(f"| {t['kind']} | {t['site']} | {t['policy']} | {_f(t['agreement_vs_fresh'])} | "
                 f"{_f(t['edit_sim_vs_fresh'])} | {_f(t['first_diff_vs_fresh'], 1)} | "
                 f"{_f(t['agreement_vs_dense'])} | {_f(t['edit_sim_vs_dense'])} | {_f(t['sparsity'])} | "
                 f"{_f(t['selections_per_layer_mean'], 1)} | {t['partial_selections']} | {t['probe_selections']} | "
                 f"{_f(t['selected_fraction'])} | {ms(t.get('step_union_s'))} | {ms(t.get('step_per_token_s'))} | "
                 f"{ms(t.get('dense_s'))} | {_f(t.get('union_vs_dense'), 2)} | {_f(t.get('per_token_vs_dense'), 2)} | "
                 f"{_f(t.get('select_vs_dense'), 2)} |")
    tf = [t for t in table if t.get("tf_agreement_vs_dense") is not None]
    if tf:
        L += ["", "Teacher-forced (the dense run's trajectory replayed with each configuration; per-step argmax "
              "agreement at the still-masked positions of the current block):", "",
              "| site | policy | agree vs dense | agree vs fresh |", "|---|---|---|---|"]
        L += [f"| {t['site']} | {t['policy']} | {_f(t['tf_agreement_vs_dense'])} | "
              f"{_f(t.get('tf_agreement_vs_fresh'))} |" for t in tf]
    q = [t for t in table if t.get("elbo_nll_per_token") is not None or t.get("task_acc") is not None]
    if q:
        L += ["", "Likelihood and task metric. 'NLL/token' = negative log-likelihood per token of "
              f"{len(args.passage_ids)} "
              "built-in held-out passages written along one fixed random reveal order per passage (the sampler's "
              "geometry; the same order for every configuration, so differences are not sampling noise): an "
              "any-order bound on the passage likelihood, the ELBO-type quantity reuse acts on. 'task' = fraction of "
              "the capability-probe prompts whose generation contains the expected keyword.", "",
              "| kind | site | policy | NLL/token | Δ vs fresh | Δ vs dense | task | task (dense) |",
              "|---|---|---|---|---|---|---|---|"]
        L += [f"| {t['kind']} | {t['site']} | {t['policy']} | {_f(t.get('elbo_nll_per_token'))} | "
              f"{_f(t.get('elbo_diff_vs_fresh'))} | {_f(t.get('elbo_diff_vs_dense'))} | {_f(t.get('task_acc'), 2)} | "
              f"{_f(t.get('dense_task_acc'), 2)} |" for t in q]
    L += ["", "Quality columns: 'agree' = fraction of generated positions with the same token; 'edit-sim' = "
          "difflib ratio of the token sequences (robust to shifted text); 'same prefix' = generated tokens before the "
          "first difference (mean over prompts)."]
    backend = next((t["kernel_backend"] for t in table if t.get("kernel_backend")), None)
    dens = [(t["site"], t["kernel_density"], t["kernel_union_density"]) for t in table
            if t.get("kernel_union_density") is not None and t["policy"] == "fresh"]
    L += ["", "Kernel masks (fresh policy): " + "; ".join(
        f"{site}: mean per-token density {d:.3f}, union over the step's tokens {u:.3f}" for site, d, u in dens)
        + ". AR rows reuse the mask of the last refreshed token for the next tokens (different positions)."]
    ad = [t for t in table if t.get("probe_overlap_mean") is not None]
    if ad:
        L += ["", "Adaptive probes: " + "; ".join(
            f"{t['kind']} {t['site']} {t['policy']}: mean probe overlap {t['probe_overlap_mean']:.3f}, "
            f"{t['probe_refreshes']} refreshes" for t in ad) + "."]
    L += ["", "\"rule ran on\": fraction of token vectors the selection rule ran on (full + partial + probe). "
          "Times: per step and per tracked layer, for the FFN matrices the site's mask can skip (input: W_gate and "
          "W_up; other sites: W_down), measured with `column_sparse_matmul` on the masks recorded at "
          f"{args.kernel_steps or 'all'} steps of the 2nd block; backend `{backend}`"
          + (" (PyTorch fallback on CPU: ratios only, not GPU speed)" if backend != "triton" else "") + ". "
          "'union' = one gathered GEMM over the union of the step's masks (a mask shared by all tokens); "
          "'per-token' = one GEMV per token with its own mask; both include the selection cost of the steps the "
          "policy selects.", "",
          "", "## Figures", ""]
    L += [f"- `{os.path.relpath(f, out_dir)}`" for f in figs]
    atomic_write_text(out_dir / "summary.md", "\n".join(L) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def _policy_lists(args) -> tuple[list[str], list[str]]:
    """The diffusion and AR policies, ``fresh`` first (the reference of every other), each checked by name."""
    from dllm_sparse.samplers.reuse import make_policy

    policies = _csv_list(args.policies)
    if "fresh" not in policies:
        policies = ["fresh", *policies]
    ar_policies = _csv_list(args.ar_policies)
    if ar_policies and "fresh" not in ar_policies:
        ar_policies = ["fresh", *ar_policies]
    for spec in {*policies, *ar_policies}:
        make_policy(spec)  # fail early on a typo
    return policies, ar_policies


def _model_note(args, note: str) -> str | None:
    """What the outputs say about the diffusion model: the fallback's note, or the embedded twin's adapter."""
    if note:
        return note
    if args.model == "smollm2-135m-mdm":
        from dllm_sparse.models.adapt import adapter_hash
        from dllm_sparse.models.twin import SMOLLM2_MDM_ADAPTER

        return (f"Diffusion model: the embedded smollm2-135m-mdm (adapter {adapter_hash(SMOLLM2_MDM_ADAPTER)}, "
                "SmolLM2-135M adapted to masked diffusion with LoRA; see dllm_sparse/data/smollm2-135m-mdm).")
    return None


@dataclass
class _Study:
    """What every cell of a run shares: its settings and where finished cells go."""

    args: argparse.Namespace
    prompts: list[str]
    settings: Any  # dllm_sparse.eval.studies.reuse_study.StudySettings
    kernel_layers: list[int]
    kernel_steps: list[int]
    note: str
    out_dir: Path
    done: dict = field(default_factory=dict)  # key -> finished row
    planned: set = field(default_factory=set)  # the keys of this run's cells
    writer: Any = None


def _study_settings(args, lm: LoadedModel) -> tuple[Any, Any, list[int], list[int], list[str]]:
    """(generation config, StudySettings, kernel layers, kernel steps, prompts) of the diffusion cells; fills
    ``args.track_layers_list``, ``args.keywords`` and the passages (the summary reads them)."""
    from dllm_sparse.eval.studies.reuse_study import StudySettings, n_layers, passage_trajectories, spread
    from dllm_sparse.samplers import GenerationConfig, resolve_geometry

    args.track_layers_list = ([int(x) for x in _csv_list(args.track_layers)] if args.track_layers
                              else spread(n_layers(lm.model), 4))
    if args.kernel_layers and args.kernel_layers.lower() == "none":
        kernel_layers = []
    elif args.kernel_layers:
        kernel_layers = [int(x) for x in _csv_list(args.kernel_layers)]
    else:
        kernel_layers = args.track_layers_list[1:3] or args.track_layers_list[:1]
    prompts, args.keywords = load_prompts(args)
    gcfg = GenerationConfig(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                            cfg_scale=args.cfg_scale, stop_token_ids=(), seed=args.seed)
    args.passage_ids, args.passage_traj = (passage_trajectories(lm.tokenizer, gcfg, args.passages,
                                                                args.passage_prompt_len, args.seed)
                                           if args.passages > 0 else ([], []))
    settings = StudySettings(p=args.p, scope=args.scope, new_positions=args.new_positions,
                             probe_layer=_probe_layer(args.probe_layer),
                             probe_region=args.probe_region, probe_positions=args.probe_positions,
                             probe_metric=args.probe_metric, track_layers=args.track_layers_list, gaps=args.gaps_list,
                             kernel_repeats=args.kernel_repeats, teacher_forced=args.teacher_forced,
                             passage_ids=args.passage_ids, passage_trajectory=args.passage_traj, keywords=args.keywords)
    spb = resolve_geometry(gcfg).steps_per_block
    first = spb if args.steps > spb else 0
    kernel_steps = list(range(first, min(args.steps, first + (args.kernel_steps or spb))))
    return gcfg, settings, kernel_layers, kernel_steps, prompts


def _cell_base(study: _Study, model_lm: LoadedModel, kind: str, site, pol, g_cfg, ids, loaded: dict) -> dict:
    """The settings that identify one cell (its key)."""
    args = study.args
    return {"model": model_lm.name, "kind": kind, "site": site, "policy": pol or "dense", "p": args.p,
            "new_positions": args.new_positions, "gen": g_cfg.to_dict(), "prompts": ids,
            "probe": [args.probe_layer, args.probe_positions, args.probe_metric, args.probe_region]
            if pol and "adaptive" in pol else None, "track": args.track_layers_list if pol == "fresh" else None,
            "kernel": [study.kernel_layers, study.kernel_steps] if kind == "diffusion" and pol else None,
            "tf": bool(args.teacher_forced and kind == "diffusion"),
            "elbo": [len(args.passage_ids), args.passage_prompt_len] if kind == "diffusion" else None,
            "task": bool(args.keywords), **loaded,
            **({"scope": args.scope} if args.scope != "token" else {})}  # token keys stay as they were


def _run_cells(study: _Study, model_lm: LoadedModel, kind: str, pols: list[str], g_cfg) -> None:
    """Run (or skip, when finished) the dense cell and every site x policy cell of one model."""
    from tqdm.auto import tqdm

    from dllm_sparse.eval.studies.reuse_study import MODEL_FIELDS, cell_key, model_fields, run_cell

    args, done = study.args, study.done
    ids = encode(model_lm.tokenizer, study.prompts, not args.no_chat_template)
    loaded = model_fields(model_lm)  # weights hash, dtype, device type: part of every key
    plan = [(None, None)] + [(s, p) for s in args.sites for p in pols]
    # a bar over this model's cells, on stderr, hidden when it is not a terminal
    bar = tqdm(plan, desc=f"mask-reuse {kind}", unit="cell", file=sys.stderr, disable=None, dynamic_ncols=True)
    for site, pol in bar:
        key = cell_key(**_cell_base(study, model_lm, kind, site, pol, g_cfg, ids, loaded))
        study.planned.add(key)
        if key in done:
            continue
        t0 = time.perf_counter()
        norm = json.loads(key)
        same = ("model", "kind", "gen", "prompts", "tf", *MODEL_FIELDS)
        dense_row = next((r for k, r in done.items() if r["policy"] == "dense"
                          and all(json.loads(k).get(f) == norm[f] for f in same)), None)
        row = run_cell(model_lm, ids, g_cfg, site, pol, study.settings, study.out_dir, key, track=(pol == "fresh"),
                       kernel_layers=study.kernel_layers if kind == "diffusion" else [],
                       kernel_steps=study.kernel_steps, dense_row=dense_row)
        row = {"key": key, "model": model_lm.name, "kind": kind, "site": site, "policy": pol or "dense",
               "p": args.p, "scope": args.scope, "new_positions": args.new_positions,
               "note": study.note if kind == "diffusion" else "",
               **row}
        study.writer.write(row)
        done[key] = row
        bar.write(f"[mask_reuse] {kind:9s} {site or 'dense':12s} {pol or '':14s} {time.perf_counter() - t0:6.1f}s "
                  f"sparsity={_f(row.get('sparsity'))} selections={row.get('selections', '–')}", file=sys.stdout)


def _write_outputs(study: _Study, cells_path: Path, notes: list[str], t_start: float) -> None:
    """Tables, figures and the summary, rebuilt from every finished cell of these settings."""
    from dllm_sparse.eval.rows import atomic_write_csv, finished
    from dllm_sparse.eval.studies.reuse_plots import (
        plot_overlap,
        plot_step_matrices,
        plot_tracker_heatmaps,
        plot_tradeoff,
    )
    from dllm_sparse.eval.studies.reuse_study import OVERLAP_COLS, TABLE_COLS, derive

    out_dir = study.out_dir
    rows = [r for k, r in finished(cells_path).items() if k in study.planned]
    table = derive(rows)
    atomic_write_csv(out_dir / "policies.csv", table, TABLE_COLS)
    ov = []
    for r in rows:
        if r.get("overlap_file") and (out_dir / r["overlap_file"]).is_file():
            ov += list(csv.DictReader(open(out_dir / r["overlap_file"])))
    atomic_write_csv(out_dir / "overlap.csv", ov, OVERLAP_COLS)
    figs = []
    if ov:
        figs += plot_overlap(ov, out_dir / "figures")
    figs += plot_step_matrices(rows, out_dir, out_dir / "figures")
    figs += plot_tracker_heatmaps(rows, out_dir, out_dir / "figures")
    figs += plot_tradeoff(table, out_dir / "figures")
    wall = time.perf_counter() - t_start
    write_summary(out_dir, study.args, notes, table, ov, figs, wall, sum(float(r.get("cell_s") or 0) for r in rows))
    print(f"[mask_reuse] done in {wall:.0f} s -> {out_dir}/summary.md", flush=True)


def main(argv=None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    import matplotlib

    matplotlib.use("Agg")  # this script writes figure files; the library leaves the backend to its user
    import torch

    from dllm_sparse.eval.rows import JsonlWriter, finished
    from dllm_sparse.eval.studies.reuse_study import check_cell_keys
    from dllm_sparse.models.loading import check_available, load_model
    from dllm_sparse.samplers import GenerationConfig

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    out_dir = Path(args.output_dir)
    args.gaps_list = [int(g) for g in _csv_list(args.gaps)]
    policies, ar_policies = _policy_lists(args)
    lm, note = load_diffusion(args.model, args.dtype, args.device, not args.no_fallback)
    run_ar = args.ar_model.lower() != "none" and bool(ar_policies)
    if run_ar:  # the AR model loads after the diffusion cells (one model in memory at a time): find it now
        check_available(args.ar_model)
    # The output folder is created only once the models are known to load: a failure leaves no folder behind.
    for sub in ("overlap_cells", "overlap_steps", "figures"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    if note:
        print(note, file=sys.stderr)
    model_note = _model_note(args, note)
    notes = [model_note] if model_note else []
    gcfg, settings, kernel_layers, kernel_steps, prompts = _study_settings(args, lm)

    cells_path = out_dir / "cells.jsonl"
    done = finished(cells_path)
    check_cell_keys(done, cells_path)
    study = _Study(args, prompts, settings, kernel_layers, kernel_steps, note, out_dir, done,
                   writer=JsonlWriter(cells_path))
    print(f"[mask_reuse] {len(done)} finished cells in {cells_path}", flush=True)
    _run_cells(study, lm, "diffusion", policies, gcfg)
    del lm
    if run_ar:
        ar = load_model(args.ar_model, dtype=args.dtype, device=None if args.device == "cpu" else args.device)
        _run_cells(study, ar, "ar", ar_policies, GenerationConfig(max_new_tokens=args.gen_length, stop_token_ids=(),
                                                                   seed=args.seed))
    study.writer.close()
    _write_outputs(study, cells_path, notes, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
