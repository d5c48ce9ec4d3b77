"""Run every entry point on LLaDA-8B / LLaMA-3.1-8B shapes with random weights; time and peak memory per phase.

    python experiments/check_8b_shapes.py --shape llada-8b --layers 1 --dtype bf16 --threads 1    # every phase
    python experiments/check_8b_shapes.py --shape llada-8b --layers 1 --save ckpt/llada-8b-1l      # official layout
    python experiments/check_8b_shapes.py --checkpoint ckpt/llada-8b-1l --shape llada-8b --phases load generate
    python experiments/check_8b_shapes.py --memory-plan --threads 1     # 1 and 2 layers, fp32 and bf16, each shape
    python experiments/check_8b_shapes.py --shape llada-8b-mini --layers 2 --smoke    # seconds (the test suite)

Phases (dllm_sparse/eval/studies/shape_check.py): load, generate, elbo@<context>, rolling@<context> (either with
/chunk<rows>: the LM head on that many rows at a time), sweep, lm_eval, accelerate, step_delta, triton.
Each prints its seconds and peak RSS; the results go to --output-dir as
<shape>-<layers>l-<dtype>.json (every number, the settings, machine, threads, versions). --memory-plan runs the
memory phases in one subprocess per (shape, layers, dtype), then writes memory_plan.json and memory_plan.md: the
peaks, the 2-layer prediction from the 1-layer run (peak(L) = peak(1) + (L - 1) x per-layer weight bytes;
dllm_sparse/eval/studies/memory_plan.py) and what fits a 24 / 48 / 80 / 141 GB GPU at the published depth (32 layers; 30
for the 26B-A4B pair of dllm_sparse/models/gemma_shapes.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from dllm_sparse.atomic import atomic_write_text

DEFAULT_PHASES = ("generate", "elbo@1024", "elbo@4096", "rolling@1024", "sweep", "lm_eval", "accelerate",
                  "step_delta")
# Two rows per ELBO forward (--plan-rows): an 8B-shaped forward of 8 x 1024 tokens takes minutes on one shared core.
MEMORY_PHASES = ("generate", "elbo@1024", "rolling@512", "rolling@512/chunk256", "accelerate", "step_delta")
SMOKE_CONTEXT = {"1024": "64", "512": "64", "4096": "64", "256": "16"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows every option's default."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--shape", default="llada-8b",
                    help="llada-8b, llama-3.1-8b, diffusion-gemma-26b-a4b, gemma4-26b-a4b, or their scaled-down -mini "
                         "versions (dllm_sparse.models.shapes, gemma_shapes)")
    ap.add_argument("--layers", type=int, default=1,
                    help="transformer blocks (the published 8B models have 32, the 26B-A4B pair 30)")
    ap.add_argument("--dtype", default="bf16", help="fp32 or bf16")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--phases", nargs="+", default=list(DEFAULT_PHASES), help="phases to run, in order")
    ap.add_argument("--checkpoint", default=None,
                    help="load the model from this directory with load_model (and run the 'load' phase) instead of "
                         "building random weights")
    ap.add_argument("--save", default=None, help="build the model, save it in the official layout here, and stop")
    ap.add_argument("--max-shard-size", default="1GB", help="--save: largest safetensors shard")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens of the sampler phases")
    ap.add_argument("--gen-length", type=int, default=128, help="sampler: generated tokens")
    ap.add_argument("--steps", type=int, default=128, help="diffusion sampler: denoising steps")
    ap.add_argument("--block-length", type=int, default=32, help="diffusion sampler: block length")
    ap.add_argument("--cfg", type=float, nargs="+", default=[0.0, 0.5], help="diffusion sampler: guidance scales")
    ap.add_argument("--mc-num", type=int, default=128, help="ELBO Monte-Carlo samples")
    ap.add_argument("--mc-batch", type=int, default=8, help="ELBO stratified mini-batch")
    ap.add_argument("--batch-size", type=int, default=8, help="ELBO rows per forward pass")
    ap.add_argument("--answer", type=int, default=16, help="elbo@<context>: scored tokens at the end of the context")
    ap.add_argument("--head-chunk", type=int, default=None,
                    help="LM head (ELBO or AR scorer) on this many scored rows at a time (None: all at once)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="generate phase: stop the diffusion sampler after this many steps and extrapolate the time "
                         "of all --steps (None: run every step)")
    ap.add_argument("--delta-steps", type=int, default=8, help="step_delta phase: sampler steps (one block)")
    ap.add_argument("--lm-eval-gen", type=int, default=8, help="lm_eval phase: generate_until tokens (= steps)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny settings for a -mini shape (prompt 8, gen 16, steps 16, block 8, mc_num 8, contexts "
                         "64): the whole script in seconds")
    ap.add_argument("--memory-plan", action="store_true",
                    help="run the memory phases for --plan-shapes x layers 1, 2 x --plan-dtypes, each in a "
                         "subprocess, and write memory_plan.json / .md")
    ap.add_argument("--plan-shapes", nargs="+", default=["llada-8b", "llama-3.1-8b"], help="--memory-plan shapes")
    ap.add_argument("--plan-dtypes", nargs="+", default=["bf16", "fp32"], help="--memory-plan dtypes")
    ap.add_argument("--plan-steps", type=int, default=2,
                    help="--memory-plan: sampler steps per run (a step's memory does not depend on how many run)")
    ap.add_argument("--plan-rows", type=int, default=2,
                    help="--memory-plan: ELBO rows per forward pass (mc_num = mc_batch = batch_size)")
    ap.add_argument("--plan-phases", nargs="+", default=list(MEMORY_PHASES), help="--memory-plan phases")
    ap.add_argument("--output-dir", type=Path, default=Path("runs/shapes_8b"), help="where the JSON files go")
    return ap


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in ("prompt", "gen_length", "steps", "block_length", "mc_num", "mc_batch",
                                          "batch_size", "answer", "head_chunk", "delta_steps", "lm_eval_gen",
                                          "stop_after")} | {
        "cfg_scales": args.cfg, "work_dir": str(args.output_dir / "work")}


def _smoke(args, phases_given: bool) -> None:
    args.prompt, args.gen_length, args.steps, args.block_length = 8, 16, 16, 8
    args.mc_num, args.mc_batch, args.batch_size, args.answer, args.delta_steps, args.lm_eval_gen = 8, 4, 4, 4, 4, 4
    if not phases_given:
        args.phases = ["generate", "elbo@64", "rolling@64", "sweep", "lm_eval", "accelerate", "step_delta"]


def memory_plan(args, argv: list[str]) -> dict:
    from dllm_sparse.eval.studies.memory_plan import GPU_SIZES_GB, extrapolate, fits_table, gpu_estimate
    from dllm_sparse.models.shapes import published_layers

    depths = {published_layers(shape) for shape in args.plan_shapes}  # 32 for the 8B shapes, 30 for the 26B-A4B pair
    if len(depths) > 1:
        raise SystemExit(f"--plan-shapes {' '.join(args.plan_shapes)}: one table extrapolates to one depth; plan the "
                         "shapes of different published depths in separate runs (separate --output-dir)")
    (L,) = depths

    runs: dict[str, dict] = {}
    for shape in args.plan_shapes:
        for dtype in args.plan_dtypes:
            for layers in (1, 2):
                out = args.output_dir / f"{shape}-{layers}l-{dtype}.json"
                if not out.is_file():  # a rerun resumes: each run's file is written atomically when it ends
                    phases = list(args.plan_phases)
                    if args.smoke:
                        for long, short in SMOKE_CONTEXT.items():
                            phases = [p.replace(f"@{long}", f"@{short}").replace(f"chunk{long}", f"chunk{short}")
                                      for p in phases]
                    rows = str(args.plan_rows)
                    cmd = [sys.executable, __file__, "--shape", shape, "--layers", str(layers), "--dtype", dtype,
                           "--threads", str(args.threads), "--output-dir", str(args.output_dir),
                           "--prompt", str(args.prompt), "--gen-length", str(args.gen_length),
                           "--steps", str(args.steps), "--block-length", str(args.block_length),
                           "--stop-after", str(args.plan_steps), "--delta-steps", str(args.plan_steps),
                           "--mc-num", rows, "--mc-batch", rows, "--batch-size", rows, "--answer", str(args.answer),
                           "--phases", *phases]
                    print(" ".join(cmd), flush=True)
                    # A fixed mmap threshold: glibc then returns every large freed block to the OS at once (its
                    # adaptive threshold would keep a freed phase's tensors in the heap, and in the next phase's RSS).
                    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                    subprocess.run(cmd, check=True, env=env)
                runs[f"{shape}/{dtype}/{layers}"] = json.loads(out.read_text())
    plan = {"formula": "peak(L) = peak(1) + (L - 1) * per_layer_weight_bytes; gpu(L) = peak(L) - baseline_rss + "
                       "CUDA allowance", "gpu_sizes_gb": GPU_SIZES_GB, "models": {}}
    lines = [f"| model | dtype | phase | peak 1 layer (GB) | predicted 2 (GB) | measured 2 (GB) | error | GPU est. {L} "
             "layers (GB) | " + " | ".join(f"{g} GB" for g in GPU_SIZES_GB) + " |",
             "|---|---|---|---:|---:|---:|---:|---:|" + "---|" * len(GPU_SIZES_GB)]
    for shape in args.plan_shapes:
        for dtype in args.plan_dtypes:
            one, two = runs[f"{shape}/{dtype}/1"], runs[f"{shape}/{dtype}/2"]
            rows = extrapolate(one, two, L)
            fits = fits_table(rows, L)
            plan["models"][f"{shape}/{dtype}"] = {"rows": rows, "fits": fits, "layers": L,
                                                  f"weights_{L}": one["weights"]}
            for r in rows:
                err = f"{r['error_2']:+.1%}" if "error_2" in r else "-"
                two_gb = f"{r['peak_2'] / 1e9:.2f}" if "peak_2" in r else "-"
                lines.append(f"| {shape} | {dtype} | {r['phase']} | {r['peak_1'] / 1e9:.2f} | "
                             f"{r['predicted_2'] / 1e9:.2f} | {two_gb} | {err} | {gpu_estimate(r, L) / 1e9:.1f} | "
                             + " | ".join(fits[r["phase"]]) + " |")
    plan["command"] = " ".join(["python experiments/check_8b_shapes.py", *argv])
    atomic_write_text(args.output_dir / "memory_plan.json", json.dumps(plan, indent=1) + "\n")
    atomic_write_text(args.output_dir / "memory_plan.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return plan


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.smoke:
        _smoke(args, "--phases" in argv)
    for name in ("layers", "threads", "prompt", "gen_length", "steps", "block_length", "mc_num", "mc_batch",
                 "batch_size", "answer", "delta_steps", "lm_eval_gen", "plan_steps", "plan_rows"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.stop_after is not None and args.stop_after < 1:
        ap.error(f"--stop-after must be >= 1 (or left out: every step), got {args.stop_after}")
    if args.head_chunk is not None and args.head_chunk < 1:
        ap.error(f"--head-chunk must be >= 1 (or left out: no chunking), got {args.head_chunk}")
    if args.mc_num % args.mc_batch:
        ap.error(f"--mc-num ({args.mc_num}) must be a multiple of --mc-batch ({args.mc_batch})")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.memory_plan:
        return memory_plan(args, argv)

    if "triton" in args.phases and os.environ.get("TRITON_INTERPRET") != "1":
        import shutil

        if shutil.which("nvidia-smi") is None and "torch" not in sys.modules:  # no GPU: interpret the kernels
            os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported; on a GPU, pass the phase without it
            print("the triton phase on a CPU: TRITON_INTERPRET=1 (set before importing Triton)", flush=True)
    import torch

    torch.set_num_threads(args.threads)
    if args.save:
        from dllm_sparse.models.loading import parse_dtype
        from dllm_sparse.models.shapes import build_random, save_checkpoint

        model, _ = build_random(args.shape, args.layers, parse_dtype(args.dtype))
        path = save_checkpoint(model, args.save, args.shape, max_shard_size=args.max_shard_size)
        print(f"saved {args.shape} ({args.layers} layers, {args.dtype}) in the official layout: {path}")
        return {"saved": str(path)}
    from dllm_sparse.eval.studies.shape_check import run_phases

    phases = list(args.phases)
    if args.checkpoint and "load" not in phases:
        phases.insert(0, "load")
    res = run_phases(args.shape, args.layers, args.dtype, phases, _settings(args), checkpoint=args.checkpoint)
    res["command"] = " ".join(["python experiments/check_8b_shapes.py", *argv])
    import transformers

    res["transformers"] = transformers.__version__
    tag = "-ckpt" if args.checkpoint else ""
    out = args.output_dir / f"{args.shape}-{args.layers}l-{args.dtype}{tag}.json"
    atomic_write_text(out, json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
