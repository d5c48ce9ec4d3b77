"""Does per-token FFN sparsity pay where a step is small? A dual-cached step computes only the current block's rows
(M <= block_length), and the per-token column-sparse path reads the union of those rows' kept columns.

    python experiments/block_step_bench.py            # the embedded twin, fp32, 1 thread; prints and saves JSON

Measured on the twin's canvas mid-way through its first block (the exact sampler, 16 of 32 steps done), for each
layer's intermediate activations (the down projection's input) of the block's rows:

* union density: |union of the per-token top-p keep sets of M consecutive block rows| / d_ff, M = 8, 16, 32
  (mean over layers and groups), beside the mean per-token density;
* the down projection at M rows: dense (``h @ W_down.T``) vs the per-token column-sparse path
  (``topp_threshold`` + ``column_sparse_matmul``: the union's columns), and the whole FFN both ways (gate and up
  dense in both); median ms (``kernels.bench.cpu_ms``), mean over layers;
* the FFN's share of a dual-cached step: the dense FFN time at M = block_length times the layers, over the wall
  time of the sampler's cached steps (the block's later steps) on the same canvas.
"""
# ruff: noqa: B023  (every lambda below is timed by cpu_ms at once, inside its own iteration)

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


class _Stop:
    def __init__(self, steps):
        self.steps, self.times = steps, []

    def on_step_end(self, state):
        self.times.append(time.perf_counter())
        return state.step + 1 >= self.steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-mdm", help="the diffusion model (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--p", type=float, default=0.9,
                    help="per-token top-p at the intermediate site (default: %(default)s)")
    ap.add_argument("--block-length", type=int, default=32, help="block length (default: %(default)s)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32],
                    help="row counts M of a step (default: %(default)s)")
    ap.add_argument("--output", type=Path, default=Path("docs/results/generation_frontier/block_step_bench.json"),
                    help="the JSON written (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.block_length < 1 or not 0 < args.p <= 1 or any(m < 1 for m in args.sizes):
        ap.error("--threads, --block-length and --sizes must be >= 1 and --p in (0, 1]")
    import torch  # after parsing: --help answers without torch
    import torch.nn.functional as F

    from dllm_sparse import TopP, load_model
    from dllm_sparse.atomic import atomic_write_text
    from dllm_sparse.kernels.bench import cpu_ms, environment
    from dllm_sparse.kernels.ops import column_sparse_matmul, topp_threshold
    from dllm_sparse.models.families import find_ffns
    from dllm_sparse.samplers import GenerationConfig, generate

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype="fp32")
    model, B = lm.model, args.block_length
    prompt = "What is the capital of France?"
    cfg = GenerationConfig(gen_length=2 * B, steps=2 * B, block_length=B, temperature=0.0, mask_id=lm.mask_id)
    mid = generate(lm, prompts=[prompt], config=cfg, apply_chat_template=True, callbacks=[_Stop(B // 2)])
    canvas, P = mid.sequences, mid.prompt_length

    ffns = find_ffns(model)
    captured = {}
    hooks = [f.down.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach()))
             for i, f in enumerate(ffns)]
    with torch.no_grad():
        model(input_ids=canvas)
    for h in hooks:
        h.remove()
    rule = TopP(args.p)
    d_ff = ffns[0].down.weight.shape[1]
    rows = {}
    for M in args.sizes:
        union, per_token, dense_ms, sparse_ms, ffn_dense_ms, ffn_sparse_ms = [], [], [], [], [], []
        select_ms, gemm_ms = [], []
        for i, f in enumerate(ffns):
            h = captured[i][0, P:P + B]  # the block's rows
            keep = rule.mask(h)
            for g in range(0, B, M):
                union.append(float(keep[g:g + M].any(0).float().mean()))
            per_token.append(float(keep.float().mean()))
            hm = h[:M].contiguous()
            w, wt = f.down.weight, f.down.weight.t().contiguous()
            x = torch.randn(M, w.shape[0])  # the FFN input at M rows (timing only)
            dense_ms.append(cpu_ms(lambda: F.linear(hm, w)))
            sparse_ms.append(cpu_ms(lambda: column_sparse_matmul(hm, wt, threshold=topp_threshold(hm, args.p))))
            tau = topp_threshold(hm, args.p)
            select_ms.append(cpu_ms(lambda: topp_threshold(hm, args.p)))  # the selection alone
            gemm_ms.append(cpu_ms(lambda: column_sparse_matmul(hm, wt, threshold=tau)))  # the product alone

            def ffn(sparse):
                a = f.act(f.gate(x)) * f.up(x)
                return column_sparse_matmul(a, wt, threshold=topp_threshold(a, args.p)) if sparse else f.down(a)

            ffn_dense_ms.append(cpu_ms(lambda: ffn(False)))
            ffn_sparse_ms.append(cpu_ms(lambda: ffn(True)))
        rows[M] = {"M": M, "union_density": statistics.mean(union), "per_token_density": statistics.mean(per_token),
                   "down_dense_ms": statistics.mean(dense_ms), "down_sparse_ms": statistics.mean(sparse_ms),
                   "select_ms": statistics.mean(select_ms), "colsparse_gemm_ms": statistics.mean(gemm_ms),
                   "ffn_dense_ms": statistics.mean(ffn_dense_ms), "ffn_sparse_ms": statistics.mean(ffn_sparse_ms)}
        r = rows[M]
        print(f"M={M}: union density {r['union_density']:.3f} (per token {r['per_token_density']:.3f}); down "
              f"{r['down_dense_ms']:.3f} ms dense vs {r['down_sparse_ms']:.3f} ms sparse "
              f"({r['down_dense_ms'] / r['down_sparse_ms']:.2f}x; top-p selection {r['select_ms']:.3f} ms + gathered "
              f"product {r['colsparse_gemm_ms']:.3f} ms); FFN {r['ffn_dense_ms']:.3f} vs "
              f"{r['ffn_sparse_ms']:.3f} ms ({r['ffn_dense_ms'] / r['ffn_sparse_ms']:.2f}x)", flush=True)

    stop = _Stop(B // 2)  # the dual cache's later steps compute the block's rows only
    t0 = time.perf_counter()
    generate(lm, prompts=[prompt], config=cfg.replace(block_cache="dual"), apply_chat_template=True, callbacks=[stop])
    steps = [b - a for a, b in zip([t0, *stop.times[:-1]], stop.times, strict=True)]
    cached_step_ms = statistics.median(steps[1:]) * 1e3
    ffn_ms = rows[B]["ffn_dense_ms"] * len(ffns) if B in rows else None
    res = {"model": args.model, "p": args.p, "block_length": B, "prompt_length": P, "layers": len(ffns), "d_ff": d_ff,
           "rows": list(rows.values()), "cached_step_ms": cached_step_ms, "first_step_ms": steps[0] * 1e3,
           "ffn_share_of_cached_step": None if ffn_ms is None else ffn_ms / cached_step_ms,
           "environment": environment("cpu"), "load_average": os.getloadavg()[0]}
    print(f"dual-cached step (M = {B}): {cached_step_ms:.1f} ms (first, full-canvas step {steps[0] * 1e3:.1f} ms); "
          f"dense FFN x {len(ffns)} layers = {ffn_ms:.1f} ms = {res['ffn_share_of_cached_step']:.0%} of it; "
          f"load average {res['load_average']:.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(res, indent=1, default=str) + "\n")
    return res


if __name__ == "__main__":
    main()
