"""Generate with and without FFN activation sparsity, side by side, for an AR and a diffusion model.

    dllm-sparse generate                                  # SmolLM2-135M (AR), input site, top-p 0.9
    dllm-sparse generate --site intermediate --threshold 0.8 --max-new-tokens 48
    dllm-sparse generate --dense                          # dense outputs only
    dllm-sparse generate --no-ar --diffusion-model /ckpt/LLaDA-8B-Instruct --device cuda \\
        --dtype bf16 --max-new-tokens 128 --steps 128 --block-length 32
    dllm-sparse generate --trace-out trace.json --overlap-out overlap   # + per-step data

Models: the AR side defaults to the embedded ``smollm2-135m`` (offline after the first fetch, ~30 s the first
time). The diffusion side defaults to the embedded ``smollm2-135m-mdm`` when this install registers it
(``dllm_sparse.models.loading.EMBEDDED_MODELS``); otherwise it runs only when ``--diffusion-model PATH`` is given.
Every prompt is generated dense and then sparse (one site, every layer, one rule and threshold: the spec's
framework, masks computed afresh at every forward), and the two outputs are printed next to each other with
the measured sparsity (mean over layers; AR: prefill and decoded tokens apart; diffusion: all steps, and
still-masked vs already-decoded positions), NFE and tokens per second.

Before anything is loaded, every setting is checked and a bad one stops the script with one usage line: the device
(``--device cuda`` on a CPU build of torch, a GPU index this machine lacks), each model (a missing path, a directory
without config.json, a hub id that is neither reachable nor cached), the dtype, the sparsity rule and threshold,
the sampler geometry, and diffusion flags (``--steps``, ``--block-length``, ...) when no diffusion model runs.
Each generation shows a progress bar on stderr (denoising steps or decoded tokens; hidden when stderr is not a
terminal).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import textwrap
from typing import TYPE_CHECKING

from dllm_sparse.atomic import atomic_write_json
from dllm_sparse.sparsity.sites import ALL_SITES

# torch, the models and the samplers are imported inside the functions that use them, after the arguments are
# parsed: --help then answers at once instead of loading torch and transformers first (seconds).
if TYPE_CHECKING:
    from dllm_sparse.samplers import StepSparsity
    from dllm_sparse.sparsity.config import SparsityConfig

DEFAULT_AR = "smollm2-135m"
DEFAULT_MDM = "smollm2-135m-mdm"
DEFAULT_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for staying focused while studying.",
]


def _mdm_available() -> bool:
    from dllm_sparse.models.loading import EMBEDDED_MODELS

    if DEFAULT_MDM in EMBEDDED_MODELS:
        return True
    try:  # the module that serves the embedded diffusion model registers it on import
        importlib.import_module("dllm_sparse.models.twin")
    except ImportError:
        return False
    return DEFAULT_MDM in EMBEDDED_MODELS


def overlap_prefix(value: str) -> str:
    """``--overlap-out`` is a prefix; a file name given instead (``overlap.csv``) means the same prefix."""
    return value[: -len(".csv")] if value.lower().endswith(".csv") else value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Dense vs sparse generation side by side (AR and masked diffusion), with measured sparsity, "
                    "NFE and tokens/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--ar-model", default=DEFAULT_AR,
                   help="autoregressive model: embedded name, local directory, .gguf file or hub id")
    g.add_argument("--diffusion-model", default=None,
                   help=f"masked-diffusion model (LLaDA / Dream / converted). None: the embedded {DEFAULT_MDM!r} "
                        "when this install registers it; otherwise the diffusion side is skipped unless a PATH "
                        "is given")
    g.add_argument("--no-ar", action="store_true", help="skip the autoregressive model")
    g.add_argument("--no-diffusion", action="store_true", help="skip the diffusion model")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run a checkpoint's own modeling code (LLaDA/Dream from the hub)")
    g.add_argument("--dtype", default="fp32", help="model dtype: fp32, bf16, fp16")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (accelerate placement)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")

    g = p.add_argument_group("sparsity")
    g.add_argument("--site", default="input", choices=[s.value for s in ALL_SITES], help="FFN site to sparsify")
    g.add_argument("--rule", default="top_p", choices=["top_p", "top_k", "max_p"],
                   help="rule: top_p (keep a fraction p of the L1 mass), top_k (target sparsity s), "
                        "max_p (keep |v| >= p max|v|)")
    g.add_argument("--threshold", type=float, default=0.9, help="p for top_p / max_p, target sparsity s for top_k")
    g.add_argument("--scope", default="token", choices=["token", "sequence"], help="rule scope")
    g.add_argument("--layers", default=None, help="comma-separated layer indices to sparsify (None: all)")
    g.add_argument("--dense", action="store_true", help="dense generation only (no sparse column)")

    g = p.add_argument_group("sampler")
    g.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for a batch; None: two built-in prompts)")
    g.add_argument("--no-chat-template", action="store_true",
                   help="send prompts as plain text even when the tokenizer has a chat template")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (diffusion: gen_length)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy / argmax")
    g.add_argument("--seed", type=int, default=0, help="base seed (row r uses seed + r)")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--steps", type=int, default=None, help="diffusion steps (None: gen_length)")
    g.add_argument("--block-length", type=int, default=None,
                   help="diffusion block length (None: 32 when it divides gen_length, else gen_length)")
    g.add_argument("--cfg-scale", type=float, default=0.0, help="diffusion classifier-free guidance (0 = off)")
    g.add_argument("--block-cache", default=None, choices=["prefix", "dual"],
                   help="diffusion: Fast-dLLM's approximate block KV cache (native LLaDA only; default: none, "
                        "every step over the whole canvas)")
    g.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"],
                   help="diffusion remasking strategy")
    g.add_argument("--confidence-threshold", type=float, default=None,
                   help="diffusion: Fast-dLLM's parallel decoding, each step commits every masked position of the "
                        "block with confidence >= this (at least one); steps is then an upper bound and must be "
                        "gen_length (default: none, the fixed schedule)")

    g = p.add_argument_group("output")
    g.add_argument("--trace-out", default=None,
                   help="write a JSON with, per model and mode, the config, outputs, NFE, timings, the per-step "
                        "trace and (sparse) the per-step / per-layer / per-group sparsity records")
    g.add_argument("--overlap-out", default=None, metavar="PREFIX",
                   help="track the sparse run's keep-masks and write PREFIX-<kind>.csv (per-step Jaccard / "
                        "recall vs previous step and block start, per layer and token group) and "
                        "PREFIX-<kind>.png (heatmap), kind = diffusion / ar; a trailing .csv is dropped "
                        "(overlap.csv -> overlap-diffusion.csv)")
    g.add_argument("--overlap-layers", default=None,
                   help="comma-separated layers for --overlap-out (None: first, middle and last)")
    g.add_argument("--width", type=int, default=120, help="terminal width for the side-by-side view")
    return p


def _layers(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",") if x.strip()]


def _pct(x: float) -> str:
    return "   n/a" if x != x else f"{100 * x:5.1f}%"


def side_by_side(left: str, right: str | None, width: int) -> str:
    if right is None:
        return "\n".join(textwrap.wrap(left, width) or [""])
    col = (width - 3) // 2
    lw = textwrap.wrap(left.replace("\n", " / "), col) or [""]
    rw = textwrap.wrap(right.replace("\n", " / "), col) or [""]
    return "\n".join(f"{a:<{col}} | {b}" for a, b in itertools.zip_longest(lw, rw, fillvalue=""))


def sparsity_line(kind: str, sp: StepSparsity) -> str:
    tags = sp.tags()
    if kind == "ar":
        decode = [t for t in tags if t != "prefill"]
        return (f"sparsity {_pct(sp.pooled())} (prefill {_pct(sp.pooled(['prefill']))}, "
                f"decode {_pct(sp.pooled(decode))})")
    per = sp.per_step()
    vals = [v for v in per.values() if v == v]
    spread = f", per step {_pct(min(vals))}..{_pct(max(vals))}" if vals else ""
    return (f"sparsity {_pct(sp.pooled())} (masked {_pct(sp.pooled(group='masked'))}, "
            f"decoded {_pct(sp.pooled(group='decoded'))}{spread})")


def load(kind: str, name: str, args):
    from dllm_sparse.models.loading import load_model

    return load_model(name, dtype=args.dtype, device=None if args.device == "cpu" else args.device,
                      trust_remote_code=args.trust_remote_code, kind=kind if kind == "diffusion" else None)


def sampler_config(kind: str, args):
    """The GenerationConfig of one side (checked when built: main builds both before loading anything)."""
    from dllm_sparse.samplers import GenerationConfig

    n = args.max_new_tokens
    cfg = GenerationConfig(max_new_tokens=n, temperature=args.temperature, seed=args.seed,
                           stop_strings=tuple(args.stop))
    if kind != "diffusion":
        return cfg
    from dllm_sparse.samplers import resolve_geometry

    block = args.block_length or (32 if n % 32 == 0 else n)
    cfg = cfg.replace(steps=args.steps or n, block_length=block, cfg_scale=args.cfg_scale, remasking=args.remasking,
                      block_cache=args.block_cache, confidence_threshold=args.confidence_threshold)
    resolve_geometry(cfg)  # the block schedule, and steps as the bound of parallel decoding
    return cfg


def device_problem(device: str) -> str | None:
    """Why ``--device`` cannot be used on this machine (None when it can), asked before any model is loaded."""
    import torch

    if device in ("cpu", "auto"):
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device; use cpu, cuda, cuda:1, ... or auto"
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return (f"--device {device}: this PyTorch build has no CUDA support (torch {torch.__version__}); use "
                    "--device cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            return f"--device {device}: no CUDA GPU is visible on this machine; use --device cpu"
        if dev.index is not None and dev.index >= count:
            return f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
        return None
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        return f"--device {device}: {dev.type} is not available to this PyTorch build here; use --device cpu"
    return None


def model_problem(name: str, trust_remote_code: bool) -> str | None:
    """Why ``name`` cannot be loaded (None when it may be), from what is on disk: an embedded name, an existing
    .gguf file or model directory, or a hub id that is reachable or cached. Loads nothing."""
    from pathlib import Path

    from dllm_sparse.models.loading import check_available, check_local_checkpoint

    try:
        check_available(name)
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                return f"{name} is a directory without a config.json, not a model checkpoint"
            check_local_checkpoint(path, name, trust_remote_code)
        elif path.exists() and path.suffix != ".gguf":
            return f"{name} is a file but not a .gguf model; give a model directory or a .gguf file"
    except (OSError, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def run_model(kind: str, name: str, args, sparsity: SparsityConfig, prompts: list[str]) -> dict | None:
    from dllm_sparse.samplers import MaskOverlapTracker, ProgressBar, StepSparsity, generate

    print(f"\n=== {kind.upper()} model: {name} ===", flush=True)
    print("loading ...", flush=True)
    try:
        lm = load(kind, name, args)
    except (OSError, RuntimeError) as e:  # FileNotFoundError is an OSError
        if kind == "diffusion" and name == DEFAULT_MDM and not args.diffusion_model:
            print(f"diffusion side skipped: the embedded {DEFAULT_MDM!r} is registered but cannot be loaded here "
                  f"({type(e).__name__}: {str(e).splitlines()[0]}). Pass --diffusion-model PATH to run a "
                  "diffusion model.")
            return None
        raise
    if lm.kind != kind:
        print(f"note: {name} loads as a {lm.kind!r} model; generating it as {lm.kind!r}")
        kind = lm.kind
    tok = lm.tokenizer
    chat = not args.no_chat_template and getattr(tok, "chat_template", None) is not None
    n = args.max_new_tokens
    cfg = sampler_config(kind, args)
    if kind == "diffusion":
        block = cfg.block_length
        print(f"sampler: gen_length {n}, steps {cfg.steps}, block_length {block}, cfg {args.cfg_scale}, "
              f"{args.remasking}, T={args.temperature}, block cache {args.block_cache or 'none'}, confidence "
              f"threshold {args.confidence_threshold or 'none'}, chat template "
              f"{'on' if chat else 'off'}")
    else:
        print(f"sampler: KV-cached, max_new_tokens {n}, T={args.temperature}, chat template {'on' if chat else 'off'}")

    dense = generate(lm, prompts=prompts, config=cfg, apply_chat_template=chat,
                     callbacks=[ProgressBar(desc=f"{kind} dense")])
    sparse = sp = tracker = None
    if not args.dense:
        observers, callbacks = [], []
        if args.overlap_out:
            n_layers = lm.model.config.num_hidden_layers
            chosen = _layers(args.overlap_layers) or sorted({0, n_layers // 2, n_layers - 1})
            tracker = MaskOverlapTracker(layers=chosen, store=False)
            observers, callbacks = [tracker], [tracker]
        callbacks.append(ProgressBar(desc=f"{kind} sparse"))
        sp = StepSparsity(sparsity, mask_observers=observers)
        sparse = generate(lm, prompts=prompts, config=cfg, sparsity=sp, callbacks=callbacks, apply_chat_template=chat)

    label = f"sparse: {sparsity.site.value}, {sparsity.rule.name} {args.threshold}"
    width = args.width
    for i, prompt in enumerate(prompts):
        print(f"\n--- prompt {i}: {prompt}")
        if sparse is None:
            print(side_by_side("[dense] " + dense.texts[i], None, width))
        else:
            col = (width - 3) // 2
            print(f"{'[dense]':<{col}} | [{label}]")
            print(side_by_side(dense.texts[i], sparse.texts[i], width))

    def line(tag, res):
        return (f"{tag:<7} NFE {res.nfe:4d} | tokens {res.num_tokens:4d} | {res.wall_time:6.2f} s | "
                f"{res.tokens_per_second:7.2f} tok/s")

    print()
    print(line("dense", dense) + " | sparsity   0.0% (dense)")
    if sparse is not None:
        print(line("sparse", sparse) + " | " + sparsity_line(kind, sp))
        same = sum(a == b for a, b in zip(dense.ids, sparse.ids, strict=True))
        print(f"identical outputs: {same}/{len(prompts)}")
    out = {"model": name, "kind": kind, "dense": dense.to_dict()}
    if sparse is not None:
        out["sparse"] = {**sparse.to_dict(), "sparsity": {**sp.describe(), "mean": sp.pooled(),
                                                          "records": sp.records()}}
    if tracker is not None:
        prefix = overlap_prefix(args.overlap_out)
        csv_path, png_path = f"{prefix}-{kind}.csv", f"{prefix}-{kind}.png"
        tracker.to_csv(csv_path)
        tracker.heatmap(png_path, title=f"{name}: {args.site} mask Jaccard vs previous step")
        prev = tracker.per_step("jaccard", "previous")
        first = tracker.per_step("jaccard", "block_start")
        print(f"mask overlap (layers {sorted(tracker.layers)}; Jaccard vs previous step, mean over layers): "
              + " ".join(f"{s}:{v:.2f}" for s, v in itertools.islice(prev.items(), 12))
              + (" ..." if len(prev) > 12 else ""))
        print("                 vs block start: "
              + " ".join(f"{s}:{v:.2f}" for s, v in itertools.islice(first.items(), 12))
              + (" ..." if len(first) > 12 else ""))
        print(f"wrote {csv_path} and {png_path}")
        out["overlap"] = {"previous": prev, "block_start": first}
    return out


# The sampler flags only the diffusion side reads, with their defaults.
DIFFUSION_FLAGS = {"steps": None, "block_length": None, "cfg_scale": 0.0, "block_cache": None,
                   "remasking": "low_confidence", "confidence_threshold": None}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.block_cache and args.overlap_out:
        parser.error("--overlap-out tracks each position's masks from step to step, but with --block-cache a step "
                     "computes only some canvas rows; drop one of the two")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1 (or left out for torch's choice), got {args.threads}")
    import matplotlib
    import torch

    matplotlib.use("Agg")  # this script writes figure files; the library leaves the backend to its user

    from dllm_sparse.models.loading import parse_dtype
    from dllm_sparse.sparsity.config import SparsityConfig
    from dllm_sparse.sparsity.rules import make_rule

    # Everything that can be refused is refused here, in one line each, before any model is loaded or run.
    if problem := device_problem(args.device):
        parser.error(problem)
    try:
        parse_dtype(args.dtype)
        sparsity = SparsityConfig(args.site, make_rule(args.rule, args.threshold, scope=args.scope),
                                  _layers(args.layers))
        for kind in ("ar", "diffusion"):
            sampler_config(kind, args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = args.prompt or DEFAULT_PROMPTS
    runs = []
    if not args.no_ar:
        runs.append(("ar", args.ar_model))
    if not args.no_diffusion:
        if args.diffusion_model:
            runs.append(("diffusion", args.diffusion_model))
        elif _mdm_available():
            runs.append(("diffusion", DEFAULT_MDM))
        else:
            print(f"diffusion side skipped: the embedded {DEFAULT_MDM!r} model is not registered in this install "
                  "(dllm_sparse.models.loading.EMBEDDED_MODELS). Pass --diffusion-model PATH (a LLaDA / Dream "
                  "checkpoint "
                  "directory or a converted model) to run it.")
    if not runs:
        print("nothing to run (both sides disabled)")
        return 1
    if not any(kind == "diffusion" for kind, _ in runs):
        given = [f"--{k.replace('_', '-')}" for k, default in DIFFUSION_FLAGS.items() if getattr(args, k) != default]
        if given:
            parser.error(f"{', '.join(given)} set(s) the diffusion sampler, but no diffusion model runs (it would be "
                         "ignored); drop it, or run a diffusion model (--diffusion-model PATH, without --no-diffusion)")
    for kind, name in runs:
        if problem := model_problem(name, args.trust_remote_code):
            parser.error(f"--{'ar' if kind == 'ar' else 'diffusion'}-model: {problem}")
    results = [r for kind, name in runs if (r := run_model(kind, name, args, sparsity, prompts)) is not None]
    if args.trace_out:
        atomic_write_json(args.trace_out, {"args": vars(args), "runs": results})  # unknown objects as str()
        print(f"\nwrote {args.trace_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
