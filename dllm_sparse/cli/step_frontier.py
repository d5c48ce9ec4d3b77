"""Quality vs measured speed of a denoising step, per sparsity strategy (the frontier figure of the README).

    dllm-sparse frontier step                          # CPU defaults: embedded pair, fp32, 2 threads
    dllm-sparse frontier step --skip-quality           # timing only (speedup vs sparsity, break-even)
    dllm-sparse frontier step --passages 16 --mc-num 32 --probe-prompts 8   # more quality data

Strategies (definitions: docs/sparsification.md, "Shared keep-sets"; fast path: docs/kernels.md):

* ``token``: the paper's per-token top-p. On a step of M ~ 150 tokens the union of the tokens' sets covers
  ~all features, so the column-sparse kernels skip ~nothing: speedup ~1 by construction.
* ``step``: one keep-set per sample, top-p over the summed |x| of the step's tokens, run by accelerate_ffn as
  dense matmuls over the packed kept rows.
* ``step+<policy>``: the same keep-set reused across steps by a policy (``every4``, ``block_start``): packed
  once at the refresh; at the intermediate site a reused set also shrinks W_gate and W_up.

Speed (the embedded twin ``smollm2-135m-mdm``, one canvas of ``--canvas`` masked positions after a chat prompt,
batch 1, ``--dtype``, ``--threads``): the FFN alone (every layer's FFN on its captured input) and the whole
step (forward with the LM head on the current block's rows, as the sampler runs it), each the median of
``--repeats`` interleaved repeats after a warm-up, sparse vs dense. A reuse strategy's step time is the
amortised (refresh + (k - 1) reuse) / k, k = the steps between refreshes. A sweep over ``TopK(s, scope="step")``
(exactly a fraction s of the features skipped) gives speedup vs sparsity, the FLOP bound and the break-even.

Quality: relative ELBO perplexity (dense / sparse, so 1 = dense) of the twin on ``--passages`` passages of
``builtin_ppl`` (Monte-Carlo ELBO, ``--mc-num`` masks, common random numbers across configurations) and of the
AR parent ``smollm2-135m`` (exact; a builtin_ppl passage has no context beyond BOS, so for the AR model
``step`` equals ``token`` except at that one position: the shared set is computed over context tokens only),
and the probe metric: greedy token agreement of the twin's generations with its dense generations on
``--probe-prompts`` capability-probe prompts. The ELBO is one forward per masked sample, with no trajectory to
reuse masks along: a ``step+policy`` strategy has the ELBO of ``step``; its probe agreement is its own.

Outputs in ``--output-dir`` (default ``runs/step_frontier``): ``frontier.json`` (every number, the machine,
threads, versions, load average, command), ``frontier.png`` (quality vs speedup, one curve per strategy),
``speedup_vs_sparsity.png`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Only argparse here, so that --help answers at once: the study (dllm_sparse.eval.studies.step_frontier) imports torch.
SITES = ("input", "intermediate")


class _HelpFormatter(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows every option's default."""


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-mdm", help="the diffusion model timed and scored")
    ap.add_argument("--ar-model", default="smollm2-135m", help="the AR model scored alongside (exact perplexity)")
    ap.add_argument("--dtype", default="fp32", help="weight dtype (fp32, bf16)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--canvas", type=int, default=128, help="masked canvas positions after the prompt")
    ap.add_argument("--block-length", type=int, default=32,
                    help="sampler block length (one token per step, so also the steps per block)")
    ap.add_argument("--top-p", type=float, nargs="+", default=[0.9, 0.95, 0.98], help="frontier thresholds")
    ap.add_argument("--sweep", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                    help="skipped fractions of the timing sweep (TopK(s, scope='step'))")
    ap.add_argument("--policies", nargs="+", default=["every4", "block_start"],
                    help="keep-set reuse policies of the step+<policy> strategies (every<k>, block_start, ...)")
    ap.add_argument("--sites", nargs="+", default=list(SITES), choices=SITES, help="FFN sites sparsified")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (medians reported)")
    ap.add_argument("--passages", type=int, default=4, help="builtin_ppl passages of the quality check")
    ap.add_argument("--mc-num", type=int, default=8, help="ELBO Monte-Carlo masks per passage")
    ap.add_argument("--probe-prompts", type=int, default=2,
                    help="capability-probe prompts whose generations are compared with dense")
    ap.add_argument("--probe-gen", type=int, default=32, help="gen_length (= steps = block_length) of the probe")
    ap.add_argument("--skip-quality", action="store_true", help="timing only (no ELBO, no probe)")
    ap.add_argument("--skip-timing", action="store_true", help="quality only (no timing, no figures)")
    ap.add_argument("--output-dir", type=Path, default=Path("runs/step_frontier"),
                    help="where frontier.json, the figures and summary.md go")
    args = ap.parse_args(argv)
    if args.canvas % args.block_length:
        ap.error(f"--canvas ({args.canvas}) must be a multiple of --block-length ({args.block_length})")
    from dllm_sparse.eval.studies.step_frontier import run_frontier

    command = " ".join(["python", *sys.argv] if argv is None else [prog or "dllm-sparse frontier step", *argv])
    return run_frontier(args, command)


if __name__ == "__main__":
    main()
