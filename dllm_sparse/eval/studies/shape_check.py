"""Every entry point on a model of a published 8B shape, with the time and peak memory of each phase.

The library side of ``experiments/check_8b_shapes.py``. One process runs one model (a shape of
:mod:`dllm_sparse.models.shapes`, ``layers`` blocks, one dtype; random weights, or loaded through ``load_model``
from a checkpoint in the official layout) through the phases named in ``phases``:

* ``load``: ``load_model(checkpoint)`` natively, then ``trust_remote_code=True`` (refused: the official modelling
  file is not at hand);
* ``generate``: the diffusion sampler (``gen_length``, ``steps``, ``block_length``, for each ``cfg`` in
  ``cfg_scales``; with ``stop_after`` only that many steps run, and the time of all ``steps`` is extrapolated from
  the seconds per step), or the AR loop (``gen_length`` new tokens) for an AR model;
* ``elbo@<context>``: the scorer on one request of ``context`` tokens whose last ``answer`` tokens are scored
  (diffusion: the Monte-Carlo ELBO, ``mc_num`` / ``mc_batch`` / ``batch_size`` / ``head_chunk``; AR: exact), and
  ``rolling@<context>``: one rolling window of ``context`` tokens scored whole (the perplexity case, where the
  LM head sees every masked position); either with ``/chunk<rows>`` (``elbo@4096/chunk2048``): the LM head (of
  the ELBO or of the AR scorer) on that many scored rows at a time;
* ``sweep``: one cell of :func:`dllm_sparse.eval.sweep.run.run_sweep` (builtin_mc, one item, ``input`` top-p 0.9);
* ``lm_eval``: the lm-eval model, one request of each kind (loglikelihood, loglikelihood_rolling, generate_until);
* ``accelerate``: ``accelerate_ffn`` with a shared keep-set (``TopP(0.9, scope="step")``, the packed path) on one
  canvas, against the masking path's logits;
* ``step_delta``: the step-delta FFN (``StepDelta("input", 0.25, 0.5, exact_block=True)``) over a few sampler steps;
* ``triton``: the Triton kernels at the shape's FFN matrices against dense references (:func:`phase_triton`; on a
  CPU under ``TRITON_INTERPRET=1``).

Memory: the resident set size (RSS) of this process, read from ``/proc/self/statm`` by a thread every 2 ms; a
phase's peak is the highest reading between its start and end (the weights included, since they are resident
throughout), its ``rss_start`` the reading at its start. CPU RSS also counts the interpreter and the libraries
(``baseline_rss``, read before the model is built). No tracemalloc (it does not see torch's allocator).
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["PeakRSS", "rss_bytes", "run_phases", "PHASES"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class PeakRSS:
    """``with PeakRSS() as p: ...`` then ``p.peak`` (bytes): the highest RSS seen by a polling thread."""

    def __init__(self, interval: float = 0.002, read: Callable[[], int] = rss_bytes):
        self.interval, self.start, self.peak = interval, 0, 0
        self._read = read  # injectable so that the poller can be tested without the allocator
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._read()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def _prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    """``n`` token ids below 256 (byte tokens of the stand-in tokenizer; never a special id)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n,), generator=g).tolist()


def phase_load(lm, s: dict) -> dict:
    from dllm_sparse import load_model

    out: dict[str, Any] = {"native": f"{type(lm.model).__name__}, kind {lm.kind}, mask id {lm.mask_id}"}
    try:
        load_model(s["checkpoint"], dtype=s["dtype"], trust_remote_code=True)
        out["trust_remote_code"] = "loaded"
    except ValueError as e:
        out["trust_remote_code"] = f"refused: {e}"
    return out


def phase_generate(lm, s: dict) -> dict:
    from dllm_sparse.samplers import GenerationConfig, generate

    ids = torch.tensor([_prompt(s["prompt"], 256)])
    out = {}
    if lm.kind == "ar":
        cfg = GenerationConfig(max_new_tokens=s["gen_length"], stop_token_ids=())
        t0 = time.perf_counter()
        res = generate(lm.model, None, ids, cfg)
        out["ar"] = {"new_tokens": res.num_tokens, "seconds": time.perf_counter() - t0, "kv_cache": res.kv_cache}
        return out
    stop = s.get("stop_after")
    uniform = lm.mask_id is None  # DiffusionGemma: its canvas is its block, and it has no guidance
    for w in [0.0] if uniform else s["cfg_scales"]:
        # The released DiffusionGemma sampler cannot stop between steps: it is given only the steps to run.
        cfg = GenerationConfig(gen_length=s["gen_length"], steps=(stop or s["steps"]) if uniform else s["steps"],
                               block_length=None if uniform else s["block_length"],
                               cfg_scale=w, stop_token_ids=(), mask_id=lm.mask_id)
        t0 = time.perf_counter()
        res = generate(lm.model, None, ids, cfg, callbacks=[_StopAfter(stop)] if stop and not uniform else None)
        seconds = time.perf_counter() - t0
        steps_run = (res.nfe if uniform else len(res.trace)) or s["steps"]
        out[f"cfg{w}"] = {"nfe": res.nfe, "steps_run": steps_run, "tokens": res.num_tokens, "seconds": seconds,
                          "seconds_per_step": seconds / steps_run,
                          # every step runs the same canvas (one forward, two with guidance): time scales with steps
                          "extrapolated_seconds_all_steps": seconds / steps_run * s["steps"]}
    return out


class _StopAfter:
    """A sampler callback that ends generation after ``steps`` steps (the timing of a step does not depend on
    which step it is: the canvas is the same size throughout)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, state):
        return state.step + 1 >= self.steps


def _scorer(lm, s: dict):
    from dllm_sparse.eval.scoring.scorer import Scorer

    kw = {"batch_size": s["batch_size"], "head_chunk": s.get("head_chunk")}
    if lm.kind == "diffusion":
        kw.update(mc_num=s["mc_num"], mc_batch=s["mc_batch"])
    return Scorer.from_loaded(lm, **kw)


def phase_elbo(lm, s: dict, context: int, rolling: bool) -> dict:
    answer = context - 1 if rolling else s["answer"]
    ids = _prompt(context, 256, seed=1)
    t0 = time.perf_counter()
    (ll, _), = _scorer(lm, s).loglikelihood_tokens([(ids[:context - answer], ids[context - answer:])])
    return {"context": context, "answer_tokens": answer, "loglikelihood": ll, "seconds": time.perf_counter() - t0,
            "head_chunk": s.get("head_chunk"),
            "forward_passes": (s["mc_num"] // s["batch_size"]) if lm.kind == "diffusion" else 1}


def phase_sweep(lm, s: dict) -> dict:
    from dllm_sparse.eval.sweep.config import SweepConfig
    from dllm_sparse.eval.sweep.run import run_sweep

    cfg = SweepConfig(models=[lm], output_dir=Path(s["work_dir"]) / "sweep", sites=["input"], thresholds=[0.9],
                      tasks=["builtin_mc"], limit=1, mc_num=s["mc_num"], mc_batch=s["mc_batch"],
                      batch_size=s["batch_size"], progress=False)
    rows = run_sweep(cfg, rank=0, world_size=1)
    keep = ("model", "site", "p", "task", "metric", "value", "sparsity", "seconds")
    return {"rows": [{k: r.get(k) for k in keep} for r in rows if r.get("model") == lm.name]}


def phase_lm_eval(lm, s: dict) -> dict:
    from lm_eval.api.instance import Instance

    from dllm_sparse.eval.tasks.scorer_lm import ScorerLM

    kw = {"max_gen_toks": s["lm_eval_gen"]}
    if lm.kind == "diffusion":
        kw.update(gen_steps=s["lm_eval_gen"], block_length=s["lm_eval_gen"])
    model = ScorerLM(_scorer(lm, s), progress=False, **kw)
    text = "The quick brown fox jumps over the lazy dog."
    ll = model.loglikelihood([Instance("loglikelihood", {}, ("The quick brown fox", " jumps"), 0, ("t", 0, 1))])
    roll = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))])
    gen = model.generate_until([Instance("generate_until", {}, ("The quick", {"until": ["\n"]}), 0, ("t", 0, 1))])
    return {"loglikelihood": ll[0], "loglikelihood_rolling": roll[0], "generate_until": gen[0]}


def phase_accelerate(lm, s: dict) -> dict:
    from dllm_sparse import SparsityConfig, TopP, sparsify
    from dllm_sparse.kernels import accelerate_ffn, restore_ffn

    if lm.kind == "diffusion" and lm.mask_id is None:
        return {"skipped": "DiffusionGemma's forward draws a random canvas per call, so two forwards of one input "
                           "differ; the packed path is not checked on it here"}
    config = SparsityConfig("input", TopP(0.9, scope="step"))
    ids = torch.tensor([_prompt(s["prompt"] + s["gen_length"], 256, seed=2)])
    with torch.no_grad():
        with sparsify(lm.model, config):
            ref = lm.model(ids).logits[0, -s["block_length"]:].float()
        accelerate_ffn(lm.model, config)
        try:
            t0 = time.perf_counter()
            fast = lm.model(ids).logits[0, -s["block_length"]:].float()
            seconds = time.perf_counter() - t0
        finally:
            restore_ffn(lm.model)
    return {"tokens": ids.shape[1], "max_abs_diff_vs_masking_path": (fast - ref).abs().max().item(),
            "argmax_agreement": (fast.argmax(-1) == ref.argmax(-1)).float().mean().item(), "seconds": seconds}


def phase_step_delta(lm, s: dict) -> dict:
    if lm.kind != "diffusion" or lm.mask_id is None:
        return {"skipped": "the step-delta FFN is a masked-diffusion strategy"}
    from dllm_sparse.samplers import GenerationConfig, generate
    from dllm_sparse.samplers.step_delta import StepDelta, step_delta

    ids = torch.tensor([_prompt(s["prompt"], 256)])
    cfg = GenerationConfig(gen_length=s["block_length"], steps=s["delta_steps"], block_length=s["block_length"],
                           stop_token_ids=(), mask_id=lm.mask_id)
    config = StepDelta("input", fraction=0.25, down_fraction=0.5, refresh="block_start", exact_block=True)
    t0 = time.perf_counter()
    with step_delta(lm.model, config) as delta:
        res = generate(lm.model, None, ids, cfg, callbacks=[delta])
    report = delta.report()
    return {"steps": res.nfe, "seconds": time.perf_counter() - t0, "ffn_work": report["ffn_work"],
            "refresh_steps": report["refresh_steps"]}


def phase_triton(lm, s: dict) -> dict:
    """The Triton kernels at this shape's FFN matrices (W_gate/W_up: d -> d_ff, W_down: d_ff -> d), a few calls
    each, against dense references: the column-sparse GEMV (one token, threshold fused), the gathered GEMM (4 tokens,
    the union of their masks), the row-sparse GEMV/GEMM, and the top-p threshold. On a CPU this needs
    ``TRITON_INTERPRET=1`` in the environment before Triton is imported (the script sets it when asked)."""
    import torch.nn.functional as F

    from dllm_sparse import top_p_mask_reference
    from dllm_sparse.kernels import column_sparse_matmul, row_sparse_matmul, topp_threshold

    cfg = lm.model.config
    d, d_ff = cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(4)
    dtype = next(lm.model.parameters()).dtype
    out: dict[str, Any] = {"d_model": d, "d_ff": d_ff, "dtype": str(dtype).replace("torch.", "")}
    for name, d_in, d_out in (("gate/up", d, d_ff), ("down", d_ff, d)):
        w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
        wt = w.t().contiguous()
        for M in (1, 4):
            x = torch.randn(M, d_in, generator=g).to(dtype)
            tau = topp_threshold(x, 0.5, backend="triton")  # [M, 1]
            keep = top_p_mask_reference(x.float(), 0.5)
            t0 = time.perf_counter()
            y = column_sparse_matmul(x, wt, threshold=tau, backend="triton")
            col_s = time.perf_counter() - t0
            ref_thr = x.abs().float() >= tau.float()
            ref = F.linear(x.float().masked_fill(~ref_thr, 0), w.float())
            keep_out = torch.rand(d_out, generator=g) >= 0.5
            t0 = time.perf_counter()
            yr = row_sparse_matmul(x, w, keep_out, backend="triton")
            row_s = time.perf_counter() - t0
            ref_r = F.linear(x.float(), w.float()).masked_fill(~keep_out, 0)
            scale = ref.abs().max().item() or 1.0
            out[f"{name} M={M}"] = {
                "column_sparse_max_rel_err": (y.float() - ref).abs().max().item() / scale,
                "row_sparse_max_rel_err": (yr.float() - ref_r).abs().max().item() / (ref_r.abs().max().item() or 1),
                "threshold_mask_equals_reference": bool(torch.equal(ref_thr, keep)),
                "column_sparse_s": col_s, "row_sparse_s": row_s}
    return out


PHASES: dict[str, Callable] = {"load": phase_load, "generate": phase_generate, "sweep": phase_sweep,
                               "lm_eval": phase_lm_eval, "accelerate": phase_accelerate,
                               "step_delta": phase_step_delta, "triton": phase_triton}


def _phase_fn(name: str) -> Callable:
    for prefix, rolling in (("elbo@", False), ("rolling@", True)):
        if name.startswith(prefix):
            context, _, chunk = name[len(prefix):].partition("/chunk")
            try:
                context, chunk = int(context), int(chunk) if chunk else None
            except ValueError:
                raise ValueError(f"phase {name!r}: write {prefix}<context>[/chunk<rows>], e.g. {prefix}1024/chunk512") \
                    from None
            return lambda lm, s: phase_elbo(lm, {**s, "head_chunk": chunk or s.get("head_chunk")}, context, rolling)
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; choose from {sorted(PHASES)}, elbo@<context>, rolling@<context>")
    return PHASES[name]


def run_phases(shape: str, layers: int, dtype: str, phases: list[str], settings: dict,
               checkpoint: str | None = None) -> dict:
    """Build (or, with ``checkpoint``, load) one model and run ``phases`` on it; returns the rows (one per phase,
    plus ``build``/``load``) with seconds and RSS, and the environment."""
    from dllm_sparse.models.loading import LoadedModel, parse_dtype
    from dllm_sparse.models.shapes import build_random, shape_family, shape_fields, standin_tokenizer, weight_bytes

    fns = [(p, _phase_fn(p)) for p in phases]  # a bad phase name fails before the model is built
    torch_dtype = parse_dtype(dtype)
    res: dict[str, Any] = {"shape": shape, "layers": layers, "dtype": dtype, "settings": settings,
                           "checkpoint": checkpoint, "torch_threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "baseline_rss": rss_bytes(), "weights": weight_bytes(shape, layers, torch_dtype),
                           "rows": []}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if checkpoint:
            from dllm_sparse import load_model

            lm = load_model(checkpoint, dtype=dtype)
            what = "load"
        else:
            # Kernel checks alone read only the config and dtype: no weights (the meta device) then.
            meta = all(p == "triton" for p in phases)
            model, kind = build_random(shape, layers, torch_dtype, device="meta" if meta else "cpu")
            fields = shape_fields(shape)
            lm = LoadedModel(model, standin_tokenizer(shape), kind, f"random-{shape}-{layers}l",
                             fields.get("mask_token_id") if kind == "diffusion" else None, shape_family(shape))
            what = "build"
        seconds = time.perf_counter() - t0
    res["rows"].append({"phase": what, "seconds": seconds, "rss_start": mem.start, "rss_peak": mem.peak})
    print(f"{what}: {seconds:.1f} s, peak RSS {mem.peak / 1e9:.2f} GB", flush=True)
    s = {**settings, "dtype": dtype, "checkpoint": checkpoint}
    for name, fn in fns:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            try:
                details, error = fn(lm, s), None
            except Exception as e:  # noqa: BLE001 - a failing entry point is a finding to report, not a crash
                details, error = None, f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t0
        row = {"phase": name, "seconds": seconds, "rss_start": mem.start, "rss_peak": mem.peak, "details": details}
        if error:
            row["error"] = error
        res["rows"].append(row)
        print(f"{name}: {seconds:.1f} s, peak RSS {mem.peak / 1e9:.2f} GB{'; ' + error if error else ''}", flush=True)
    return res
