"""How much a sparsified forward costs over a dense one on CPU (the masking path: hooks + top-p selection).

    python experiments/masking_overhead.py                    # smollm2-135m, 2 threads, fp32 (+ bf16 if fast)
    python experiments/masking_overhead.py --runs 3 --shapes 1x128 --no-profile   # a quick look

For every site x dtype x shape it times the dense forward and the forward inside
``sparsify(model, SparsityConfig.parse("<site>:top_p:<p>"))`` (the whole block: hooks attached, forward,
hooks removed), interleaved run by run so that a change of machine load hits all variants alike, and reports
min(sparse) / min(dense) over the runs. The LM head is left out of both (it is the same dense matmul in both
and would only dilute the ratio). bf16 is timed only when the CPU has fast bf16 matmuls (AVX512-BF16 or AMX);
without them PyTorch falls back to a slow reference GEMM and the ratio would say nothing about the masking.

Then one sparsified forward per site is profiled (torch.profiler) and its time split into matmuls, top-p
selection, statistics and the rest (attention, norms, activations, applying the mask). Profiling adds its
own cost to every small op, so read the split as shares, not as absolute times.

Output: printed, and saved as JSON + Markdown table + PNG bar chart in --output-dir, with the machine
(CPU model, avx512 / bf16 / amx flags, cores, threads, load average, library versions, date).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

from dllm_sparse.hardware import cpu_flags, cpu_name, slow_bf16_reason

SITES = ("input", "gate", "up", "intermediate")
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "masking_overhead"
TARGET_RATIO = 1.10  # the overhead the masking path aims to stay under


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--model", default="smollm2-135m", help="model name or path for load_model (default: %(default)s)")
    ap.add_argument("--p", type=float, default=0.9, help="top-p threshold (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=7,
                    help="interleaved timing runs; the minimum counts (default: %(default)s)")
    ap.add_argument("--shapes", default="1x128,8x128", help="batch x tokens, comma-separated (default: %(default)s)")
    ap.add_argument("--dtypes", default="fp32,bf16",
                    help="fp32 and/or bf16 (bf16 is skipped on CPUs without fast bf16 matmuls) (default: %(default)s)")
    ap.add_argument("--sites", default=",".join(SITES), help="comma-separated sites (default: %(default)s)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (user + system, all its threads), which "
                         "time other processes take from the cores does not inflate: for a loaded, shared machine, "
                         "best with --threads 1 (spinning threads add CPU time) (default: %(default)s)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled time split")
    ap.add_argument("--note", default="", help="free text saved with the results, e.g. what else loads the machine")
    ap.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT,
                    help="where the JSON, Markdown and PNG go (default: experiments/results/masking_overhead)")
    args = ap.parse_args(argv)
    args.shapes = [_parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    for d in args.dtypes:
        if d not in ("fp32", "bf16"):
            ap.error(f"--dtypes takes fp32 and/or bf16, got {d!r}")
    for s in args.sites:
        if s not in SITES:
            ap.error(f"--sites takes {', '.join(SITES)}; got {s!r}")
    if args.runs < 1 or args.threads < 1:
        ap.error("--runs and --threads must be at least 1")
    return args


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxTOKENS such as 8x128, got {text!r}") from None
    return b, t


# --------------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------------


def machine_info(threads: int, note: str) -> dict:
    import torch
    import transformers

    flags = cpu_flags()
    model_name = cpu_name()
    return {
        "cpu": model_name,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "note": note,
        "top_p_kernel": _top_p_kernel(),
    }


def _top_p_kernel() -> str:
    """What runs the CPU top-p rule here (TopP's "auto"): the compiled kernel and its build, or the row sort."""
    from dllm_sparse.sparsity import native

    return "native, " + native.describe() if native.available() else "row_sort: " + native.describe()


def fast_bf16_reason(info: dict) -> str | None:
    """None when bf16 matmuls are fast here, else why bf16 is skipped."""
    flags = {name for name in ("avx512_bf16", "amx_bf16") if info[name]} | {"avx2"}
    why = slow_bf16_reason("cpu", flags)
    return None if why is None else why + ", so a bf16 ratio would measure that GEMM, not the masking"


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_ratios(model, inputs: dict, sites: list[str], p: float, runs: int, clock: str = "wall") -> dict:
    """Min over ``runs`` interleaved runs of the dense and each site's sparsified forward (seconds of ``clock``:
    :data:`CLOCKS`)."""
    import torch

    from dllm_sparse import SparsityConfig, sparsify

    configs = {site: SparsityConfig.parse(f"{site}:top_p:{p}") for site in sites}

    def dense():
        model(**inputs)

    def sparse(config):
        with sparsify(model, config):
            model(**inputs)

    variants = {"dense": dense, **{site: (lambda c=c: sparse(c)) for site, c in configs.items()}}
    best = {name: float("inf") for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up: first-call allocations, lazy inits
            fn()
        for _ in range(runs):
            for name, fn in variants.items():
                t0 = CLOCKS[clock]()
                fn()
                best[name] = min(best[name], CLOCKS[clock]() - t0)
    return best


def profile_split(model, inputs: dict, site: str, p: float) -> dict:
    """Milliseconds of one sparsified forward by category, from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from dllm_sparse import SparsityConfig
    from dllm_sparse.sparsity.hooks import Sparsifier

    sp = Sparsifier(model, SparsityConfig.parse(f"{site}:top_p:{p}")).attach()
    rule, add = sp.rule, sp.stats.add

    class LabelledRule:  # the rule, with its selection marked for the profiler
        def __getattr__(self, name):
            return getattr(rule, name)

        def mask(self, x):
            with record_function("selection"):
                return rule.mask(x)

        def apply_fused(self, x):  # the native kernel: selection, applying the mask and counting zeros, fused
            with record_function("selection"):
                return rule.apply_fused(x)

    def labelled_add(*a, **kw):
        with record_function("statistics"):
            return add(*a, **kw)

    sp.rule, sp.stats.add = LabelledRule(), labelled_add
    try:
        with torch.inference_mode():
            model(**inputs)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("forward"):
                    model(**inputs)
    finally:
        sp.detach()
    return _split(prof.events())


_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def _split(events) -> dict:
    """Group the profiled events: the labelled ranges, then matmuls outside them, then the rest."""
    total = next(e.cpu_time_total for e in events if e.name == "forward")
    by = {"selection": 0.0, "statistics": 0.0, "matmul": 0.0}
    for e in events:
        if e.name in ("selection", "statistics"):
            by[e.name] += e.cpu_time_total
        elif e.name in _MATMULS and not _inside(e, _MATMULS | {"selection", "statistics"}):
            by["matmul"] += e.cpu_time_total
    by["other"] = max(total - sum(by.values()), 0.0)
    out = {k: round(v / 1e3, 3) for k, v in by.items()}
    out["total"] = round(total / 1e3, 3)
    return out


def _inside(event, names: set[str]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Masking overhead: sparsified / dense forward",
        "",
        f"{result['model']}, top-p {result['p']}, LM head excluded, min of {result['runs']} interleaved runs "
        f"({'CPU time of the process' if result.get('clock') == 'cpu' else 'wall-clock time'}). "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, avx2={m['avx2']}, "
        f"avx512f={m['avx512f']}, avx512_bf16={m['avx512_bf16']}, amx_bf16={m['amx_bf16']}, load average "
        f"{m['load_average_1min']}; torch {m['torch']}, transformers {m['transformers']}; {m['date']}.",
        f"Top-p on CPU: {m.get('top_p_kernel', 'row_sort (before the native kernel)')}.",
    ]
    if m["note"]:
        lines.append(f"Note: {m['note']}")
    for dtype, why in result["skipped"].items():
        lines.append(f"{dtype} skipped: {why}.")
    lines += ["", "| dtype | shape | dense ms | " + " | ".join(result["sites"]) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in result["sites"]) + " |"]
    for row in result["timings"]:
        cells = [f"{row['ratio'][s]:.2f}x" for s in result["sites"]]
        lines.append(f"| {row['dtype']} | {row['shape']} | {row['dense_ms']:.1f} | " + " | ".join(cells) + " |")
    if result["profile"]:
        lines += ["", "Time split of one sparsified forward (torch.profiler, ms; profiling inflates small ops):", "",
                  "| dtype | shape | site | matmul | selection | statistics | other | total |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["profile"]:
            s = row["split_ms"]
            lines.append(f"| {row['dtype']} | {row['shape']} | {row['site']} | {s['matmul']:.1f} | "
                         f"{s['selection']:.1f} | {s['statistics']:.1f} | {s['other']:.1f} | {s['total']:.1f} |")
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, sites = result["timings"], result["sites"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.2))
    width = 0.8 / len(sites)
    for i, site in enumerate(sites):
        xs = [j + (i - (len(sites) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r["ratio"][site] for r in rows], width, label=site)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(TARGET_RATIO, color="grey", ls="--", lw=0.8, label=f"target {TARGET_RATIO}x")
    ax.set_xticks(range(len(rows)), [f"{r['dtype']} {r['shape']}" for r in rows])
    ax.set_ylabel("sparse / dense forward")
    ax.set_title(f"{result['model']}, top-p {result['p']}, {result['machine']['torch_threads']} threads", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from dllm_sparse import load_model, without_lm_head
    from dllm_sparse.atomic import atomic_write_text

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads, args.note)
    skipped = {}
    dtypes = []
    for name in args.dtypes:
        why = fast_bf16_reason(info) if name == "bf16" else None
        if why is None:
            dtypes.append(name)
        else:
            skipped[name] = why
            print(f"bf16 skipped: {why}")
    result = {"model": args.model, "p": args.p, "runs": args.runs, "clock": args.clock, "sites": args.sites,
              "machine": info,
              "skipped": skipped, "lm_head": "excluded", "timings": [], "profile": []}
    for name in dtypes:
        loaded = load_model(args.model, dtype=torch.float32 if name == "fp32" else torch.bfloat16, device="cpu")
        model = loaded.model.eval()
        with without_lm_head(model):
            for b, t in args.shapes:
                g = torch.Generator().manual_seed(0)
                ids = torch.randint(0, model.config.vocab_size, (b, t), generator=g)
                inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                best = time_ratios(model, inputs, args.sites, args.p, args.runs, args.clock)
                row = {"dtype": name, "shape": f"{b}x{t}", "dense_ms": round(best["dense"] * 1e3, 2),
                       "sparse_ms": {s: round(best[s] * 1e3, 2) for s in args.sites},
                       "ratio": {s: round(best[s] / best["dense"], 3) for s in args.sites}}
                result["timings"].append(row)
                print(f"{name} {b}x{t}: dense {row['dense_ms']:.1f} ms; "
                      + ", ".join(f"{s} {r:.2f}x" for s, r in row["ratio"].items()), flush=True)
                if not args.no_profile:
                    for site in args.sites:
                        split = profile_split(model, inputs, site, args.p)
                        result["profile"].append({"dtype": name, "shape": f"{b}x{t}", "site": site, "split_ms": split})
                        print(f"  profile {site}: " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()) + " ms",
                              flush=True)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "masking_overhead.json", json.dumps(result, indent=1))
    table = markdown(result)
    atomic_write_text(out / "masking_overhead.md", table)
    if result["timings"]:
        bar_chart(result, out / "masking_overhead.png")
    print()
    print(table)
    print(f"saved {out / 'masking_overhead.json'}, .md and .png")
    return result


if __name__ == "__main__":
    main()
