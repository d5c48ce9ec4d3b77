"""The whole-generation frontier: speed and quality of complete generations, per decoding strategy.

The library side of ``experiments/generation_frontier.py``. Where the trajectory frontier
(:mod:`dllm_sparse.eval.studies.trajectory_frontier`) times a replay of a fixed trajectory, here every strategy
generates on its own, as a user runs it, so the levers that change the number of steps count too: Fast-dLLM's
block caches (``GenerationConfig(block_cache=...)``) and confidence-threshold parallel decoding
(``confidence_threshold``), and FFN sparsity on top of them.

Strategy names (:func:`parse_generation_strategy`): ``exact`` (the one-token-per-step sampler, steps =
gen_length); ``t<threshold>`` (parallel decoding); any trajectory-frontier strategy
(:func:`~dllm_sparse.eval.studies.trajectory_frontier.parse_strategy`: ``cache-dual``, ``cache-prefix``,
``cache-dual+token-intermediate:0.9``, ...); and ``t<threshold>+<trajectory strategy>`` for both.

Per strategy and prompt: one greedy generation of ``gen_length`` tokens (blocks of ``block_length``), its wall
time, forward passes, probe hit (a keyword of the capability probe in the answer) and token agreement with the
exact sampler's answer. The strategies run interleaved prompt by prompt (round-robin, the order rotated per
prompt), so every prompt is a paired repeat: the speedup is the median over prompts of exact time / strategy time,
with its [min, max]. Quality is deterministic (greedy), so one generation per prompt and strategy gives both.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dllm_sparse.atomic import atomic_write_text
from dllm_sparse.eval.studies.trajectory_frontier import (
    Strategy,
    _probe_hit,
    _ratio_interval,
    _token_agreement,
    parse_strategy,
)
from dllm_sparse.samplers import GenerationConfig, generate

__all__ = ["GenStrategy", "parse_generation_strategy", "run_generation_frontier", "summarise_strategy"]

_THRESHOLD = re.compile(r"^t([0-9.]+)(?:\+(.+))?$")


@dataclass
class GenStrategy:
    """A decoding strategy: parallel decoding's threshold (None = one token per step) and a trajectory-frontier
    strategy (block cache and FFN sparsity)."""

    name: str
    threshold: float | None
    inner: Strategy

    def config(self, base: GenerationConfig) -> GenerationConfig:
        return base.replace(block_cache=self.inner.block_cache, confidence_threshold=self.threshold)


def parse_generation_strategy(spec: str) -> GenStrategy:
    """A :class:`GenStrategy` from its name (module docstring); ``ValueError`` naming the forms for anything else."""
    spec = spec.strip()
    if spec == "exact":
        return GenStrategy(spec, None, Strategy("dense", "dense"))
    m = _THRESHOLD.match(spec)
    threshold, rest = (float(m.group(1)), m.group(2)) if m else (None, spec)
    if threshold is not None and not threshold > 0:
        raise ValueError(f"strategy {spec!r}: the threshold must be > 0")
    try:
        inner = parse_strategy(rest) if rest else Strategy("dense", "dense")
    except ValueError as e:
        raise ValueError(f"strategy {spec!r}: {e}; a generation strategy is exact, t<threshold>, a trajectory "
                         "strategy, or t<threshold>+<trajectory strategy>") from None
    return GenStrategy(spec, threshold, inner)


def _generate_one(lm, prompt, cfg: GenerationConfig, s: GenStrategy, chat: bool) -> dict:
    callbacks, observer = s.inner.attach(lm.model)
    try:
        t0 = time.perf_counter()
        out = generate(lm, prompts=[prompt], config=s.config(cfg), apply_chat_template=chat, callbacks=callbacks)
        wall = time.perf_counter() - t0
        work = observer.report()["ffn_work"] if observer is not None and hasattr(observer, "ffn_work") else None
    finally:
        s.inner.detach(lm.model)
    return {"ids": out.ids[0], "text": out.texts[0] if out.texts else None, "nfe": out.nfe,
            "tokens": out.num_tokens, "wall_s": wall, "ffn_work": work}


def summarise_strategy(name: str, items: list[dict], exact_items: list[dict]) -> dict:
    """One row: tokens per second and speedup over the exact sampler (median over prompts of the paired ratios,
    [min, max]), forward passes per token, probe score with a 95 % bootstrap interval over prompts, token
    agreement with the exact sampler's answers (and its interval)."""
    tps = [it["tokens"] / it["wall_s"] for it in items]
    ratios = [e["wall_s"] / it["wall_s"] for it, e in zip(items, exact_items, strict=True)]
    agree = [_token_agreement(it["ids"], e["ids"]) for it, e in zip(items, exact_items, strict=True)]
    same, total = np.array([a for a, _ in agree], float), np.array([b for _, b in agree], float)
    hits = [it["probe_hit"] for it in items if it["probe_hit"] is not None]
    row: dict[str, Any] = {
        "strategy": name, "prompts": len(items),
        "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [min(tps), max(tps)],
        "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
        "forwards_per_token": sum(it["nfe"] for it in items) / sum(it["tokens"] for it in items),
        "agreement": float(same.sum() / max(total.sum(), 1)), "agreement_ci": _ratio_interval(same, total),
        "probe_score": sum(hits) if hits else None, "probe_items": len(hits),
        "ffn_work": (statistics.mean(w) if (w := [it["ffn_work"] for it in items if it["ffn_work"] is not None])
                     else None),
    }
    if hits:  # the interval of the count: bootstrap over prompts of the hit rate, times the items
        ci = _ratio_interval(np.array(hits, float), np.ones(len(hits)))
        row["probe_ci"] = [ci[0] * len(hits), ci[1] * len(hits)] if ci else None
    row["items"] = [{k: v for k, v in it.items() if k != "ids"} for it in items]
    return row


def run_generation_frontier(lm, prompts: list, keywords: list | None, strategies: list[GenStrategy], *,
                            gen_length: int, block_length: int, chat: bool, log=print, on_prompt=None) -> dict:
    """Every strategy on every prompt, interleaved; returns ``{"rows": [...], ...}`` (exact first).
    ``on_prompt(run)`` is called with the rows so far after each prompt (a long run can be stopped and kept)."""
    names = [s.name for s in strategies]
    if "exact" not in names:
        strategies = [parse_generation_strategy("exact"), *strategies]
    cfg = GenerationConfig(gen_length=gen_length, steps=gen_length, block_length=block_length, temperature=0.0,
                           mask_id=lm.mask_id)
    _generate_one(lm, prompts[0], cfg.replace(gen_length=block_length, steps=block_length), strategies[0], chat)
    items: dict[str, list[dict]] = {s.name: [] for s in strategies}
    for i, prompt in enumerate(prompts):
        k = i % len(strategies)
        for s in strategies[k:] + strategies[:k]:  # rotated: no strategy always runs first
            it = _generate_one(lm, prompt, cfg, s, chat)
            it["prompt"] = i
            it["probe_hit"] = _probe_hit(it["text"], keywords[i] if keywords else None)
            items[s.name].append(it)
        log(f"  prompt {i}: " + ", ".join(f"{s.name} {items[s.name][-1]['wall_s']:.1f}s/"
                                          f"{items[s.name][-1]['nfe']}f" for s in strategies), flush=True)
        run = {"gen_length": gen_length, "block_length": block_length, "prompts": i + 1,
               "rows": [summarise_strategy(s.name, items[s.name], items["exact"]) for s in strategies]}
        if on_prompt is not None:
            on_prompt(run)
    return run


def summary_md(res: dict) -> str:
    lines = [f"# Whole-generation frontier: {res['model']}", "", f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']['cpu']} ({', '.join(res['machine']['cpu_flags'])}), "
             f"{res['threads']} thread(s), torch {res['machine']['torch']}; load average "
             f"{res['load_before']:.2f} before, {res['load_after']:.2f} after (a load above the thread count means a "
             "shared machine and noisy timings).", ""]
    for run in res["runs"]:
        lines += [f"## {run['gen_length']} tokens, blocks of {run['block_length']}, {run['prompts']} probe prompts",
                  "",
                  "| strategy | tokens/s (median [min, max]) | speedup vs exact (median [min, max]) | "
                  "forwards / token | probe (95 % CI) | agreement with exact | FFN work |",
                  "|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            ci = r.get("probe_ci")
            probe = (f"{r['probe_score']}/{r['probe_items']}" + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else "")
                     if r["probe_score"] is not None else "-")
            a = r["agreement_ci"]
            lines.append(f"| {r['strategy']} | {r['tokens_per_s']:.2f} [{r['tokens_per_s_range'][0]:.2f}, "
                         f"{r['tokens_per_s_range'][1]:.2f}] | {r['speedup']:.2f}x [{r['speedup_range'][0]:.2f}, "
                         f"{r['speedup_range'][1]:.2f}] | {r['forwards_per_token']:.3f} | {probe} | "
                         f"{r['agreement']:.3f}" + (f" [{a[0]:.3f}, {a[1]:.3f}]" if a else "") + " | "
                         + (f"{r['ffn_work']:.3f}" if r["ffn_work"] is not None else "-") + " |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["runs"]), figsize=(6.5 * len(res["runs"]), 4.8), squeeze=False)
    for ax, run in zip(axes[0], res["runs"], strict=True):
        for i, r in enumerate(run["rows"]):
            lo, hi = r["speedup_range"]
            ax.errorbar(r["speedup"], r["agreement"], xerr=[[r["speedup"] - lo], [hi - r["speedup"]]], fmt="o",
                        color=plt.cm.tab20(i % 20), capsize=2,
                        label=f"{r['strategy']} (probe {r['probe_score']}/{r['probe_items']})")
        ax.axvline(1.0, color="k", lw=0.6)
        ax.set_xlabel("speedup over the exact sampler (median over prompts, [min, max])")
        ax.set_ylabel("token agreement with the exact sampler")
        ax.set_title(f"{run['gen_length']} tokens, blocks of {run['block_length']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{res['model']}: whole generations ({res['threads']} thread, shared CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_study(args, command: str, lm=None, prompts=None, keywords=None, chat: bool = True) -> dict:
    """The study for the script's parsed ``args``: one run per ``--gen-lengths`` entry; writes
    ``generation_frontier.json``, ``summary.md`` and ``generation_frontier.png`` to ``args.output_dir``."""
    from dllm_sparse.eval.studies.step_frontier import machine

    torch.set_num_threads(args.threads)
    strategies = [parse_generation_strategy(s) for s in args.strategies]
    load_before = os.getloadavg()[0]
    if lm is None:
        from dllm_sparse import load_model

        lm = load_model(args.model, dtype=args.dtype)
        probe = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "data" /
                                               "capability_probe.jsonl").open()][:args.prompts]
        prompts, keywords = [q["prompt"] for q in probe], [q["keywords"] for q in probe]
    res: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "threads": args.threads, "command": command,
                           "machine": machine(), "load_before": load_before, "runs": []}
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def write(run: dict, k: int) -> None:  # after every prompt: the rows so far, kept if the run is stopped
        res["runs"][k:] = [run]
        res["load_after"] = os.getloadavg()[0]
        res["figure"] = plot(res, args.output_dir / "generation_frontier.png")
        atomic_write_text(args.output_dir / "generation_frontier.json", json.dumps(res, indent=1, default=str) + "\n")
        atomic_write_text(args.output_dir / "summary.md", summary_md(res))

    for k, n in enumerate(args.gen_lengths):
        run_generation_frontier(lm, prompts, keywords, strategies, gen_length=n, block_length=args.block_length,
                                chat=chat, on_prompt=lambda run, k=k: write(run, k))
    print(summary_md(res))
    return res
