"""The step frontier: quality vs measured speed of a denoising step, per sparsity strategy.

The library side of ``experiments/step_frontier.py`` (which documents the strategies, the measurements and the
outputs): the timing bench, the quality measurements, the break-even and FLOP bounds, the figures and the report.
:func:`run_frontier` runs the whole study from the script's parsed arguments.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dllm_sparse import SparsityConfig, SparsityStats, TopK, TopP, find_ffns, load_model, sparsify, without_lm_head
from dllm_sparse.atomic import atomic_write_text
from dllm_sparse.eval.analysis.critical import critical_sparsity
from dllm_sparse.kernels import accelerate_ffn, restore_ffn, union_density
from dllm_sparse.samplers import GenerationConfig, generate
from dllm_sparse.samplers.reuse import make_policy
from dllm_sparse.steps import StepState

DATA = Path(__file__).resolve().parents[2] / "data"  # the package's data folder
SITES = ("input", "intermediate")


# --------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------


def strategy_names(policies: list[str]) -> list[str]:
    return ["token", "step", *[f"step+{p}" for p in policies]]


def rule_for(strategy: str, p: float):
    return TopP(p) if strategy == "token" else TopP(p, scope="step")


def policy_for(strategy: str):
    return make_policy(strategy.split("+", 1)[1]) if "+" in strategy else None


def refresh_interval(strategy: str, steps_per_block: int) -> int:
    """Steps between refreshes of a reuse strategy (1 = fresh every step)."""
    policy = policy_for(strategy)
    if policy is None:
        return 1
    return getattr(policy, "k", steps_per_block)


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------


def _step_state(lm, prompt_length: int, step_in_block: int) -> StepState:
    return StepState(kind="diffusion", model=lm.model, config=None, batch_size=1, prompt_length=prompt_length,
                     num_steps=1, step=step_in_block, block=0, step_in_block=step_in_block, tag=step_in_block,
                     first_step_of_block=step_in_block == 0)


class Bench:
    """Times the FFN alone and the whole step of one canvas, dense or with a strategy swapped in."""

    def __init__(self, lm, canvas: torch.Tensor, prompt_length: int, block_length: int):
        self.lm, self.model, self.canvas = lm, lm.model, canvas
        self.P, self.block = prompt_length, block_length
        self.ffn_inputs = self._capture()

    @torch.no_grad()
    def _capture(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        handles = [f.gate.register_forward_pre_hook(lambda m, a, i=f.layer: seen.__setitem__(i, a[0].clone()))
                   for f in find_ffns(self.model)]
        try:
            self.model(input_ids=self.canvas)
        finally:
            for h in handles:
                h.remove()
        return [seen[i] for i in sorted(seen)]

    @torch.no_grad()
    def ffn(self) -> float:
        ffns = find_ffns(self.model)  # resolved now: the swapped modules when a strategy is attached
        t0 = time.perf_counter()
        for f, x in zip(ffns, self.ffn_inputs, strict=True):
            f.down(f.act(f.gate(x)) * f.up(x))
        return time.perf_counter() - t0

    @torch.no_grad()
    def step(self, full_head: bool = False) -> float:
        rows = slice(self.P, self.P + self.block)  # the first block (the twin shifts inside its forward)
        t0 = time.perf_counter()
        if full_head:
            self.model(input_ids=self.canvas).logits[:, rows]
        else:
            with without_lm_head(self.model) as head:
                h = self.model(input_ids=self.canvas).logits[:, rows]
            if head is not None:
                F.linear(h, head.weight, head.bias)
        return time.perf_counter() - t0

    def measure(self, rule, site: str, strategy: str, steps_per_block: int) -> dict:
        """One timing of the FFN and the step with ``rule`` at ``site`` under ``strategy``, refresh and reuse."""
        policy = policy_for(strategy)
        accelerate_ffn(self.model, SparsityConfig(site, rule), backend="torch", reuse=policy)
        try:
            if policy is None:
                return {"ffn": self.ffn(), "step": self.step()}
            k = refresh_interval(strategy, steps_per_block)
            policy.on_generation_begin(_step_state(self.lm, self.P, 0))
            out = {}
            for phase, step_in_block in (("refresh", 0), ("reuse", 1)):
                policy.on_step_begin(_step_state(self.lm, self.P, step_in_block))
                out[f"step_{phase}"] = self.step()  # the refresh fills the cache the reuse reads
                out[f"ffn_{phase}"] = self.ffn()
                policy.on_step_end(None)
            policy.on_generation_end(None)
            for what in ("ffn", "step"):
                out[what] = (out[f"{what}_refresh"] + (k - 1) * out[f"{what}_reuse"]) / k
            return out
        finally:
            restore_ffn(self.model)

    def dense(self) -> dict:
        return {"ffn": self.ffn(), "step": self.step(), "step_full_head": self.step(full_head=True)}


def measured_sparsity(model, canvas, config: SparsityConfig) -> dict:
    """Per-token measured sparsity (SparsityStats) and the fraction of features no token keeps (1 - union)."""
    unions = []
    with torch.no_grad(), sparsify(model, config, mask_observers=[lambda ev: unions.append(
            float(union_density(ev.keep)))]) as stats:
        model(input_ids=canvas)
    return {"sparsity": stats.mean(config.site.value), "skipped": 1.0 - statistics.mean(unions)}


def run_timing(bench: Bench, cells: list[dict], repeats: int, steps_per_block: int) -> tuple[dict, dict]:
    """(medians, samples) over interleaved repeats (dense, then every cell, ``repeats`` times), after one warm-up
    round. ``samples[key][r]`` is repeat r's timing, so a speedup can be paired by repeat (:func:`speedup_range`)."""
    samples: dict = {"dense": []}
    for c in cells:
        samples[c["key"]] = []
    for r in range(repeats + 1):
        dense = bench.dense()
        if r:
            samples["dense"].append(dense)
        for c in cells:
            t = bench.measure(c["rule"], c["site"], c["strategy"], steps_per_block)
            if r:
                samples[c["key"]].append(t)
        print(f"  timing repeat {r}/{repeats} done (load {os.getloadavg()[0]:.2f})", flush=True)
    med = {k: {m: statistics.median(s[m] for s in v) for m in v[0]} for k, v in samples.items()}
    return med, samples


def speedup_range(samples: dict, key: str, what: str) -> list[float]:
    """[min, max] over repeats of dense / ``key``'s time of ``what`` ("ffn", "step", "ffn_reuse", ...), each
    repeat's cell divided by the same repeat's dense timing: the spread the medians hide."""
    dense_what = what.split("_", 1)[0]
    ratios = [d[dense_what] / c[what] for d, c in zip(samples["dense"], samples[key], strict=True)]
    return [min(ratios), max(ratios)]


# --------------------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------------------


def elbo_ppl(scorer, texts, keys, config) -> tuple[float, float]:
    stats = SparsityStats()
    with scorer.sparsified(config, stats):
        scores = scorer.loglikelihood_rolling(texts, keys)
    ll, n = sum(s for s, _ in scores), sum(k for _, k in scores)
    sparsity = stats.mean(config.site.value) if config is not None else 0.0
    return float(torch.tensor(-ll / n).exp()), sparsity


def probe_agreement(lm, prompts, gcfg, strategy, config, dense_ids) -> float:
    policy = policy_for(strategy) if config is not None else None
    if config is not None:
        accelerate_ffn(lm.model, config, backend="torch", reuse=policy)
    try:
        out = generate(lm, prompts=prompts, config=gcfg, apply_chat_template=True,
                       callbacks=[policy] if policy is not None else [])
    finally:
        restore_ffn(lm.model)
    if dense_ids is None:
        return out.ids
    same = total = 0
    for a, b in zip(out.ids, dense_ids, strict=True):
        n = max(len(a), len(b))
        same += sum(1 for x, y in zip(a, b, strict=False) if x == y)
        total += n
    return same / max(total, 1)


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


def break_even(points: list[tuple[float, float]], target: float) -> float | None:
    """The smallest sparsity at which the speedup reaches ``target`` (linear interpolation), None if never."""
    pts = sorted(points)
    for (s1, v1), (s2, v2) in zip(pts, pts[1:], strict=False):
        if v1 >= target:
            return s1
        if v2 >= target:
            return s1 + (target - v1) * (s2 - s1) / (v2 - v1)
    return pts[-1][0] if pts and pts[-1][1] >= target else None


def ideal_ffn_speedup(site: str, s: float, reused: bool) -> float:
    """FLOP bound: a shared input set skips columns of W_gate and W_up (2/3 of the FFN), an intermediate set
    known before the step (reused) all three matrices, a fresh intermediate set only W_down's columns."""
    if site == "input":
        return 1.0 / (1.0 - 2.0 * s / 3.0)
    return 1.0 / (1.0 - s) if reused else 1.0 / (1.0 - s / 3.0)


def machine() -> dict:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma")
    from dllm_sparse.hardware import cpu_name

    model_name = cpu_name()
    import transformers

    return {"cpu": model_name, "cpu_flags": [f for f in wanted if f in flags.split()], "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform()}


def plot(res: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"token": "tab:gray", "step": "tab:blue"}
    extra = iter(["tab:orange", "tab:green", "tab:red", "tab:purple"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), sharey="row")
    metrics = [("elbo_rel", "twin: dense / sparse ELBO perplexity"), ("probe", "twin: token agreement with dense")]
    for row, (metric, label) in enumerate(metrics):
        for col, speed in enumerate(("step", "ffn")):
            ax = axes[row][col]
            for strategy in res["strategies"]:
                if strategy not in colors:
                    colors[strategy] = next(extra)
                for site, marker, ls in (("input", "o", "-"), ("intermediate", "s", "--")):
                    pts = sorted((c[f"speedup_{speed}"], c[metric]) for c in res["cells"]
                                 if c["strategy"] == strategy and c["site"] == site and c.get(metric) is not None)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), marker=marker, ls=ls, color=colors[strategy],
                                label=f"{strategy} ({site})")
            ax.axvline(1.0, color="k", lw=0.6)
            ax.set_xlabel(f"measured speedup of the {'whole step' if speed == 'step' else 'FFN alone'} vs dense")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{res['model']}: quality vs wall-clock speedup of a denoising step "
                 f"(canvas {res['canvas']} + prompt {res['prompt_length']}, {res['dtype']}, {res['threads']} threads)",
                 fontsize=10)
    fig.tight_layout()
    files = [out_dir / "frontier.png"]
    fig.savefig(files[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, speed in zip(axes, ("ffn", "step"), strict=True):
        for name, curve in res["sweep"].items():
            pts = sorted((c["sparsity"], c[f"speedup_{speed}"]) for c in curve)
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        if speed == "ffn":
            xs = [i / 20 for i in range(19)]
            ax.plot(xs, [ideal_ffn_speedup("input", s, False) for s in xs], "k:", lw=0.8, label="FLOP bound, input")
            ax.plot(xs, [ideal_ffn_speedup("intermediate", s, True) for s in xs], "k--", lw=0.8,
                    label="FLOP bound, reused intermediate")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xlabel("skipped fraction of the features (TopK(s, scope='step'))")
        ax.set_ylabel(f"speedup of the {'FFN alone' if speed == 'ffn' else 'whole step'}")
        ax.set_ylim(0.5, 4.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    files.append(out_dir / "speedup_vs_sparsity.png")
    fig.savefig(files[1], dpi=110)
    plt.close(fig)
    return [str(f) for f in files]


def summary_md(res: dict) -> str:
    lines = [f"# Step frontier: {res['model']} (AR parent {res['ar_model']})", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']['cpu']} ({', '.join(res['machine']['cpu_flags'])}), {res['threads']} threads, "
             f"torch {res['machine']['torch']}; load average {res['load_before']:.2f} before, "
             f"{res['load_after']:.2f} after (its own {res['threads']} threads load about {res['threads']})"
             f"{'; NOT quiet: other work shared the CPU, timings are noisy' if res['noisy'] else ''}.", "",
             f"Canvas {res['canvas']} masked + prompt {res['prompt_length']} tokens, batch 1, {res['dtype']}. " + (
                 f"Dense step {res['dense']['step'] * 1e3:.0f} ms (LM head on the block's rows; "
                 f"{res['dense']['step_full_head'] * 1e3:.0f} ms with the head on every position), dense FFN "
                 f"{res['dense']['ffn'] * 1e3:.0f} ms." if "dense" in res else "Timing skipped."), "",
             "## Speedup vs skipped fraction (TopK(s, scope='step'))", "",
             f"Median over {res.get('repeats', '?')} interleaved repeats, [min, max] of the repeats' own ratios "
             "(each repeat's cell over the same repeat's dense timing). The FLOP bound is the ratio of multiply-adds; "
             "the BLAS does not run every shape at the same rate, so a measured speedup can exceed it.", "",
             "| curve | s | FFN speedup | step speedup | FLOP bound (FFN) |", "|---|---|---|---|---|"]

    def rng(c, what):
        r = c.get(f"speedup_{what}_range")
        return f" [{r[0]:.2f}, {r[1]:.2f}]" if r else ""

    for name, curve in res["sweep"].items():
        for c in sorted(curve, key=lambda c: c["sparsity"]):
            lines.append(f"| {name} | {c['sparsity']:.2f} | {c['speedup_ffn']:.2f}x{rng(c, 'ffn')} | "
                         f"{c['speedup_step']:.2f}x{rng(c, 'step')} | {c['ideal_ffn']:.2f}x |")
    lines += ["", "Break-even (smallest skipped fraction reaching the speedup; interpolated):", ""]
    for name, be in res["break_even"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k}: {f'{v:.2f}' if v is not None else 'not reached'}"
                                               for k, v in be.items()))
    if res["cells"]:
        lines += ["", "## Frontier points", "",
                  "Speedups: median, [min, max] over repeats (reuse strategies: median only; their time is the "
                  "refresh and the reuse steps weighted by the refresh interval).", "",
                  "| strategy | site | p | measured sparsity | skipped (union) | FFN speedup | step speedup | "
                  "twin ELBO rel | AR rel | probe agreement |", "|---|---|---|---|---|---|---|---|---|---|"]

        def f(v, fmt="{:.3f}"):
            return fmt.format(v) if isinstance(v, (int, float)) else "-"

        for c in res["cells"]:
            lines.append(f"| {c['strategy']} | {c['site']} | {c['p']} | {f(c['sparsity'])} | {f(c['skipped'])} | "
                         f"{f(c.get('speedup_ffn'), '{:.2f}x')}{rng(c, 'ffn')} | "
                         f"{f(c.get('speedup_step'), '{:.2f}x')}{rng(c, 'step')} | "
                         f"{f(c.get('elbo_rel'))} | {f(c.get('ar_rel'))} | {f(c.get('probe'))} |")
        lines += ["", "## Critical sparsity (highest measured sparsity with relative ELBO perplexity >= 0.99)", "",
                  "| strategy | site | twin (ELBO) | AR parent |", "|---|---|---|---|"]
        for k in res["critical"]:
            lines.append(f"| {k['strategy']} | {k['site']} | {f(k['twin'])} | {f(k['ar'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


def run_frontier(args, command: str) -> dict:
    """The study of ``experiments/step_frontier.py`` for its parsed ``args``; ``command`` is recorded."""
    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]

    lm = load_model(args.model, dtype=args.dtype)
    probe = [json.loads(line) for line in (DATA / "capability_probe.jsonl").open()]
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": probe[0]["prompt"]}], tokenize=False,
                                            add_generation_prompt=True)
    prompt = list(lm.tokenizer.encode(text, add_special_tokens=False))
    P = len(prompt)
    canvas = torch.tensor([prompt + [lm.mask_id] * args.canvas])
    strategies = strategy_names(args.policies)

    res: dict = {"model": args.model, "ar_model": args.ar_model, "dtype": args.dtype, "threads": args.threads,
                 "canvas": args.canvas, "prompt_length": P, "block_length": args.block_length,
                 "strategies": strategies, "command": command, "machine": machine(),
                 "load_before": load_before, "cells": [], "sweep": {}, "break_even": {}, "critical": []}
    cells, sweep_cells = frontier_cells(args, strategies)
    if not args.skip_timing:
        add_timing(res, Bench(lm, canvas, P, args.block_length), args, cells, sweep_cells)
    for c in cells:
        c.update(measured_sparsity(lm.model, canvas, SparsityConfig(c["site"], c["rule"])))
    if not args.skip_quality:
        add_quality(res, lm, args, probe, cells, strategies)
    return write_frontier(res, args, cells)


def frontier_cells(args, strategies: list[str]) -> tuple[list[dict], list[dict]]:
    """The cells of the frontier (strategy x site x top-p) and of the top-k sparsity sweep (fresh, and reused by
    the block-start policy or the first one given)."""
    cells = [{"strategy": st, "site": site, "p": p, "rule": rule_for(st, p), "key": f"{st}|{site}|{p}"}
             for st in strategies for site in args.sites for p in args.top_p]
    sweep_cells = []
    for s in args.sweep:
        for site in args.sites:
            sweep_cells.append({"strategy": "step", "site": site, "p": s, "rule": TopK(s, scope="step"),
                                "key": f"sweep|step|{site}|{s}", "curve": f"{site}, fresh"})
            reuse = next((pol for pol in args.policies if pol == "block_start"), args.policies[0] if args.policies
                         else None)
            if reuse is not None:
                sweep_cells.append({"strategy": f"step+{reuse}", "site": site, "p": s, "rule": TopK(s, scope="step"),
                                    "key": f"sweep|{reuse}|{site}|{s}", "curve": f"{site}, reused ({reuse})",
                                    "reuse_step_only": True})

    return cells, sweep_cells


def add_timing(res: dict, bench: Bench, args, cells: list[dict], sweep_cells: list[dict]) -> None:
    """Times every cell against the dense step (medians and ranges of ``args.repeats`` repeats) into the cells and
    ``res`` (the sweep's curves and their break-even sparsities)."""
    steps_per_block = args.block_length  # steps = canvas length: one token per step
    print(f"timing {len(cells) + len(sweep_cells)} configurations x {args.repeats} repeats ...", flush=True)
    med, samples = run_timing(bench, cells + sweep_cells, args.repeats, steps_per_block)
    res["dense"] = med["dense"]
    res["repeats"] = args.repeats
    for c in cells:
        m = med[c["key"]]
        c.update({"ffn_s": m["ffn"], "step_s": m["step"], "speedup_ffn": med["dense"]["ffn"] / m["ffn"],
                  "speedup_step": med["dense"]["step"] / m["step"]})
        if "ffn_refresh" not in m:  # a reuse strategy's time is a weighted mean of two phases: no single ratio
            c["speedup_ffn_range"] = speedup_range(samples, c["key"], "ffn")
            c["speedup_step_range"] = speedup_range(samples, c["key"], "step")
        for phase in ("refresh", "reuse"):
            if f"ffn_{phase}" in m:
                c[f"speedup_ffn_{phase}"] = med["dense"]["ffn"] / m[f"ffn_{phase}"]
                c[f"speedup_step_{phase}"] = med["dense"]["step"] / m[f"step_{phase}"]
    for c in sweep_cells:
        m = med[c["key"]]
        reuse_only = c.get("reuse_step_only")
        ffn_t, step_t = (m["ffn_reuse"], m["step_reuse"]) if reuse_only else (m["ffn"], m["step"])
        phase = "_reuse" if reuse_only else ""
        res["sweep"].setdefault(c["curve"], []).append({
            "sparsity": c["p"], "speedup_ffn": med["dense"]["ffn"] / ffn_t,
            "speedup_step": med["dense"]["step"] / step_t,
            "speedup_ffn_range": speedup_range(samples, c["key"], "ffn" + phase),
            "speedup_step_range": speedup_range(samples, c["key"], "step" + phase),
            "ideal_ffn": ideal_ffn_speedup(c["site"], c["p"], bool(reuse_only))})
    for name, curve in res["sweep"].items():
        res["break_even"][name] = {
            "ffn_1x": break_even([(c["sparsity"], c["speedup_ffn"]) for c in curve], 1.0),
            "step_1x": break_even([(c["sparsity"], c["speedup_step"]) for c in curve], 1.0),
            "ffn_1.6x": break_even([(c["sparsity"], c["speedup_ffn"]) for c in curve], 1.6),
            "ffn_1.7x": break_even([(c["sparsity"], c["speedup_ffn"]) for c in curve], 1.7),
            "step_1.2x": break_even([(c["sparsity"], c["speedup_step"]) for c in curve], 1.2),
            "step_1.3x": break_even([(c["sparsity"], c["speedup_step"]) for c in curve], 1.3)}


def add_quality(res: dict, lm, args, probe: list[dict], cells: list[dict], strategies: list[str]) -> None:
    """The quality of every cell: the twin's ELBO perplexity and the AR model's perplexity on held-out passages
    relative to dense, the probe prompts' agreement with dense generation; and the critical sparsities."""
    from dllm_sparse.eval.scoring.scorer import Scorer
    from dllm_sparse.eval.tasks.builtin import load_builtin_passages

    passages = load_builtin_passages()[:args.passages]
    texts, keys = [p["text"] for p in passages], [p["id"] for p in passages]
    twin = Scorer.from_loaded(lm, mc_num=args.mc_num, mc_batch=args.mc_num, batch_size=args.mc_num)
    ar = load_model(args.ar_model, dtype=args.dtype)
    ar_scorer = Scorer.from_loaded(ar, batch_size=8)
    dense_twin, _ = elbo_ppl(twin, texts, keys, None)
    dense_ar, _ = elbo_ppl(ar_scorer, texts, keys, None)
    gcfg = GenerationConfig(gen_length=args.probe_gen, steps=args.probe_gen, block_length=args.probe_gen,
                            temperature=0.0)
    prompts = [q["prompt"] for q in probe[:args.probe_prompts]]
    dense_ids = probe_agreement(lm, prompts, gcfg, "token", None, None)
    res["dense_quality"] = {"twin_elbo_ppl": dense_twin, "ar_ppl": dense_ar, "passages": len(texts),
                            "mc_num": args.mc_num, "probe_prompts": len(prompts), "probe_gen": args.probe_gen}
    elbo_cache: dict = {}
    for c in cells:
        config = SparsityConfig(c["site"], c["rule"])
        if config.id not in elbo_cache:  # a step+policy strategy has the ELBO of step (one forward each)
            ppl, sp = elbo_ppl(twin, texts, keys, config)
            ar_ppl, ar_sp = elbo_ppl(ar_scorer, texts, keys, config)
            elbo_cache[config.id] = (ppl, sp, ar_ppl, ar_sp)
        ppl, sp, ar_ppl, ar_sp = elbo_cache[config.id]
        c.update({"elbo_ppl": ppl, "elbo_rel": dense_twin / ppl, "elbo_sparsity": sp, "ar_ppl": ar_ppl,
                  "ar_rel": dense_ar / ar_ppl, "ar_sparsity": ar_sp,
                  "probe": probe_agreement(lm, prompts, gcfg, c["strategy"], config, dense_ids)})
        print(f"  {c['key']}: ELBO rel {c['elbo_rel']:.3f}, AR rel {c['ar_rel']:.3f}, probe {c['probe']:.3f}",
              flush=True)
    for st in strategies:
        for site in args.sites:
            pts = [c for c in cells if c["strategy"] == st and c["site"] == site]
            twin_crit = critical_sparsity([(c["elbo_sparsity"], c["elbo_rel"]) for c in pts])
            ar_crit = critical_sparsity([(c["ar_sparsity"], c["ar_rel"]) for c in pts])
            res["critical"].append({"strategy": st, "site": site, "twin": twin_crit.interpolated,
                                    "ar": ar_crit.interpolated, "twin_bracketed": twin_crit.bracketed})


def write_frontier(res: dict, args, cells: list[dict]) -> dict:
    """Writes ``frontier.json``, ``summary.md`` and the figures; prints the summary."""
    res["load_after"] = os.getloadavg()[0]
    # The run's own threads make a load of about args.threads; more than that means other work shared the CPU.
    # (The 1-minute load average at the start still holds whatever ran just before.)
    res["noisy"] = res["load_after"] > args.threads + 0.5
    res["cells"] = [{k: v for k, v in c.items() if k not in ("rule", "key")} for c in cells]
    files = plot(res, args.output_dir) if not args.skip_timing else []
    res["figures"] = files
    atomic_write_text(args.output_dir / "frontier.json", json.dumps(res, indent=1, default=str) + "\n")
    atomic_write_text(args.output_dir / "summary.md", summary_md(res))
    print(summary_md(res))
    return res

