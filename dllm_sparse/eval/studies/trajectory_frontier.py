"""The trajectory frontier: quality vs measured speed of whole denoising trajectories, per strategy.

The library side of ``experiments/trajectory_frontier.py``. The step frontier
(:mod:`dllm_sparse.eval.studies.step_frontier`) times one step on a fixed canvas and scores quality by the ELBO, one
forward per sample; strategies that carry state from step to step (a reused keep-set, the step-delta FFN) are
judged here on trajectories instead:

* **replay agreement**: the dense greedy trajectory of each prompt is replayed (teacher-forced: every strategy sees
  the very same canvases, :func:`dllm_sparse.samplers.replay`) and a commit is a hit when the strategy's argmax at
  the committed position is the recorded token (dense: 1.0);
* **free-running agreement**: the strategy generates on its own; the fraction of generated positions holding the
  dense generation's token;
* **probe score**: of the free-running answers, how many contain a keyword of the capability probe (the dense
  model's score alongside);
* **speed**: mean wall time per step over a replay of the first ``timing_steps`` steps of a dense trajectory at
  the timing canvas (the sampler's own loop, LM head on the rows a step reads, refresh steps included as they
  fall), interleaved with dense replays of the same steps, median over repeats with the [min, max] of the
  repeats' paired ratios; batch 1 and more.

Every interval is a 95 % percentile bootstrap over prompts (ratio of summed hits to summed commits).

Strategy names (:func:`parse_strategy`): ``dense``; ``token-<site>:<p>`` (per-token top-p, accelerate_ffn);
``step-<site>:<p>`` (one keep-set per sample and step, packed) and ``step-<site>:<p>@<policy>`` (reused between
refreshes); ``delta-input:<f>/<f_h>[+block][@<policy>]`` and
``delta-intermediate:<f>[,held|,oracle][+block][@<policy>]``
(:class:`dllm_sparse.samplers.step_delta.StepDelta`, whose ``name`` is this string); ``cache-prefix`` /
``cache-dual`` (Fast-dLLM's block caches, ``GenerationConfig(block_cache=...)``, dense FFN) and
``cache-dual+<strategy>`` (any of the above under the cache). A strategy on a cache is also judged against the
cache alone (``quality_vs_cache``: its free-running generations and trajectories as the reference; ``vs_cache``:
the speedup over the cache alone's step), the comparison that says what the FFN strategy adds to the cache.
"""

from __future__ import annotations

import hashlib
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
from dllm_sparse.eval.analysis.bootstrap import percentile_interval
from dllm_sparse.kernels import accelerate_ffn, restore_ffn
from dllm_sparse.samplers import GenerationConfig, generate, replay
from dllm_sparse.samplers.reuse import make_policy
from dllm_sparse.samplers.step_delta import StepDelta, apply_step_delta
from dllm_sparse.sparsity.rules import TopP

__all__ = ["Strategy", "parse_strategy", "quality", "timing", "run_trajectory_frontier"]

_SPARSE = re.compile(r"^(token|step)-(input|intermediate|gate|up):([0-9.]+)(?:@([a-z_0-9.:]+))?$")
_CACHE = re.compile(r"^cache-(prefix|dual)(?:\+(.+))?$")
_DELTA = re.compile(r"^delta-(input|intermediate):([0-9.]+)(?:/([0-9.]+))?(,oracle|,held)?(\+block)?"
                    r"(?:@([a-z_0-9.:]+))?$")


@dataclass
class Strategy:
    """One way of running a denoising step: attach it to the model, run, detach."""

    name: str
    kind: str  # dense | token | step | delta
    site: str | None = None
    p: float | None = None
    policy: str | None = None
    delta: StepDelta | None = None
    block_cache: str | None = None  # GenerationConfig.block_cache the strategy runs under (prefix / dual)

    def attach(self, model) -> tuple[list, Any]:
        """Swap the strategy in; returns (callbacks for the sampler, the object whose report to keep)."""
        if self.kind == "dense":
            return [], None
        if self.kind == "delta":
            run = apply_step_delta(model, self.delta)
            return [run], run
        rule = TopP(self.p) if self.kind == "token" else TopP(self.p, scope="step")
        policy = make_policy(self.policy) if self.policy else None
        accelerate_ffn(model, self.site, rule, backend="torch", reuse=policy)
        return ([policy] if policy is not None else []), policy

    @staticmethod
    def detach(model) -> None:
        restore_ffn(model)


def parse_strategy(spec: str) -> Strategy:
    """A :class:`Strategy` from its name (see the module docstring); a clear error for anything else."""
    spec = spec.strip()
    m = _CACHE.match(spec)
    if m:
        mode, inner = m.groups()
        base = parse_strategy(inner) if inner else Strategy("dense", "dense")
        if base.block_cache is not None:
            raise ValueError(f"strategy {spec!r}: one block cache per strategy")
        base.name, base.block_cache = spec, mode
        return base
    if spec == "dense":
        return Strategy("dense", "dense")
    m = _SPARSE.match(spec)
    if m:
        kind, site, p, policy = m.groups()
        if kind == "token" and policy:
            raise ValueError(f"strategy {spec!r}: a per-token mask is not reused across steps on the fast path "
                             "(it keeps the union of the positions' sets); drop the @policy or use step-...")
        if not 0.0 < float(p) <= 1.0:
            raise ValueError(f"strategy {spec!r}: p must be in (0, 1], got {p}")
        if policy:
            make_policy(policy)  # raises on an unknown policy
        return Strategy(spec, kind, site, float(p), policy)
    m = _DELTA.match(spec)
    if m:
        variant, f, f_h, select, block, policy = m.groups()
        if variant == "input" and f_h is None:
            raise ValueError(f"strategy {spec!r}: the input variant needs both fractions, e.g. delta-input:0.25/0.5")
        if variant == "intermediate" and f_h is not None:
            raise ValueError(f"strategy {spec!r}: the intermediate variant takes one fraction, e.g. "
                             "delta-intermediate:0.3")
        delta = StepDelta(variant, float(f), float(f_h) if f_h else 0.5, select=select[1:] if select else None,
                          refresh=policy or "block_start", exact_block=bool(block))
        return Strategy(delta.name, "delta", variant, delta=delta)
    raise ValueError(f"unknown strategy {spec!r}; use dense, token-<site>:<p>, step-<site>:<p>[@policy], "
                     "delta-input:<f>/<f_h>[+block][@policy] or "
                     "delta-intermediate:<f>[,held|,oracle][+block][@policy], "
                     "each optionally under a block cache: cache-prefix / cache-dual alone or cache-dual+<strategy>")


# --------------------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------------------


def _token_agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    n = max(len(a), len(b))
    return sum(1 for x, y in zip(a, b, strict=False) if x == y), n


def _probe_hit(text: str | None, keywords: list[str] | None) -> bool | None:
    if text is None or not keywords:
        return None
    return any(k.lower() in text.lower() for k in keywords)


def prompt_fingerprint(prompt) -> str:
    """A short sha256 of a prompt (its text, or its token ids): the key under which a prompt's quality is reused."""
    raw = prompt if isinstance(prompt, str) else ",".join(map(str, prompt))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def quality(lm, prompts: list, keywords: list | None, cfg: GenerationConfig, strategy: Strategy,
            dense: list, chat: bool, first: int = 0, with_replay: bool = True) -> dict:
    """Per prompt: replay hits / commits on the reference trajectory ``dense`` (the dense sampler's, or the block
    cache alone's for the "vs cache alone" columns), free-running token agreement with it, probe hit.

    ``first`` is the index of ``prompts[0]`` in the probe list (items carry absolute indices and the prompt's
    fingerprint, so runs over other prompt ranges can be merged, :func:`reused_quality`); ``with_replay=False``
    skips the replay (hits / commits ``None``): the free-running columns and the probe score alone cost half."""
    items = []
    for i, prompt in enumerate(prompts):
        callbacks, observer = strategy.attach(lm.model)
        try:
            rep = replay(lm, [prompt], dense[i], callbacks=callbacks, apply_chat_template=chat,
                         block_cache=strategy.block_cache) if with_replay else None
            measures = observer is not None and hasattr(observer, "ffn_work")
            report = observer.report() if measures and rep is not None else None  # the replay's FFN work
            free = generate(lm, prompts=[prompt], config=cfg.replace(block_cache=strategy.block_cache),
                            apply_chat_template=chat, callbacks=callbacks)
            if measures and report is None:
                report = observer.report()  # no replay: the FFN work of the free run
        finally:
            strategy.detach(lm.model)
        hits = sum(sum(row) for st in rep.steps for row in st.hits) if rep else None
        commits = sum(len(row) for st in rep.steps for row in st.hits) if rep else None
        same, total = _token_agreement(free.ids[0], dense[i].ids[0])
        items.append({"prompt": first + i, "prompt_sha": prompt_fingerprint(prompt), "hits": hits,
                      "commits": commits, "same_tokens": same, "tokens": total,
                      "probe_hit": _probe_hit(free.texts[0] if free.texts else None,
                                              keywords[i] if keywords else None),
                      "ffn_work": report["ffn_work"] if report else None})
    return summarise(items)


def _ratio_interval(num: np.ndarray, den: np.ndarray, replicates: int = 1000, seed: int = 0):
    """95 % percentile bootstrap over items of sum(num) / sum(den)."""
    rng = np.random.default_rng(seed)
    n = len(num)
    w = rng.multinomial(n, [1.0 / n] * n, size=replicates)
    den_r = w @ den
    ok = den_r > 0
    return percentile_interval((w @ num)[ok] / den_r[ok])


def summarise(items: list[dict]) -> dict:
    """The quality of one strategy from its per-prompt items; replay agreement over the items that were replayed
    (``replay_prompts`` of them: a free-running-only run over more prompts adds to the probe score alone)."""
    replayed = [r for r in items if r["hits"] is not None]
    hits = np.array([r["hits"] for r in replayed], float)
    commits = np.array([r["commits"] for r in replayed], float)
    same, toks = np.array([r["same_tokens"] for r in items], float), np.array([r["tokens"] for r in items], float)
    out = {"items": items, "prompts": len(items), "replay_prompts": len(replayed),
           "replay_agreement": float(hits.sum() / commits.sum()) if replayed else None,
           "replay_ci": _ratio_interval(hits, commits) if replayed else None,
           "free_agreement": float(same.sum() / max(toks.sum(), 1)), "free_ci": _ratio_interval(same, toks)}
    probe = [r["probe_hit"] for r in items if r["probe_hit"] is not None]
    if probe:
        out["probe_score"] = sum(probe)
        out["probe_items"] = len(probe)
    work = [r["ffn_work"] for r in items if r["ffn_work"] is not None]
    out["ffn_work"] = sum(work) / len(work) if work else None
    return out


QUALITY_KEYS = ("model", "dtype", "gen_length", "block_length")


def _settings_differ(old: dict, res: dict, keys: tuple[str, ...]) -> list[str]:
    """What an earlier run's settings ``old`` and this run's ``res`` disagree on, one "k: a there, b here" each."""
    return [f"{k}: {old.get(k)!r} there, {res[k]!r} here" for k in keys if old.get(k) != res[k]]


def reused_quality(paths: Path | list[Path], res: dict, names: list[str], shas: list[str]) -> dict[str, dict]:
    """The quality of earlier runs (``--quality-from``, one file or several), merged prompt by prompt.

    Refused unless every setting that changes a number is the same (model, dtype, gen_length, block_length) and,
    for every strategy asked for, the files hold an item for each prompt of this run (``res["first_prompt"]`` on,
    ``shas`` their fingerprints, :func:`prompt_fingerprint`; an item whose prompt differs is refused). The first
    file that has a prompt's item gives it; the items are then summarised afresh, so quality runs over prompts
    0-7 with replay and 8-19 without it give one table over 20 prompts. Quality is deterministic (greedy, no
    timing): quality-only runs on a busy machine plus a timing-only run on a quiet one give the same table as one
    run."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    have: dict[tuple[str, str], dict[int, dict]] = {}  # (strategy, kind) -> prompt index -> item
    for path in paths:
        old = json.loads(Path(path).read_text())
        differ = _settings_differ(old, res, QUALITY_KEYS)
        if differ:
            raise ValueError(f"--quality-from {path}: measured with other settings ({'; '.join(differ)}); rerun "
                             "quality with these settings or match them")
        for r in old["rows"]:
            for kind in ("quality", "quality_vs_cache"):
                for item in (r.get(kind) or {}).get("items", []):
                    if "prompt_sha" not in item:
                        raise ValueError(f"--quality-from {path}: its items carry no prompt fingerprint (measured "
                                         "before prompts were fingerprinted); rerun its quality")
                    have.setdefault((r["strategy"], kind), {}).setdefault(item["prompt"], item)
    first = res.get("first_prompt", 0)
    wanted = range(first, first + len(shas))
    out: dict[str, dict] = {}
    for name in names:
        got: dict[str, dict] = {}
        for kind in ("quality", "quality_vs_cache"):
            by_prompt = have.get((name, kind))
            if by_prompt is None:
                continue
            missing = [i for i in wanted if i not in by_prompt]
            if missing:
                raise ValueError(f"--quality-from: {name} ({kind}) has no item for prompt(s) {missing}; measure "
                                 f"them (--first-prompt {missing[0]} --prompts {len(missing)}) and add the file")
            wrong = [i for i in wanted if by_prompt[i]["prompt_sha"] != shas[i - first]]
            if wrong:
                raise ValueError(f"--quality-from: {name}: prompt(s) {wrong} were other prompts there (fingerprints "
                                 "differ): the probe list changed; rerun their quality")
            got[kind] = summarise([by_prompt[i] for i in wanted])
        if "quality" not in got:
            raise ValueError(f"--quality-from {' '.join(map(str, paths))}: no quality for {name!r}; measured there: "
                             f"{sorted({s for s, k in have if k == 'quality'})}")
        out[name] = got
    return out


TIMING_KEYS = ("model", "dtype", "threads", "canvas", "timing_steps", "repeats", "batches", "block_length")


def reused_timing(path: Path, res: dict, names: list[str]) -> dict[str, dict]:
    """The timing rows of an earlier run (``--timing-from``): refused unless every setting that changes them is
    the same (model, dtype, threads, canvas, timed steps, repeats, batches, block) and every strategy asked for was
    timed there. Its machine, load and command are carried along (``res["timing_source"]``)."""
    old = json.loads(Path(path).read_text())
    differ = _settings_differ(old, res, TIMING_KEYS)
    if differ:
        raise ValueError(f"--timing-from {path}: timed with other settings ({'; '.join(differ)}); match them")
    have = {r["strategy"]: r["timing"] for r in old["rows"] if r.get("timing")}
    missing = [n for n in names if n not in have]
    if missing:
        raise ValueError(f"--timing-from {path}: no timing for {missing}; timed there: {sorted(have)}")
    res["timing_source"] = {"path": str(path), "command": old["command"], "machine": old["machine"],
                            "load_before": old["load_before"], "load_after": old["load_after"],
                            "noisy": old["noisy"]}
    return {n: have[n] for n in names}


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------


def _timed_replay(lm, prompt_ids: torch.Tensor, trajectory, cfg: GenerationConfig,
                  strategy: Strategy) -> tuple[float, float | None]:
    """(seconds per step, FFN work or None) of a replay of ``trajectory`` (the sampler's loop) with ``strategy``."""
    callbacks, observer = strategy.attach(lm.model)
    try:
        t0 = time.perf_counter()
        rep = replay(lm.model, prompt_ids, trajectory, cfg, callbacks=callbacks, block_cache=strategy.block_cache)
        dt = time.perf_counter() - t0
    finally:
        strategy.detach(lm.model)
    work = observer.ffn_work() if observer is not None and hasattr(observer, "ffn_work") else None
    return dt / len(rep.steps), work


def ffn_share(lm, prompt_ids: torch.Tensor, trajectory, cfg: GenerationConfig) -> float:
    """The FFNs' share of a dense step's linear-layer multiply-adds (LM head on the rows the step reads, as the
    sampler runs it; attention scores are not linear layers and are left out), counted by hooks over a replay."""
    from dllm_sparse.models.families import find_ffns

    ffn_linears = {id(m) for f in find_ffns(lm.model) for m in (f.gate, f.up, f.down)}
    macs = {"ffn": 0, "all": 0}

    def count(module, args, out):
        n = module.in_features * module.out_features * args[0][..., 0].numel()
        macs["all"] += n
        if id(module) in ffn_linears:
            macs["ffn"] += n

    handles = [m.register_forward_hook(count) for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        replay(lm.model, prompt_ids, trajectory, cfg)
    finally:
        for h in handles:
            h.remove()
    # The sampler applies the split-off LM head with F.linear outside any module: add it by hand.
    from dllm_sparse.models.families import without_lm_head

    with without_lm_head(lm.model) as head:
        if head is not None:
            rows = prompt_ids.shape[0] * cfg.block_length * len(trajectory)
            macs["all"] += head.in_features * head.out_features * rows
    return macs["ffn"] / macs["all"]


def step_flop_bound(share: float, work: float | None) -> float | None:
    """The speedup of a step if only the FFN's multiply-adds shrank, to ``work`` of dense (linear layers only)."""
    return None if work is None else 1.0 / (1.0 - share * (1.0 - work))


# Matrix products as torch.profiler names their CPU kernels (aten::linear and aten::matmul only dispatch to these).
_MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def _step_profile(lm, prompt_ids: torch.Tensor, trajectory, cfg: GenerationConfig, strategy: Strategy) -> dict:
    """Where a step's time goes: one replay of ``trajectory`` with ``strategy`` under torch.profiler, the self time
    of its ops in three groups, ms per step: matrix products (:data:`_MATMUL_OPS`), attention (the scaled
    dot-product attention kernels) and every other op (norms, rotary, activation, residual adds, copies, top-k,
    gathers); ``unattributed_ms`` = wall time - op time (Python, hooks, the sampler's bookkeeping). Profiling adds
    a cost per op, so small ops weigh more here than in the timed rounds; compare strategies with each other."""
    from torch.profiler import ProfilerActivity, profile

    callbacks, _ = strategy.attach(lm.model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            rep = replay(lm.model, prompt_ids, trajectory, cfg, callbacks=callbacks, block_cache=strategy.block_cache)
            wall = time.perf_counter() - t0
    finally:
        strategy.detach(lm.model)
    groups = {"matmul_ms": 0.0, "attention_ms": 0.0, "other_ops_ms": 0.0}
    for e in prof.key_averages():
        name = e.key
        group = ("matmul_ms" if name in _MATMUL_OPS else "attention_ms" if "scaled_dot_product" in name
                 or "flash_attention" in name else "other_ops_ms")
        groups[group] += e.self_cpu_time_total / 1e3  # microseconds -> ms
    n = len(rep.steps)
    out = {k: v / n for k, v in groups.items()}
    out["wall_ms"] = wall * 1e3 / n
    out["unattributed_ms"] = out["wall_ms"] - sum(groups.values()) / n
    return out


def timing(lm, prompt_ids: list[int], strategies: list[Strategy], batch: int, canvas: int, block_length: int,
           steps: int, repeats: int, profile: bool = False) -> dict:
    """Median seconds per step per strategy (and dense) over ``repeats`` interleaved rounds after a warm-up, with
    the [min, max] over rounds of dense / strategy (each round's ratio); with ``profile``, also each strategy's
    :func:`_step_profile` (one more replay, after the timed rounds)."""
    ids = torch.tensor([prompt_ids] * batch)
    cfg = GenerationConfig(gen_length=canvas, steps=canvas, block_length=block_length, temperature=0.0,
                           stop_token_ids=(), mask_id=lm.mask_id)
    stop_after = _StopAfter(steps)
    recorded = generate(lm.model, None, ids, cfg, callbacks=[stop_after])  # the dense trajectory, `steps` steps
    dense = Strategy("dense", "dense")
    share = ffn_share(lm, ids, recorded.trace, cfg)
    samples: dict[str, list[float]] = {s.name: [] for s in [dense, *strategies]}
    work: dict[str, float | None] = {}
    for r in range(repeats + 1):
        for s in [dense, *strategies]:
            t, work[s.name] = _timed_replay(lm, ids, recorded.trace, cfg, s)
            if r:
                samples[s.name].append(t)
    out = {}
    for s in [dense, *strategies]:
        ts = samples[s.name]
        out[s.name] = {"step_s": statistics.median(ts), **_speedup(samples["dense"], ts), "samples": ts,
                       "ffn_work": work[s.name], "ffn_share": share,
                       "flop_bound": None if s.block_cache else step_flop_bound(share, work[s.name])}
        alone = f"cache-{s.block_cache}"
        if s.block_cache is not None and s.name != alone and alone in samples:  # against the cache alone
            out[s.name]["vs_cache"] = _speedup(samples[alone], ts)
        if profile:
            out[s.name]["profile"] = _step_profile(lm, ids, recorded.trace, cfg, s)
    return out


def _speedup(base: list[float], ts: list[float]) -> dict:
    """Median-over-median speedup of ``ts`` against ``base`` and the [min, max] of the rounds' paired ratios."""
    ratios = [b / t for b, t in zip(base, ts, strict=True)]
    return {"speedup": statistics.median(base) / statistics.median(ts), "speedup_range": [min(ratios), max(ratios)]}


class _StopAfter:
    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, state):
        return state.step + 1 >= self.steps


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def summary_md(res: dict) -> str:
    def ci(c):
        return f" [{c[0]:.3f}, {c[1]:.3f}]" if c else ""

    def replay_cell(q):
        if not q or q.get("replay_agreement") is None:
            return "-"
        n = f" ({q['replay_prompts']} prompts)" if q.get("replay_prompts", q["prompts"]) != q["prompts"] else ""
        return f"{q['replay_agreement']:.3f}{ci(q.get('replay_ci'))}{n}"

    source = (f"Timing from `{res['timing_source']['path']}`, measured by `{res['timing_source']['command']}`.\n\n"
              if "timing_source" in res else "")
    lines = [f"# Trajectory frontier: {res['model']}", "", f"Command: `{res['command']}`", "", source +
             f"Machine: {res['machine']['cpu']} ({', '.join(res['machine']['cpu_flags'])}), {res['threads']} threads, "
             f"torch {res['machine']['torch']}; load average {res['load_before']:.2f} before, {res['load_after']:.2f} "
             f"after{'; NOT quiet: other work shared the CPU, timings are noisy' if res['noisy'] else ''}.", "",
             f"Quality: {res['quality_prompts']} probe prompts (from prompt {res.get('first_prompt', 0)}; replay on "
             f"those a row says, else all), gen_length {res['gen_length']} = steps, block "
             f"{res['block_length']}, greedy; 95 % bootstrap intervals over prompts. Timing: canvas "
             f"{res['canvas']} + prompt, block {res['block_length']}, the first {res['timing_steps']} steps, median of "
             f"{res['repeats']} interleaved repeats, [min, max] of the repeats' paired ratios.", "",
             "FFN work: multiply-adds done / dense, mean over steps (quality runs; timing geometry in brackets). FLOP "
             "bound: the step speedup if only the FFN's multiply-adds shrank to that work (linear layers, LM head on "
             "the read rows; the FFN share of a dense step's multiply-adds is in the JSON).", "",
             "| strategy | replay agreement | free-running agreement | probe | FFN work | "
             + " | ".join(f"step speedup (batch {b}) | FLOP bound" for b in res["batches"]) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(res["batches"])]
    for row in res["rows"]:
        q = row.get("quality") or {}
        t1 = row.get("timing", {}).get(str(res["batches"][0]), {})
        work = f"{q['ffn_work']:.3f}" if q.get("ffn_work") is not None else "-"
        if t1.get("ffn_work") is not None:
            work += f" ({t1['ffn_work']:.3f})"
        cells = [row["strategy"],
                 replay_cell(q), f"{q['free_agreement']:.3f}{ci(q.get('free_ci'))}" if q else "-",
                 f"{q['probe_score']}/{q['probe_items']}" if "probe_score" in q else "-", work]
        for b in res["batches"]:
            t = row.get("timing", {}).get(str(b))
            cells.append(f"{t['speedup']:.2f}x [{t['speedup_range'][0]:.2f}, {t['speedup_range'][1]:.2f}]"
                         if t else "-")
            cells.append(f"{t['flop_bound']:.2f}x" if t and t.get("flop_bound") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    on_cache = [r for r in res["rows"] if r.get("quality_vs_cache") or any(
        "vs_cache" in t for t in r.get("timing", {}).values())]
    if on_cache:
        lines += ["", "Strategies on top of a block cache, against the cache alone (its own free-running generations "
                  "and replays of its trajectories as the reference; speedup over the cache alone's step):", "",
                  "| strategy | replay agreement vs cache | free-running agreement vs cache | "
                  + " | ".join(f"speedup vs cache (batch {b})" for b in res["batches"]) + " |",
                  "|---|---|---|" + "---|" * len(res["batches"])]
        for row in on_cache:
            q = row.get("quality_vs_cache") or {}
            cells = [row["strategy"], replay_cell(q),
                     f"{q['free_agreement']:.3f}{ci(q.get('free_ci'))}" if q else "-"]
            for b in res["batches"]:
                v = row.get("timing", {}).get(str(b), {}).get("vs_cache")
                cells.append(f"{v['speedup']:.2f}x [{v['speedup_range'][0]:.2f}, {v['speedup_range'][1]:.2f}]"
                             if v else "-")
            lines.append("| " + " | ".join(cells) + " |")
    profiled = [r for r in res["rows"] if any("profile" in t for t in r.get("timing", {}).values())]
    if profiled:
        lines += ["", "Where a step's time goes (torch.profiler, one more replay per strategy after the timed rounds; "
                  "ms per step; op self times: matrix products, attention, every other op; unattributed = wall - "
                  "ops: Python, hooks, bookkeeping; profiling inflates small ops):", "",
                  "| strategy | batch | wall | matmul | attention | other ops | unattributed |",
                  "|---|---|---|---|---|---|---|"]
        for row in profiled:
            for b in res["batches"]:
                pr = row.get("timing", {}).get(str(b), {}).get("profile")
                if pr:
                    lines.append(f"| {row['strategy']} | {b} | {pr['wall_ms']:.1f} | {pr['matmul_ms']:.1f} | "
                                 f"{pr['attention_ms']:.1f} | {pr['other_ops_ms']:.1f} | "
                                 f"{pr['unattributed_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out_dir: Path) -> str | None:
    rows = [r for r in res["rows"] if r.get("quality") and r.get("timing")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = str(res["batches"][0])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for ax, (metric, label) in zip(axes, (("replay", "replay commit agreement with dense"),
                                          ("free", "free-running token agreement with dense")), strict=True):
        for i, r in enumerate(rows):
            q, t = r["quality"], r["timing"][b]
            val = q[f"{metric}_agreement"]
            if val is None:  # a free-running-only row has no replay point
                continue
            lohi = q.get(f"{metric}_ci") or (val, val)
            xerr = [[t["speedup"] - t["speedup_range"][0]], [t["speedup_range"][1] - t["speedup"]]]
            ax.errorbar(t["speedup"], val, yerr=[[val - lohi[0]], [lohi[1] - val]], xerr=xerr, fmt="o",
                        color=f"C{i % 10}", label=r["strategy"], capsize=2)
            if t.get("flop_bound"):  # where the point would sit if only the FFN's multiply-adds counted
                ax.plot([t["speedup"], t["flop_bound"]], [val, val], ls=":", lw=0.8, color=f"C{i % 10}")
                ax.plot(t["flop_bound"], val, marker="x", color=f"C{i % 10}")
        ax.axvline(1.0, color="k", lw=0.6)
        ax.axhline(0.99, color="tab:red", lw=0.6, ls="--")
        ax.set_xlabel(f"measured speedup of a denoising step vs dense (batch {b}); x: FLOP bound")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{res['model']}: quality vs speed over whole trajectories ({res['threads']} threads)", fontsize=10)
    fig.tight_layout()
    path = out_dir / "trajectory_frontier.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


def run_trajectory_frontier(args, command: str, lm=None, prompts=None, keywords=None, chat: bool = True) -> dict:
    """The study for the script's parsed ``args`` (``lm``, ``prompts``, ``keywords`` given by the smoke mode)."""
    from dllm_sparse.eval.studies.step_frontier import machine

    torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    strategies = [parse_strategy(s) for s in args.strategies]  # bad names fail before any work
    load_before = os.getloadavg()[0]
    if lm is None:
        from dllm_sparse import load_model

        lm = load_model(args.model, dtype=args.dtype)
        first = getattr(args, "first_prompt", 0)
        probe = [json.loads(line) for line in (Path(__file__).resolve().parents[2] / "data" /
                                               "capability_probe.jsonl").open()][first:first + args.prompts]
        if len(probe) < args.prompts:
            raise ValueError(f"--first-prompt {first} --prompts {args.prompts}: the capability probe has only "
                             f"{first + len(probe)} prompts")
        prompts, keywords = [q["prompt"] for q in probe], [q["keywords"] for q in probe]
    res: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "threads": args.threads, "command": command,
                           "machine": machine(), "load_before": load_before, "gen_length": args.gen_length,
                           "block_length": args.block_length, "canvas": args.canvas, "timing_steps": args.timing_steps,
                           "repeats": args.repeats, "batches": args.batches, "quality_prompts": len(prompts),
                           "first_prompt": getattr(args, "first_prompt", 0),
                           "replay": not getattr(args, "skip_replay", False), "rows": []}
    rows = {s.name: {"strategy": s.name} for s in [Strategy("dense", "dense"), *strategies]}
    if getattr(args, "quality_from", None) is not None:
        shas = [prompt_fingerprint(p) for p in prompts]
        for name, q in reused_quality(args.quality_from, res, list(rows), shas).items():
            rows[name].update(q)
        res["quality_from"] = [str(p) for p in args.quality_from] if isinstance(args.quality_from, list) else str(
            args.quality_from)
    elif not args.skip_quality:
        cfg = GenerationConfig(gen_length=args.gen_length, steps=args.gen_length, block_length=args.block_length,
                               temperature=0.0, mask_id=lm.mask_id)
        dense = [generate(lm, prompts=[p], config=cfg, apply_chat_template=chat) for p in prompts]
        cache_alone: dict[str, list] = {}  # block cache -> its free-running generations (the "vs cache" reference)
        for s in [Strategy("dense", "dense"), *strategies]:
            t0 = time.perf_counter()
            rows[s.name]["quality"] = quality(lm, prompts, keywords, cfg, s, dense, chat, res["first_prompt"],
                                              res["replay"])
            if s.block_cache is not None and s.kind != "dense":  # a strategy on top of a cache: also against it
                if s.block_cache not in cache_alone:
                    cache_alone[s.block_cache] = [generate(lm, prompts=[p], config=cfg.replace(
                        block_cache=s.block_cache), apply_chat_template=chat) for p in prompts]
                rows[s.name]["quality_vs_cache"] = quality(lm, prompts, keywords, cfg, s, cache_alone[s.block_cache],
                                                           chat, res["first_prompt"], res["replay"])
            q = rows[s.name]["quality"]
            shown = f"replay {q['replay_agreement']:.3f}" if q["replay_agreement"] is not None else "no replay"
            print(f"  quality {s.name}: {shown}, free {q['free_agreement']:.3f}, probe "
                  f"{q.get('probe_score', '-')}/{q.get('probe_items', '-')} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    if getattr(args, "timing_from", None) is not None:
        for name, t in reused_timing(args.timing_from, res, list(rows)).items():
            rows[name]["timing"] = t
    elif not args.skip_timing:
        first = prompts[0]
        if isinstance(first, str):
            text = lm.tokenizer.apply_chat_template([{"role": "user", "content": first}], tokenize=False,
                                                    add_generation_prompt=True) if chat else first
            first = list(lm.tokenizer.encode(text, add_special_tokens=False))
        for b in args.batches:
            t = timing(lm, list(first), strategies, b, args.canvas, args.block_length, args.timing_steps,
                       args.repeats, profile=getattr(args, "profile", False))
            for name, v in t.items():
                rows[name].setdefault("timing", {})[str(b)] = v
            print(f"  timing batch {b}: " + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in t.items()), flush=True)
    res["rows"] = list(rows.values())
    res["load_after"] = os.getloadavg()[0]
    res["noisy"] = res["load_after"] > args.threads + 0.5
    if "timing_source" in res:  # the timing's own conditions, not this (quick) run's
        src = res["timing_source"]
        res["machine"], res["load_before"], res["load_after"], res["noisy"] = (
            src["machine"], src["load_before"], src["load_after"], src["noisy"])
    res["figure"] = plot(res, args.output_dir)
    atomic_write_text(args.output_dir / "trajectory_frontier.json", json.dumps(res, indent=1, default=str) + "\n")
    atomic_write_text(args.output_dir / "summary.md", summary_md(res))
    print(summary_md(res))
    return res
