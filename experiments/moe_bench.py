"""Time one mixture-of-experts layer's experts on the CPU: dense, the masking path, the kernel path.

    python experiments/moe_bench.py                                   # docs/results/moe_bench/moe_bench.json
    python experiments/moe_bench.py --tokens 1 32 --threads 2 --out /tmp/moe.json

What is timed: one call of a Qwen3-MoE experts module (random weights, a scaled-down Qwen3-30B-A3B expert layout by
default: hidden 1024, expert width 384, 32 experts, top-4) on ``--tokens`` tokens routed by a random router, as

- ``dense``: the model's own ``grouped_mm`` implementation (transformers' default);
- ``masking``: ``sparsify`` (the dllm_sparse experts implementation: a loop over experts, gathered tokens, the rule
  applied as a mask, dense products);
- ``kernels``: ``accelerate_ffn`` with the PyTorch fallback of the kernels (each expert's products read only the
  kept rows / columns of its weights, gathered with index_select: the packed path on the CPU).

for each site at ``--p`` (top-p, per token). Each figure is the median of repeated calls (kernels/bench.py's
``cpu_ms``), in milliseconds, fp32. A CPU timing on a shared machine: it depends on the machine and its load (the
JSON records both); not a unit test.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SITES = ("input", "gate", "up", "intermediate")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "moe_bench" / "moe_bench.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 32, 256], help="tokens per call (default: 1 32 256)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size d_model (default: 1024)")
    p.add_argument("--expert-width", type=int, default=384, help="each expert's FFN width (default: 384)")
    p.add_argument("--experts", type=int, default=32, help="number of experts (default: 32)")
    p.add_argument("--top-k", type=int, default=4, help="experts per token (default: 4)")
    p.add_argument("--p", type=float, default=0.5, help="top-p threshold of every site (default: 0.5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timing per figure (default: 0.5)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file to write (default: {DEFAULT_OUT})")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(m < 1 for m in args.tokens):
        parser.error(f"--tokens must be >= 1, got {args.tokens}")
    for name in ("hidden", "expert_width", "experts", "top_k", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        parser.error(f"--top-k ({args.top_k}) cannot exceed --experts ({args.experts})")
    if not 0 < args.p <= 1:
        parser.error(f"--p must be in (0, 1], got {args.p}")
    if not args.budget > 0:
        parser.error(f"--budget must be > 0, got {args.budget}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    import transformers

    from dllm_sparse import TopP, sparsify
    from dllm_sparse.atomic import atomic_write_text
    from dllm_sparse.hardware import machine_description
    from dllm_sparse.kernels import accelerated_ffn
    from dllm_sparse.models.families import find_experts
    from dllm_sparse.kernels.bench import cpu_ms, environment

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=16, hidden_size=args.hidden, intermediate_size=args.expert_width,
        moe_intermediate_size=args.expert_width, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
        head_dim=16, num_experts=args.experts, num_experts_per_tok=args.top_k)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    experts = find_experts(model)[0].experts
    with torch.no_grad():
        for w in (experts.gate_up_proj, experts.down_proj):
            w.normal_(0, w.shape[-1] ** -0.5)
    rows = []
    for n in args.tokens:
        x = torch.randn(n, args.hidden)
        logits = torch.randn(n, args.experts)
        weights, index = torch.softmax(logits, -1).topk(args.top_k, dim=-1)

        def call():
            with torch.no_grad():
                return experts(x, index, weights)

        row = {"tokens": n, "dense_ms": cpu_ms(call, args.budget)}
        for site in SITES:
            with sparsify(model, site, TopP(args.p)):
                row[f"masking_{site}_ms"] = cpu_ms(call, args.budget)
            with accelerated_ffn(model, site=site, rule=TopP(args.p), backend="torch"):
                row[f"kernels_{site}_ms"] = cpu_ms(call, args.budget)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": machine_description(args.threads), "env": environment("cpu", backend="torch"),
              "load_average": os.getloadavg(), "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
