"""FFN activation sparsity of a masked-diffusion LM vs its architecture-matched autoregressive LM (paper Fig. 3d).

    dllm-sparse compare                     # offline, CPU: embedded SmolLM2 pair, quick grid
    dllm-sparse compare \\
        --diffusion-model GSAI-ML/LLaDA-8B-Base --ar-model meta-llama/Llama-3.1-8B \\
        --grid standard --tasks builtin_mc builtin_ppl arc_easy hellaswag --mc-num 128   # the paper's pair, GPU
    accelerate launch experiments/llada_vs_llama.py ...   # a clone: data parallel over cells, a model per GPU

``python experiments/llada_vs_llama.py`` (a clone) is the same command.

For each model, site and threshold of the rule it measures the sparsity actually reached and the relative
performance (sparse / dense; PPL_dense / PPL_sparse for perplexity, the ELBO perplexity for the diffusion model),
then reports the critical sparsity (relative performance >= 0.99) per model and site as a CSV and a Markdown
table shaped like the paper's Table 1, and draws the figures. Results are appended cell by cell to
``<output-dir>/rows.jsonl``: rerun the same command after an interruption and it resumes. The models load
before the output folder is created, so a model that cannot load leaves nothing behind. The step profile
(``step_profile.json``) is stored with its identity (model and weights hash, sites, rule, step threshold,
generation settings, dtype, device): a rerun with other ``--sites`` or ``--step-threshold``, or a truncated file,
recomputes it (and says why) instead of reusing it. Every summary file is written atomically.

Defaults: with no model arguments the embedded pair is used: ``smollm2-135m`` (SmolLM2-135M-Instruct) and its
masked-diffusion twin ``smollm2-135m-mdm`` when that is available (otherwise the AR model runs alone, and the
run says so). Every item of the built-in tasks is scored (64 multiple-choice items, 48 passages) on the quick
grid (top-p 1, 0.995, 0.99, 0.98, 0.95, 0.9); on a CPU with mc_num 2 (run time in the README), on a GPU with
mc_num 128, bf16 and ``device="auto"``. The tables carry 95 % paired bootstrap intervals over items
(``--n-boot``). ``--threads auto`` (default) uses one intra-op thread per core this process may run on
(``os.sched_getaffinity``; printed with its reason). It does not measure other load: on a busy shared machine
oversubscribed OpenMP threads spin (a forward pass up to 8x slower in our measurements), so pass ``--threads N``
there; a start-up sample of the idle cores, used before, read a briefly busy core as busy for the whole run
(:func:`dllm_sparse.hardware.auto_threads`). ``--workers
auto`` (default) then runs the sweep in one process per thread, each with one thread and its own model copy,
taking cells one at a time (:func:`dllm_sparse.eval.sweep.run.run_sweep`): the small forward passes of the built-in
tasks use two cores only in part from one process (1.5-1.8x from a second thread, measured in the README), and
the top-p row sort runs on one core. ``--workers 1`` keeps one process with all the threads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

# Only light modules here, so that --help answers at once; torch and the package's heavy modules are imported
# by the functions that use them, after the arguments are parsed.
from dllm_sparse.eval.scoring.defaults import MC_BATCH, MC_NUM, SEED
from dllm_sparse.eval.scoring.presets import PRESETS
from dllm_sparse.hardware import machine_description
from dllm_sparse.sparsity.names import RULE_NAMES, SCOPES
from dllm_sparse.sparsity.sites import ALL_SITES, SitesAction

DEFAULT_AR = "smollm2-135m"
DEFAULT_DIFFUSION = "smollm2-135m-mdm"
CPU_MC_NUM = 2  # ELBO samples per item on a CPU (GPU: 128); every item of the built-in tasks is scored
SMOKE_LIMIT = 2
SMOKE_THRESHOLDS = (1.0, 0.8)


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusion-model", default=None,
                    help=f"HF id, local dir or embedded name (default: {DEFAULT_DIFFUSION} when available; "
                         "'none' to skip)")
    ap.add_argument("--ar-model", default=None, help=f"HF id, local dir or embedded name (default: {DEFAULT_AR}; "
                                                     "'none' to skip)")
    ap.add_argument("--sites", nargs="+", action=SitesAction, default=[s.value for s in ALL_SITES],
                    help="FFN sites, space-separated: " + " ".join(s.value for s in ALL_SITES) + " (default: all)")
    ap.add_argument("--rule", default="top_p", choices=list(RULE_NAMES),
                    help="top_p (the paper's rule, default), top_k, max_p, or paper_top_p: the paper's LLaDA scripts' "
                         "variant (input site on up_proj only, one top-p per sample, p in percent, bf16 cumsum)")
    ap.add_argument("--scope", default=None, choices=list(SCOPES),
                    help="rule scope (default: token; sequence for paper_top_p, which allows nothing else; step / "
                         "step_wina: one keep-set per sample shared by the tokens of each forward, docs/"
                         "sparsification.md; for the AR model it is computed over context tokens only)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--grid", default="quick", choices=["quick", "standard"],
                   help="threshold grid: quick (6 points) or standard (25 points) of the rule (default: quick)")
    g.add_argument("--thresholds", nargs="+", type=float, help="explicit thresholds (overrides --grid)")
    ap.add_argument("--tasks", nargs="+", default=["builtin_mc", "builtin_ppl"],
                    help="built-in (builtin_mc, builtin_ppl) or lm-eval task names (name or name:metric; default: "
                         "builtin_mc builtin_ppl)")
    ap.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    ap.add_argument("--limit", type=int, default=None,
                    help="items per task (default: all: the 64 multiple-choice items and 48 passages of the "
                         "built-in tasks)")
    ap.add_argument("--mc-num", type=int, default=None,
                    help=f"Monte-Carlo samples of the ELBO (default: CPU {CPU_MC_NUM}, GPU 128)")
    ap.add_argument("--mc-batch", type=int, default=None, help="stratified mini-batch b of the ELBO (default: "
                                                               "min(16, mc_num))")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default: %(default)s)")
    ap.add_argument("--head-chunk", type=int, default=None,
                    help="LM head on this many scored rows at a time (bounds logit memory for long rolling windows "
                         "at a 126k vocabulary, docs/memory.md; default: all at once; part of the cell keys)")
    ap.add_argument("--cfg-scale", type=float, default=None,
                    help="guided ELBO w of the diffusion model for every task (default 0: no guidance)")
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                    help="llada-official: the official LLaDA evaluation's per-task guidance, mc_num 128 and "
                         "mc_batch 8 (dllm_sparse.eval.scoring.presets; explicit --mc-num / --mc-batch win)")
    ap.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--device", default=None, help="cpu / cuda / auto (default: auto on GPU, cpu otherwise)")
    ap.add_argument("--output-dir", default=None,
                    help="rows, tables, figures and summary (default: runs/llada_vs_llama, with --smoke "
                         "runs/compare_smoke; a rerun resumes it)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"seed of the ELBO masks (default: {SEED})")
    ap.add_argument("--step-threshold", type=float, default=None,
                    help="threshold of the sparsity-vs-denoising-step profile (default: 0.9 for top_p, middle of "
                         "the grid otherwise)")
    ap.add_argument("--no-step-profile", action="store_true", help="skip the short generation for the step figure")
    ap.add_argument("--threads", default="auto",
                    help="torch intra-op threads on CPU: a number, or 'auto' (default: one per core this process "
                         "may run on; other load is not measured, so pass a number on a busy shared machine)")
    ap.add_argument("--workers", default="auto",
                    help="processes computing the cells on a CPU, sharing the --threads between them; each loads "
                         "its own copy of the model it is on: a number, or 'auto' (default: one per thread, each "
                         "with one thread; 1 on a GPU or under a launcher). On a 2-core CPU two one-thread workers "
                         "ran the sweep faster than one two-thread process (README); the thread count can move a "
                         "value by float noise, as the CPU kind can (each row records its threads)")
    ap.add_argument("--no-cap", action="store_true",
                    help="task-averaged curve: average the raw relative performances (default: each task capped "
                         "at 1 first, so a task above dense cannot hide another's loss)")
    ap.add_argument("--n-boot", type=int, default=1000,
                    help="bootstrap replicates of the intervals (paired over items; 0: no intervals; default: "
                         "%(default)s)")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bars (default: bars on stderr when it is a terminal: the sweep's cells, the "
                         "items of each cell)")
    ap.add_argument("--smoke", action="store_true",
                    help="check the whole pipeline in seconds: a tiny random AR model and its tiny random diffusion "
                         f"counterpart (byte tokenizer, no download), {SMOKE_LIMIT} items per task, thresholds "
                         f"{' '.join(map(str, SMOKE_THRESHOLDS))} unless given, one process, no step profile; "
                         "its numbers mean nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        given = [o for o, v in (("--diffusion-model", args.diffusion_model), ("--ar-model", args.ar_model)) if v]
        if given:
            ap.error(f"--smoke runs its own tiny random models; drop {' and '.join(given)} (or --smoke)")
        if args.workers not in ("auto", "1"):
            ap.error(f"--smoke runs in one process (its models are built in memory); drop --workers {args.workers}")
        args.workers, args.no_step_profile = "1", True  # the byte tokenizer has no chat template to generate with
        args.limit = SMOKE_LIMIT if args.limit is None else args.limit
        args.thresholds = args.thresholds or list(SMOKE_THRESHOLDS)
    args.output_dir = args.output_dir or ("runs/compare_smoke" if args.smoke else "runs/llada_vs_llama")
    if args.n_boot < 0:
        ap.error(f"--n-boot must be a whole number >= 0 (got {args.n_boot}; 0: no intervals)")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be a whole number >= 1 (got {args.limit}); leave it out to use every item")
    return args


def smoke_tokenizer():
    """``--smoke``'s tokenizer: a Hugging Face tokenizer over UTF-8 bytes (0 pad, 1 bos, 2 eos, 3 mask, then the
    256 byte symbols: vocabulary 260), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<mask>"])}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   mask_token="<mask>")
    fast.model_max_length = 1024
    return fast


def smoke_models() -> list:
    """``--smoke``'s pair: a tiny random LLaDA and a tiny random LLaMA of the same shape over a byte tokenizer
    (:func:`smoke_tokenizer`), built in memory: the pipeline runs, the numbers are noise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dllm_sparse.models.llada import LLaDAModelLM, tiny_llada_config
    from dllm_sparse.models.loading import LoadedModel

    tok = smoke_tokenizer()
    torch.manual_seed(0)
    diffusion = LLaDAModelLM(tiny_llada_config(vocab_size=len(tok), embedding_size=len(tok),
                                               mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, max_sequence_length=1024)).eval()
    c = diffusion.config
    ar = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                                      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                                      intermediate_size=c.mlp_hidden_size, max_position_embeddings=1024,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id)).eval()
    return [LoadedModel(diffusion, tok, "diffusion", "tiny-llada (smoke)", tok.mask_token_id, "llada"),
            LoadedModel(ar, tok, "ar", "tiny-llama (smoke)", None, "llama")]


def resolve_models(args) -> tuple[list[str], list[str]]:
    from dllm_sparse.models.loading import EMBEDDED_MODELS

    notes, models = [], []
    diff = args.diffusion_model
    if diff is None:
        if DEFAULT_DIFFUSION in EMBEDDED_MODELS:
            try:
                EMBEDDED_MODELS[DEFAULT_DIFFUSION](dtype=None, device=None)  # resolves (builds once) or raises
                diff = DEFAULT_DIFFUSION
            except Exception as e:  # noqa: BLE001 - any failure means "not available here"
                notes.append(f"NOTE: the diffusion default {DEFAULT_DIFFUSION!r} is registered but not usable here "
                             f"({type(e).__name__}: {str(e)[:200]}); running the AR model alone.")
        else:
            notes.append(f"NOTE: no embedded diffusion model {DEFAULT_DIFFUSION!r} is registered yet; running the AR "
                         f"default alone (give --diffusion-model to compare).")
    if diff and diff.lower() != "none":
        models.append(diff)
    ar = DEFAULT_AR if args.ar_model is None else args.ar_model
    if ar and ar.lower() != "none":
        models.append(ar)
    if not models:
        raise SystemExit("no model to run (both --diffusion-model and --ar-model are 'none')")
    return models, notes


STEP_PROMPT = "Write a short paragraph about the ocean."


def step_gen_length(device) -> int:
    return 16 if device in (None, "cpu") else 64


def step_profile_identity(model_name: str, args, device, dtype, rows: list[dict]) -> dict:
    """Everything that changes the step profile; the weights hash comes from the model's sweep rows."""
    from dllm_sparse.eval.identity import run_identity
    from dllm_sparse.sparsity.config import SparsityConfig
    from dllm_sparse.sparsity.rules import make_rule

    weights = next((r["model_identity"]["weights"] for r in rows
                    if r.get("model") == model_name and r.get("model_identity")), None)
    n = step_gen_length(device)
    rule = make_rule(args.rule, args.step_p, scope=args.scope)
    return run_identity(model=model_name, weights=weights, dtype=dtype, device_type=str(device),
                        sparsity=[SparsityConfig(site, rule) for site in args.sites],
                        gen_length=n, steps=n, block_length=n, temperature=0.0, seed=args.seed,
                        prompt=STEP_PROMPT).to_dict()


def step_profile(model_name: str, args, device, dtype, out: Path, identity: dict | None = None) -> list[dict]:
    """Sparsity per denoising step of a short generation (one per site), if the samplers are available; stored
    in ``out/step_profile.json`` with its ``identity`` (:func:`step_profile_identity`)."""
    from dllm_sparse.eval.rows import atomic_write_json
    from dllm_sparse.models.loading import load_model
    from dllm_sparse.sparsity.config import SparsityConfig
    from dllm_sparse.sparsity.rules import make_rule

    try:
        from dllm_sparse.samplers import GenerationConfig, StepSparsity, generate
    except ImportError as e:
        print(f"(step profile from a generation skipped: dllm_sparse.samplers unavailable: {e})")
        return []
    p = args.step_p
    lm = load_model(model_name, dtype=dtype, device=device)
    gen_length = step_gen_length(device)
    config = GenerationConfig(gen_length=gen_length, steps=gen_length, block_length=gen_length, temperature=0.0,
                              seed=args.seed)
    rows = []
    for site in args.sites:
        sp = StepSparsity(SparsityConfig(site, make_rule(args.rule, p, scope=args.scope)))
        generate(lm, prompts=[STEP_PROMPT], config=config, sparsity=sp, apply_chat_template=True)
        for group in ("all", "masked"):
            for step, s in sp.per_step(group=group).items():
                if isinstance(step, int) and s == s:
                    rows.append({"model": model_name, "site": site, "x": step, "sparsity": s, "source": "generation",
                                 "label": f"{args.rule} {p:g}, {group} tokens", "group": group})
    atomic_write_json(out / "step_profile.json", {"identity": identity, "rows": rows})
    del lm
    return rows


def stored_step_profile(path: Path, identity: dict) -> list[dict] | None:
    """The rows of ``path`` when it was computed with ``identity``; None (and a line saying why) when it is
    missing, unreadable, of the old format or of another configuration: the caller recomputes it."""
    from dllm_sparse.eval.identity import describe_differences
    from dllm_sparse.eval.rows import read_json_or_none

    data = read_json_or_none(path)
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("identity"), dict) or "rows" not in data:
        print(f"{path}: written without its configuration (an older version); recomputing it")
        return None
    diffs = describe_differences(data["identity"], identity)
    if diffs:
        print(f"{path} was computed with other settings ({'; '.join(diffs)}); recomputing it")
        return None
    return data["rows"]


def elbo_ratio_profile(rows: list[dict], p: float) -> list[dict]:
    """Sparsity per mask-ratio bin of the ELBO passes (from the sweep rows of diffusion models at threshold p)."""
    from dllm_sparse.sparsity.config import DENSE

    out = []
    for r in rows:
        if r.get("kind") != "diffusion" or r["site"] == DENSE or abs(r["p"] - p) > 1e-12:  # "p": rule threshold
            continue
        for g, s in (r.get("sparsity_groups") or {}).items():
            if g.startswith("ratio") and s == s:
                lo, hi = (float(v) for v in g[len("ratio"):].split("-"))
                out.append({"model": r["model"], "site": r["site"], "x": (lo + hi) / 2, "sparsity": s,
                            "source": "elbo_mask_ratio", "label": f"{r['task']}, {r['rule']} {p:g}"})
    return out


Parts = list[tuple[str, float]]


def time_breakdown(rows: list[dict], started: float, status: dict, phases: dict[str, float], wall: float,
                   workers: int = 1, sweep_wall: float = 0.0) -> tuple[Parts, Parts]:
    """Where this run's wall time went: model loading, the dense and the sparse passes per model and task (the
    cells this run computed, by their ``finished_at``), the tables with their bootstrap, the figures, the step
    profile, and the rest (start-up, imports, bookkeeping). With several workers the sweep is one wall-time part
    and its passes (computed side by side) are returned apart, as compute seconds summed over the processes."""
    from dllm_sparse.sparsity.config import DENSE

    cells: dict[str, float] = {}
    for name, s in (status.get("load_seconds_this_run") or {}).items():
        cells[f"loading {name}"] = s
    for r in rows:
        if r.get("finished_at", 0) >= started and r.get("seconds"):
            what = "dense pass" if r["site"] == DENSE else "sparse cells"
            key = f"{r['model']} {r['task']}: {what}"
            cells[key] = cells.get(key, 0.0) + r["seconds"]
    parts = dict(cells) if workers == 1 else {f"sweep ({workers} processes side by side, starts included)": sweep_wall}
    parts.update(phases)
    parts["other (start-up, imports, bookkeeping)"] = max(0.0, wall - sum(parts.values()))
    return list(parts.items()), ([] if workers == 1 else list(cells.items()))


def _whole_number(option: str, spec: str) -> int:
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise SystemExit(f"{option} takes a whole number >= 1 or 'auto', got {spec!r}")
    return n


def set_threads(spec: str) -> tuple[int, str]:
    """Set torch's intra-op threads from ``--threads``; returns (threads, why, for the screen)."""
    import torch

    from dllm_sparse.hardware import auto_threads

    if spec != "auto":
        n = _whole_number("--threads", spec)
        torch.set_num_threads(n)
        return torch.get_num_threads(), f"{torch.get_num_threads()} (--threads {spec})"
    n, why = auto_threads()
    torch.set_num_threads(n)
    return n, f"{why}, --threads auto"


def resolve_workers(spec: str, threads: int, on_cpu: bool, world: int) -> tuple[int, int, str]:
    """``(workers, threads per worker, why)`` from ``--workers`` and the threads ``--threads`` gave."""
    if spec == "auto":
        n = threads if on_cpu and world == 1 else 1
        why = "auto: one per thread" if n > 1 else "auto"
    else:
        n = _whole_number("--workers", spec)
        why = f"--workers {spec}"
        if n > 1 and not on_cpu:
            raise SystemExit(f"--workers {n} is for a CPU run (on a GPU use one process per GPU: accelerate launch)")
        if n > 1 and world > 1:
            raise SystemExit(f"--workers {n} under a launcher ({world} processes): use one or the other")
    per = max(1, threads // n)
    return n, per, f"{n} process{'es' if n > 1 else ''} x {per} thread{'s' if per > 1 else ''} ({why})"


def main(argv=None, prog: str | None = None) -> int:
    t0 = time.perf_counter()
    started = time.time()
    args = parse_args(argv, prog)
    import matplotlib

    matplotlib.use("Agg")  # this script writes figure files; the library leaves the backend to its user

    import dllm_sparse  # noqa: F401  (registers embedded models)

    run = resolve_run(args)
    if run.rank == 0:
        print_settings(args, run)
    rows, t_sweep, sweep_wall = run_the_sweep(args, run, t0)
    if run.rank != 0:
        return 0
    report = write_report(args, run, rows)
    wall = time.perf_counter() - t0
    breakdown, worker_seconds, machine = write_summary(args, run, rows, report, started, wall, t_sweep, sweep_wall)
    print_report(args, run, report, breakdown, worker_seconds, machine, wall)
    return 0


def resolve_run(args) -> SimpleNamespace:
    """Step 1 of :func:`main`: device, dtype, threads and worker processes, the ELBO settings (``--preset`` or the
    CPU / GPU defaults), the threshold grid and the models (``--smoke``: tiny random ones)."""
    import torch

    from dllm_sparse.eval.rows import launch_note, process_info
    from dllm_sparse.eval.scoring.presets import get_preset
    from dllm_sparse.eval.sweep.config import grid

    gpu = torch.cuda.is_available()
    device = args.device or ("auto" if gpu else "cpu")
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    on_cpu = device == "cpu" or not gpu
    threads, threads_why = set_threads(args.threads) if on_cpu else (torch.get_num_threads(), "not on CPU")
    rank, world, _ = process_info()
    workers, worker_threads, workers_why = resolve_workers(args.workers, threads, on_cpu, world)
    preset = get_preset(args.preset) if args.preset else None
    if preset is not None and args.cfg_scale is not None:
        raise SystemExit(f"--preset {preset.name} sets the guidance per task; drop --cfg-scale (or the preset)")
    mc_num = args.mc_num or (preset.mc_num if preset else CPU_MC_NUM if on_cpu else MC_NUM)
    mc_batch = args.mc_batch or min(preset.mc_batch if preset else MC_BATCH, mc_num)
    cfg_scale = {t: preset.cfg_for(t) for t in args.tasks} if preset else (args.cfg_scale or 0.0)
    thresholds = args.thresholds or grid(args.grid, args.rule)
    mid = sorted(thresholds)[len(thresholds) // 2]
    default_step = {"top_p": 0.9, "paper_top_p": 90.0}.get(args.rule, mid)
    args.step_p = args.step_threshold if args.step_threshold is not None else default_step
    args.scope = args.scope or ("sequence" if args.rule == "paper_top_p" else "token")
    models, notes = (smoke_models(), ["SMOKE RUN: tiny random models; the numbers mean nothing"]) if args.smoke \
        else resolve_models(args)
    if launch_note(world):
        notes.append(launch_note(world))
    return SimpleNamespace(
        device=device, dtype=dtype, threads=threads, threads_why=threads_why, rank=rank, world=world,
        workers=workers, worker_threads=worker_threads, workers_why=workers_why, preset=preset, mc_num=mc_num,
        mc_batch=mc_batch, cfg_scale=cfg_scale, limit=args.limit, thresholds=thresholds, models=models, notes=notes,
        names=[getattr(m, "name", m) for m in models],  # --smoke's are built in memory (LoadedModel)
        out=Path(args.output_dir))


def print_settings(args, run: SimpleNamespace) -> None:
    for n in run.notes:
        print(n)
    print(f"models: {run.names}\nsites: {args.sites}\nrule: {args.rule} ({args.scope} scope), "
          f"thresholds: {run.thresholds}\n"
          f"tasks: {args.tasks}, limit: {run.limit}\nguided ELBO cfg_scale: {run.cfg_scale}"
          f"{f' (preset {run.preset.name})' if run.preset else ''}\nmc_num: {run.mc_num}, mc_batch: {run.mc_batch}, "
          f"batch_size: {args.batch_size}{f', head_chunk: {args.head_chunk}' if args.head_chunk else ''}, dtype: "
          f"{run.dtype}, device: {run.device}, seed: {args.seed}, processes: {run.world}, "
          f"CPU threads: {run.threads_why}; sweep: {run.workers_why}\n"
          f"output: {run.out}")


def run_the_sweep(args, run: SimpleNamespace, t0: float) -> tuple[list[dict], float, float]:
    """Step 2: the sweep (:func:`dllm_sparse.eval.sweep.run.run_sweep`); returns this configuration's rows (rank 0),
    the seconds since the start and the sweep's own wall time."""
    import torch

    from dllm_sparse.eval.sweep.config import SweepConfig, planned_keys
    from dllm_sparse.eval.sweep.run import run_sweep

    run.cfg = SweepConfig(models=run.models, output_dir=run.out, sites=args.sites, rule=args.rule,
                          thresholds=run.thresholds, tasks=args.tasks, limit=run.limit, mc_num=run.mc_num,
                          mc_batch=run.mc_batch, batch_size=args.batch_size, seed=args.seed, dtype=run.dtype,
                          device=run.device, include_path=args.include_path, progress=not args.no_progress,
                          cfg_scale=run.cfg_scale, scope=args.scope, head_chunk=args.head_chunk)
    t_start = time.perf_counter()
    if run.workers > 1:
        torch.set_num_threads(run.worker_threads)
    rows = run_sweep(run.cfg, workers=run.workers, worker_threads=run.worker_threads)
    torch.set_num_threads(run.threads)
    if run.rank != 0:
        return rows, 0.0, 0.0
    t_sweep = time.perf_counter() - t0
    sweep_wall = time.perf_counter() - t_start
    planned = planned_keys(run.cfg)
    return [r for r in rows if r["key"] in planned], t_sweep, sweep_wall  # this configuration's cells only


def write_report(args, run: SimpleNamespace, rows: list[dict]) -> SimpleNamespace:
    """Step 3: critical-sparsity tables with bootstrap intervals, figures, and the sparsity-vs-step profile (of the
    first diffusion model, generated unless a stored one matches); the seconds of each phase."""
    from dllm_sparse.eval.analysis.critical import write_critical
    from dllm_sparse.eval.analysis.plots import plot_layer_heatmaps, plot_relative_performance, plot_step_sparsity

    out = run.out
    t_tables = time.perf_counter()
    paths = write_critical(rows, out, cap=not args.no_cap, n_boot=args.n_boot)
    phases = {"critical-sparsity tables + bootstrap": time.perf_counter() - t_tables}
    t_figs = time.perf_counter()
    figs = out / "figures"
    boot = paths["bootstrap"]
    fig_paths = plot_relative_performance(rows, figs, boot=boot, cap=not args.no_cap)
    for t in args.tasks:
        fig_paths += plot_relative_performance(rows, figs, task=t, boot=boot, cap=not args.no_cap)
    fig_paths += plot_layer_heatmaps(rows, figs)
    phases["figures"] = time.perf_counter() - t_figs
    t_profile = time.perf_counter()
    profile = elbo_ratio_profile(rows, args.step_p)
    diffusion = [m for m in run.names if any(r["model"] == m and r["kind"] == "diffusion" for r in rows)]
    if diffusion and not args.no_step_profile:
        prof_path = out / "step_profile.json"
        identity = step_profile_identity(diffusion[0], args, run.device, run.dtype, rows)
        stored = stored_step_profile(prof_path, identity)
        profile += stored if stored is not None else step_profile(diffusion[0], args, run.device, run.dtype, out,
                                                                  identity)
    fig_paths += plot_step_sparsity(profile, figs)
    phases["step profile (generation + figure)"] = time.perf_counter() - t_profile
    return SimpleNamespace(paths=paths, boot=boot, fig_paths=fig_paths, phases=phases, diffusion=diffusion)


def write_summary(args, run: SimpleNamespace, rows: list[dict], report: SimpleNamespace, started: float, wall: float,
                  t_sweep: float, sweep_wall: float) -> tuple[list, list, str]:
    """Step 4: ``summary.json`` (wall time and its breakdown, machine, workers, the files written)."""
    from dllm_sparse.eval.rows import atomic_write_json, read_json_or_none

    out, paths = run.out, report.paths
    status = read_json_or_none(out / "status.json") or {}
    breakdown, worker_seconds = time_breakdown(rows, started, status, report.phases, wall, run.workers, sweep_wall)
    machine = machine_description(run.threads) + (f"; sweep in {run.workers_why}" if run.workers > 1 else "")
    summary = {"wall_seconds": wall, "sweep_seconds": t_sweep, "models": run.names, "notes": run.notes,
               "time_breakdown_seconds": dict(breakdown), "machine": machine, "workers": run.workers,
               "threads_per_worker": run.worker_threads,
               **({"compute_seconds_summed_over_workers": dict(worker_seconds)} if run.workers > 1 else {}),
               "critical_csv": str(paths["csv"]), "critical_markdown": str(paths["markdown"]),
               "figures": [str(p) for p in report.fig_paths], "rows": str(out / "rows.jsonl")}
    atomic_write_json(out / "summary.json", summary)
    return breakdown, worker_seconds, machine


def print_report(args, run: SimpleNamespace, report: SimpleNamespace, breakdown, worker_seconds, machine: str,
                 wall: float) -> None:
    """Step 5: the critical-sparsity tables, the files written and the time breakdown, on stdout."""
    from dllm_sparse.eval.analysis.critical import AVG_CURVE, differences_markdown, markdown_table

    paths, boot = report.paths, report.boot
    table = paths["table"]
    print()
    for n in run.notes:
        print(n)
    ci = f" [{100 * boot.level:g} % paired bootstrap interval over items]" if boot is not None else ""
    print(f"Critical sparsity (%), task-averaged curve; interpolated between the two grid points bracketing 0.99{ci}:")
    print(markdown_table(table, AVG_CURVE, "interpolated"))
    print(f"\nCritical sparsity (%), task-averaged curve; last grid point passing 0.99{ci}:")
    print(markdown_table(table, AVG_CURVE, "last_passing"))
    if paths["differences"]:
        print("\nDiffusion − AR critical sparsity (points; a claim only where the interval excludes 0):")
        print(differences_markdown(paths["differences"], boot.level))
    print(f"\nfull report (per task too): {paths['markdown']}\nCSV: {paths['csv']}\nfigures:")
    for p in report.fig_paths:
        if p.suffix == ".png":
            print(f"  {p}  (+ .pdf)")
    if not report.diffusion:
        print("\n(no diffusion model in this run: the sparsity-vs-step figure was not drawn)")
    print("\ntime breakdown (this run):")
    for name, sec in breakdown:
        print(f"  {sec:8.1f} s  {100 * sec / wall:5.1f} %  {name}")
    if run.workers > 1:
        print(f"the sweep's compute, summed over its {run.workers} processes:")
        for name, sec in worker_seconds:
            print(f"  {sec:8.1f} s  {name}")
    print(f"\nwall time: {wall / 60:.1f} min on {machine} (rows: {run.out / 'rows.jsonl'})")


if __name__ == "__main__":
    sys.exit(main())
