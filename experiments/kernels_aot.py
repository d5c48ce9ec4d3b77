"""Compile every Triton kernel specialization the launchers pick at the 8B FFN shapes, for sm_80 and sm_90, no GPU.

    python experiments/kernels_aot.py                       # all: both shapes, fp16 + bf16, M = 1..288, sm_80 + sm_90
    python experiments/kernels_aot.py --markdown /tmp/aot.md   # also write the table that docs/kernels.md holds
    python experiments/kernels_aot.py --tokens 1 4 64 --dtypes bf16 --archs 90 --shapes llama-3.1-8b   # a subset
    python experiments/kernels_aot.py --shapes qwen3-30b-a3b-expert --archs 90   # one MoE expert's products

What it does. The launchers of dllm_sparse.kernels.triton_kernels are called with ``meta`` tensors of the real shapes
inside ``recording_launches(num_sms)`` (108 SMs for sm_80 = A100, 132 for sm_90 = H100), for every call an
accelerated FFN makes: the top-p threshold over x [M, d] and h [M, d_ff]; the column-sparse GEMV (M = 1) or gathered
GEMM (M > 1) over W_gate;up^T [d, 2 d_ff] (input site), W_gate^T [d, d_ff] (shared input site) and W_down^T
[d_ff, d] (intermediate site); the row-sparse GEMV / GEMM over W_gate or W_up [d_ff, d] (gate and up sites).
Each recorded launch is turned into the specialization Triton's JIT would compile for it (argument types, integer
arguments equal to 1 made constants, divisibility by 16, the constexprs, num_warps) with Triton's own
specialization function, deduplicated, and compiled with ``triton.compile`` for a GPUTarget (ptxas ships in the
Triton wheel). It fails (exit status 1) on a compile error or a register spill (ptxas's "bytes spill stores" > 0),
and prints one row per specialization: registers per thread, spill bytes and shared memory per program.

Needs the real Triton compiler: run it without TRITON_INTERPRET=1. Under another Triton version (the GPU image has
Triton 3.6): a throwaway venv with ``pip install triton==3.6.0`` whose site-packages chain to this project's
environment (docs/kernels.md, "Ahead-of-time compile check").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

SHAPES = {"llama-3.1-8b": (4096, 14336), "llada-8b": (4096, 12288),  # (hidden d, FFN width d_ff)
          # one routed expert of Qwen3-30B-A3B (hidden 2048, expert width 768): accelerate_ffn runs each expert's
          # products on its gathered tokens with the same kernels (kernels/sparse_experts.py, docs/moe.md)
          "qwen3-30b-a3b-expert": (2048, 768)}
DEFAULT_SHAPES = ("llama-3.1-8b", "llada-8b")  # the docs' table; experts: --shapes qwen3-30b-a3b-expert
ARCH_SMS = {80: 108, 90: 132}  # compute capability -> SMs of the GPU the launchers are planned for (A100, H100)
MAX_TOKENS = 288


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES),
                   help=f"published FFN shapes to plan launches for (default: {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "fp32"],
                   help="activation / weight dtypes (default: fp16 bf16; fp32 is checked for spills too)")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"token counts M (default: every M in 1..{MAX_TOKENS})")
    p.add_argument("--archs", nargs="+", type=int, default=sorted(ARCH_SMS), choices=sorted(ARCH_SMS),
                   help="CUDA compute capabilities to compile for, as 80 / 90 (default: 80 90: A100, H100 with "
                        "108 / 132 SMs)")
    p.add_argument("--json", type=Path, default=None, help="write every row (and the versions) here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as a markdown file here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.tokens is not None and any(m < 1 for m in args.tokens):
        build_parser().error(f"--tokens must be >= 1, got {args.tokens}")
    return args


# ------------------------------------------------------------------------------------------------------------------
# Which launches the launchers make
# ------------------------------------------------------------------------------------------------------------------


def record_launches(num_sms: int, shapes, dtypes, tokens) -> list[tuple[dict, str]]:
    """(launch, where) for every kernel launch an accelerated FFN makes at these shapes, dtypes and token counts."""
    import torch

    from dllm_sparse.kernels import triton_kernels as tk

    def meta(*shape, dtype):
        return torch.empty(*shape, device="meta", dtype=dtype)

    out = []
    for shape in shapes:
        d, f = SHAPES[shape]
        for dt_name in dtypes:
            dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt_name]
            idx, count = meta(max(d, f), dtype=torch.int32), meta(1, dtype=torch.int32)
            for M in tokens:
                with tk.recording_launches(num_sms) as rec:
                    tk.topp_threshold(meta(M, d, dtype=dt), 0.5)
                    tk.topp_threshold(meta(M, f, dtype=dt), 0.5)
                    for k_in, n_out in ((d, 2 * f), (d, f), (f, d)):
                        w_t = meta(k_in, n_out, dtype=dt)
                        if M == 1:
                            tk.colsparse_gemv(meta(k_in, dtype=dt), w_t, meta(1, dtype=torch.float32))
                        else:
                            tk.colsparse_gemm(meta(M, k_in, dtype=dt), w_t, idx, count)
                    w = meta(f, d, dtype=dt)
                    if M == 1:
                        tk.rowsparse_gemv(meta(d, dtype=dt), w, idx, count)
                    else:
                        tk.rowsparse_gemm(meta(M, d, dtype=dt), w, idx, count)
                out += [(launch, f"{shape} {dt_name} M={M}") for launch in rec]
    return out


def specialization(launch: dict) -> tuple:
    """The key Triton's JIT compiles a launch under: (kernel name, signature, constexprs, attrs, num_warps)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = launch["kernel"]
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = launch["args"][name]
        if fn.params[i].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":  # an integer argument equal to 1
            signature[name], constexprs[name] = "constexpr", spec
            continue
        signature[name] = ty
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
            tuple(sorted((k, tuple(map(tuple, v))) for k, v in attrs.items())), launch["num_warps"])


# ------------------------------------------------------------------------------------------------------------------
# Compiling
# ------------------------------------------------------------------------------------------------------------------


def compile_key(key: tuple, arch: int):
    """Compile one specialization for sm_<arch>: (compiled kernel, ptxas -v log)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dllm_sparse.kernels import triton_kernels as tk

    name, signature, constexprs, attrs, num_warps = key
    fn = getattr(tk, name)
    src = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs),
                    attrs={k: [list(a) for a in v] for k, v in attrs})
    log = io.StringIO()
    # ptxas's -v report is only printed when asked, and only when ptxas runs (not on a cache hit)
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return kernel, log.getvalue()


def ptxas_usage(log: str) -> dict:
    """Registers and spill bytes from ptxas's -v report."""
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if not (regs and stores and loads):
        raise RuntimeError(f"could not read registers / spills from the ptxas report:\n{log[-2000:]}")
    return {"registers": int(regs.group(1)), "spill_stores": int(stores.group(1)), "spill_loads": int(loads.group(1))}


def loop_bodies(ptx: str) -> list[str]:
    """The PTX text of every loop: from a label to a later branch back to it (innermost and outer loops alike)."""
    lines = ptx.splitlines()
    label_at = {}
    bodies = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(\$L__\w+):", line)
        if m:
            label_at[m.group(1)] = i
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if m and m.group(1) in label_at:  # a backward branch: the loop's latch
            bodies.append("\n".join(lines[label_at[m.group(1)]: i + 1]))
    return bodies


def sass_loops(cubin: bytes) -> list[list[str]] | None:
    """The SASS instructions of every loop of a cubin (from a branch target to a later branch back to it), by
    cuobjdump from the Triton wheel; None when this Triton ships no cuobjdump."""
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    code, labels, pending = [], {}, []
    for line in text.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            labels.update({name: addr for name in pending})
            pending = []
            code.append((addr, m.group(2)))
    loops = []
    for addr, ins in code:
        m = re.search(r"\bBRA\s+(?:`\((\.L_x_\d+)\)|0x([0-9a-f]+))", ins)
        if not m:
            continue
        target = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
        if target is not None and target <= addr:
            loops.append([i for a, i in code if target <= a <= addr])
    return loops


def describe(key: tuple) -> str:
    name, signature, constexprs, attrs, num_warps = key
    dtype = next(ty[1:] for arg, ty in signature if ty.startswith("*") and arg in ("x_ptr",))
    blocks = " ".join(f"{k}={v}" for k, v in constexprs if k.isupper())
    ones = " ".join(f"{k}=1" for k, v in constexprs if not k.isupper())
    aligned = {k[0] for k, _ in attrs}
    unaligned = [arg for i, (arg, ty) in enumerate(signature) if ty in ("i32", "i64") and i not in aligned]
    extra = (f"; {ones}" if ones else "") + (f"; not /16: {','.join(unaligned)}" if unaligned else "")
    return f"{name.strip('_').replace('_kernel', '')} {dtype} {blocks} warps={num_warps}{extra}"


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    out, start = [], values[0]
    for a, b in zip(values, values[1:] + [None], strict=True):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def token_counts(values: list[int]) -> str:
    """M values in words: 'a-b', 'a-b, multiples of 16', 'a-b, not multiples of 16' or the plain ranges."""
    values = sorted(set(values))
    lo, hi = values[0], values[-1]
    span = range(lo, hi + 1)
    if values == list(span):
        return f"{lo}" if lo == hi else f"{lo}-{hi}"
    if len(values) > 1 and values == [m for m in span if m % 16 == 0]:
        return f"{lo}-{hi}, multiples of 16"
    if values == [m for m in span if m % 16]:
        return f"{lo}-{hi}, not multiples of 16"
    return _ranges(values)


def run(shapes, dtypes, tokens, archs) -> tuple[list[dict], list[str]]:
    """Rows (one per specialization, with each arch's registers, spills and shared memory) and failures."""
    rows: dict[tuple, dict] = {}
    failures = []
    for arch in archs:
        uses: dict[tuple, dict] = {}
        for launch, where in record_launches(ARCH_SMS[arch], shapes, dtypes, tokens):
            key = specialization(launch)
            shape, _, m = where.split()
            uses.setdefault(key, {}).setdefault(shape, []).append(int(m[2:]))
        for key, where in uses.items():
            row = rows.setdefault(key, {"kernel": describe(key)})
            by_m = {}
            for shape, ms in where.items():
                by_m.setdefault(token_counts(ms), []).append(shape)
            row[f"sm_{arch} M"] = "; ".join(m if len(names) == len(shapes) else f"{m} ({', '.join(names)})"
                                            for m, names in by_m.items())
            try:
                kernel, log = compile_key(key, arch)
                usage = {**ptxas_usage(log), "shared": int(kernel.metadata.shared)}
                if usage["spill_stores"] or usage["spill_loads"]:
                    failures.append(f"sm_{arch} {row['kernel']}: spills {usage['spill_stores']} B stores, "
                                    f"{usage['spill_loads']} B loads ({usage['registers']} registers)")
            except Exception as e:  # noqa: BLE001 - every failure is reported, then the run fails
                usage = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                failures.append(f"sm_{arch} {row['kernel']}: compile error {usage['error']}")
            row[f"sm_{arch}"] = usage
    return sorted(rows.values(), key=lambda r: r["kernel"]), failures


def versions() -> dict:
    import torch
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def _usage(u: dict | None) -> str:
    if u is None:
        return "-"
    if "error" in u:
        return "compile error"
    spill = u["spill_stores"] + u["spill_loads"]
    return f"{u['registers']} / {u['shared']}" + (f" / spills {spill} B" if spill else "")


def markdown(rows: list[dict], archs) -> str:
    import triton

    head = (f"Triton {triton.__version__} (ptxas from its wheel): {len(rows)} specializations, "
            f"`python experiments/kernels_aot.py --markdown FILE`. Registers per thread / shared memory per program "
            "(bytes); no specialization spills.\n\n"
            "| kernel: dtype, constexprs, warps; integer args specialised to 1; args not divisible by 16 | "
            + " | ".join(f"sm_{a}" for a in archs) + " | " + " | ".join(f"M at sm_{a}" for a in archs) + " |\n"
            + "| --- " * (1 + 2 * len(archs)) + "|\n")
    return head + "".join(
        f"| {r['kernel']} | " + " | ".join(_usage(r.get(f"sm_{a}")) for a in archs) + " | "
        + " | ".join(r.get(f"sm_{a} M", "-") for a in archs) + " |\n" for r in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        print("TRITON_INTERPRET is set: the interpreter replaces the compiler; run without it", file=sys.stderr)
        return 2
    tokens = args.tokens or list(range(1, MAX_TOKENS + 1))
    t0 = time.perf_counter()
    rows, failures = run(args.shapes, args.dtypes, tokens, args.archs)
    info = {**versions(), "specializations": len(rows), "seconds": round(time.perf_counter() - t0, 1)}
    for r in rows:
        for a in args.archs:
            u = r.get(f"sm_{a}")
            if u is None:
                continue
            usage = (f"{u['registers']:3d} regs  spill {u['spill_stores'] + u['spill_loads']:4d} B  "
                     f"smem {u['shared']:6d} B" if "error" not in u else u["error"])
            print(f"sm_{a}  {r['kernel']:<96s} {usage}  M={r[f'sm_{a} M']}")
    print(f"{len(rows)} specializations, {len(rows) * len(args.archs)} compiles, {info['seconds']:.0f} s, "
          f"Triton {info['triton']}")
    if args.json:
        from dllm_sparse.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"versions": info, "rows": rows}, indent=1))
    if args.markdown:
        from dllm_sparse.atomic import atomic_write_text

        atomic_write_text(args.markdown, markdown(rows, args.archs))
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
