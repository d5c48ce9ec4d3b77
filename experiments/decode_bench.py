"""End-to-end speed with and without accelerate_ffn: AR decode tokens/s, diffusion seconds per denoising step.

    python experiments/decode_bench.py --model-shape llama-3.1-8b                 # random weights, real shape
    python experiments/decode_bench.py --model-shape llada-8b --gen-length 256   # seconds per denoising step
    python experiments/decode_bench.py --model /ckpt/Llama-3.1-8B --site input --p 0.5
    python experiments/decode_bench.py --model-shape smollm2-135m --layers 2 --tokens 8   # CPU smoke run

Speed does not depend on the weights, so a randomly initialised model of a real shape is a fair subject
(its measured sparsity is that of random activations, though: for sparsity figures use a real model).
AR decoding is a minimal greedy KV-cached loop over the transformers model (prefill excluded from the
timing); a diffusion step is one forward pass over the whole canvas plus the argmax (the sampler's
remasking bookkeeping is excluded). Those loops run eagerly, Python included.

The step alone, as the GPU runs it: one AR decode step (one token over a StaticCache at a fixed position, so the
shapes never change) and one denoising step, each captured in a CUDA graph and replayed (dense, then with the
sparse FFN swapped in): ``*_step_ms`` with ``*_step_timing`` saying "cuda_graph", or "eager: ..." naming the op
that synchronised with the host and kept the step out of a graph. On CPU the same step functions run eagerly.
Every measurement is appended, as it finishes, to ``<output-dir>/<stem>.jsonl`` (and ``--rows``) with the
environment (GPU, driver, torch, Triton, backend).

The bound: with a fraction f of the bytes read per step sitting in the matrices the site lets us skip, and
a skipped fraction s of them, the bandwidth bound is 1 / (1 - f * s). For AR decode s is the measured
per-token sparsity; for a diffusion step (many tokens share one kept set) it is 1 - union density.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from dllm_sparse.atomic import atomic_write_text
from dllm_sparse.sparsity.sites import FFNSite

# torch, the models and the kernels are imported inside the functions that use them, after the arguments are
# parsed: --help then answers at once instead of loading torch and transformers first (seconds).
if TYPE_CHECKING:
    import torch

    from dllm_sparse import SparsityConfig, SparsityStats

# Real shapes. smollm2-135m and llama-3.1-8b are LlamaForCausalLM; llada-8b is the native LLaDA (its
# LLaDAConfig defaults are the 8B values).
MODEL_SHAPES = {
    "smollm2-135m": dict(family="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.1-8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False),
    "llada-8b": dict(family="llada"),
}

# The FFN matrices whose reads each site lets the kernels skip.
SKIPPED = {FFNSite.INPUT: ("gate", "up"), FFNSite.INTERMEDIATE: ("down",), FFNSite.GATE: ("up", "down"),
           FFNSite.UP: ("gate", "down")}


def build_random(shape: str, layers: int | None, dtype: torch.dtype, device: torch.device):
    """A randomly initialised model of a named real shape, built directly on ``device``."""
    import torch

    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown --model-shape {shape!r}; choose one of {sorted(MODEL_SHAPES)}")
    fields = dict(MODEL_SHAPES[shape])
    family = fields.pop("family")
    if family == "llada":
        from dllm_sparse.models.llada import LLaDAConfig, LLaDAModelLM

        config = LLaDAConfig(**({"n_layers": layers} if layers else {}))
        cls, kind = LLaDAModelLM, "diffusion"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        if layers:
            fields["num_hidden_layers"] = layers
        config = LlamaConfig(max_position_embeddings=8192, **fields)
        cls, kind = LlamaForCausalLM, "ar"
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    return model.eval(), kind


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# The two workloads
# --------------------------------------------------------------------------------------------------------


def greedy_decode(model, prompt: torch.Tensor, new_tokens: int, stats: SparsityStats | None = None) -> float:
    """Greedy KV-cached decoding of ``new_tokens`` tokens; returns seconds per decoded token (prefill excluded)."""
    import torch

    from dllm_sparse.samplers.kv_cache import cache_keyword, check_cache_length, new_cache

    device = prompt.device
    key, cache = cache_keyword(model), new_cache(model)  # the keyword is version-dependent: ask transformers
    with torch.no_grad(), stats.tagged("prefill") if stats else nullcontext():
        out = model(input_ids=prompt, use_cache=True, **{key: cache})
    tok = out.logits[:, -1:].argmax(-1)
    check_cache_length(cache, prompt.shape[1], model)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), stats.tagged("decode") if stats else nullcontext():
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, use_cache=True, **{key: cache})
            tok = out.logits[:, -1:].argmax(-1)
    sync(device)
    check_cache_length(cache, prompt.shape[1] + new_tokens - 1, model)
    return (time.perf_counter() - t0) / (new_tokens - 1)


def denoising_steps(model, canvas: torch.Tensor, steps: int) -> float:
    """``steps`` forward passes over the canvas (+ argmax); returns seconds per step."""
    import torch

    sync(canvas.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            model(input_ids=canvas).logits.argmax(-1)
    sync(canvas.device)
    return (time.perf_counter() - t0) / steps


def ar_step(model, prompt: torch.Tensor):
    """One greedy decode step after ``prompt``, over a StaticCache at a fixed position (len(prompt)): the step's
    inputs are fixed tensors and nothing changes shape, so a CUDA graph can capture it; every replay rewrites the
    same cache slot (the cost of a decode step at context len(prompt) + 1)."""
    import torch
    from transformers import StaticCache

    from dllm_sparse.samplers.kv_cache import cache_keyword

    n, device = prompt.shape[1], prompt.device
    key = cache_keyword(model)
    cache = StaticCache(config=model.config, max_cache_len=n + 1)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, cache_position=torch.arange(n, device=device), **{key: cache})
    token = out.logits[:, -1:].argmax(-1)
    position = torch.tensor([n], device=device)
    # transformers >= 5.24 counts each layer's length in a device tensor that every update advances (and ignores
    # cache_position): set it back to n before each step, in the step, so that graph replays rewind it too.
    counters = [layer.cumulative_length for layer in getattr(cache, "layers", ())
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def step():
        for counter in counters:
            counter.fill_(n)
        with torch.no_grad():
            return model(input_ids=token, position_ids=position[None], cache_position=position, use_cache=True,
                         **{key: cache}).logits.argmax(-1)

    return step


def diffusion_step(model, ids: torch.Tensor):
    """One denoising step over the fixed canvas ``ids``: the forward pass and the argmax."""
    import torch

    def step():
        with torch.no_grad():
            return model(input_ids=ids).logits.argmax(-1)

    return step


def step_ms(step, device: torch.device) -> tuple[float, str]:
    """(milliseconds, how): the median of 20 CUDA-graph replays of ``step`` on the GPU (kernels/bench.graph_ms),
    else a CPU median of eager calls."""
    from dllm_sparse.kernels.bench import cpu_ms, graph_ms

    if device.type == "cuda":
        return graph_ms(step, calls=1, replays=20)
    return cpu_ms(step, 0.05), "cpu"


def timed(fn, repeats: int) -> float:
    fn()  # warmup: kernel compilation, allocator, caches
    return statistics.median(fn() for _ in range(repeats))


# --------------------------------------------------------------------------------------------------------
# Bound
# --------------------------------------------------------------------------------------------------------


def byte_fraction(model, site: FFNSite, context: int, kind: str) -> dict:
    """Bytes read per step: every weight matrix except the input embedding (a lookup reads one row per token,
    unless it is tied to the LM head), plus the KV cache at this context length for AR decode."""
    from dllm_sparse import find_ffns

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    # named_parameters() lists a tied matrix once; the LM head then reads it in full.
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb or tied)
    skipped = sum(getattr(f, role).weight.numel() * getattr(f, role).weight.element_size()
                  for f in find_ffns(model) for role in SKIPPED[site])
    kv = 0
    if kind == "ar":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * emb.element_size()
    return {"weight_bytes": total, "kv_bytes": kv, "skippable_bytes": skipped, "f": skipped / (total + kv)}


def measure_sparsity(model, config: SparsityConfig, ids, kind, new_tokens, be) -> dict:
    """Per-token sparsity of the accelerated run (decode tokens for AR) and, for a canvas, the union density
    of the tokens' masks per layer (from the masking path's recorded masks: the same masks)."""
    import torch

    from dllm_sparse import SparsityStats, sparsify
    from dllm_sparse.kernels import accelerate_ffn, restore_ffn, union_density

    site = config.site
    stats = SparsityStats()
    accelerate_ffn(model, config, stats=stats, backend=be)
    try:
        if kind == "ar":
            greedy_decode(model, ids, max(new_tokens, 2), stats)
            token_sparsity = stats.mean(site, tag="decode")
        else:
            with torch.no_grad():
                model(input_ids=ids)
            token_sparsity = stats.mean(site)
    finally:
        restore_ffn(model)
    out = {"token_sparsity": token_sparsity}
    if kind != "ar":
        with sparsify(model, config, record_masks=True) as rec, torch.no_grad():
            model(input_ids=ids)
        dens = [float(union_density(m["keep"])) for m in rec.masks]
        out["union_density"] = sum(dens) / len(dens)
    return out


def check_against_masking_path(model, config: SparsityConfig, ids, be) -> dict:
    """Logits of one forward pass: accelerated vs the masking path (same masks; differences are rounding)."""
    import torch

    from dllm_sparse import sparsify
    from dllm_sparse.kernels import accelerate_ffn, restore_ffn

    with sparsify(model, config), torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    accelerate_ffn(model, config, backend=be)
    try:
        with torch.no_grad():
            fast = model(input_ids=ids).logits.float()
    finally:
        restore_ffn(model)
    err = float((fast - ref).abs().max())
    return {"max_abs_diff": err, "max_abs_logit": float(ref.abs().max())}


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawTextHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows every option's default."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model id, directory, or an embedded name (smollm2-135m)")
    src.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), help="random weights of a real shape")
    ap.add_argument("--layers", type=int, default=None, help="truncate a --model-shape to N layers (CPU smoke runs)")
    ap.add_argument("--site", default="input", choices=[s.value for s in FFNSite], help="FFN site sparsified")
    ap.add_argument("--rule", default="top_p", help="top_p, top_k or max_p")
    ap.add_argument("--p", type=float, default=0.5, help="the rule's threshold (top-p p; top-k sparsity)")
    ap.add_argument("--tokens", type=int, default=128, help="AR: tokens to decode (timed: all but the first)")
    ap.add_argument("--prompt-len", type=int, default=32, help="tokens of the random prompt")
    ap.add_argument("--gen-length", type=int, default=128, help="diffusion: masked positions on the canvas")
    ap.add_argument("--steps", type=int, default=8, help="diffusion: denoising steps timed")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of dense and of sparse")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                    help="weight dtype (None: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--device", default=None, help="None: cuda when available, else cpu")
    ap.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                    help="kernel backend (None: $DLLM_SPARSE_KERNELS, else auto = Triton on CUDA, PyTorch elsewhere)")
    ap.add_argument("--output-dir", default="experiments/results", help="where the JSON goes")
    ap.add_argument("--rows", type=Path, default=None,
                    help="also append every measurement, as it finishes, to this JSONL file")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (the first token comes from the untimed prefill)")
    for name in ("layers", "prompt_len", "gen_length", "steps", "repeats"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return args


def _model_and_work(args, dtype, device):
    """The model (loaded, or random weights of a real shape), its kind and name, the input ids, the timed loop
    (``work``: AR greedy decoding, or denoising steps), the prompt and the context length the bytes are counted at."""
    import torch

    from dllm_sparse import load_model

    if args.model:
        lm = load_model(args.model, dtype=dtype, device=str(device))
        model, kind, name = lm.model.eval(), lm.kind, args.model
        mask_id = lm.mask_id
    else:
        model, kind = build_random(args.model_shape, args.layers, dtype, device)
        name = args.model_shape + (f" ({args.layers} layers)" if args.layers else "")
        mask_id = getattr(model.config, "mask_token_id", None)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(vocab, 32000), (1, args.prompt_len), generator=g).to(device)
    if kind == "ar":
        ids = prompt
        work = lambda: greedy_decode(model, prompt, args.tokens)  # noqa: E731
        context = args.prompt_len + args.tokens // 2
    else:
        canvas = torch.full((1, args.gen_length), mask_id if mask_id is not None else vocab - 1, device=device)
        ids = torch.cat([prompt, canvas], dim=1)
        work = lambda: denoising_steps(model, ids, args.steps)  # noqa: E731
        context = ids.shape[1]
    return model, kind, name, ids, work, prompt, context


def _captured_steps(model, config, kind: str, prompt, ids, device, backend, emit) -> dict:
    """The step alone, captured (dense, then sparse): the figure that measures the GPU's work."""
    from dllm_sparse.kernels import accelerate_ffn, restore_ffn

    make_step = (lambda: ar_step(model, prompt)) if kind == "ar" else (lambda: diffusion_step(model, ids))
    steps = {}
    for label in ("dense", "sparse"):
        if label == "sparse":
            accelerate_ffn(model, config, backend=backend)
        try:
            ms, how = step_ms(make_step(), device)
            steps[label] = {"ms": ms, "timing": how}
        except Exception as e:  # noqa: BLE001 - recorded (e.g. a transformers without StaticCache); the loops run
            steps[label] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            if label == "sparse":
                restore_ffn(model)
        emit({"measure": f"{label}_step", **steps[label]})
    return steps


def _timed_loops(model, config, work, repeats: int, backend, emit) -> tuple[float, float]:
    """Seconds per token (AR) or per step (diffusion) of the loop, dense then with accelerate_ffn."""
    from dllm_sparse.kernels import accelerate_ffn, restore_ffn

    dense_s = timed(work, repeats)
    emit({"measure": "dense_loop", "seconds": dense_s})
    accelerate_ffn(model, config, backend=backend)
    try:
        sparse_s = timed(work, repeats)
    finally:
        restore_ffn(model)
    emit({"measure": "sparse_loop", "seconds": sparse_s})
    return dense_s, sparse_s


def _bounds(result: dict, steps: dict, meta: dict, fraction: dict, s_eff: float) -> str | None:
    """The captured steps against the GPU's bandwidth bound (bytes per step: dense, and with f * s of them
    skipped), added to ``result``; returns the GPU's key (None off a known GPU)."""
    from dllm_sparse.kernels.roofline import bound_us, gpu_key

    for label, got in steps.items():
        result.update({f"{label}_step_{k}": v for k, v in got.items()})
    if "ms" in steps.get("dense", {}) and "ms" in steps.get("sparse", {}):
        result["step_speedup"] = steps["dense"]["ms"] / steps["sparse"]["ms"]
    gpu = gpu_key(meta["device"])
    if gpu is not None:
        step_bytes = fraction["weight_bytes"] + fraction["kv_bytes"]
        result["dense_step_bound_us"] = bound_us(step_bytes, gpu)
        result["sparse_step_bound_us"] = bound_us(int(step_bytes * (1 - fraction["f"] * s_eff)), gpu)
        for label in ("dense", "sparse"):
            if "ms" in steps.get(label, {}):
                result[f"{label}_step_of_bound"] = result[f"{label}_step_bound_us"] / (steps[label]["ms"] * 1e3)
    return gpu


def _print_result(name: str, kind: str, config, ids, result: dict, steps: dict, gpu) -> None:
    site, rule = config.site, config.rule
    sparsity, fraction, check = result["sparsity"], result["bytes"], result["check_vs_masking_path"]
    if kind == "ar":
        print(f"{name}: dense {result['dense_tokens_per_s']:8.2f} tok/s   "
              f"accelerate_ffn({site.value}, {rule}) {result['sparse_tokens_per_s']:8.2f} tok/s")
    else:
        print(f"{name}: dense {result['dense_s_per_step']:.4f} s/step   accelerate_ffn({site.value}, {rule}) "
              f"{result['sparse_s_per_step']:.4f} s/step "
              f"({ids.shape[1]} tokens, union density {sparsity['union_density']:.2f})")
    print(f"speedup {result['speedup']:.2f}x   bound 1/(1 - f*s) = {result['bound']:.2f}x   "
          f"(f = {fraction['f']:.2f} of the bytes per step, s = {result['effective_sparsity']:.2f})   "
          f"logit diff vs masking path {check['max_abs_diff']:.2e} (logits up to {check['max_abs_logit']:.1f})")
    for label, got in steps.items():
        share = (f", {result[f'{label}_step_of_bound']:.0%} of the {gpu} bound "
                 f"{result[f'{label}_step_bound_us']:.0f} us" if f"{label}_step_of_bound" in result else "")
        print(f"{label} step alone: " + (f"{got['ms']:.3f} ms ({got['timing']}{share})" if "ms" in got
                                         else got["error"]), flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from dllm_sparse import SparsityConfig, make_rule
    from dllm_sparse.kernels import backend
    from dllm_sparse.kernels.bench import append_row, environment
    from dllm_sparse.sparsity.config import slug

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = SparsityConfig(args.site, make_rule(args.rule, args.p))
    site, rule = config.site, config.rule
    model, kind, name, ids, work, prompt, context = _model_and_work(args, dtype, device)
    meta = {"model": name, "kind": kind, "site": site.value, "rule": rule.to_dict(), "dtype": str(dtype)[6:],
            "weights": "real" if args.model else "random", **environment(device, backend(ids, args.backend))}
    if device.type != "cuda":
        meta["note"] = "CPU: the PyTorch fallbacks, not the Triton kernels; a smoke run, not a measurement"
    print(json.dumps(meta), flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode_bench_{slug(name)}_{site.value}_{slug(meta['device'])}"
    (out / f"{stem}.jsonl").write_text("")  # this run's rows; --rows is appended to only

    def emit(row: dict) -> None:
        for path in [out / f"{stem}.jsonl"] + ([args.rows] if args.rows else []):
            append_row(path, {"bench": "decode", "model": name, "kind": kind, **row, "env": meta})
        print(json.dumps(row), flush=True)

    steps = _captured_steps(model, config, kind, prompt, ids, device, args.backend, emit)
    dense_s, sparse_s = _timed_loops(model, config, work, args.repeats, args.backend, emit)
    sparsity = measure_sparsity(model, config, ids, kind, min(args.tokens, 16), args.backend)
    check = check_against_masking_path(model, config, ids, args.backend)
    fraction = byte_fraction(model, site, context, kind)
    s_eff = sparsity["token_sparsity"] if kind == "ar" else 1 - sparsity["union_density"]
    result = {"meta": meta, "sparsity": sparsity, "bytes": fraction, "check_vs_masking_path": check}
    if kind == "ar":
        result.update(dense_tokens_per_s=1 / dense_s, sparse_tokens_per_s=1 / sparse_s)
    else:
        result.update(dense_s_per_step=dense_s, sparse_s_per_step=sparse_s, tokens_per_step=ids.shape[1])
    result.update(speedup=dense_s / sparse_s, bound=1 / (1 - fraction["f"] * s_eff), effective_sparsity=s_eff)
    gpu = _bounds(result, steps, meta, fraction, s_eff)
    _print_result(name, kind, config, ids, result, steps, gpu)
    path = out / f"{stem}.json"
    atomic_write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
