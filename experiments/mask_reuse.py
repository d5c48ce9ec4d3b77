"""Mask reuse across denoising steps: how stable are FFN keep-masks, and what does reusing them cost and buy?

    python experiments/mask_reuse.py                                   # offline default, < 10 min on a CPU
    python experiments/mask_reuse.py --model /ckpt/LLaDA-8B-Instruct --ar-model /ckpt/Llama-3.1-8B-Instruct \\
        --device cuda --dtype bf16 --gen-length 128 --steps 128 --block-length 32 --prompts 8 \\
        --track-layers 0,8,16,24,31 --output-dir runs/mask_reuse_llada8b

Two studies, one site and one top-p threshold per cell (``docs/sparsification.md``, "Mask reuse across
denoising steps"; policies in :mod:`dllm_sparse.samplers.reuse`):

1. **Overlap vs step gap.** The ``fresh`` run of every site carries a :class:`MaskOverlapTracker` on a few
   layers; the stored masks give, for every pair of steps (t - g, t), the per-position Jaccard |A∩B|/|A∪B|
   and recall of the fresh mask |A∩B|/|A|, for gaps g = 1, 2, 4, 8, ... per layer and position group:
   ``masked`` (mask token at both steps), ``decoded`` (same token at both steps), ``newly_decoded`` (decoded
   in between: its input changed), ``prompt``. For the AR twin the same numbers compare the masks of decoded
   tokens g apart (what "reuse the last decoded token's mask" would reuse). Heatmaps and line plots (PNG).
2. **Policy sweep.** For every policy and site at the same p: greedy generations, token agreement with the
   ``fresh`` policy (and with dense), measured sparsity, number of mask selections, and with the kernels
   (:func:`dllm_sparse.kernels.column_sparse_matmul`) the time per step of the FFN matrices the site can skip,
   on the masks actually recorded at a few layers and steps: one gathered GEMM over the union of the step's
   masks (what a mask shared by all tokens of a step allows) vs one GEMV per token with its own mask, plus
   the selection cost on the steps where the policy selects. On a CPU these are PyTorch-fallback timings
   (labelled so), useful for the ratios, not as GPU numbers.

ELBO quality is not measured: :class:`dllm_sparse.eval.likelihood.Scorer` attaches its sparsity without a mask
selector, and its Monte-Carlo forwards are independent single passes with no denoising trajectory to reuse
masks along.

Outputs (``--output-dir``, default ``runs/mask_reuse``): ``cells.jsonl`` (one row per finished cell, appended
atomically; a rerun skips finished cells), ``policies.csv`` (tidy, with the relative quality filled in),
``overlap.csv`` (overlap vs gap), ``overlap_steps/*.csv`` (tracker rows per step), ``figures/*.png``,
``summary.md``. Models: ``--model`` defaults to the embedded ``smollm2-135m-mdm``; when its adapter is not
installed the script falls back to the *untrained* converted twin of SmolLM2-135M (bidirectional attention,
mask token added, no adaptation) and says so in every output.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dllm_sparse.models.loading import LoadedModel, load_model
from dllm_sparse.samplers.reuse import make_policy, reuse_sparsity
from dllm_sparse.sparsity.rules import TopP
from dllm_sparse.samplers import GenerationCallback, GenerationConfig, MaskOverlapTracker, generate, mask_overlap
from dllm_sparse.sparsity.sites import FFNSite
from dllm_sparse.eval.sweep import JsonlWriter, read_rows

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "dllm_sparse" / "data" / "capability_probe.jsonl"
DEFAULT_POLICIES = "fresh,every2,every4,block_start,adaptive0.7,adaptive0.8"
GROUPS = ("all", "masked", "decoded", "newly_decoded", "prompt")


# ----------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-mdm",
                    help="diffusion model: embedded name, local dir or hub id (default: %(default)s; falls back to "
                         "the untrained converted SmolLM2-135M twin when the embedded adapter is missing)")
    ap.add_argument("--ar-model", default="smollm2-135m",
                    help="AR model for the contrast ('none' to skip; default: %(default)s)")
    ap.add_argument("--no-fallback", action="store_true",
                    help="fail instead of falling back to the untrained twin when --model cannot be loaded")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: %(default)s)")
    ap.add_argument("--dtype", default=None, help="model dtype: float32, bf16, fp16 (default: as stored)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--sites", default="input,intermediate", help="FFN sites, comma-separated (default: %(default)s)")
    ap.add_argument("--p", type=float, default=0.9, help="top-p threshold of every cell (default: %(default)s)")
    ap.add_argument("--policies", default=DEFAULT_POLICIES,
                    help="reuse policies: fresh, every<k>, block_start, adaptive<bound> (default: %(default)s)")
    ap.add_argument("--new-positions", choices=("fresh", "reuse"), default="fresh",
                    help="positions decoded since their cached mask: fresh selection or reuse (default: %(default)s)")
    ap.add_argument("--probe-layer", default="middle",
                    help="Adaptive: probe layer: 'middle' (median sparsified layer), 'first' or an index "
                         "(default: %(default)s)")
    ap.add_argument("--probe-region", choices=("generated", "all"), default="generated",
                    help="Adaptive: positions the probe compares (default: %(default)s)")
    ap.add_argument("--probe-positions", type=int, default=None,
                    help="Adaptive: compare only this many positions (default: all reusable positions)")
    ap.add_argument("--probe-metric", choices=("jaccard", "recall"), default="jaccard",
                    help="Adaptive: overlap metric (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=2,
                    help="number of prompts from dllm_sparse/data/capability_probe.jsonl (default: %(default)s)")
    ap.add_argument("--prompt-file", default=None, help="JSONL with a 'prompt' field per line instead")
    ap.add_argument("--no-chat-template", action="store_true", help="feed raw prompts (default: chat template)")
    ap.add_argument("--gen-length", type=int, default=32,
                    help="diffusion canvas / AR new tokens (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=16, help="denoising steps (default: %(default)s)")
    ap.add_argument("--block-length", type=int, default=16, help="block length (default: %(default)s)")
    ap.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (default: %(default)s)")
    ap.add_argument("--track-layers", default=None,
                    help="layers of the overlap tracker, comma-separated (default: 4 evenly spaced layers)")
    ap.add_argument("--gaps", default="1,2,4,8,16", help="step gaps of the overlap analysis (default: %(default)s)")
    ap.add_argument("--kernel-layers", default=None,
                    help="layers whose recorded masks are timed with the kernels (default: 2 tracked layers; "
                         "'none' skips the timing)")
    ap.add_argument("--kernel-steps", type=int, default=0,
                    help="steps whose masks are timed, from the start of the 2nd block (default: 0 = the whole "
                         "block, so each policy's mix of selecting and reusing steps is timed)")
    ap.add_argument("--kernel-repeats", type=int, default=3, help="timing repeats, median (default: %(default)s)")
    ap.add_argument("--ar-policies", default="fresh,every2,every4,block_start",
                    help="policies also run on the AR model ('none' to skip; default: %(default)s)")
    ap.add_argument("--teacher-forced", action="store_true",
                    help="also replay the dense run's trajectory with every policy and report the per-step argmax "
                         "agreement at still-masked positions with dense and fresh (one extra pass per cell)")
    ap.add_argument("--passages", type=int, default=4,
                    help="built-in held-out passages for the likelihood check (diffusion; 0 to skip): each "
                         "configuration scores the same passages along the same random reveal order (default: "
                         "%(default)s)")
    ap.add_argument("--passage-prompt-len", type=int, default=8,
                    help="tokens of each passage given as the prompt (default: %(default)s)")
    ap.add_argument("--output-dir", default="runs/mask_reuse", help="output folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed (default: %(default)s)")
    return ap.parse_args(argv)


def _probe_layer(v: str) -> int | str:
    return int(v) if str(v).lstrip("-").isdigit() else str(v)


def _csv_list(s: str | None) -> list[str]:
    return [] if s is None or s.strip().lower() in ("", "none") else [t.strip() for t in s.split(",") if t.strip()]


# ----------------------------------------------------------------------------------------------------------------
# models and prompts
# ----------------------------------------------------------------------------------------------------------------


def load_diffusion(name: str, dtype, device, allow_fallback: bool) -> tuple[LoadedModel, str]:
    """(model, note). Falls back to the untrained converted SmolLM2-135M twin when the embedded adapter is absent."""
    try:
        lm = load_model(name, dtype=dtype, device=None if device == "cpu" else device)
        if lm.kind != "diffusion":
            raise ValueError(f"{name} loaded as a {lm.kind!r} model; --model must be a masked-diffusion LM")
        return lm, ""
    except (FileNotFoundError, OSError) as e:
        if not allow_fallback or name != "smollm2-135m-mdm":
            raise
        from dllm_sparse.models.adapt import add_mask_token, convert_causal_lm

        base = load_model("smollm2-135m", dtype=dtype)
        model = convert_causal_lm(base.model).eval()
        mask_id = add_mask_token(model, base.tokenizer)
        if device not in (None, "cpu", "auto"):
            model = model.to(device)
        note = (f"FALLBACK: load_model('smollm2-135m-mdm') failed ({type(e).__name__}: {str(e)[:160]}). Using the "
                "UNTRAINED converted twin of SmolLM2-135M (bidirectional attention, mean-embedding mask token, no "
                "adaptation): its generations are not meaningful text, so token agreement measures the stability "
                "of the sampler's trajectory, not task quality.")
        return LoadedModel(model, base.tokenizer, "diffusion", "smollm2-135m-mdm[untrained-fallback]", mask_id,
                           "llada"), note


def load_prompts(args) -> tuple[list[str], list[list[str]] | None]:
    """Prompts, and their keywords when the file has them (the capability probe does: the task metric)."""
    path = Path(args.prompt_file) if args.prompt_file else PROBE
    rows = [json.loads(line) for line in path.open() if line.strip()][: args.prompts]
    keywords = [r["keywords"] for r in rows] if all("keywords" in r for r in rows) else None
    return [r["prompt"] for r in rows], keywords


def encode(tok, prompts: list[str], chat: bool) -> list[list[int]]:
    out = []
    for p in prompts:
        if chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tok(p, add_special_tokens=True)["input_ids"]
        out.append([int(i) for i in ids])
    return out


def n_layers(model) -> int:
    from dllm_sparse.models.families import find_ffns

    return len(find_ffns(model))


def spread(n: int, k: int) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


# ----------------------------------------------------------------------------------------------------------------
# callbacks that record what the analysis needs
# ----------------------------------------------------------------------------------------------------------------


class GroupRecorder(GenerationCallback):
    """Per step: the conditional rows' ``masked`` / ``prompt`` groups and the attention mask (CPU bool)."""

    def __init__(self):
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_begin(self, state):
        B = state.batch_size
        g = {k: v[:B].bool().cpu() for k, v in state.groups.items()}
        g["valid"] = state.attention_mask.bool().cpu()
        g["block"] = int(state.block)
        self.steps[int(state.step)] = g


class KernelRecorder(GenerationCallback):
    """Mask observer + callback: keeps the conditional row-0 keep-masks of ``layers`` at ``steps`` and the
    fraction of that layer's token vectors the policy ran the rule on at each of those steps."""

    def __init__(self, layers, steps, policy):
        self.layers, self.steps, self.policy = set(layers), set(steps), policy
        self.masks: dict[tuple[int, int], torch.Tensor] = {}
        self.selected: dict[tuple[int, int], float] = {}
        self._step = None
        self._before: dict[int, tuple[int, int]] = {}
        self._valid = None

    def __call__(self, event):
        if self._step in self.steps and event.layer in self.layers:
            keep = event.keep if event.keep.dim() == 3 else event.keep[None]
            self.masks[(self._step, event.layer)] = keep[0][self._valid].cpu()

    def _counts(self, layer):
        return (self.policy.positions_selected.get(layer, 0), self.policy.positions_total.get(layer, 0))

    def on_step_begin(self, state):
        self._step = int(state.step)
        self._valid = state.attention_mask[0].bool().cpu()
        self._before = {layer: self._counts(layer) for layer in self.layers}

    def on_step_end(self, state):
        if self._step in self.steps:
            for layer in self.layers:
                s0, t0 = self._before[layer]
                s1, t1 = self._counts(layer)
                self.selected[(self._step, layer)] = (s1 - s0) / (t1 - t0) if t1 > t0 else float("nan")
        self._step = None


# ----------------------------------------------------------------------------------------------------------------
# overlap vs gap
# ----------------------------------------------------------------------------------------------------------------


def diffusion_overlap_rows(tracker: MaskOverlapTracker, groups: GroupRecorder, layers, site, gaps) -> list[dict]:
    steps = sorted(groups.steps)
    acc: dict[tuple, list[float]] = {}
    for layer in layers:
        masks = {s: tracker.mask(s, layer, site) for s in steps if (tracker.run, s, layer, site) in tracker.masks}
        for g in gaps:
            for t in steps:
                if t - g not in masks or t not in masks:
                    continue
                A, B = masks[t], masks[t - g]  # fresh mask, reference (g steps earlier)
                jac, rec = mask_overlap(A, B)
                gt, gs = groups.steps[t], groups.steps[t - g]
                valid = gt["valid"][:, -A.shape[1]:]
                m_t, m_s = gt["masked"][:, -A.shape[1]:], gs["masked"][:, -A.shape[1]:]
                sel = {
                    "all": valid,
                    "prompt": gt["prompt"][:, -A.shape[1]:] & valid,
                    "masked": m_t,
                    "decoded": ~m_s & valid & ~gt["prompt"][:, -A.shape[1]:],
                    "newly_decoded": m_s & ~m_t,
                }
                same_block = int(gt["block"] == gs["block"])
                for name, s in sel.items():
                    n = int(s.sum())
                    if not n:
                        continue
                    key = (layer, g, name, same_block)
                    a = acc.setdefault(key, [0.0, 0.0, 0])
                    a[0] += float(jac[s].sum())
                    a[1] += float(rec[s].sum())
                    a[2] += n
    return [{"layer": k[0], "gap": k[1], "group": k[2], "same_block": k[3], "jaccard": v[0] / v[2],
             "recall": v[1] / v[2], "positions": v[2]} for k, v in sorted(acc.items())]


def ar_overlap_rows(tracker: MaskOverlapTracker, layers, site, n_steps, gaps) -> list[dict]:
    """Masks of decoded tokens g apart (decode step t feeds the token decoded at t - 1)."""
    rows = []
    for layer in layers:
        masks = {t: tracker.mask(t, layer, site)[:, -1] for t in range(1, n_steps)
                 if (tracker.run, t, layer, site) in tracker.masks}
        for g in gaps:
            pairs = [(masks[t], masks[t - g]) for t in masks if t - g in masks]
            if not pairs:
                continue
            jac = torch.cat([mask_overlap(a, b)[0] for a, b in pairs])
            rec = torch.cat([mask_overlap(a, b)[1] for a, b in pairs])
            rows.append({"layer": layer, "gap": g, "group": "decoded", "same_block": 1,
                         "jaccard": float(jac.mean()), "recall": float(rec.mean()), "positions": int(jac.numel())})
    return rows


def step_matrix(tracker: MaskOverlapTracker, groups: GroupRecorder, layer, site) -> np.ndarray:
    """[steps, steps] mean Jaccard over the generated positions (conditional rows) of one layer."""
    steps = sorted(groups.steps)
    masks = [tracker.mask(s, layer, site) for s in steps]
    gen = ~groups.steps[steps[0]]["prompt"] & groups.steps[steps[0]]["valid"]
    gen = gen[:, -masks[0].shape[1]:]
    out = np.full((len(steps), len(steps)), np.nan)
    for i in range(len(steps)):
        for j in range(i + 1):
            jac, _ = mask_overlap(masks[i], masks[j])
            out[i, j] = out[j, i] = float(jac[gen].mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# kernel timing on recorded masks
# ----------------------------------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    _sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()  # GPU kernels are asynchronous
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def ffn_weights(model, layer: int, site: str) -> list[torch.Tensor]:
    """Transposed weights [d_in, d_out] of the matrices whose columns the site's mask skips."""
    from dllm_sparse.models.families import find_ffns

    ffn = find_ffns(model)[layer]
    mods = [ffn.gate, ffn.up] if site == "input" else [ffn.down]
    return [m.weight.detach().t().contiguous() for m in mods]


def _time_point(x, ws, keep, rule, repeats, matmul) -> tuple[float, float, float, float]:
    """(dense, union GEMM, per-token GEMVs, selection) seconds for one step's tokens and masks."""
    T = x.shape[0]
    dense = _median_time(lambda: [x @ w for w in ws], repeats)
    union = _median_time(lambda: [matmul(x, w, keep=keep) for w in ws], repeats)
    per_token = _median_time(lambda: [matmul(x[t:t + 1], w, keep=keep[t:t + 1]) for w in ws for t in range(T)],
                             repeats)
    select = _median_time(lambda: rule.mask(x), repeats)
    return dense, union, per_token, select


def time_masks(model, site: str, rule, rec: KernelRecorder, repeats: int) -> dict[str, Any]:
    from dllm_sparse.kernels import backend, column_sparse_matmul, union_density

    per: list[dict] = []
    weights: dict[int, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)
    for (step, layer), keep in sorted(rec.masks.items()):
        ws = weights.setdefault(layer, ffn_weights(model, layer, site))
        keep = keep.to(ws[0].device)
        x = torch.randn(keep.shape, generator=gen, dtype=torch.float32).to(ws[0].device, ws[0].dtype)
        T = x.shape[0]
        dense, union, per_token, select = _time_point(x, ws, keep, rule, repeats, column_sparse_matmul)
        frac = rec.selected.get((step, layer), float("nan"))
        per.append({"step": step, "layer": layer, "tokens": T, "density": float(keep.float().mean()),
                    "union_density": float(union_density(keep)), "dense_s": dense, "union_s": union,
                    "per_token_s": per_token, "select_s": select, "selected_fraction": frac,
                    "backend": backend(x)})
    if not per:
        return {}
    mean = {k: float(np.nanmean([r[k] for r in per])) for k in
            ("density", "union_density", "dense_s", "union_s", "per_token_s", "select_s", "selected_fraction")}
    # seconds per step and layer for these matrices: matmul + the selections the policy actually ran
    sel_cost = float(np.nanmean([r["select_s"] * r["selected_fraction"] for r in per]))
    return {
        "kernel_backend": per[0]["backend"], "kernel_points": len(per),
        "kernel_tokens": float(np.mean([r["tokens"] for r in per])),
        "kernel_density": mean["density"], "kernel_union_density": mean["union_density"],
        "dense_s": mean["dense_s"], "union_s": mean["union_s"], "per_token_s": mean["per_token_s"],
        "select_full_s": mean["select_s"], "select_s": sel_cost,
        "kernel_selected_fraction": mean["selected_fraction"],
        "step_union_s": mean["union_s"] + sel_cost, "step_per_token_s": mean["per_token_s"] + sel_cost,
        "kernel_detail": per,
    }


# ----------------------------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------------------------


def cell_key(**fields) -> str:
    return json.dumps(fields, sort_keys=True, default=str)


def slug(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def atomic_write_csv(path: Path, rows: list[dict], cols: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    cols = cols or (list(rows[0]) if rows else [])
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def teacher_forced(lm: LoadedModel, prompt_ids, gcfg: GenerationConfig, trajectory,
                   callbacks=()) -> tuple[list[list[int]], float, int]:
    """Replay a fixed diffusion trajectory with ``callbacks`` (a sparsity and a policy) attached.

    ``trajectory[t]`` = {"committed": per row the generated indices written at step t, "tokens": the ids written
    there}, from the dense run's trace. Returns per step the argmax predictions at the still-masked positions of
    the current block (row-major), plus the summed log-probability of the tokens the trajectory writes at each
    step and their count. Every configuration sees the very same canvases, so its predictions can be compared
    position by position with dense ones, free of the divergence of free-running greedy generation. With a
    trajectory that writes a passage's true tokens in a fixed random order, the log-probability sum is an
    any-order likelihood bound of the passage (the ELBO-type quantity reuse policies can act on).
    """
    from dllm_sparse.samplers import StepState
    from dllm_sparse.samplers.common import encode_prompts, model_device, resolve_pad_id, resolve_stop_ids

    model, tok = lm.model, lm.tokenizer
    stop = resolve_stop_ids(gcfg, model, tok, lm.family)
    ids, am = encode_prompts(prompt_ids, tok, resolve_pad_id(gcfg, model, tok, stop))
    device = model_device(model)
    B, P = ids.shape
    G = gcfg.max_new_tokens
    mask_id = lm.mask_id
    canvas = torch.cat([ids, torch.full((B, G), mask_id, dtype=torch.long)], dim=1).to(device)
    attn = torch.cat([am, torch.ones((B, G), dtype=torch.long)], dim=1).to(device)
    padded = not bool(am.bool().all())
    prompt_mask = torch.zeros_like(attn, dtype=torch.bool)
    prompt_mask[:, :P] = am.bool()
    gen_region = torch.zeros_like(prompt_mask)
    gen_region[:, P:] = True
    n_blocks = G // gcfg.block_length
    spb = gcfg.steps // n_blocks
    state = StepState(kind="diffusion", model=model, config=gcfg, batch_size=B, prompt_length=P,
                      num_steps=gcfg.steps, canvas=canvas, attention_mask=attn, prompt_mask=prompt_mask,
                      forward_batch=B)
    preds: list[list[int]] = []
    lp_sum, n_tok = 0.0, 0
    for cb in callbacks:
        cb.on_generation_begin(state)
    try:
        for step, committed in enumerate(trajectory):
            blk, sib = divmod(step, spb)
            s, e = P + blk * gcfg.block_length, P + (blk + 1) * gcfg.block_length
            masked = (canvas == mask_id) & gen_region
            state.step, state.block, state.step_in_block, state.tag = step, blk, sib, step
            state.canvas, state.masked = canvas, masked
            state.groups = {"prompt": prompt_mask, "masked": masked, "decoded": gen_region & ~masked}
            for cb in callbacks:
                cb.on_step_begin(state)
            out = model(input_ids=canvas, attention_mask=attn) if padded else model(input_ids=canvas)
            x0 = out.logits[:, s:e].argmax(dim=-1)
            preds.append(x0[masked[:, s:e]].tolist())
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            for cb in callbacks:
                cb.on_step_end(state)
            canvas = canvas.clone()
            for r, (cols, toks) in enumerate(zip(committed["committed"], committed["tokens"], strict=True)):
                for c, t in zip(cols, toks, strict=True):
                    lp_sum += float(logp[r, P + c, t])
                    n_tok += 1
                    canvas[r, P + c] = t
    finally:
        for cb in reversed(list(callbacks)):
            cb.on_generation_end(state)
    return preds, lp_sum, n_tok


def passage_trajectories(tok, gcfg: GenerationConfig, n: int, prompt_len: int, seed: int):
    """Built-in held-out passages as (prompt ids, trajectory): the first ``prompt_len`` tokens are the prompt, the
    next ``gen_length`` the answer, written block by block in a random order seeded per passage (the sampler's
    n // s (+1) tokens per step). The same order serves every configuration (common random numbers)."""
    from dllm_sparse.samplers import num_transfer_tokens
    from dllm_sparse.eval.tasks import load_builtin_passages

    G, bl = gcfg.max_new_tokens, gcfg.block_length
    spb = gcfg.steps // (G // bl)
    counts = num_transfer_tokens(torch.full((1, 1), bl), spb)[0].tolist()
    prompts, orders, answers = [], [], []
    for i, p in enumerate(load_builtin_passages()):
        ids = tok(p["text"], add_special_tokens=False)["input_ids"]
        if len(ids) < prompt_len + G or len(prompts) == n:
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        order = [b * bl + int(j) for b in range(G // bl) for j in torch.randperm(bl, generator=gen)]
        prompts.append(ids[:prompt_len])
        answers.append(ids[prompt_len:prompt_len + G])
        orders.append(order)
    trajectory, pos = [], 0
    for _ in range(G // bl):
        for k in counts:
            cols = [o[pos:pos + k] for o in orders]
            trajectory.append({"committed": cols, "tokens": [[a[c] for c in cs] for a, cs in zip(answers, cols,
                                                                                                  strict=True)]})
            pos += k
    return prompts, trajectory


def _make_policy(spec: str, args):
    adaptive = {"probe_layer": _probe_layer(args.probe_layer), "probe_positions": args.probe_positions,
                "metric": args.probe_metric, "probe_region": args.probe_region}
    return make_policy(spec, new_positions=args.new_positions, **(adaptive if spec.startswith("adaptive") else {}))


def _flat_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    x = [u for step in a for u in step]
    y = [v for step in b for v in step]
    if len(x) != len(y) or not x:
        return float("nan")
    return float(np.mean([u == v for u, v in zip(x, y, strict=True)]))


def run_cell(lm: LoadedModel, prompt_ids, gcfg: GenerationConfig, site: str | None, policy_spec: str | None,
             args, out_dir: Path, key: str, track: bool, kernel_layers, kernel_steps,
             dense_row: dict | None = None) -> dict:
    model = lm.model
    t0 = time.perf_counter()
    row: dict[str, Any] = {}
    if site is None:  # dense
        out = generate(lm, prompts=prompt_ids, config=gcfg)
    else:
        policy = _make_policy(policy_spec, args)
        tracker = groups = krec = None
        observers, callbacks = [], []
        if track:
            tracker = MaskOverlapTracker(layers=args.track_layers_list, sites=[site], store=True)
            groups = GroupRecorder()
            observers.append(tracker)
            callbacks += [tracker, groups]
        if kernel_layers and lm.kind == "diffusion":
            krec = KernelRecorder(kernel_layers, kernel_steps, policy)
            observers.append(krec)
        sp, policy = reuse_sparsity(site, TopP(args.p), policy, mask_observers=observers)
        if krec is not None:
            callbacks = [krec, *callbacks]  # after the policy (it reads the policy's counters at step end)
        out = generate(lm, prompts=prompt_ids, config=gcfg, sparsity=sp, callbacks=[policy, *callbacks])
        rep = policy.report()
        row.update({k: v for k, v in rep.items() if k not in ("refresh_steps",)})
        row["refresh_steps"] = rep["refresh_steps"]
        decisions = getattr(policy, "decisions", None)
        if decisions:
            row["probe_decisions"] = decisions
            row["probe_overlap_mean"] = float(np.mean([d["overlap"] for d in decisions]))
            row["probe_refreshes"] = int(sum(d["refreshed"] for d in decisions))
        row["n_refresh_steps"] = len(set(rep["refresh_steps"]))
        dec = [t for t in sp.tags() if t != "prefill"]
        row["sparsity"] = sp.mean()
        row["sparsity_generated"] = sp.pooled(dec, group="decoded") if lm.kind == "ar" else sp.mean("decoded")
        if lm.kind == "diffusion":
            row["sparsity_masked"] = sp.mean("masked")
        layers_n = n_layers(model)
        row["selections_per_layer_mean"] = rep["selections"] / max(1, len(rep["selections_per_layer"]) or layers_n)
        if tracker is not None:
            sname = str(FFNSite.parse(site))
            if lm.kind == "diffusion":
                ov = diffusion_overlap_rows(tracker, groups, args.track_layers_list, sname, args.gaps_list)
                mid = args.track_layers_list[len(args.track_layers_list) // 2]
                mat = step_matrix(tracker, groups, mid, sname)
                np.save(out_dir / "overlap_steps" / f"{slug(key)}_stepmatrix_L{mid}.npy", mat)
                row["step_matrix"] = f"overlap_steps/{slug(key)}_stepmatrix_L{mid}.npy"
                row["step_matrix_layer"] = mid
            else:
                ov = ar_overlap_rows(tracker, args.track_layers_list, sname, gcfg.max_new_tokens, args.gaps_list)
            base = {"model": lm.name, "kind": lm.kind, "site": sname, "p": args.p}
            atomic_write_csv(out_dir / "overlap_cells" / f"{slug(key)}.csv", [{**base, **r} for r in ov],
                             ["model", "kind", "site", "p", "layer", "gap", "group", "same_block", "jaccard", "recall",
                              "positions"])
            tracker.to_csv(out_dir / "overlap_steps" / f"{slug(key)}.csv")
            row["overlap_file"] = f"overlap_cells/{slug(key)}.csv"
            row["tracker_file"] = f"overlap_steps/{slug(key)}.csv"
        if krec is not None:
            row.update(time_masks(model, str(FFNSite.parse(site)), TopP(args.p), krec, args.kernel_repeats))
    if args.teacher_forced and lm.kind == "diffusion":
        if site is None:
            traj = [{"committed": i.committed, "tokens": i.tokens} for i in out.trace]
            row["trajectory"] = traj
            row["tf_pred"] = teacher_forced(lm, prompt_ids, gcfg, traj)[0]
        elif dense_row is not None and dense_row.get("trajectory"):
            sp2, pol2 = reuse_sparsity(site, TopP(args.p), _make_policy(policy_spec, args))
            row["tf_pred"] = teacher_forced(lm, prompt_ids, gcfg, dense_row["trajectory"], [sp2, pol2])[0]
            row["tf_agreement_vs_dense"] = _flat_agreement(row["tf_pred"], dense_row["tf_pred"])
    if getattr(args, "passage_traj", None) and lm.kind == "diffusion":
        cbs = [] if site is None else list(reuse_sparsity(site, TopP(args.p), _make_policy(policy_spec, args)))
        _, lp, n = teacher_forced(lm, args.passage_ids, gcfg, args.passage_traj, cbs)
        row["elbo_nll_per_token"] = -lp / n
    if getattr(args, "keywords", None):
        hits = [any(k.lower() in text.lower() for k in kws) for text, kws in zip(out.texts, args.keywords, strict=True)]
        row["task_acc"] = float(np.mean(hits))
    row.update({"generated": out.sequences[:, out.prompt_length:].tolist(), "texts": out.texts, "nfe": out.nfe,
                "gen_wall_s": out.wall_time, "cell_s": time.perf_counter() - t0})
    return row


def edit_similarity(a, b) -> float:
    """Mean over rows of difflib's ratio on token ids (robust to shifted text, unlike position agreement)."""
    import difflib

    ratios = [difflib.SequenceMatcher(None, x, y, autojunk=False).ratio() for x, y in zip(a, b, strict=True)]
    return float(np.mean(ratios))


def first_divergence(a, b) -> float:
    """Mean over rows of the number of leading generated positions identical in both."""
    out = []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), min(len(x), len(y)))
        out.append(n)
    return float(np.mean(out))


def agreement(a, b) -> float:
    ta, tb = torch.tensor(a), torch.tensor(b)
    n = min(ta.shape[-1], tb.shape[-1])
    return float((ta[:, :n] == tb[:, :n]).float().mean())


# ----------------------------------------------------------------------------------------------------------------
# tables, figures, summary
# ----------------------------------------------------------------------------------------------------------------

TABLE_COLS = ["model", "kind", "site", "policy", "p", "new_positions", "agreement_vs_fresh", "agreement_vs_dense",
              "edit_sim_vs_fresh", "edit_sim_vs_dense", "first_diff_vs_fresh", "tf_agreement_vs_dense",
              "tf_agreement_vs_fresh", "task_acc", "dense_task_acc", "elbo_nll_per_token", "elbo_diff_vs_fresh",
              "elbo_diff_vs_dense",
              "sparsity", "sparsity_generated", "sparsity_masked", "selections", "selections_per_layer_mean",
              "partial_selections", "probe_selections", "selected_fraction", "n_refresh_steps", "steps",
              "kernel_backend", "kernel_tokens", "kernel_density", "kernel_union_density", "dense_s", "union_s",
              "per_token_s", "select_full_s", "select_s", "step_union_s", "step_per_token_s", "union_vs_dense",
              "per_token_vs_dense", "select_vs_dense", "probe_overlap_mean", "probe_refreshes", "gen_wall_s", "nfe",
              "cell_s"]


def derive(rows: list[dict]) -> list[dict]:
    table = []
    for r in rows:
        if r.get("site") is None:
            continue
        fresh = next((f for f in rows if f["model"] == r["model"] and f["site"] == r["site"] and f["policy"] == "fresh"
                      and f["p"] == r["p"]), None)
        dense = next((f for f in rows if f["model"] == r["model"] and f.get("site") is None), None)
        t = {c: r.get(c) for c in TABLE_COLS}
        t["agreement_vs_fresh"] = agreement(r["generated"], fresh["generated"]) if fresh else None
        t["agreement_vs_dense"] = agreement(r["generated"], dense["generated"]) if dense else None
        t["edit_sim_vs_fresh"] = edit_similarity(r["generated"], fresh["generated"]) if fresh else None
        t["edit_sim_vs_dense"] = edit_similarity(r["generated"], dense["generated"]) if dense else None
        t["first_diff_vs_fresh"] = first_divergence(r["generated"], fresh["generated"]) if fresh else None
        if dense is not None:
            t["dense_task_acc"] = dense.get("task_acc")
        if r.get("elbo_nll_per_token") is not None:  # NLL differences: > 0 = worse than the reference
            if fresh and fresh.get("elbo_nll_per_token") is not None:
                t["elbo_diff_vs_fresh"] = r["elbo_nll_per_token"] - fresh["elbo_nll_per_token"]
            if dense and dense.get("elbo_nll_per_token") is not None:
                t["elbo_diff_vs_dense"] = r["elbo_nll_per_token"] - dense["elbo_nll_per_token"]
        if r.get("tf_pred") and fresh and fresh.get("tf_pred"):
            t["tf_agreement_vs_fresh"] = _flat_agreement(r["tf_pred"], fresh["tf_pred"])
        if r.get("dense_s"):
            t["union_vs_dense"] = r["step_union_s"] / r["dense_s"]
            t["per_token_vs_dense"] = r["step_per_token_s"] / r["dense_s"]
            t["select_vs_dense"] = r["select_s"] / r["dense_s"]
        table.append(t)
    return table


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_overlap(ov: list[dict], fig_dir: Path) -> list[str]:
    plt = _plt()
    paths = []
    sites = sorted({r["site"] for r in ov})
    for metric in ("jaccard", "recall"):
        fig, axes = plt.subplots(1, max(1, len(sites)), figsize=(5 * max(1, len(sites)), 3.8), squeeze=False)
        for ax, site in zip(axes[0], sites, strict=False):
            for kind, groups, style in (("diffusion", ("masked", "decoded", "newly_decoded"), "-"),
                                        ("ar", ("decoded",), "--")):
                for g in groups:
                    pts = {}
                    for r in ov:
                        if r["site"] == site and r["kind"] == kind and r["group"] == g:
                            pts.setdefault(int(r["gap"]), []).append((float(r[metric]), int(r["positions"])))
                    if not pts:
                        continue
                    xs = sorted(pts)
                    ys = [sum(v * n for v, n in pts[x]) / sum(n for _, n in pts[x]) for x in xs]
                    ax.plot(xs, ys, style, marker="o", label=f"{kind}: {g}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("step gap (AR: token gap)")
            ax.set_ylabel(metric)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"site {site}: {metric} vs gap (mean over tracked layers)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = fig_dir / f"overlap_vs_gap_{metric}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    # per layer (diffusion, masked + decoded), one panel per site
    fig, axes = plt.subplots(1, max(1, len(sites)), figsize=(5 * max(1, len(sites)), 3.8), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=False):
        layers = sorted({int(r["layer"]) for r in ov if r["site"] == site and r["kind"] == "diffusion"})
        for layer in layers:
            for g, style in (("masked", "-"), ("decoded", ":")):
                pts = {}
                for r in ov:
                    if (r["site"], r["kind"], r["group"], int(r["layer"])) == (site, "diffusion", g, layer):
                        pts.setdefault(int(r["gap"]), []).append((float(r["jaccard"]), int(r["positions"])))
                xs = sorted(pts)
                if xs:
                    ys = [sum(v * n for v, n in pts[x]) / sum(n for _, n in pts[x]) for x in xs]
                    ax.plot(xs, ys, style, marker=".", label=f"L{layer} {g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("step gap")
        ax.set_ylabel("jaccard")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"diffusion, site {site}: per layer", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    p = fig_dir / "overlap_vs_gap_per_layer.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))
    return paths


def plot_step_matrices(rows: list[dict], out_dir: Path, fig_dir: Path) -> list[str]:
    plt = _plt()
    paths = []
    for r in rows:
        if r.get("policy") != "fresh" or not r.get("step_matrix"):
            continue
        mat = np.load(out_dir / r["step_matrix"])
        fig, ax = plt.subplots(figsize=(5, 4.2))
        im = ax.imshow(mat, origin="lower", vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("step")
        ax.set_ylabel("step")
        fig.colorbar(im, ax=ax, label="jaccard (generated positions)")
        ax.set_title(f"{r['site']}, layer {r['step_matrix_layer']}: mask overlap between steps", fontsize=9)
        fig.tight_layout()
        p = fig_dir / f"step_matrix_{r['site']}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def plot_tracker_heatmaps(rows: list[dict], out_dir: Path, fig_dir: Path) -> list[str]:
    plt = _plt()
    paths = []
    for r in rows:
        if r.get("policy") != "fresh" or not r.get("tracker_file") or r.get("kind") != "diffusion":
            continue
        data = list(csv.DictReader(open(out_dir / r["tracker_file"])))
        for ref in ("previous", "block_start"):
            sel = [d for d in data if d["reference"] == ref and d["group"] == "all" and d["jaccard"] not in ("", "nan")]
            if not sel:
                continue
            layers = sorted({int(d["layer"]) for d in sel})
            steps = sorted({int(d["step"]) for d in sel})
            m = np.full((len(layers), len(steps)), np.nan)
            for d in sel:
                m[layers.index(int(d["layer"])), steps.index(int(d["step"]))] = float(d["jaccard"])
            fig, ax = plt.subplots(figsize=(7, 2.5 + 0.3 * len(layers)))
            im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                           interpolation="nearest")
            ax.set_yticks(range(len(layers)), [str(x) for x in layers])
            ax.set_xticks(range(0, len(steps), max(1, len(steps) // 16)),
                          [str(steps[i]) for i in range(0, len(steps), max(1, len(steps) // 16))])
            ax.set_xlabel("step")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, label="jaccard")
            ax.set_title(f"{r['site']}: jaccard vs {ref} step (all real positions)", fontsize=9)
            fig.tight_layout()
            p = fig_dir / f"heatmap_{r['site']}_{ref}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(str(p))
    return paths


def plot_tradeoff(table: list[dict], fig_dir: Path) -> list[str]:
    plt = _plt()
    diff = [t for t in table if t["kind"] == "diffusion" and t.get("agreement_vs_fresh") is not None]
    if not diff:
        return []
    sites = sorted({t["site"] for t in diff})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for site in sites:
        pts = [t for t in diff if t["site"] == site]
        x = [t["selected_fraction"] for t in pts]
        axes[0].scatter(x, [t["agreement_vs_fresh"] for t in pts], label=site)
        for t in pts:
            axes[0].annotate(t["policy"], (t["selected_fraction"], t["agreement_vs_fresh"]), fontsize=7)
        tp = [t for t in pts if t.get("step_union_s")]
        if tp:
            axes[1].scatter([t["step_union_s"] * 1e3 for t in tp], [t["agreement_vs_fresh"] for t in tp],
                            label=f"{site} union GEMM")
            axes[1].scatter([t["step_per_token_s"] * 1e3 for t in tp], [t["agreement_vs_fresh"] for t in tp],
                            marker="x", label=f"{site} per-token GEMV")
            for t in tp:
                axes[1].annotate(t["policy"], (t["step_union_s"] * 1e3, t["agreement_vs_fresh"]), fontsize=7)
    axes[0].set_xlabel("fraction of token vectors the rule ran on")
    axes[0].set_ylabel("token agreement with fresh")
    axes[1].set_xlabel("ms per step and layer (CPU fallback kernels; matmul + selections)")
    axes[1].set_ylabel("token agreement with fresh")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = fig_dir / "policy_tradeoff.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [str(p)]


def _f(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_summary(out_dir: Path, args, notes: list[str], table: list[dict], ov: list[dict], figs: list[str],
                  wall: float, cells_s: float = float("nan")) -> None:
    L = ["# Mask reuse across denoising steps", ""]
    L += [f"Settings: p = {args.p} (top-p), sites {args.sites}, gen_length {args.gen_length}, steps {args.steps}, "
          f"block_length {args.block_length}, cfg {args.cfg_scale}, {args.prompts} prompt(s), new positions: "
          f"{args.new_positions}, tracked layers {args.track_layers_list}. Wall time of this invocation: "
          f"{wall:.0f} s (finished cells of earlier runs are not recomputed); sum of the cells' own times "
          f"{cells_s:.0f} s.", ""]
    for n in notes:
        L += [f"> **{n}**", ""]
    L += ["## Overlap vs step gap (fresh masks, mean over tracked layers, position-weighted)", "",
          "| model kind | site | group | " + " | ".join(f"gap {g}" for g in args.gaps_list) + " |",
          "|---|---|---|" + "---|" * len(args.gaps_list)]
    for kind in ("diffusion", "ar"):
        for site in sorted({r["site"] for r in ov}):
            for g in ("masked", "decoded", "newly_decoded") if kind == "diffusion" else ("decoded",):
                cells = []
                for gap in args.gaps_list:
                    pts = [r for r in ov if r["kind"] == kind and r["site"] == site and r["group"] == g
                           and int(r["gap"]) == gap]
                    n = sum(int(r["positions"]) for r in pts)
                    if n:
                        j = sum(float(r["jaccard"]) * int(r["positions"]) for r in pts) / n
                        rc = sum(float(r["recall"]) * int(r["positions"]) for r in pts) / n
                        cells.append(f"{j:.3f} / {rc:.3f}")
                    else:
                        cells.append("–")
                if any(c != "–" for c in cells):
                    L.append(f"| {kind} | {site} | {g} | " + " | ".join(cells) + " |")
    L += ["", "Cells: Jaccard / recall of the fresh mask, pooled over all step pairs (t - g, t); gaps of "
          f"{args.steps // (args.gen_length // args.block_length)} steps or more cross a block boundary (reuse "
          "policies restart at each block). AR: masks of decoded tokens g tokens apart.", "",
          "## Policy sweep", "",
          "| kind | site | policy | agree vs fresh | edit-sim vs fresh | same prefix | agree vs dense "
          "| edit-sim vs dense | sparsity | selections/layer | partial | probe | rule ran on | ms/step union "
          "| ms/step per-token | ms dense | union / dense | per-token / dense | selection / dense |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        ms = (lambda v: _f(v * 1e3 if v is not None else None, 2))
        L.append(f"| {t['kind']} | {t['site']} | {t['policy']} | {_f(t['agreement_vs_fresh'])} | "
                 f"{_f(t['edit_sim_vs_fresh'])} | {_f(t['first_diff_vs_fresh'], 1)} | "
                 f"{_f(t['agreement_vs_dense'])} | {_f(t['edit_sim_vs_dense'])} | {_f(t['sparsity'])} | "
                 f"{_f(t['selections_per_layer_mean'], 1)} | {t['partial_selections']} | {t['probe_selections']} | "
                 f"{_f(t['selected_fraction'])} | {ms(t.get('step_union_s'))} | {ms(t.get('step_per_token_s'))} | "
                 f"{ms(t.get('dense_s'))} | {_f(t.get('union_vs_dense'), 2)} | {_f(t.get('per_token_vs_dense'), 2)} | "
                 f"{_f(t.get('select_vs_dense'), 2)} |")
    tf = [t for t in table if t.get("tf_agreement_vs_dense") is not None]
    if tf:
        L += ["", "Teacher-forced (the dense run's trajectory replayed with each configuration; per-step argmax "
              "agreement at the still-masked positions of the current block):", "",
              "| site | policy | agree vs dense | agree vs fresh |", "|---|---|---|---|"]
        L += [f"| {t['site']} | {t['policy']} | {_f(t['tf_agreement_vs_dense'])} | "
              f"{_f(t.get('tf_agreement_vs_fresh'))} |" for t in tf]
    q = [t for t in table if t.get("elbo_nll_per_token") is not None or t.get("task_acc") is not None]
    if q:
        L += ["", "Likelihood and task metric. 'NLL/token' = negative log-likelihood per token of "
              f"{len(args.passage_ids)} "
              "built-in held-out passages written along one fixed random reveal order per passage (the sampler's "
              "geometry; the same order for every configuration, so differences are not sampling noise): an "
              "any-order bound on the passage likelihood, the ELBO-type quantity reuse acts on. 'task' = fraction of "
              "the capability-probe prompts whose generation contains the expected keyword.", "",
              "| kind | site | policy | NLL/token | Δ vs fresh | Δ vs dense | task | task (dense) |",
              "|---|---|---|---|---|---|---|---|"]
        L += [f"| {t['kind']} | {t['site']} | {t['policy']} | {_f(t.get('elbo_nll_per_token'))} | "
              f"{_f(t.get('elbo_diff_vs_fresh'))} | {_f(t.get('elbo_diff_vs_dense'))} | {_f(t.get('task_acc'), 2)} | "
              f"{_f(t.get('dense_task_acc'), 2)} |" for t in q]
    L += ["", "Quality columns: 'agree' = fraction of generated positions with the same token; 'edit-sim' = "
          "difflib ratio of the token sequences (robust to shifted text); 'same prefix' = generated tokens before the "
          "first difference (mean over prompts)."]
    backend = next((t["kernel_backend"] for t in table if t.get("kernel_backend")), None)
    dens = [(t["site"], t["kernel_density"], t["kernel_union_density"]) for t in table
            if t.get("kernel_union_density") is not None and t["policy"] == "fresh"]
    L += ["", "Kernel masks (fresh policy): " + "; ".join(
        f"{site}: mean per-token density {d:.3f}, union over the step's tokens {u:.3f}" for site, d, u in dens)
        + ". AR rows reuse the mask of the last refreshed token for the next tokens (different positions)."]
    ad = [t for t in table if t.get("probe_overlap_mean") is not None]
    if ad:
        L += ["", "Adaptive probes: " + "; ".join(
            f"{t['kind']} {t['site']} {t['policy']}: mean probe overlap {t['probe_overlap_mean']:.3f}, "
            f"{t['probe_refreshes']} refreshes" for t in ad) + "."]
    L += ["", "\"rule ran on\": fraction of token vectors the selection rule ran on (full + partial + probe). "
          "Times: per step and per tracked layer, for the FFN matrices the site's mask can skip (input: W_gate and "
          "W_up; other sites: W_down), measured with `column_sparse_matmul` on the masks recorded at "
          f"{args.kernel_steps or 'all'} steps of the 2nd block; backend `{backend}`"
          + (" (PyTorch fallback on CPU: ratios only, not GPU speed)" if backend != "triton" else "") + ". "
          "'union' = one gathered GEMM over the union of the step's masks (a mask shared by all tokens); "
          "'per-token' = one GEMV per token with its own mask; both include the selection cost of the steps the "
          "policy selects.", "",
          "", "## Figures", ""]
    L += [f"- `{os.path.relpath(f, out_dir)}`" for f in figs]
    (out_dir / "summary.md").write_text("\n".join(L) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    out_dir = Path(args.output_dir)
    for sub in ("overlap_cells", "overlap_steps", "figures"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    args.gaps_list = [int(g) for g in _csv_list(args.gaps)]
    sites = [str(FFNSite.parse(s)) for s in _csv_list(args.sites)]
    policies = _csv_list(args.policies)
    if "fresh" not in policies:
        policies = ["fresh", *policies]
    ar_policies = _csv_list(args.ar_policies)
    if ar_policies and "fresh" not in ar_policies:
        ar_policies = ["fresh", *ar_policies]
    for spec in {*policies, *ar_policies}:
        make_policy(spec)  # fail early on a typo
    notes: list[str] = []

    lm, note = load_diffusion(args.model, args.dtype, args.device, not args.no_fallback)
    if note:
        print(note, file=sys.stderr)
        notes.append(note)
    elif args.model == "smollm2-135m-mdm":
        from dllm_sparse.models.adapt import adapter_hash
        from dllm_sparse.models.twin import SMOLLM2_MDM_ADAPTER

        notes.append(f"Diffusion model: the embedded smollm2-135m-mdm (adapter {adapter_hash(SMOLLM2_MDM_ADAPTER)}, "
                     "SmolLM2-135M adapted to masked diffusion with LoRA; see dllm_sparse/data/smollm2-135m-mdm).")
    L = n_layers(lm.model)
    args.track_layers_list = ([int(x) for x in _csv_list(args.track_layers)] if args.track_layers
                              else spread(L, 4))
    if args.kernel_layers and args.kernel_layers.lower() == "none":
        kernel_layers = []
    elif args.kernel_layers:
        kernel_layers = [int(x) for x in _csv_list(args.kernel_layers)]
    else:
        kernel_layers = args.track_layers_list[1:3] or args.track_layers_list[:1]
    prompts, args.keywords = load_prompts(args)
    chat = not args.no_chat_template
    gcfg = GenerationConfig(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                            cfg_scale=args.cfg_scale, stop_token_ids=(), seed=args.seed)
    args.passage_ids, args.passage_traj = (passage_trajectories(lm.tokenizer, gcfg, args.passages,
                                                                args.passage_prompt_len, args.seed)
                                           if args.passages > 0 else ([], []))
    spb = args.steps // (args.gen_length // args.block_length)
    first = spb if args.steps > spb else 0
    kernel_steps = list(range(first, min(args.steps, first + (args.kernel_steps or spb))))

    cells_path = out_dir / "cells.jsonl"
    done = {r["key"]: r for r in read_rows(cells_path)}
    writer = JsonlWriter(cells_path)
    print(f"[mask_reuse] {len(done)} finished cells in {cells_path}", flush=True)

    planned: set[str] = set()

    def plan_for(model_lm, kind, pols, g_cfg):
        ids = encode(model_lm.tokenizer, prompts, chat)
        plan = [(None, None)] + [(s, p) for s in sites for p in pols]
        for site, pol in plan:
            base = {"model": model_lm.name, "kind": kind, "site": site, "policy": pol or "dense", "p": args.p,
                    "new_positions": args.new_positions, "gen": g_cfg.to_dict(), "prompts": ids,
                    "probe": [args.probe_layer, args.probe_positions, args.probe_metric, args.probe_region]
                    if pol and "adaptive" in pol else None, "track": args.track_layers_list if pol == "fresh" else None,
                    "kernel": [kernel_layers, kernel_steps] if kind == "diffusion" and pol else None,
                    "tf": bool(args.teacher_forced and kind == "diffusion"),
                    "elbo": [len(args.passage_ids), args.passage_prompt_len] if kind == "diffusion" else None,
                    "task": bool(args.keywords)}
            key = cell_key(**base)
            planned.add(key)
            if key in done:
                continue
            t0 = time.perf_counter()
            norm = json.loads(key)
            same = ("model", "kind", "gen", "prompts", "tf")
            dense_row = next((r for k, r in done.items() if r["policy"] == "dense"
                              and all(json.loads(k).get(f) == norm[f] for f in same)), None)
            row = run_cell(model_lm, ids, g_cfg, site, pol, args, out_dir, key, track=(pol == "fresh"),
                           kernel_layers=kernel_layers if kind == "diffusion" else [], kernel_steps=kernel_steps,
                           dense_row=dense_row)
            row = {"key": key, "model": model_lm.name, "kind": kind, "site": site, "policy": pol or "dense",
                   "p": args.p, "new_positions": args.new_positions, "note": note if kind == "diffusion" else "",
                   **row}
            writer.write(row)
            done[key] = row
            print(f"[mask_reuse] {kind:9s} {site or 'dense':12s} {pol or '':14s} {time.perf_counter() - t0:6.1f}s "
                  f"sparsity={_f(row.get('sparsity'))} selections={row.get('selections', '–')}", flush=True)

    plan_for(lm, "diffusion", policies, gcfg)
    del lm
    if args.ar_model.lower() != "none" and ar_policies:
        ar = load_model(args.ar_model, dtype=args.dtype, device=None if args.device == "cpu" else args.device)
        plan_for(ar, "ar", ar_policies, GenerationConfig(max_new_tokens=args.gen_length, stop_token_ids=(),
                                                         seed=args.seed))
    writer.close()

    # ---- tables, figures, summary (rebuilt from every finished cell of these settings) ----
    rows = list({r["key"]: r for r in read_rows(cells_path) if r["key"] in planned}.values())
    table = derive(rows)
    atomic_write_csv(out_dir / "policies.csv", table, TABLE_COLS)
    ov = []
    for r in rows:
        if r.get("overlap_file") and (out_dir / r["overlap_file"]).is_file():
            ov += list(csv.DictReader(open(out_dir / r["overlap_file"])))
    atomic_write_csv(out_dir / "overlap.csv", ov, ["model", "kind", "site", "p", "layer", "gap", "group", "same_block",
                                                   "jaccard", "recall", "positions"])
    figs = []
    if ov:
        figs += plot_overlap(ov, out_dir / "figures")
    figs += plot_step_matrices(rows, out_dir, out_dir / "figures")
    figs += plot_tracker_heatmaps(rows, out_dir, out_dir / "figures")
    figs += plot_tradeoff(table, out_dir / "figures")
    wall = time.perf_counter() - t_start
    write_summary(out_dir, args, notes, table, ov, figs, wall, sum(float(r.get("cell_s") or 0) for r in rows))
    print(f"[mask_reuse] done in {wall:.0f} s -> {out_dir}/summary.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
