"""The prepared GPU check: kernels, decode and the step frontier at 8B shapes, and a twin-training run (<= 8 min).

    bash experiments/device_check.sh                  # on the GPU machine; everything under $OUT (or --output-dir)
    bash experiments/device_check.sh --smoke          # any CPU, tiny shapes, seconds (the test suite runs this)
    python experiments/device_check.py --parts kernels decode --output-dir runs/device_check

Parts, each a subprocess with its own time limit, its log in <output-dir>/<part>.log, its results in
<output-dir>/<part>/ (a failing part is recorded with its error and the next part runs):

* ``kernels``: experiments/kernel_bench.py at the LLaMA-3.1-8B and LLaDA-8B FFN shapes, bf16, Triton: the one-token
  GEMV and the shared-set gathered GEMM at 0 / 50 / 70 / 90 % sparsity, M = 1, 4, 16, 128 (90 s);
* ``decode``: experiments/decode_bench.py, AR tokens/s at the LLaMA-3.1-8B shape (input site, top-p 0.5) and seconds
  per denoising step at the LLaDA-8B shape (gen 256, 4 steps), random bf16 weights, 32 layers (2 x 75 s);
* ``frontier``: the trajectory frontier's timing (dllm_sparse/eval/trajectory_frontier.py) on a random LLaDA-8B
  shape of 4 layers, bf16, canvas 128, block 32: per-token top-p, a reused shared keep-set and the step-delta
  strategies with the Triton backend (the gathered delta GEMM's GPU figure, owed by issue #26) (90 s);
* ``train``: experiments/adapt_ar_to_diffusion.py from the shipped adapter on the committed corpus for
  ``--train-minutes`` (2.5), exporting the adapter, its log and held-out loss. It needs the SmolLM2-135M weights
  (the 98 MB GGUF in $DLLM_SPARSE_CACHE/smollm2, else ~/.cache/dllm_sparse/smollm2); they are larger than what
  travels with a working tree (64 MiB), so without them the part is skipped, saying so (150 s + loading).

Versions: the device image may be older than this project's floors (torch >= 2.13, transformers >= 5.23). Checked
first, as capabilities rather than numbers: CUDA (refused without it, except --smoke), ``torch.library.custom_op``
(the kernels' custom ops; torch >= 2.4), Triton >= 3.0 importable (the kernels part), transformers configs being
dataclasses (the native LLaDA's config; transformers 5), and the optional modules each part imports (peft,
accelerate, matplotlib). A part whose requirement is missing is refused with the reason; versions below the floors
are recorded in ``preflight.json`` and every part still runs (its outcome says whether that mattered).

Not installed on the device: when ``import dllm_sparse.samplers`` fails, the package is put on PYTHONPATH from the
working tree (a folder of symlinks, <output-dir>/.pkg, mapping dllm_sparse/, samplers/ and kernels/ as pyproject.toml
installs them). Everything is written under the output folder; ``summary.json`` lists each part's outcome, seconds
and files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("kernels", "decode", "frontier", "train")
FLOORS = {"torch": "2.13", "transformers": "5.23", "triton": "3.9"}
FRONTIER_STRATEGIES = ("token-intermediate:0.9", "step-intermediate:0.9@block_start",
                       "delta-input:0.25/0.5@block_start", "delta-input:0.125/0.25+block@block_start",
                       "delta-intermediate:0.15+block@block_start")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", type=Path, default=Path(os.environ.get("OUT") or "runs/device_check"),
                    help="where everything goes (default: $OUT when set, else runs/device_check)")
    ap.add_argument("--parts", nargs="+", default=None, choices=PARTS, help="parts to run (default: all)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on any device, seconds: the CPU test of the whole script (default: off)")
    ap.add_argument("--train-minutes", type=float, default=2.5, help="training budget of the train part (default: 2.5)")
    ap.add_argument("--frontier-layers", type=int, default=4,
                    help="layers of the frontier's LLaDA-8B shape (default: 4)")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    return ap


# ---- making the package importable without installing it ------------------------------------------------------


def package_path(out: Path, force: bool = False) -> str | None:
    """A directory to put first on PYTHONPATH so that ``dllm_sparse`` (with its ``samplers`` and ``kernels``
    subpackages, top-level folders of the repository) imports from the working tree; None when the installed
    package already serves (and ``force`` is off)."""
    if not force:
        import importlib.util

        try:  # finds the subpackages without importing them (dllm_sparse/__init__ itself is light)
            if all(importlib.util.find_spec(m) for m in ("dllm_sparse.samplers", "dllm_sparse.kernels")):
                return None
        except ImportError:
            pass
    shim = (out / ".pkg").resolve()
    pkg = shim / "dllm_sparse"
    pkg.mkdir(parents=True, exist_ok=True)
    links = {p.name: p for p in (ROOT / "dllm_sparse").iterdir() if p.name != "__pycache__"}
    links.update(samplers=ROOT / "samplers", kernels=ROOT / "kernels")
    for name, target in links.items():
        link = pkg / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return str(shim)


# ---- preflight -------------------------------------------------------------------------------------------------


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def preflight(smoke: bool) -> dict:
    """Versions, device and the capabilities each part needs; ``refused``: part -> reason."""
    import importlib

    info: dict = {"python": sys.version.split()[0], "versions": {}, "missing": [], "refused": {}, "below_floor": {}}
    for mod in ("torch", "triton", "transformers", "accelerate", "peft", "matplotlib", "numpy", "safetensors",
                "tokenizers"):
        try:
            info["versions"][mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001 - a broken install is as absent as a missing one
            info["missing"].append(f"{mod} ({type(e).__name__})")
    for mod, floor in FLOORS.items():
        v = info["versions"].get(mod)
        if v is not None and _version_tuple(v) < _version_tuple(floor):
            info["below_floor"][mod] = f"{v} < {floor} (the tested floor)"
    if "torch" in info["versions"]:
        import torch

        info["cuda"] = torch.cuda.is_available()
        info["device"] = torch.cuda.get_device_name(0) if info["cuda"] else "cpu"
        if not info["cuda"] and not smoke:
            for part in PARTS:
                info["refused"][part] = "no CUDA device: this is the GPU check (use --smoke on a CPU)"
        if not hasattr(torch.library, "custom_op"):
            for part in PARTS:
                info["refused"].setdefault(part, "torch.library.custom_op is missing (torch < 2.4): the kernels' "
                                                 "custom ops cannot be registered")
    else:
        for part in PARTS:
            info["refused"][part] = "torch is not importable"
    triton = info["versions"].get("triton")
    if triton is None and info.get("cuda"):
        info["refused"].setdefault("kernels", "Triton is not importable: the kernel benchmark times the Triton kernels")
    elif triton is not None and _version_tuple(triton) < (3, 0):
        info["refused"].setdefault("kernels", f"Triton {triton} < 3.0: the kernels use the 3.x language")
    if "transformers" in info["versions"]:
        import dataclasses

        import transformers

        if not dataclasses.is_dataclass(transformers.PretrainedConfig):
            for part in ("decode", "frontier", "train"):
                info["refused"].setdefault(part, f"transformers {transformers.__version__}: configs are not "
                                                 "dataclasses (transformers < 5), the native LLaDA needs them")
    needs = {"train": ("peft", "accelerate", "matplotlib"), "kernels": ("matplotlib",),
             "frontier": ("matplotlib", "numpy")}
    for part, mods in needs.items():
        gone = [m for m in mods if m not in info["versions"]]
        if gone:
            info["refused"].setdefault(part, f"missing module(s) {', '.join(gone)}")
    return info


def smollm2_weights() -> Path | None:
    root = Path(os.environ.get("DLLM_SPARSE_CACHE") or Path.home() / ".cache" / "dllm_sparse")
    gguf = root / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf if gguf.is_file() else None


# ---- the parts ---------------------------------------------------------------------------------------------------


def part_commands(part: str, args, out: Path) -> list[list[str]] | str:
    """The command lines of a part, or a sentence saying why it is skipped."""
    py = sys.executable
    here = out / part
    if part == "kernels":
        if args.smoke:
            return [[py, str(ROOT / "experiments/kernel_bench.py"), "--quick", "--tokens", "1", "4",
                     "--sparsities", "0.5", "--output-dir", str(here)]]
        return [[py, str(ROOT / "experiments/kernel_bench.py"), "--shapes", "llama-3.1-8b", "llada-8b",
                 "--sparsities", "0", "0.5", "0.7", "0.9", "--tokens", "1", "4", "16", "128", "--dtype", "bf16",
                 "--backend", "triton", "--output-dir", str(here)]]
    if part == "decode":
        bench = str(ROOT / "experiments/decode_bench.py")
        if args.smoke:
            return [[py, bench, "--model-shape", "smollm2-135m", "--layers", "1", "--tokens", "3", "--repeats", "1",
                     "--output-dir", str(here)]]
        return [[py, bench, "--model-shape", "llama-3.1-8b", "--site", "input", "--p", "0.5", "--dtype", "bf16",
                 "--backend", "triton", "--output-dir", str(here)],
                [py, bench, "--model-shape", "llada-8b", "--gen-length", "256", "--steps", "4", "--dtype", "bf16",
                 "--backend", "triton", "--output-dir", str(here)]]
    if part == "frontier":
        layers = "1" if args.smoke else str(args.frontier_layers)
        return [[py, str(Path(__file__).resolve()), "--run-part", "frontier", "--output-dir", str(out),
                 "--frontier-layers", layers] + (["--smoke"] if args.smoke else [])]
    if part == "train":
        if args.smoke and "train" not in (args.explicit_parts or ()):
            return ("skipped in --smoke (it loads the 135M model: minutes on a busy CPU); --smoke --parts train runs "
                    "one training step")
        weights = smollm2_weights()
        if weights is None:
            return ("skipped: the SmolLM2-135M weights are not on this machine (smollm2/SmolLM2-135M-Instruct.Q4_1."
                    "gguf under $DLLM_SPARSE_CACHE or ~/.cache/dllm_sparse; 98 MB, more than the 64 MiB that travel "
                    "with a working tree). Copy that file there and rerun --parts train")
        cmd = [py, str(ROOT / "experiments/adapt_ar_to_diffusion.py"), "--init-adapter",
               str(ROOT / "dllm_sparse/data/smollm2-135m-mdm"), "--run-dir", str(here / "run"), "--export",
               str(here / "adapter"), "--ckpt-minutes", "100"]
        if args.smoke:
            cmd += ["--max-steps", "1", "--heldout", "2", "--batch-size", "2", "--threads", "1"]
        else:
            cmd += ["--minutes", str(args.train_minutes)]
        return [cmd]
    raise ValueError(part)


TIME_LIMITS = {"kernels": 90, "decode": 75, "frontier": 90, "train": 240}


def run_frontier(args) -> None:
    """The frontier part in this process: a random LLaDA-8B shape (``--smoke``: llada-8b-mini) on the GPU, the
    trajectory frontier's timing with the Triton backend."""
    import torch

    from dllm_sparse.eval.trajectory_frontier import run_trajectory_frontier
    from dllm_sparse.models.loading import LoadedModel
    from dllm_sparse.models.shapes import build_random, shape_fields

    shape = "llada-8b-mini" if args.smoke else "llada-8b"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        os.environ.setdefault("DLLM_SPARSE_KERNELS", "triton")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, _ = build_random(shape, args.frontier_layers, dtype, device)
    lm = LoadedModel(model, None, "diffusion", f"random {shape} ({args.frontier_layers} layers)",
                     shape_fields(shape)["mask_token_id"], "llada")
    small = args.smoke
    ns = argparse.Namespace(
        model=lm.name, dtype=str(dtype).replace("torch.", ""), threads=1 if small else 4,
        strategies=list(FRONTIER_STRATEGIES[1:3] if small else FRONTIER_STRATEGIES), prompts=1,
        gen_length=16 if small else 128, block_length=8 if small else 32,
        canvas=16 if small else 128, timing_steps=4 if small else 32, batches=[1] if small else [1, 4],
        repeats=1 if small else 3, skip_quality=True, skip_timing=False, quality_from=None,
        output_dir=args.output_dir / "frontier")
    prompt = list(range(40, 40 + (8 if small else 32)))  # byte-range ids: never a special token
    res = run_trajectory_frontier(ns, "experiments/device_check.py --parts frontier", lm=lm, prompts=[prompt],
                                  keywords=None, chat=False)
    res["kernels_backend"] = os.environ.get("DLLM_SPARSE_KERNELS", "auto")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.explicit_parts, args.parts = args.parts, args.parts or list(PARTS)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.frontier_layers < 1 or args.train_minutes <= 0:
        build_parser().error("--frontier-layers must be >= 1 and --train-minutes > 0")
    if args.run_part == "frontier":
        run_frontier(args)
        return {}
    shim = package_path(out, force=os.environ.get("DLLM_SPARSE_FORCE_SHIM") == "1")
    env = dict(os.environ)
    if shim:
        env["PYTHONPATH"] = shim + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        sys.path.insert(0, shim)
    from dllm_sparse.atomic import atomic_write_json

    info = preflight(args.smoke)
    info["package_from"] = f"working tree via {shim}" if shim else "installed"
    atomic_write_json(out / "preflight.json", info)
    print(json.dumps(info, indent=1), flush=True)
    summary: dict = {"preflight": info, "smoke": args.smoke, "parts": {}}
    for part in args.parts:
        t0 = time.perf_counter()
        if part in info["refused"]:
            summary["parts"][part] = {"outcome": "refused", "reason": info["refused"][part]}
            print(f"[{part}] refused: {info['refused'][part]}", flush=True)
            continue
        cmds = part_commands(part, args, out)
        if isinstance(cmds, str):
            summary["parts"][part] = {"outcome": "skipped", "reason": cmds}
            print(f"[{part}] {cmds}", flush=True)
            continue
        outcome, detail = "ok", []
        limit = TIME_LIMITS[part] if not args.smoke else 300
        with open(out / f"{part}.log", "w") as log:
            for cmd in cmds:
                print(f"[{part}] {' '.join(cmd)}", flush=True)
                try:
                    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=limit)
                    rc = proc.returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
                detail.append({"command": cmd, "rc": rc})
                if rc != 0:
                    outcome = "failed"
        files = sorted(str(p.relative_to(out)) for p in (out / part).rglob("*") if p.is_file()) \
            if (out / part).is_dir() else []
        tail = (out / f"{part}.log").read_text()[-2000:] if outcome != "ok" else ""
        summary["parts"][part] = {"outcome": outcome, "seconds": time.perf_counter() - t0, "commands": detail,
                                  "files": files, **({"log_tail": tail} if tail else {})}
        print(f"[{part}] {outcome} in {time.perf_counter() - t0:.0f} s", flush=True)
        atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps({k: v["outcome"] for k, v in summary["parts"].items()}), flush=True)
    return summary


if __name__ == "__main__":
    main()
