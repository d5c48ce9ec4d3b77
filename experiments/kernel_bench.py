"""Benchmark the sparse FFN kernels against dense matmuls (definitions: docs/kernels.md).

    python experiments/kernel_bench.py                       # GPU: every spec shape, bf16
    python experiments/kernel_bench.py --model smollm2-135m  # union densities from real activations too
    python experiments/kernel_bench.py --quick               # CPU smoke run of the PyTorch fallbacks

Three tables, printed and saved as JSON + PNG in --output-dir, named after the device:

1. One token (decode): dense F.linear (cuBLAS on GPU) vs the column-sparse GEMV at input sparsity s, the
   bandwidth bound 1/(1 - s), achieved GB/s; the row-sparse GEMV (kept output rows); the top-p threshold.
2. Several tokens: M tokens with independent per-token top-p masks share the union of their kept sets. The
   union density (not the per-token one) bounds the shared-mask GEMM's speedup: 1 / union density.
   Masks come from a real model's FFN activations with --model, else from random heavy-tailed vectors
   (Student-t, 3 degrees of freedom), and each row says which.
3. The GEMM time at that union density vs dense.
4. M tokens sharing one kept set of a fixed sparsity (a shared keep-set, a reused mask): the gathered GEMM (GEMV at
   M = 1) vs dense, with the bound 1 / (1 - s).

On a GPU every call, dense (cuBLAS) and sparse alike, is timed under CUDA graphs (dllm_sparse/kernels/bench.py:
20 calls captured in one graph, the median of 25 replays; Python's per-call host cost is not in the figure); a call
that cannot be captured (a host sync) is timed eagerly and its row says which op synced (``timing``). Each GPU row
carries its roofline (dllm_sparse/kernels/roofline.py: bytes of the kept weights, activations and outputs at the
GPU's bandwidth) and the share of it reached (``of_bound``: bound / measured). On CPU: time.perf_counter medians
after a warmup, of the PyTorch fallbacks (index_select + matmul), not of the kernels: they only prove the script
runs.

Rows are appended as they finish to ``<output-dir>/<stem>.jsonl`` (and to ``--rows`` when given), each with the
environment (GPU, driver, torch, Triton, backend): a run killed half-way keeps what it measured. The full JSON and
the plot are written at the end.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from dllm_sparse.atomic import atomic_write_text

# torch, the models and the kernels are imported inside the functions that use them, after the arguments are
# parsed: --help then answers at once instead of loading torch and transformers first (seconds).
if TYPE_CHECKING:
    import torch

# (name, d_in, d_out): the FFN matrices of the spec's models, as y[d_out] = W x[d_in].
SHAPES = [
    ("llama-3.1-8b gate/up", 4096, 14336),
    ("llama-3.1-8b down", 14336, 4096),
    ("llada-8b gate/up", 4096, 12288),
    ("llada-8b down", 12288, 4096),
    ("smollm2-135m gate/up", 576, 1536),
    ("smollm2-135m down", 1536, 576),
]
SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.9)
TOKENS = (1, 8, 32, 128, 256)
TOP_P = (0.5, 0.7, 0.9)


# --------------------------------------------------------------------------------------------------------
# Timing and environment
# --------------------------------------------------------------------------------------------------------


class Timer:
    """fn -> milliseconds per call; ``how`` records how each labelled call was timed ("cuda_graph", "eager: <why>"
    or "cpu") for the row being built."""

    def __init__(self, device: torch.device, quick: bool, eager: bool = False):
        self.cuda, self.quick, self.eager = device.type == "cuda", quick, eager
        self.how: dict[str, str] = {}

    def __call__(self, fn, label: str) -> float:
        from dllm_sparse.kernels.bench import cpu_ms, graph_ms

        if not self.cuda:
            ms, how = cpu_ms(fn, 0.02 if self.quick else 0.2), "cpu"
        elif self.eager:
            from triton.testing import do_bench

            ms, how = float(do_bench(fn, warmup=25, rep=100)), "eager: --eager"
        else:
            ms, how = graph_ms(fn, calls=20)
        self.how[label] = how
        return ms

    def take(self) -> dict[str, str]:
        """The labels timed since the last take (for one row), and forget them."""
        how, self.how = self.how, {}
        return how


class Rows:
    """Each finished row goes to the run's JSONL file (and ``--rows``) at once, with the environment."""

    def __init__(self, paths, env: dict):
        from dllm_sparse.kernels.bench import append_row

        self.paths, self.env, self._append = paths, env, append_row

    def add(self, table: str, row: dict, timer: Timer) -> dict:
        row["timing"] = timer.take()
        for path in self.paths:
            self._append(path, {"table": table, **row, "env": self.env})
        return row


def with_bound(row: dict, ms: float, env: dict, prefix: str, **shape) -> str:
    """Add ``<prefix>bound_us`` and ``<prefix>of_bound`` (kernels/roofline.py) to ``row``; the printed share."""
    from dllm_sparse.kernels.roofline import share_of_bound

    got = share_of_bound(ms * 1e3, row["d_in"], row["d_out"], env.get("roofline_gpu") or env["device"],
                         dtype=env["dtype"], **shape)
    if not got:
        return ""
    row[f"{prefix}bound_us"], row[f"{prefix}of_bound"] = got["bound_us"], got["of_bound"]
    return f" [{got['of_bound']:4.0%} of the {got['bound_gpu']} bound {got['bound_us']:.1f} us]"


def heavy_tailed(*shape, generator, device, dtype) -> torch.Tensor:
    """Student-t(3) samples: heavy tails like LLM activations, no exact zeros."""
    import torch

    z = torch.randn(*shape, generator=generator)
    chi = torch.randn(*shape, 3, generator=generator).pow(2).mean(-1).sqrt()
    return (z / chi).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# 1. One token
# --------------------------------------------------------------------------------------------------------


def bench_one_token(shapes, sparsities, device, dtype, timer, be, rows_out: Rows) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from dllm_sparse.kernels import column_sparse_matmul, row_sparse_matmul, topp_threshold

    g = torch.Generator().manual_seed(0)
    elt = torch.finfo(dtype).bits // 8
    rows = []
    for name, d_in, d_out in shapes:
        w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device=device, dtype=dtype)
        wt = w.t().contiguous()
        x = heavy_tailed(1, d_in, generator=g, device=device, dtype=dtype)
        dense_ms = timer(partial(F.linear, x, w), "dense")
        thr_ms = timer(partial(topp_threshold, x, 0.5, backend=be), "topp_threshold")
        shared_how = timer.take()
        a = x.abs().float().flatten().sort().values
        for s in sparsities:
            n_masked = int(round(s * d_in))
            tau = torch.zeros(1, 1, device=device) if n_masked == 0 else a[n_masked].reshape(1, 1)
            kept_in = int(((x.abs().float() >= tau) & (x != 0)).sum())
            col_ms = timer(partial(column_sparse_matmul, x, wt, threshold=tau, backend=be), "column_sparse")
            keep_out = torch.rand(d_out, generator=g).to(device) >= s
            row_ms = timer(partial(row_sparse_matmul, x, w, keep_out, backend=be), "row_sparse")
            timer.how.update(shared_how)
            col_bytes = kept_in * d_out * elt
            rows.append({
                "shape": name, "d_in": d_in, "d_out": d_out, "sparsity": s,
                "measured_sparsity": 1 - kept_in / d_in,
                "dense_ms": dense_ms, "column_sparse_ms": col_ms, "row_sparse_ms": row_ms,
                "topp_threshold_ms": thr_ms,
                "speedup": dense_ms / col_ms, "row_speedup": dense_ms / row_ms,
                "speedup_with_threshold": dense_ms / (col_ms + thr_ms),
                "bound": 1 / (1 - s),
                "dense_GBps": d_in * d_out * elt / dense_ms / 1e6,
                "column_sparse_GBps": col_bytes / col_ms / 1e6,
            })
            r = rows[-1]
            env = rows_out.env
            dense_share = with_bound(r, dense_ms, env, "dense_")
            col_share = with_bound(r, col_ms, env, "column_sparse_", sparsity=r["measured_sparsity"])
            # Row-sparse reads kept rows of W [d_out, d_in]: the same byte count as a column-sparse call with d_in
            # and d_out swapped (kept rows x row length, plus x and y).
            row_bound = dict(r, d_in=d_out, d_out=d_in)
            with_bound(row_bound, row_ms, env, "row_sparse_", sparsity=1 - float(keep_out.float().mean()))
            r.update({k: v for k, v in row_bound.items() if k.startswith("row_sparse_")})
            rows_out.add("one_token", r, timer)
            print(f"{name:22s} s={s:4.2f}  dense {dense_ms:8.3f} ms{dense_share}  col-sparse {col_ms:8.3f} ms "
                  f"({r['speedup']:5.2f}x, bound {r['bound']:5.2f}x, {r['column_sparse_GBps']:7.1f} GB/s){col_share}  "
                  f"row-sparse {row_ms:8.3f} ms ({r['row_speedup']:5.2f}x)  +top-p {thr_ms:.3f} ms", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------
# 2 + 3. Several tokens: union density of per-token masks, and the shared-mask GEMM at that density
# --------------------------------------------------------------------------------------------------------


def real_activations(model_name: str, max_tokens: int, device) -> dict[str, torch.Tensor]:
    """FFN inputs (site input) and down-projection inputs (site intermediate) of a middle layer of a real
    model, one row per token of the package's built-in passages, captured with forward pre-hooks."""
    from importlib.resources import files

    import torch

    from dllm_sparse import find_ffns, load_model

    lm = load_model(model_name, device=device)
    texts = [json.loads(line)["text"] for line in (files("dllm_sparse") / "data/builtin_passages.jsonl")
             .read_text().splitlines() if line.strip()]
    ids = lm.tokenizer(" ".join(texts), return_tensors="pt").input_ids[:, :max_tokens].to(lm.device)
    ffn = find_ffns(lm.model)[len(find_ffns(lm.model)) // 2]
    got = {}
    first = ffn.gate_up if ffn.gate_up is not None else ffn.gate  # the input x enters here
    hooks = [first.register_forward_pre_hook(lambda m, a: got.__setitem__("input", a[0][0].detach())),
             ffn.down.register_forward_pre_hook(lambda m, a: got.__setitem__("intermediate", a[0][0].detach()))]
    try:
        with torch.no_grad():
            lm.model(ids)
    finally:
        for h in hooks:
            h.remove()
    print(f"captured {ids.shape[1]} tokens of real activations from {model_name}, layer {ffn.layer}")
    return {k: v.float() for k, v in got.items()}


def bench_tokens(sources, tokens, device, dtype, timer, be, rows_out: Rows) -> list[dict]:
    """sources: (label, site, activations [T, d_in], d_out); the first M rows are the M tokens."""
    import torch
    import torch.nn.functional as F

    from dllm_sparse import TopP
    from dllm_sparse.kernels import column_sparse_matmul, union_density

    g = torch.Generator().manual_seed(1)
    rows = []
    for label, site, acts, d_out in sources:
        d_in = acts.shape[1]
        for M in tokens:
            if acts.shape[0] < M:
                print(f"  ({label}: only {acts.shape[0]} tokens captured, skipping M={M})")
                continue
            x = acts[:M].to(device=device, dtype=dtype)
            w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device=device, dtype=dtype)
            wt = w.t().contiguous()
            dense_ms = timer(partial(F.linear, x, w), "dense")
            dense_how = timer.take()
            for p in TOP_P:
                keep = TopP(p).mask(x)
                xs = x.masked_fill(~keep, 0)
                union = float(union_density(keep))
                ms = timer(partial(column_sparse_matmul, xs, wt, backend=be), "sparse")
                timer.how.update(dense_how)
                rows.append({
                    "activations": label, "site": site, "d_in": d_in, "d_out": d_out, "tokens": M, "top_p": p,
                    "token_sparsity": 1 - float(keep.float().mean()), "union_density": union,
                    "dense_ms": dense_ms, "sparse_ms": ms, "speedup": dense_ms / ms, "bound": 1 / max(union, 1e-9),
                })
                r = rows[-1]
                share = with_bound(r, ms, rows_out.env, "sparse_", tokens=M, sparsity=min(1 - union, 0.999999))
                rows_out.add("tokens", r, timer)
                print(f"{label:34s} {site:12s} M={M:4d} p={p:.1f}  token sparsity {r['token_sparsity']:.2f}  "
                      f"union density {union:.2f}  GEMM {ms:8.3f} ms vs dense {dense_ms:8.3f} ms "
                      f"({r['speedup']:5.2f}x, bound {r['bound']:5.2f}x){share}", flush=True)
    return rows


def bench_shared(shapes, sparsities, tokens, device, dtype, timer, be, rows_out: Rows) -> list[dict]:
    """4. M tokens sharing ONE kept set of a fixed sparsity s (a shared keep-set of a denoising step, a reused
    mask): the gathered GEMM (the GEMV for M = 1) over the kept rows of W^T vs dense; bound 1 / (1 - s)."""
    import torch
    import torch.nn.functional as F

    from dllm_sparse.kernels import column_sparse_matmul

    g = torch.Generator().manual_seed(3)
    rows = []
    for name, d_in, d_out in shapes:
        w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device=device, dtype=dtype)
        wt = w.t().contiguous()
        for M in tokens:
            x = torch.randn(M, d_in, generator=g).to(device=device, dtype=dtype)
            dense_ms = timer(partial(F.linear, x, w), "dense")
            dense_how = timer.take()
            for s in sparsities:
                keep = (torch.rand(d_in, generator=g) >= s).to(device)
                ms = timer(partial(column_sparse_matmul, x, wt, keep=keep, backend=be), "shared")
                timer.how.update(dense_how)
                kept = int(keep.sum())
                rows.append({"shape": name, "d_in": d_in, "d_out": d_out, "tokens": M, "sparsity": s,
                             "kept": kept, "dense_ms": dense_ms, "shared_ms": ms,
                             "speedup": dense_ms / ms, "bound": 1 / (1 - s)})
                r = rows[-1]
                dense_share = with_bound(r, dense_ms, rows_out.env, "dense_", tokens=M)
                share = with_bound(r, ms, rows_out.env, "shared_", tokens=M, sparsity=min(1 - kept / d_in, 0.999999))
                rows_out.add("shared", r, timer)
                print(f"{name:22s} M={M:4d} s={s:4.2f}  shared-set {'GEMV' if M == 1 else 'GEMM'} {ms:8.3f} ms{share} "
                      f"vs dense {dense_ms:8.3f} ms{dense_share} ({dense_ms / ms:5.2f}x, bound {1 / (1 - s):5.2f}x)",
                      flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    one = result["one_token"]
    for shape in dict.fromkeys(r["shape"] for r in one):
        rs = [r for r in one if r["shape"] == shape]
        ax.plot([r["sparsity"] for r in rs], [r["speedup"] for r in rs], marker="o", label=shape)
    s = sorted({r["sparsity"] for r in one})
    ax.plot(s, [1 / (1 - v) for v in s], "k--", label="bound 1/(1-s)")
    ax.set(xlabel="input sparsity s", ylabel="speedup vs dense", yscale="log", title="one token: column-sparse GEMV")
    ax.legend(fontsize=7)
    many = result["tokens"]
    # One colour per (site, p); solid lines for real activations, dotted for random ones, one line per d_in.
    colours = {k: f"C{i}" for i, k in enumerate(dict.fromkeys((r["site"], r["top_p"]) for r in many))}
    for ax, key, title in ((axes[1], "union_density", "union density of per-token top-p masks"),
                           (axes[2], "speedup", "shared-mask GEMM speedup vs dense")):
        for label, site, p in dict.fromkeys((r["activations"], r["site"], r["top_p"]) for r in many):
            rs = [r for r in many if (r["activations"], r["site"], r["top_p"]) == (label, site, p)]
            style = "-" if label.startswith("real") else ":"
            ax.plot([r["tokens"] for r in rs], [r[key] for r in rs], style, marker="o",
                    color=colours[(site, p)], label=f"{label}, {site}, p={p}")
        ax.set(xlabel="tokens M", xscale="log", title=title, ylabel=key.replace("_", " "))
        ax.legend(fontsize=6)
    fig.suptitle(f"{result['meta']['device']} - {result['meta']['dtype']} - backend {result['meta']['backend']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _HelpFormatter(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows every option's default."""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and few points (CPU smoke run)")
    ap.add_argument("--model", default=None, help="take per-token masks from this model's real activations "
                                                  "(id, directory, or smollm2-135m)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                    help="weight dtype (None: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--device", default=None, help="None: cuda when available, else cpu")
    ap.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                    help="kernel backend (None: $DLLM_SPARSE_KERNELS, else auto = Triton on CUDA, PyTorch elsewhere)")
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="only the shapes whose name starts with one of these (llama-3.1-8b, llada-8b, smollm2-135m; "
                         "None: every shape, --quick: smollm2-135m)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=None,
                    help="input sparsities of tables 1 and 4 (None: 0 0.25 0.5 0.7 0.9; --quick: 0 0.5 0.9)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="token counts M of tables 2-4 (None: 1 8 32 128 256; --quick: 1 8 32)")
    ap.add_argument("--output-dir", default="experiments/results", help="where the JSON and the plot go")
    ap.add_argument("--rows", type=Path, default=None,
                    help="also append every row, as it finishes, to this JSONL file (the device check's rows file)")
    ap.add_argument("--eager", action="store_true",
                    help="GPU: time eager calls (triton.testing.do_bench) instead of CUDA-graph replays")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--roofline-gpu", default=None, choices=["H100", "H100 PCIe", "H200"],
                    help="compute each row's bound for this GPU (None: the device's own; a CPU has none)")
    args = ap.parse_args(argv)
    for s in args.sparsities or ():
        if not 0 <= s < 1:
            ap.error(f"--sparsities: {s} is not in [0, 1)")
    for m in args.tokens or ():
        if m < 1:
            ap.error(f"--tokens: {m} is not >= 1")
    known = sorted({name.split(" ")[0] for name, _, _ in SHAPES})
    for prefix in args.shapes or ():
        if prefix not in known:
            ap.error(f"--shapes: unknown shape {prefix!r}; choose from {known}")
    import torch

    from dllm_sparse.kernels import backend
    from dllm_sparse.sparsity.config import slug

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from dllm_sparse.kernels.bench import environment

    timer = Timer(device, args.quick, args.eager)
    be = args.backend
    meta = environment(device, backend(torch.empty(0, device=device), be))
    meta.update(dtype=str(dtype).replace("torch.", ""), quick=args.quick,
                timing="cpu" if device.type != "cuda" else "eager" if args.eager else "cuda_graph",
                roofline_gpu=args.roofline_gpu)
    if device.type != "cuda":
        meta["note"] = "CPU: timings of the PyTorch fallbacks, not of the Triton kernels"
    print(json.dumps(meta))

    shapes = [s for s in SHAPES if s[0].startswith("smollm2")] if args.quick else SHAPES
    if args.shapes:
        shapes = [s for s in SHAPES if s[0].split(" ")[0] in args.shapes]
    sparsities = tuple(args.sparsities or ((0.0, 0.5, 0.9) if args.quick else SPARSITIES))
    tokens = tuple(args.tokens or ((1, 8, 32) if args.quick else TOKENS))
    meta.update(shapes=[s[0] for s in shapes], sparsities=sparsities, tokens=tokens)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernel_bench_{slug(meta['device'])}" + ("_quick" if args.quick else "")
    (out / f"{stem}.jsonl").write_text("")  # this run's rows; --rows is appended to only
    rows_out = Rows([out / f"{stem}.jsonl"] + ([args.rows] if args.rows else []), meta)
    one = bench_one_token(shapes, sparsities, device, dtype, timer, be, rows_out)

    sources = []
    if args.model:
        acts = real_activations(args.model, max(tokens), device)
        d_model, d_ff = acts["input"].shape[1], acts["intermediate"].shape[1]
        sources += [(f"real ({args.model})", "input", acts["input"], d_ff),
                    (f"real ({args.model})", "intermediate", acts["intermediate"], d_model)]
    g = torch.Generator().manual_seed(2)
    random_dims = [(576, 1536)] if args.quick else [(576, 1536), (4096, 14336)]
    for d_model, d_ff in random_dims:
        for site, d_in, d_out in (("input", d_model, d_ff), ("intermediate", d_ff, d_model)):
            acts = heavy_tailed(max(tokens), d_in, generator=g, device="cpu", dtype=torch.float32)
            sources.append((f"random Student-t(3) (d_in {d_in})", site, acts, d_out))
    many = bench_tokens(sources, tokens, device, dtype, timer, be, rows_out)
    shared = bench_shared(shapes, sparsities, tokens, device, dtype, timer, be, rows_out)

    result = {"meta": meta, "one_token": one, "tokens": many, "shared": shared}
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1))
    if not args.no_plot:
        plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.json{'' if args.no_plot else ' and .png'} ({out / stem}.jsonl: the rows)")
    return result


if __name__ == "__main__":
    main()
