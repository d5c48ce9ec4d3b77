"""The prepared GPU check, made for one shot of at most 600 s: the kernel tests compiled on the GPU, the kernel and
decode benchmarks at 8B shapes, the step frontier at an 8B shape, and a twin-training run.

    bash experiments/device_check.sh                  # on the GPU machine; what comes back goes to $OUT
    bash experiments/device_check.sh --smoke          # any CPU, tiny shapes, a few minutes (the test suite runs this)
    python3 experiments/device_check.py --parts kernels decode --output-dir runs/device_check/out

What comes back (the device returns at most 8 files of <= 16 MiB, none deeper than $OUT/a/b/file, no symlinks):
exactly four files directly under --output-dir ($OUT):

* ``device_check.log``: everything this script and its parts printed, line by line as it happened (capped at 8 MiB);
* ``rows.jsonl``: every measured row of the kernel and decode benchmarks, appended and flushed as it finishes,
  each with the environment (GPU, driver, torch, Triton, backend): a part killed half-way keeps the rows it finished;
* ``summary.json``: the preflight, the environment, the plan (each part's estimated seconds, time limit and output
  size), each part's outcome, seconds, files and log tail, and the return check; rewritten after every part;
* ``results.tar.gz``: the work folder (every part's own JSON / JSONL / PNG / logs), rewritten after every part;
  files that cannot come back (checkpoints, adapter weights: larger than a returned file) stay on the device and
  are listed in the summary.

The parts run in --work-dir (default runs/device_check/work in the repository), one subprocess each, in its own
process group with its own time limit; a failing, timed-out or killed part is recorded and the next one runs:

* ``kernel_tests``: tests/test_kernels.py's Triton tests, compiled on the GPU (pytest runs outside the repository
  root so that the package shim below, not the bare folders, serves ``dllm_sparse``);
* ``kernels``: experiments/kernel_bench.py at the LLaMA-3.1-8B and LLaDA-8B FFN shapes, bf16, Triton, every call
  timed under CUDA graphs with its roofline share: the one-token GEMV and the shared-set gathered GEMM at
  0 / 50 / 70 / 90 % sparsity, M = 1, 4, 16, 128;
* ``decode``: experiments/decode_bench.py: the AR decode step at the LLaMA-3.1-8B shape (input site, top-p 0.5) and
  the denoising step at the LLaDA-8B shape (gen 256), each captured in a CUDA graph, dense and sparse, plus the eager
  loops (tokens/s, s/step), random bf16 weights, 32 layers;
* ``frontier``: the trajectory frontier's timing (dllm_sparse/eval/studies/trajectory_frontier.py) on a random LLaDA-8B
  shape of 4 layers, bf16, canvas 128, block 32: per-token top-p, a reused shared keep-set and the step-delta
  strategies with the Triton backend (the gathered delta GEMM's GPU figure, owed by issue #26);
* ``train`` (only with ``--parts train``: it does not fit one shot with the others):
  experiments/adapt_ar_to_diffusion.py from the shipped adapter on the committed corpus for ``--train-minutes``
  (2.5), its log and held-out loss (the adapter weights, 19 MB, stay on the device). It needs the
  SmolLM2-135M weights (the 98 MB GGUF in $DLLM_SPARSE_CACHE/smollm2, else ~/.cache/dllm_sparse/smollm2), larger
  than what travels with a working tree (64 MiB): without them the part is skipped, saying so.

Time. Each part's limit is its estimated seconds (work counted from its command line: timed calls, kernels to
compile, tensors to fill, steps to run, at the rates in ``RATES``) times 1.3 plus 20 s; ``--plan`` prints them. A
run whose limits add up to more than --budget-s (560: the device's 600 s per command, less preflight and packing)
is refused before it starts, naming the parts; so is one whose planned output would not fit the return rules. The
run also stops starting parts once the budget is spent.

Stopping and rerunning. SIGTERM / SIGINT stop the running part's whole process group, record it as stopped, pack
what exists and exit; a part also dies with this script when that is SIGKILLed (Linux: PR_SET_PDEATHSIG). A lock
file (<work-dir>/device_check.lock, holding the pid) refuses a second run into the same work folder while the first
is alive; a dead holder's lock is taken over, saying so. A work folder holding a previous run is refused unless
--resume (keep its finished parts, rerun the others) or --fresh (start over).

Versions: the device image may be older than this project's floors (torch >= 2.13, transformers >= 5.23). Checked
first, as capabilities rather than numbers: CUDA (refused without it, except --smoke), ``torch.library.custom_op``
(the kernels' custom ops; torch >= 2.4), Triton >= 3.0 importable (the kernels parts), transformers configs being
dataclasses (the native LLaDA's config; transformers 5), and the optional modules each part imports (peft,
accelerate, matplotlib, pytest; the kernels part runs without matplotlib, skipping its plot). A part whose
requirement is missing is refused with the reason; versions below the floors are recorded in the summary's
preflight and every part still runs (its outcome says whether that mattered).

Not installed on the device: when ``import dllm_sparse.samplers`` fails, the package is put on PYTHONPATH from the
working tree (a folder of symlinks, <work-dir>/.pkg, mapping dllm_sparse/, samplers/ and kernels/ as pyproject.toml
installs them; in the work folder, never in $OUT, which must hold no symlinks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("kernel_tests", "kernels", "decode", "frontier", "train")
DEFAULT_PARTS = PARTS[:-1]  # train only when asked: with the others it does not fit one 600 s shot
FLOORS = {"torch": "2.13", "transformers": "5.23", "triton": "3.9"}
FRONTIER_STRATEGIES = ("token-intermediate:0.9", "step-intermediate:0.9@block_start",
                       "delta-input:0.25/0.5@block_start", "delta-input:0.125/0.25+block@block_start",
                       "delta-intermediate:0.15+block@block_start")
MiB = 2**20
# What the device brings back from $OUT.
RETURN_LIMITS = {"files": 8, "file_bytes": 16 * MiB, "depth": 3}  # depth: path parts below $OUT ($OUT/a/b/file)
LOG_CAP = 8 * MiB
LOCK = "device_check.lock"
# Files a part may write that can never come back (each larger than a returned file): left in the work folder.
STAYS_ON_DEVICE = (".pt", ".safetensors", ".bin", ".gguf")
# Rates the time estimates assume on one H100/H200 (guesses for work this script counts, not measurements):
RATES = {
    "startup_s": 20.0,            # a fresh python: torch + transformers imports, the CUDA context
    "timed_call_s": 0.25,         # one graph-timed call (kernels/bench.graph_ms: sync check, capture, 25 replays)
    "compile_s": 2.0,             # one Triton kernel specialisation compiled on first use
    "cpu_randn_per_s": 1e8,       # random weights made on the CPU (seeded) before they move to the GPU
    "triton_test_s": 1.5,         # one Triton-parametrised kernel test (mostly its compile)
    "eager_decode_step_s": 0.05,  # one eager decode step of a 32-layer 8B model with the sparse FFN (Python-bound)
    "eager_denoise_step_s": 0.1,  # one eager denoising step over ~290 tokens, 32 layers
    "frontier_forward_s": 0.02,   # one forward of the 4-layer frontier model over its canvas
}
MARGIN, LIMIT_FLOOR_S = 1.3, 20.0
SMOKE_LIMIT_S = 600.0  # --smoke on a busy 2-core CPU: limits only catch a hang


def finite_positive(text: str) -> float:
    """argparse type: a finite number > 0 (nan, inf, 0 and negatives are refused, naming the value)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", type=Path, default=Path(os.environ.get("OUT") or "runs/device_check/out"),
                    help="what comes back: four files (default: $OUT when set, else runs/device_check/out)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "device_check" / "work",
                    help="where the parts write (default: runs/device_check/work in the repository)")
    ap.add_argument("--parts", nargs="+", default=None, choices=PARTS, help="parts to run, in this order "
                    f"(default: {' '.join(DEFAULT_PARTS)})")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on any device: the CPU test of the whole script (default: off)")
    ap.add_argument("--train-minutes", type=finite_positive, default=2.5,
                    help="training budget of the train part, a finite number > 0 (default: 2.5)")
    ap.add_argument("--frontier-layers", type=positive_int, default=4,
                    help="layers of the frontier's LLaDA-8B shape (default: 4)")
    ap.add_argument("--budget-s", type=finite_positive, default=560.0,
                    help="seconds the parts' limits may add up to (default: 560, inside the device's 600 s)")
    again = ap.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="the work folder holds a previous run: keep its finished parts, run the others")
    again.add_argument("--fresh", action="store_true",
                       help="the work folder holds a previous run: remove it and start over")
    ap.add_argument("--plan", action="store_true",
                    help="print the plan (commands, estimated seconds, limits, output bytes) and whether it would be "
                         "refused, then exit without running anything")
    ap.add_argument("--run-part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    return ap


# ---- making the package importable without installing it ------------------------------------------------------


def package_path(where: Path, force: bool = False) -> str | None:
    """A directory to put first on PYTHONPATH so that ``dllm_sparse`` (with its ``samplers`` and ``kernels``
    subpackages, top-level folders of the repository) imports from the working tree; None when the installed
    package already serves (and ``force`` is off). It is a folder of symlinks, ``where/.pkg``: keep it out of
    the returned folder."""
    if not force:
        try:  # finds the subpackages without importing them (dllm_sparse/__init__ itself is light)
            if all(importlib.util.find_spec(m) for m in ("dllm_sparse.samplers", "dllm_sparse.kernels")):
                return None
        except ImportError:
            pass
    shim = (where / ".pkg").resolve()
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
                "tokenizers", "pytest"):
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
    triton_refusal = info["refused"].get("kernels")
    if triton_refusal:
        info["refused"].setdefault("kernel_tests", triton_refusal)
    needs = {"train": ("peft", "accelerate", "matplotlib"), "frontier": ("matplotlib", "numpy"),
             "kernel_tests": ("pytest",)}  # kernels: without matplotlib it runs with --no-plot
    for part, mods in needs.items():
        gone = [m for m in mods if m not in info["versions"]]
        if gone:
            info["refused"].setdefault(part, f"missing module(s) {', '.join(gone)}")
    return info


def smollm2_weights() -> Path | None:
    root = Path(os.environ.get("DLLM_SPARSE_CACHE") or Path.home() / ".cache" / "dllm_sparse")
    gguf = root / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return gguf if gguf.is_file() else None



# ---- the frontier part (run in a child of this script) -----------------------------------------------------


def run_frontier(args) -> None:
    """The frontier part in this process: a random LLaDA-8B shape (``--smoke``: llada-8b-mini) on the GPU, the
    trajectory frontier's timing with the Triton backend."""
    import torch

    from dllm_sparse.eval.studies.trajectory_frontier import run_trajectory_frontier
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
        canvas=16 if small else 128, timing_steps=4 if small else 16, batches=[1] if small else [1, 4],
        repeats=1 if small else 2, skip_quality=True, skip_timing=False, quality_from=None,
        output_dir=args.work_dir / "frontier")
    prompt = list(range(40, 40 + (8 if small else 32)))  # byte-range ids: never a special token
    run_trajectory_frontier(ns, "experiments/device_check.py --parts frontier", lm=lm, prompts=[prompt],
                            keywords=None, chat=False)
    # Every result file carries the environment: add it to the frontier's JSON (written without it).
    from dllm_sparse.atomic import atomic_write_json
    from dllm_sparse.kernels.bench import environment

    path = ns.output_dir / "trajectory_frontier.json"
    result = json.loads(path.read_text())
    result["env"] = environment(device, backend=os.environ.get("DLLM_SPARSE_KERNELS", "auto"))
    atomic_write_json(path, result)


# ---- the parts: commands, estimated work, limits --------------------------------------------------------------


@dataclass
class Part:
    name: str
    commands: list[list[str]] = field(default_factory=list)
    estimate_s: float = 0.0
    output_bytes: int = 0
    skipped: str | None = None  # why it does not run

    @property
    def limit_s(self) -> float:
        return self.estimate_s * MARGIN + LIMIT_FLOOR_S

    def plan(self) -> dict:
        if self.skipped:
            return {"skipped": self.skipped}
        return {"estimate_s": round(self.estimate_s, 1), "limit_s": round(self.limit_s, 1),
                "output_bytes": self.output_bytes, "commands": self.commands}


# kernel_bench's shapes per model prefix (gate/up and down), and its random activation sources when not --quick.
KERNEL_SHAPES = {"llama-3.1-8b": [(4096, 14336), (14336, 4096)], "llada-8b": [(4096, 12288), (12288, 4096)],
                 "smollm2-135m": [(576, 1536), (1536, 576)]}
KERNEL_SOURCES = [(576, 1536), (1536, 576), (4096, 14336), (14336, 4096)]  # (d_in, d_out) per site
TOP_PS = 3  # kernel_bench's top-p values per token count


def kernel_bench_work(models, sparsities, tokens, sources) -> tuple[float, int]:
    """(seconds, bytes written) of one kernel_bench run, counted from its options at the rates in RATES."""
    shapes = [s for m in models for s in KERNEL_SHAPES[m]]
    calls = len(shapes) * (2 + 2 * len(sparsities))                      # 1. dense, top-p, then col + row per s
    calls += len(sources) * len(tokens) * (1 + TOP_PS)                   # 2-3. dense + GEMM per top-p
    calls += len(shapes) * len(tokens) * (1 + len(sparsities))           # 4. dense + shared-set per s
    rows = len(shapes) * len(sparsities) + len(sources) * len(tokens) * TOP_PS + len(shapes) * len(tokens) * len(
        sparsities)
    randn = sum(i * o for i, o in shapes) * (1 + len(tokens)) + sum(i * o for i, o in sources) * len(tokens)
    compiles = 12  # five kernels in a few dtype / block / divisibility specialisations
    seconds = (RATES["startup_s"] + compiles * RATES["compile_s"] + calls * RATES["timed_call_s"]
               + randn / RATES["cpu_randn_per_s"])
    return seconds, rows * 3000 + 200_000  # a row: ~1.5 KB in JSONL with its environment, twice; the PNG


def plan_part(name: str, args, work: Path, out: Path) -> Part:
    """The part's command lines and its estimated work, or why it is skipped."""
    py = sys.executable
    here = work / name
    rows = ["--rows", str(out / "rows.jsonl")]
    part = Part(name)
    if name == "kernel_tests":
        # cwd = the work folder: `python -m pytest` puts the current folder first on sys.path, and in the
        # repository root the bare dllm_sparse/ (without its samplers and kernels subpackages) would shadow the shim.
        select = ("torch" if args.smoke else "triton") + " and not interpreter and not sm90"
        probe = ("import dllm_sparse.kernels as k, dllm_sparse.samplers as s; "
                 "print('dllm_sparse.kernels imported from', k.__file__, flush=True)")
        part.commands = [[py, "-u", "-c", probe],
                         [py, "-u", "-m", "pytest", str(ROOT / "tests" / "test_kernels.py"), "-q", "-rfE",
                          "-p", "no:cacheprovider", "--rootdir", str(ROOT), "-k", select,
                          "--junitxml", str(here / "junit.xml")]]
        tests = 64 if not args.smoke else 53  # collected with these -k selections (pytest --collect-only)
        part.estimate_s = RATES["startup_s"] + tests * RATES["triton_test_s"]
        part.output_bytes = 100_000
    elif name == "kernels":
        bench = [py, "-u", str(ROOT / "experiments/kernel_bench.py"), "--output-dir", str(here)] + rows
        if importlib.util.find_spec("matplotlib") is None:
            bench.append("--no-plot")
        if args.smoke:
            part.commands = [bench + ["--quick", "--tokens", "1", "4", "--sparsities", "0.5", "--roofline-gpu", "H100"]]
            part.estimate_s, part.output_bytes = kernel_bench_work(["smollm2-135m"], [0.5], [1, 4], KERNEL_SOURCES[:2])
        else:
            models, sparsities = ["llama-3.1-8b", "llada-8b"], ["0", "0.5", "0.7", "0.9"]
            tokens = ["1", "4", "16", "128"]
            part.commands = [bench + ["--shapes", *models, "--sparsities", *sparsities, "--tokens", *tokens,
                                      "--dtype", "bf16", "--backend", "triton"]]
            part.estimate_s, part.output_bytes = kernel_bench_work(models, sparsities, tokens, KERNEL_SOURCES)
    elif name == "decode":
        bench = [py, "-u", str(ROOT / "experiments/decode_bench.py"), "--output-dir", str(here)] + rows
        if args.smoke:
            part.commands = [bench + ["--model-shape", "smollm2-135m", "--layers", "1", "--tokens", "3",
                                      "--repeats", "1"]]
        else:
            part.commands = [bench + ["--model-shape", "llama-3.1-8b", "--site", "input", "--p", "0.5",
                                      "--tokens", "64", "--repeats", "2", "--dtype", "bf16", "--backend", "triton"],
                             bench + ["--model-shape", "llada-8b", "--gen-length", "256", "--steps", "4",
                                      "--repeats", "2", "--dtype", "bf16", "--backend", "triton"]]
        # AR: 2 captured steps (3 warmups + 21 replays each), the loops (tokens - 1 steps, 1 + repeats times, dense
        # and sparse), 16 sparsity steps; diffusion: 2 captured steps, steps x (1 + repeats) x 2, 2 check passes.
        ar = RATES["eager_decode_step_s"] * (2 * 24 + 63 * 3 * 2 + 16 + 4)
        diffusion = RATES["eager_denoise_step_s"] * (2 * 24 + 4 * 3 * 2 + 4)
        part.estimate_s = 2 * RATES["startup_s"] + ar + diffusion + 2 * 10  # + filling 16 GB of weights, twice
        part.output_bytes = 50_000
    elif name == "frontier":
        layers = "1" if args.smoke else str(args.frontier_layers)
        part.commands = [[py, "-u", str(Path(__file__).resolve()), "--run-part", "frontier", "--work-dir", str(work),
                          "--output-dir", str(out), "--frontier-layers", layers] + (["--smoke"] if args.smoke else [])]
        # strategies + dense, batches 1 and 4, 2 repeats, 16 timing steps (run_frontier's settings)
        forwards = (len(FRONTIER_STRATEGIES) + 1) * 2 * 2 * 16
        part.estimate_s = RATES["startup_s"] + 10 * RATES["compile_s"] + forwards * RATES["frontier_forward_s"]
        part.output_bytes = 300_000
    elif name == "train":
        if args.smoke and "train" not in (args.explicit_parts or ()):
            part.skipped = ("skipped in --smoke (it loads the 135M model: minutes on a busy CPU); --smoke --parts "
                            "train runs one training step")
            return part
        weights = smollm2_weights()
        if weights is None:
            part.skipped = ("skipped: the SmolLM2-135M weights are not on this machine (smollm2/SmolLM2-135M-Instruct."
                            "Q4_1.gguf under $DLLM_SPARSE_CACHE or ~/.cache/dllm_sparse; 98 MB, more than the 64 MiB "
                            "that travel with a working tree). Copy that file there and rerun --parts train")
            return part
        cmd = [py, "-u", str(ROOT / "experiments/adapt_ar_to_diffusion.py"), "--init-adapter",
               str(ROOT / "dllm_sparse/data/smollm2-135m-mdm"), "--run-dir", str(here / "run"), "--export",
               str(here / "adapter"), "--ckpt-minutes", "100"]
        if args.smoke:
            cmd += ["--max-steps", "1", "--heldout", "2", "--batch-size", "2", "--threads", "1"]
        else:
            cmd += ["--minutes", str(args.train_minutes)]
        part.commands = [cmd]
        part.estimate_s = RATES["startup_s"] + 40 + (0 if args.smoke else args.train_minutes * 60)  # 40 s: loading
        part.output_bytes = 500_000  # log, loss curve, held-out loss; the adapter weights stay (STAYS_ON_DEVICE)
    else:
        raise ValueError(name)
    return part


def refuse_plan(plan: list[Part], budget_s: float, smoke: bool) -> str | None:
    """Why the planned run cannot be one shot (too long for the budget, more output than comes back), or None."""
    running = [p for p in plan if not p.skipped]
    total = sum(p.limit_s for p in running)
    if not smoke and total > budget_s:
        parts = ", ".join(f"{p.name} {p.limit_s:.0f} s" for p in running)
        return (f"the parts' time limits add up to {total:.0f} s ({parts}), more than --budget-s {budget_s:.0f}: "
                "drop parts with --parts (and run them in a second shot), or raise --budget-s if the device allows")
    out_bytes = sum(p.output_bytes for p in running)
    if out_bytes > RETURN_LIMITS["file_bytes"]:
        return (f"the parts would write about {out_bytes / MiB:.1f} MiB to bring back, more than one returned file "
                f"holds ({RETURN_LIMITS['file_bytes'] // MiB} MiB): drop parts with --parts or shrink them")
    return None


# ---- running a part: own process group, output into the log, limit --------------------------------------------


class Stopped(Exception):
    """SIGTERM / SIGINT arrived: stop the running part, pack, exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Log:
    """Everything goes to stdout (what the device shows) and to <output-dir>/device_check.log (capped)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")
        self.written = path.stat().st_size
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            if self.written < LOG_CAP:
                piece = text[: LOG_CAP - self.written]
                if len(piece) < len(text):
                    piece += "\n[device_check.log capped at 8 MiB; stdout has the rest]\n"
                self.file.write(piece)
                self.file.flush()
                self.written += len(piece.encode("utf-8"))

    def print(self, *items) -> None:
        self.write(" ".join(str(i) for i in items) + "\n")


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the part's whole process group (its own children too), SIGKILL what is left after ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, and the leader if it ignored SIGTERM
    except ProcessLookupError:
        pass
    proc.wait()


def _die_with_parent() -> None:
    """In the part's process, before exec (Linux): SIGKILL it when device_check dies, even by SIGKILL, which no
    handler sees; its own process group, outside ours, would otherwise outlive us."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_command(cmd: list[str], env: dict, cwd: Path, limit_s: float, log: Log) -> int | str:
    """Run ``cmd`` in its own process group, its output line by line into ``log``; the return code, or
    "timeout" when it ran past ``limit_s`` (the group is then stopped). A Stopped signal stops it and propagates."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True, preexec_fn=_die_with_parent)

    def pump():
        for line in iter(proc.stdout.readline, b""):
            log.write(line.decode("utf-8", errors="replace"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | str = proc.wait(timeout=max(limit_s, 1.0))
    except subprocess.TimeoutExpired:
        stop_group(proc)
        rc = "timeout"
    except BaseException:
        stop_group(proc)
        raise
    reader.join(timeout=5)
    return rc


# ---- the lock and a previous run --------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a recycled pid running something else is not our holder (an empty command line: exec under way)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return not cmdline or b"device_check" in cmdline


def take_lock(work: Path) -> str | None:
    """Create <work>/device_check.lock with this pid. Raises SystemExit while a live holder runs; returns a sentence
    when a dead holder's lock was taken over, else None."""
    path = work / LOCK
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                held = {}
            pid = held.get("pid")
            if isinstance(pid, int) and _alive(pid):
                raise SystemExit(f"device_check: another run (pid {pid}, started {held.get('started')}) is writing "
                                 f"into {work}; wait for it, or stop it with `kill -TERM {pid}` (it stops its running "
                                 "part too), or pass another --work-dir") from None
            note = (f"took over the lock of pid {pid} (started {held.get('started')}), which is no longer running: "
                    "its unfinished part left files behind")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        return note
    raise SystemExit(f"device_check: could not create {path}: another run keeps taking it")


def release_lock(work: Path) -> None:
    path = work / LOCK
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, json.JSONDecodeError):
        pass


def previous_run(work: Path, args) -> dict:
    """The previous run's part outcomes kept for --resume ({} for a fresh start); refuses without --resume/--fresh."""
    summary = work / "summary.json"
    if not summary.is_file():
        return {}
    try:
        parts = json.loads(summary.read_text()).get("parts", {})
    except (OSError, json.JSONDecodeError):
        parts = {}
    done = ", ".join(f"{k} {v.get('outcome')}" for k, v in parts.items()) or "no part finished"
    if args.fresh:
        for p in work.iterdir():
            if p.name not in (LOCK, ".pkg"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return {}
    if not args.resume:
        raise SystemExit(f"device_check: {work} holds a previous run ({done}). Pass --resume to keep its finished "
                         "parts and run the others, or --fresh to remove it and start over (or another --work-dir)")
    return {k: v for k, v in parts.items() if v.get("outcome") == "ok"}


# ---- what comes back ----------------------------------------------------------------------------------------------


def return_violations(out: Path) -> list[str]:
    """What in ``out`` the device would not bring back (RETURN_LIMITS); [] when everything comes back."""
    problems, files = [], []
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(out)
            if p.is_symlink():
                problems.append(f"{rel}: a symlink")
            elif p.is_file():
                files.append(rel)
                if len(rel.parts) > RETURN_LIMITS["depth"]:
                    problems.append(f"{rel}: deeper than $OUT/a/b/file")
                if p.stat().st_size > RETURN_LIMITS["file_bytes"]:
                    problems.append(f"{rel}: {p.stat().st_size / MiB:.1f} MiB > 16 MiB")
    if len(files) > RETURN_LIMITS["files"]:
        problems.append(f"{len(files)} files > {RETURN_LIMITS['files']}: {', '.join(map(str, sorted(files)))}")
    return problems


def pack(work: Path, out: Path) -> dict:
    """<out>/results.tar.gz of the work folder (atomically replaced); files that cannot come back are listed, and
    the largest others are left out, listed too, until the archive fits one returned file."""
    files = sorted(p for p in work.rglob("*") if p.is_file() and not p.is_symlink()
                   and ".pkg" not in p.relative_to(work).parts and p.name != LOCK)
    stays = [p for p in files if p.suffix in STAYS_ON_DEVICE]
    chosen = [p for p in files if p.suffix not in STAYS_ON_DEVICE]
    left_out = []
    while True:
        tmp = out / ".results.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for p in chosen:
                tar.add(p, arcname=str(p.relative_to(work)), recursive=False)
        size = tmp.stat().st_size
        if size <= RETURN_LIMITS["file_bytes"] or not chosen:
            break
        biggest = max(chosen, key=lambda p: p.stat().st_size)
        chosen.remove(biggest)
        left_out.append(str(biggest.relative_to(work)))
    os.replace(tmp, out / "results.tar.gz")
    return {"files": len(chosen), "bytes": size, "stays_on_device": [str(p.relative_to(work)) for p in stays],
            "left_out_to_fit": left_out}


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    ap = build_parser(prog)  # prog: `dllm-sparse device-check` runs this
    args = ap.parse_args(argv)
    args.explicit_parts, args.parts = args.parts, args.parts or list(DEFAULT_PARTS)
    if len(set(args.parts)) != len(args.parts):
        ap.error(f"--parts names a part twice: {' '.join(args.parts)}")
    out, work = args.output_dir.resolve(), args.work_dir.resolve()
    if out == work or work.is_relative_to(out) or out.is_relative_to(work):
        ap.error(f"--work-dir {work} and --output-dir {out} must not contain each other: the work folder holds "
                 "symlinks and more files than come back")
    if args.run_part == "frontier":
        run_frontier(args)
        return {}
    if args.plan:
        plan = [plan_part(name, args, work, out) for name in args.parts]
        refusal = refuse_plan(plan, args.budget_s, args.smoke)
        total = sum(p.limit_s for p in plan if not p.skipped)
        print(json.dumps({"plan": {p.name: p.plan() for p in plan}, "limits_total_s": round(total), "budget_s":
                          args.budget_s, "refused": refusal}, indent=1))
        return {"refused": refusal}
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    takeover = take_lock(work)
    try:
        return _run(args, out, work, takeover)
    finally:
        release_lock(work)


def _package_env(work: Path) -> tuple[str | None, dict]:
    """The package the parts import (installed, or the working tree through a shim on PYTHONPATH) and the
    environment of their commands."""
    shim = package_path(work, force=os.environ.get("DLLM_SPARSE_FORCE_SHIM") == "1")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if shim:
        env["PYTHONPATH"] = shim + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        sys.path.insert(0, shim)
    return shim, env


def _machine(args, shim: str | None) -> tuple[dict, dict]:
    """(preflight: what each part needs and what is refused, the environment record)."""
    from dllm_sparse.kernels.bench import environment

    info = preflight(args.smoke)
    info["package_from"] = f"working tree via {shim}" if shim else "installed"
    try:
        import torch

        environ = environment("cuda" if torch.cuda.is_available() else "cpu",
                              backend=os.environ.get("DLLM_SPARSE_KERNELS", "auto"))
    except ImportError as e:  # preflight has refused every part already
        environ = {"error": f"{type(e).__name__}: {e}"}
    return info, environ


def _stop_on_signals() -> None:
    """SIGTERM / SIGINT raise :class:`Stopped` once (the summary is then saved and packed, uninterrupted)."""
    def on_signal(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough; packing must not be interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _run_part(part, args, info: dict, summary: dict, save, log, env: dict, work: Path, out: Path,
              started: float) -> tuple[bool, Stopped | None]:
    """Run one part's commands within its limit (or record why it does not run). Returns (whether it ran, the
    signal that stopped it or None)."""
    t0 = time.perf_counter()
    if part.name in info["refused"]:
        summary["parts"][part.name] = {"outcome": "refused", "reason": info["refused"][part.name]}
        log.print(f"[{part.name}] refused: {info['refused'][part.name]}")
        return False, None
    if part.skipped:
        summary["parts"][part.name] = {"outcome": "skipped", "reason": part.skipped}
        log.print(f"[{part.name}] {part.skipped}")
        return False, None
    left = args.budget_s - (time.monotonic() - started)
    limit = SMOKE_LIMIT_S if args.smoke else part.limit_s
    if not args.smoke and left < part.limit_s:
        summary["parts"][part.name] = {"outcome": "not started",
                                       "reason": f"{left:.0f} s left of --budget-s, it may take {limit:.0f} s"}
        log.print(f"[{part.name}] not started: {left:.0f} s of the budget left, its limit is {limit:.0f} s")
        return False, None
    here = work / part.name
    if here.exists():  # a previous, unfinished attempt: start clean
        shutil.rmtree(here)
    here.mkdir(parents=True)
    summary["parts"][part.name] = {"outcome": "running", "limit_s": limit}
    save(f"running {part.name}")
    outcome, detail, stopped = "ok", [], None
    deadline = time.monotonic() + limit
    try:
        for cmd in part.commands:
            log.print(f"[{part.name}] (limit {deadline - time.monotonic():.0f} s) {' '.join(cmd)}")
            rc = run_command(cmd, env, work, deadline - time.monotonic(), log)
            detail.append({"command": cmd, "rc": rc})
            if rc != 0:
                outcome = "timeout" if rc == "timeout" else "failed"
            if rc == "timeout":
                break
    except Stopped as e:
        outcome, stopped = f"stopped by {e}", e
        detail.append({"command": cmd, "rc": outcome})
    files = sorted(str(p.relative_to(work)) for p in here.rglob("*") if p.is_file())
    record = {"outcome": outcome, "seconds": round(time.perf_counter() - t0, 1), "limit_s": limit,
              "commands": detail, "files": files}
    if outcome != "ok":
        record["log_tail"] = _tail(out / "device_check.log", 3000)
    summary["parts"][part.name] = record
    log.print(f"[{part.name}] {outcome} in {record['seconds']:.0f} s")
    return True, stopped


def _run(args, out: Path, work: Path, takeover: str | None) -> dict:
    log = Log(out / "device_check.log")
    if takeover:
        log.print(f"[device_check] {takeover}")
    kept = previous_run(work, args)
    shim, env = _package_env(work)
    from dllm_sparse.atomic import atomic_write_json

    info, environ = _machine(args, shim)
    log.print(json.dumps({"preflight": info, "environment": environ}, indent=1))
    plan = [plan_part(name, args, work, out) for name in args.parts if name not in kept]
    summary: dict = {"environment": environ, "preflight": info, "smoke": args.smoke, "state": "planning",
                     "plan": {p.name: p.plan() for p in plan}, "rates": RATES, "parts": dict(kept)}
    if kept:
        summary["resumed"] = f"kept from the previous run: {', '.join(kept)}"
    if takeover:
        summary["lock"] = takeover

    def save(state: str) -> None:
        summary["state"] = state
        atomic_write_json(work / "summary.json", summary)  # the work folder's own record (read by --resume)
        summary["archive"] = pack(work, out)
        summary["return_check"] = return_violations(out) or "ok"
        atomic_write_json(out / "summary.json", summary)

    refusal = refuse_plan([p for p in plan if p.name not in info["refused"]], args.budget_s, args.smoke)
    if refusal:
        summary["refused"] = refusal
        save("refused before starting")
        log.print(f"[device_check] refused: {refusal}")
        raise SystemExit(f"device_check: {refusal}")
    _stop_on_signals()
    started = time.monotonic()
    stopped = None
    try:
        for part in plan:
            ran, stopped = _run_part(part, args, info, summary, save, log, env, work, out, started)
            if stopped:
                break
            if ran:
                save(f"after {part.name}")
    except Stopped as e:  # between parts
        stopped = e
    save(f"stopped by {stopped}" if stopped else "finished")
    log.print(json.dumps({k: v["outcome"] for k, v in summary["parts"].items()}))
    if summary["return_check"] != "ok":
        log.print(f"[device_check] WARNING: not everything in {out} comes back: {summary['return_check']}")
    if stopped:
        raise SystemExit(128 + stopped.signum)
    return summary


def _tail(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - n))
        return f.read().decode("utf-8", errors="replace")


if __name__ == "__main__":
    main()
