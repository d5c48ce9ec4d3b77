"""Quality vs measured speed over whole denoising trajectories, per strategy (step-delta FFN, keep-sets, top-p).

    dllm-sparse frontier trajectory                       # CPU defaults: the embedded twin, fp32, 2 threads
    dllm-sparse frontier trajectory --skip-timing --prompts 20
    # the probe score on 20 prompts for what was replayed on 8: prompts 8-19 free-running only, then one table
    dllm-sparse frontier trajectory --skip-timing --skip-replay --first-prompt 8 --prompts 12 \
        --output-dir runs/tf_probe_rest
    dllm-sparse frontier trajectory --skip-quality --prompts 20 \
        --quality-from runs/trajectory_frontier/trajectory_frontier.json runs/tf_probe_rest/trajectory_frontier.json
    dllm-sparse frontier trajectory --smoke               # a tiny random LLaDA, seconds (the test suite)

Strategies (names: dllm_sparse/eval/studies/trajectory_frontier.py; definitions: docs/sparsification.md):

* ``token-<site>:<p>``: per-token top-p (the paper's rule) on the fast path;
* ``step-<site>:<p>`` and ``step-<site>:<p>@<policy>``: one keep-set per sample, fresh or reused between refreshes;
* ``delta-input:<f>/<f_h>[+block][@policy]``, ``delta-intermediate:<f>[,oracle][+block][@policy]``: the step-delta
  FFN, which keeps each position's FFN values and recomputes the largest part of the change (``+block``: the
  current block's rows exactly).

Quality (the twin's greedy trajectories on ``--prompts`` capability-probe prompts, gen_length = steps =
``--gen-length``, block ``--block-length``): replay commit agreement with dense (teacher-forced on the dense
trajectory), free-running token agreement with dense, probe keyword hits; 95 % bootstrap intervals over prompts.
Speed: seconds per step over a replay of the first ``--timing-steps`` steps of a dense trajectory at canvas
``--canvas``, batch ``--batches``, median of ``--repeats`` interleaved repeats, sparse vs dense.

Outputs in ``--output-dir``: ``trajectory_frontier.json`` (every number, per-prompt items, machine, threads,
versions, load, command), ``trajectory_frontier.png`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Only argparse here, so that --help answers at once: the study (dllm_sparse.eval.studies.trajectory_frontier)
# imports torch.
DEFAULT_STRATEGIES = (
    "token-intermediate:0.9", "step-intermediate:0.95", "step-intermediate:0.9@block_start",
    "delta-input:0.25/0.5@block_start", "delta-intermediate:0.3+block@block_start",
    "delta-input:0.125/0.25+block@block_start", "delta-intermediate:0.15+block@block_start",
)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-mdm", help="the diffusion model (default: %(default)s)")
    ap.add_argument("--dtype", default="fp32", help="model dtype (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                    help="strategy names, compared with dense (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=8,
                    help="capability-probe prompts for quality (default: %(default)s)")
    ap.add_argument("--first-prompt", type=int, default=0,
                    help="quality on the probe prompts from this index on (0-based; with --quality-from, runs over "
                         "other ranges merge prompt by prompt) (default: %(default)s)")
    ap.add_argument("--skip-replay", action="store_true",
                    help="quality without the replay (teacher-forced) agreement: free-running agreement and the "
                         "probe score only, half the cost")
    ap.add_argument("--gen-length", type=int, default=64,
                    help="quality runs: gen_length = steps (default: %(default)s)")
    ap.add_argument("--block-length", type=int, default=32, help="block length (default: %(default)s)")
    ap.add_argument("--canvas", type=int, default=128, help="timing: masked canvas positions (default: %(default)s)")
    ap.add_argument("--timing-steps", type=int, default=32, help="timing: steps replayed (default: %(default)s)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="timing batch sizes (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=5, help="timing: interleaved repeats (default: %(default)s)")
    ap.add_argument("--profile", action="store_true",
                    help="timing: also one torch.profiler replay per strategy, a step's time split into matrix "
                         "products, attention, other ops and unattributed (default: off)")
    ap.add_argument("--skip-quality", action="store_true", help="timing only")
    ap.add_argument("--skip-timing", action="store_true", help="quality only")
    ap.add_argument("--quality-from", type=Path, nargs="+", default=None,
                    help="take the quality rows from earlier runs' trajectory_frontier.json files (same model, dtype, "
                         "gen length, block, prompts; every strategy measured in one of them): quality-only runs on "
                         "a busy machine, then the timing on a quiet one (default: none)")
    ap.add_argument("--timing-from", type=Path, default=None,
                    help="take the timing rows from an earlier run's trajectory_frontier.json (same model, dtype, "
                         "threads, canvas, timed steps, repeats, batches, block; every strategy timed there): new "
                         "quality on old timing without timing again (default: none)")
    ap.add_argument("--smoke", action="store_true",
                    help="check the code in seconds: a tiny random LLaDA, 2 prompts, gen/canvas 16, block 8, 8 timed "
                         "steps, 1 repeat, batches 1 and 2 (overrides those options)")
    ap.add_argument("--output-dir", type=Path, default=Path("runs/trajectory_frontier"),
                    help="where the results go (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompts, args.gen_length, args.block_length, args.canvas = 2, 16, 8, 16
        args.timing_steps, args.repeats, args.batches = 8, 1, [1, 2]
    if args.first_prompt < 0:
        ap.error(f"--first-prompt must be >= 0, got {args.first_prompt}")
    if args.skip_replay and args.skip_quality:
        ap.error("--skip-replay is a quality option; it means nothing with --skip-quality")
    for name in ("prompts", "gen_length", "block_length", "canvas", "timing_steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batches):
        ap.error(f"--batches must be >= 1, got {args.batches}")
    for what, length in (("--gen-length", args.gen_length), ("--canvas", args.canvas)):
        if length % args.block_length:
            ap.error(f"{what} ({length}) must be a multiple of --block-length ({args.block_length})")
    if args.timing_from is not None and not args.timing_from.is_file():
        ap.error(f"--timing-from {args.timing_from}: no such file")
    if args.timing_from is not None and args.skip_timing:
        ap.error("--timing-from and --skip-timing contradict each other: drop one")
    for path in args.quality_from or []:
        if not path.is_file():
            ap.error(f"--quality-from {path}: no such file")
    if args.timing_steps > args.canvas:
        ap.error(f"--timing-steps ({args.timing_steps}) cannot exceed the canvas ({args.canvas}): one token per step")

    from dllm_sparse.eval.studies.trajectory_frontier import parse_strategy, run_trajectory_frontier

    for s in args.strategies:  # a bad name fails here, before any model is loaded
        try:
            parse_strategy(s)
        except ValueError as e:
            ap.error(str(e))
    command = " ".join(["python", *sys.argv] if argv is None else [prog or "dllm-sparse frontier trajectory", *argv])
    if not args.smoke:
        return run_trajectory_frontier(args, command)

    from dllm_sparse.cli.smoke import smoke_llada

    lm = smoke_llada(max_sequence_length=512)
    args.model = lm.name
    prompts = [[5, 17, 3, 9, 40, 2], [7, 7, 21, 2, 11, 30], [3, 8, 8, 50, 1, 6]][
        args.first_prompt:args.first_prompt + args.prompts]
    return run_trajectory_frontier(args, command, lm=lm, prompts=prompts, keywords=None, chat=False)


if __name__ == "__main__":
    main()
