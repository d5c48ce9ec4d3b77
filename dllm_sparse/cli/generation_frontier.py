"""Speed and quality of whole generations per decoding strategy: exact, block caches, parallel decoding, FFN
sparsity on top (library: :mod:`dllm_sparse.eval.studies.generation_frontier`; results:
``docs/generation_frontier.md``).

    dllm-sparse frontier generation                        # the embedded twin, fp32, 1 thread, 64 tokens, 20 prompts
    dllm-sparse frontier generation --gen-lengths 64 128
    dllm-sparse frontier generation --smoke                # a tiny random LLaDA, seconds

Resumable: every finished (gen length, prompt, strategy) unit is kept in ``<output-dir>/units.jsonl``; rerun the
same command after a stop, or with a larger ``--prompts`` or more ``--gen-lengths``/``--strategies`` to extend it
(finished units are read back; a changed setting is refused, naming it: use another ``--output-dir``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_STRATEGIES = (
    "exact", "cache-prefix", "cache-dual", "t0.9", "t0.7", "t0.5",
    "t0.9+cache-dual", "t0.7+cache-dual", "t0.5+cache-dual",
    "t0.9+cache-dual+token-intermediate:0.9", "t0.9+cache-dual+step-intermediate:0.9",
    "t0.9+cache-dual+delta-intermediate:0.15,held@block_start",
    "t0.5+cache-dual+token-intermediate:0.9", "t0.5+cache-dual+step-intermediate:0.9",
    "t0.5+cache-dual+delta-intermediate:0.15,held@block_start",
)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-mdm", help="the diffusion model (default: %(default)s)")
    ap.add_argument("--dtype", default="fp32", help="model dtype (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                    help="exact, t<threshold>, a trajectory-frontier strategy (cache-dual, cache-dual+token-...), "
                         "or t<threshold>+<that> (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=20, help="capability-probe prompts (default: %(default)s)")
    ap.add_argument("--gen-lengths", type=int, nargs="+", default=[64], help="tokens generated (default: %(default)s)")
    ap.add_argument("--block-length", type=int, default=32, help="block length (default: %(default)s)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny random LLaDA, 4 prompts (fewer with --prompts), 16 tokens, blocks of 8")
    ap.add_argument("--output-dir", type=Path, default=Path("runs/generation_frontier"),
                    help="where the results go (default: %(default)s)")
    args = ap.parse_args(argv)
    for name in ("prompts", "block_length", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 or n % args.block_length for n in args.gen_lengths):
        ap.error(f"--gen-lengths {args.gen_lengths}: each must be a positive multiple of --block-length "
                 f"({args.block_length})")

    from dllm_sparse.eval.identity import IdentityMismatch
    from dllm_sparse.eval.studies.generation_frontier import parse_generation_strategy

    for s in args.strategies:  # a bad name fails here, before any model is loaded
        try:
            parse_generation_strategy(s)
        except ValueError as e:
            ap.error(str(e))
    command = " ".join(["python", *sys.argv] if argv is None else [prog or "dllm-sparse frontier generation", *argv])
    try:
        return _run(args, command)
    except IdentityMismatch as e:  # the output folder holds units of other settings: say which, no traceback
        raise SystemExit(f"generation_frontier: {e}") from None


def _run(args, command: str) -> dict:
    from dllm_sparse.eval.studies.generation_frontier import run_study

    if not args.smoke:
        return run_study(args, command)

    from dllm_sparse.cli.smoke import smoke_llada

    lm = smoke_llada(init_std=0.2)
    args.model, args.gen_lengths, args.block_length = lm.name, [16], 8
    prompts = [[5, 17, 3, 9, 40, 2], [7, 7, 21, 2, 11, 30], [12, 4, 4, 60, 1, 8], [33, 2, 19, 5, 5, 70]][:args.prompts]
    return run_study(args, command, lm=lm, prompts=prompts, keywords=None, chat=False)


if __name__ == "__main__":
    main()
