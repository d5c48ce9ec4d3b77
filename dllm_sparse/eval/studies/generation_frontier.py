"""The whole-generation frontier: speed and quality of complete generations, per decoding strategy.

The library side of ``dllm-sparse frontier generation`` (``experiments/generation_frontier.py``). Where the
trajectory frontier (:mod:`dllm_sparse.eval.studies.trajectory_frontier`) times a replay of a fixed trajectory,
here every strategy generates on its own, as a user runs it, so the levers that change the number of steps count
too: Fast-dLLM's block caches (``GenerationConfig(block_cache=...)``) and confidence-threshold parallel decoding
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

Resume: each finished unit (gen_length, prompt, strategy) is appended to ``<output dir>/units.jsonl``
(:class:`~dllm_sparse.eval.rows.JsonlWriter`: one fsync'ed line, a torn last line dropped) with its raw
measurements (answer ids and text, forward passes, tokens, wall time, FFN work, probe hit), the session that
measured it (an id, host, CPU, load average) and its identity (:func:`unit_identity`: the model's name, weights
hash, kind, dtype and device type, threads, the chat template, the unit's full generation config, the strategy's
full definition, the prompt's hash and its probe keywords). A rerun reads the finished units back instead of
recomputing them (so ``--prompts 20`` after ``--prompts 8`` runs only prompts 8..19), refuses a folder whose units
were made with other settings (:class:`~dllm_sparse.eval.identity.IdentityMismatch` naming each field), and derives
the tables from every finished unit of the planned prompts (a prompt counts once all its strategies finished).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dllm_sparse.atomic import atomic_write_text
from dllm_sparse.eval.analysis.bootstrap import percentile_interval
from dllm_sparse.eval.identity import IdentityMismatch, RunIdentity, run_identity
from dllm_sparse.eval.rows import JsonlWriter, finished
from dllm_sparse.eval.studies.trajectory_frontier import (
    Strategy,
    _probe_hit,
    _ratio_interval,
    _token_agreement,
    parse_strategy,
)
from dllm_sparse.samplers import GenerationConfig, generate

__all__ = ["GenStrategy", "base_of", "median_interval", "over_base", "parse_generation_strategy",
           "run_generation_frontier", "summarise_strategy", "UnitRows", "unit_identity", "UNITS_FILE"]

#: The rows file of finished units in the output folder.
UNITS_FILE = "units.jsonl"
#: The raw measurements of a unit, stored in its row; every table number is derived from them.
MEASURED = ("ids", "text", "nfe", "tokens", "wall_s", "ffn_work", "probe_hit")
#: Bumped when a unit's computation changes in a way no setting shows (old rows then refuse to mix).
UNIT_FORMAT = 1

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
    its 95 % bootstrap interval over prompts, [min, max]), forward passes per token, probe score with a 95 %
    bootstrap interval over prompts, token agreement with the exact sampler's answers (and its interval)."""
    tps = [it["tokens"] / it["wall_s"] for it in items]
    ratios = [e["wall_s"] / it["wall_s"] for it, e in zip(items, exact_items, strict=True)]
    agree = [_token_agreement(it["ids"], e["ids"]) for it, e in zip(items, exact_items, strict=True)]
    same, total = np.array([a for a, _ in agree], float), np.array([b for _, b in agree], float)
    hits = [it["probe_hit"] for it in items if it["probe_hit"] is not None]
    row: dict[str, Any] = {
        "strategy": name, "prompts": len(items),
        "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [min(tps), max(tps)],
        "speedup": statistics.median(ratios), "speedup_ci": median_interval(ratios),
        "speedup_range": [min(ratios), max(ratios)],
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


def _with_exact(strategies: list[GenStrategy]) -> list[GenStrategy]:
    """The strategies with the exact sampler first (every ratio and agreement is against it)."""
    if "exact" in [s.name for s in strategies]:
        return strategies
    return [parse_generation_strategy("exact"), *strategies]


def _base_config(lm, gen_length: int, block_length: int) -> GenerationConfig:
    return GenerationConfig(gen_length=gen_length, steps=gen_length, block_length=block_length, temperature=0.0,
                            mask_id=lm.mask_id)


def _digest(value: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def run_fields(lm, *, threads: int, chat: bool) -> RunIdentity:
    """What every unit of a run shares: the model (:func:`~dllm_sparse.eval.identity.run_identity`: name,
    weights hash, kind, dtype, device type, load options), the torch threads (they change the times), the chat
    template (its hash; None without one) and the unit format."""
    template = getattr(getattr(lm, "tokenizer", None), "chat_template", None) if chat else None
    return run_identity(lm, threads=threads, chat=chat, chat_template=_digest(template) if template else None,
                        unit_format=UNIT_FORMAT)


def unit_identity(run: RunIdentity, cfg: GenerationConfig, s: GenStrategy, prompt: Any,
                  keywords: Any) -> RunIdentity:
    """Every setting that can change a unit's numbers: the run's fields, the unit's full generation config (the
    strategy's threshold and block cache applied), the strategy's full definition, the prompt's hash and its
    probe keywords."""
    return run.updated(generation=s.config(cfg).to_dict(), strategy={"threshold": s.threshold, **asdict(s.inner)},
                       prompt=_digest(prompt), keywords=keywords)


def unit_key(gen_length: int, prompt: int, strategy: str) -> str:
    return json.dumps([gen_length, prompt, strategy])


def new_session() -> dict:
    """Who measures the units of this process: an id, the host, the CPU, the start time."""
    from dllm_sparse.hardware import cpu_name

    return {"id": uuid.uuid4().hex[:12], "host": platform.node(), "cpu": cpu_name(), "started_at": time.time()}


@dataclass
class UnitRows:
    """The finished units of a run (``path``: a JSONL rows file; None keeps them in memory) and where new ones go.
    ``computed`` counts the units this process measured."""

    path: Path | None
    session: dict = field(default_factory=new_session)
    done: dict = field(default_factory=dict)
    computed: int = 0
    _writer: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.path is not None:
            self.done = finished(self.path)

    def check(self, planned: dict[str, RunIdentity], run: RunIdentity) -> None:
        """Refuse finished units made with other settings: a planned unit must match its whole identity, any
        other unit of the folder the run's fields (one folder, one model and machine setting)."""
        fix = (f"Start another --output-dir (this one holds those units), or rerun with the settings "
               f"{self.path} was made with.")
        for key, row in self.done.items():
            stored = row.get("identity") if isinstance(row.get("identity"), dict) else {}
            if key in planned:
                planned[key].require_same(stored, what=f"{self.path}: unit {key}", fix=fix)
            else:
                run.require_same({k: stored[k] for k in run if k in stored}, what=f"{self.path}: unit {key}",
                                 fix=fix)

    def add(self, key: str, ident: RunIdentity, unit: dict, measured: dict) -> dict:
        row = {"key": key, **unit, **{k: measured[k] for k in MEASURED}, "session": self.session,
               "load_avg": os.getloadavg()[0], "finished_at": time.time(), "identity": ident.to_dict()}
        if self.path is not None:
            if self._writer is None:
                self._writer = JsonlWriter(self.path)  # opened on the first new unit: drops a torn last line
            self._writer.write(row)
        self.done[key] = row
        self.computed += 1
        return row

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def sessions_of(rows: list[dict]) -> list[dict]:
    """The sessions that measured ``rows``: id, host, CPU, threads, units, [min, max] load average."""
    out: dict[str, dict] = {}
    for r in rows:
        s = r["session"]
        e = out.setdefault(s["id"], {**s, "threads": r["identity"].get("threads"), "units": 0, "load_avg": []})
        e["units"] += 1
        e["load_avg"].append(r["load_avg"])
    for e in out.values():
        e["load_avg"] = [min(e["load_avg"]), max(e["load_avg"])]
    return sorted(out.values(), key=lambda e: e["started_at"])


def derive_run(done: dict, gen_length: int, block_length: int, n_prompts: int,
               strategies: list[GenStrategy]) -> dict:
    """The rows of one gen_length from the finished units: the prompts among the first ``n_prompts`` whose every
    strategy has finished (each prompt a paired repeat), summarised per strategy."""
    keys = {i: [unit_key(gen_length, i, s.name) for s in strategies] for i in range(n_prompts)}
    full = [i for i in range(n_prompts) if all(k in done for k in keys[i])]
    items = {s.name: [{**{k: done[unit_key(gen_length, i, s.name)][k] for k in MEASURED}, "prompt": i,
                       "session": done[unit_key(gen_length, i, s.name)]["session"]["id"]} for i in full]
             for s in strategies}
    rows = [summarise_strategy(s.name, items[s.name], items["exact"]) for s in strategies] if full else []
    names = [s.name for s in strategies]
    steps = [over_base(n, base, items[n], items[base]) for n in names if (base := base_of(n, names))] if full else []
    return {"gen_length": gen_length, "block_length": block_length, "prompts": len(full), "rows": rows,
            "over_base": steps, "sessions": sessions_of([done[k] for i in full for k in keys[i]])}


def base_of(name: str, names: list[str]) -> str | None:
    """The strategy of the run that ``name`` adds one lever to (``t0.9+cache-dual+delta-...`` extends
    ``t0.9+cache-dual``, which extends ``t0.9``): the longest other name followed by ``+``; None if none."""
    bases = [b for b in names if name.startswith(b + "+")]
    return max(bases, key=len) if bases else None


def median_interval(values: list[float], replicates: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the median of ``values`` (resampled with replacement)."""
    v = np.asarray(values, float)
    boot = np.median(v[np.random.default_rng(seed).integers(0, len(v), size=(replicates, len(v)))], axis=1)
    return list(percentile_interval(boot))


def over_base(name: str, base: str, items: list[dict], base_items: list[dict], replicates: int = 2000,
              seed: int = 0) -> dict:
    """What the last lever of ``name`` adds on top of ``base``, paired by prompt: the speedup (median over prompts
    of base time / strategy time, its 95 % percentile-bootstrap interval over prompts, [min, max]), the probe
    items gained and lost, and how many pairs were timed in the same session (the others compare sessions)."""
    ratios = [b["wall_s"] / it["wall_s"] for it, b in zip(items, base_items, strict=True)]
    pairs = list(zip(items, base_items, strict=True))
    return {"strategy": name, "base": base, "prompts": len(ratios), "speedup": statistics.median(ratios),
            "speedup_ci": median_interval(ratios, replicates, seed), "speedup_range": [min(ratios), max(ratios)],
            "probe_gained": sum(bool(it["probe_hit"]) and b["probe_hit"] is False for it, b in pairs),
            "probe_lost": sum(it["probe_hit"] is False and bool(b["probe_hit"]) for it, b in pairs),
            "same_session": sum(it["session"] == b["session"] for it, b in pairs)}


def run_generation_frontier(lm, prompts: list, keywords: list | None, strategies: list[GenStrategy], *,
                            gen_length: int, block_length: int, chat: bool, units: UnitRows | None = None,
                            run: RunIdentity | None = None, log=print, on_prompt=None) -> dict:
    """Every strategy on every prompt, interleaved; returns ``{"rows": [...], ...}`` (exact first). Units already
    in ``units`` are read back, not recomputed; new ones are added to it (``run``: the run's fields, default
    :func:`run_fields` at the current torch threads). ``on_prompt(run)`` is called with the rows so far after each
    prompt (a long run can be stopped and kept)."""
    strategies = _with_exact(strategies)
    units = units if units is not None else UnitRows(None)
    run = run if run is not None else run_fields(lm, threads=torch.get_num_threads(), chat=chat)
    cfg = _base_config(lm, gen_length, block_length)
    warmed = False
    for i, prompt in enumerate(prompts):
        k, computed = i % len(strategies), units.computed
        for s in strategies[k:] + strategies[:k]:  # rotated: no strategy always runs first
            key = unit_key(gen_length, i, s.name)
            if key in units.done:
                continue
            if not warmed:  # one short generation before the first timed one (lazy: a finished run needs none)
                _generate_one(lm, prompt, cfg.replace(gen_length=block_length, steps=block_length), strategies[0],
                              chat)
                warmed = True
            it = _generate_one(lm, prompt, cfg, s, chat)
            it["probe_hit"] = _probe_hit(it["text"], keywords[i] if keywords else None)
            units.add(key, unit_identity(run, cfg, s, prompt, keywords[i] if keywords else None),
                      {"gen_length": gen_length, "prompt": i, "strategy": s.name}, it)
        done = {s.name: units.done[unit_key(gen_length, i, s.name)] for s in strategies}
        log(f"  prompt {i}" + (" (finished before, read back)" if units.computed == computed else "") + ": "
            + ", ".join(f"{n} {r['wall_s']:.1f}s/{r['nfe']}f" for n, r in done.items()), flush=True)
        result = derive_run(units.done, gen_length, block_length, i + 1, strategies)
        if on_prompt is not None:
            on_prompt(result)
    return result


def summary_md(res: dict) -> str:
    lines = [f"# Whole-generation frontier: {res['model']}", "", f"Command: `{res['command']}`", "",
             f"This session's machine: {res['machine']['cpu']} ({', '.join(res['machine']['cpu_flags'])}), "
             f"{res['threads']} thread(s), torch {res['machine']['torch']}; this session's load average "
             f"{res['load_before']:.2f} before, {res['load_after']:.2f} after (a load above the thread count means a "
             "shared machine and noisy timings).", ""]
    for run in res["runs"]:
        lines += [f"## {run['gen_length']} tokens, blocks of {run['block_length']}, {run['prompts']} probe prompts",
                  "", *([_sessions_line(run["sessions"]), ""] if run.get("sessions") else []),
                  "| strategy | tokens/s (median [min, max]) | speedup vs exact (median (95 % CI) [min, max]) | "
                  "forwards / token | probe (95 % CI) | agreement with exact | FFN work |",
                  "|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            ci = r.get("probe_ci")
            probe = (f"{r['probe_score']}/{r['probe_items']}" + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else "")
                     if r["probe_score"] is not None else "-")
            a = r["agreement_ci"]
            lines.append(f"| {r['strategy']} | {r['tokens_per_s']:.2f} [{r['tokens_per_s_range'][0]:.2f}, "
                         f"{r['tokens_per_s_range'][1]:.2f}] | {r['speedup']:.2f}x{_ci(r.get('speedup_ci'))} "
                         f"[{r['speedup_range'][0]:.2f}, "
                         f"{r['speedup_range'][1]:.2f}] | {r['forwards_per_token']:.3f} | {probe} | "
                         f"{r['agreement']:.3f}" + (f" [{a[0]:.3f}, {a[1]:.3f}]" if a else "") + " | "
                         + (f"{r['ffn_work']:.3f}" if r["ffn_work"] is not None else "-") + " |")
        lines.append("")
        if run.get("over_base"):
            lines += ["What each strategy's last lever adds on top of the strategy it extends, paired by prompt "
                      "(speedup: median of base time / strategy time, 95 % bootstrap interval over prompts, "
                      "[min, max]; probe items gained and lost against the base; pairs timed in one session):", "",
                      "| strategy | on top of | speedup (95 % CI) [min, max] | probe +gained / -lost | same session |",
                      "|---|---|---|---|---|"]
            for o in run["over_base"]:
                lines.append(f"| {o['strategy']} | {o['base']} | {o['speedup']:.2f}x ({o['speedup_ci'][0]:.2f}, "
                             f"{o['speedup_ci'][1]:.2f}) [{o['speedup_range'][0]:.2f}, {o['speedup_range'][1]:.2f}] "
                             f"| +{o['probe_gained']} / -{o['probe_lost']} | {o['same_session']}/{o['prompts']} |")
            lines.append("")
    return "\n".join(lines)


def _ci(ci: list[float] | None) -> str:
    return f" ({ci[0]:.2f}, {ci[1]:.2f})" if ci else ""


def _sessions_line(sessions: list[dict]) -> str:
    """Where the units of a table were measured: one session, or (a resumed run) several, with their hosts and
    load averages, since the machine's state may differ between them."""
    units = sum(s["units"] for s in sessions)
    hosts = sorted({s["host"] for s in sessions})
    lo, hi = (min(s["load_avg"][0] for s in sessions), max(s["load_avg"][1] for s in sessions)) if sessions else (0, 0)
    line = (f"Units: {units} from {len(sessions)} session(s) on {len(hosts)} host(s) ({', '.join(hosts)}), "
            f"threads {sorted({s['threads'] for s in sessions})}, load average {lo:.2f} to {hi:.2f} over the units.")
    if len(sessions) > 1:
        line += (" A resumed run: its units were timed in different sessions, so absolute tokens/s may shift "
                 "between them; the paired ratios within a prompt are what to read (per session: "
                 + "; ".join(f"{s['host']} {s['units']} units, load {s['load_avg'][0]:.2f} to {s['load_avg'][1]:.2f}"
                             for s in sessions) + ").")
    return line


def plot(res: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Top: the probe score (the quality bar; dashed: one item below the exact sampler's, the parity line).
    # Bottom: token agreement with the exact sampler. x: speedup over it, median over prompts with [min, max].
    n = len(res["runs"])
    fig, axes = plt.subplots(2, n, figsize=(6.5 * n + 4.5, 8.0), squeeze=False, sharex="col")
    markers = "osD^v<>P*X"
    for col, run in enumerate(res["runs"]):
        top, bottom = axes[0][col], axes[1][col]
        for i, r in enumerate(run["rows"]):
            lo, hi = r["speedup_range"]
            style = {"fmt": markers[i % len(markers)], "color": plt.cm.tab20(i % 20), "capsize": 2}
            xerr = [[r["speedup"] - lo], [hi - r["speedup"]]]
            if r["probe_score"] is not None:
                ci = r.get("probe_ci") or [r["probe_score"]] * 2
                top.errorbar(r["speedup"], r["probe_score"], xerr=xerr,
                             yerr=[[r["probe_score"] - ci[0]], [ci[1] - r["probe_score"]]], alpha=0.85, **style)
            probe = f" (probe {r['probe_score']}/{r['probe_items']})" if r["probe_score"] is not None else ""
            bottom.errorbar(r["speedup"], r["agreement"], xerr=xerr, **style,
                            label=f"{r['strategy']}{probe}" if col == 0 else None)
        exact = next((r for r in run["rows"] if r["strategy"] == "exact"), None)
        if exact is not None and exact["probe_score"] is not None:
            top.axhline(exact["probe_score"] - 1, color="k", lw=0.6, ls="--")
        for ax in (top, bottom):
            ax.axvline(1.0, color="k", lw=0.6)
            ax.grid(alpha=0.3)
        top.set_ylabel(f"probe score (of {run['prompts']}, 95 % CI)")
        bottom.set_ylabel("token agreement with the exact sampler")
        bottom.set_xlabel("speedup over the exact sampler (median over prompts, [min, max])")
        top.set_title(f"{run['gen_length']} tokens, blocks of {run['block_length']}", fontsize=9)
    fig.legend(loc="center right", fontsize=6.5)
    fig.subplots_adjust(right=1 - 4.4 / (6.5 * n + 4.5))
    fig.suptitle(f"{res['model']}: whole generations ({res['threads']} thread, shared CPU)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_study(args, command: str, lm=None, prompts=None, keywords=None, chat: bool = True) -> dict:
    """The study for the script's parsed ``args``: one run per ``--gen-lengths`` entry; writes
    ``generation_frontier.json``, ``summary.md`` and ``generation_frontier.png`` to ``args.output_dir``, and each
    finished unit to its ``units.jsonl`` (a rerun reads them back; other settings are refused)."""
    from dllm_sparse.eval.studies.step_frontier import DATA, machine

    strategies = _with_exact([parse_generation_strategy(s) for s in args.strategies])
    load_before = os.getloadavg()[0]
    if lm is None:
        from dllm_sparse import load_model

        probe = [json.loads(line) for line in (DATA / "capability_probe.jsonl").open()][:args.prompts]
        if len(probe) < args.prompts:  # checked before the model loads
            raise ValueError(f"--prompts {args.prompts}: the capability probe has only {len(probe)} prompts; pass "
                             f"--prompts {len(probe)} or fewer")
        lm = load_model(args.model, dtype=args.dtype)
        prompts, keywords = [q["prompt"] for q in probe], [q["keywords"] for q in probe]
    run = run_fields(lm, threads=args.threads, chat=chat)
    units = UnitRows(args.output_dir / UNITS_FILE)
    if (args.output_dir / "generation_frontier.json").is_file() and units.path is not None and not units.done:
        raise IdentityMismatch(
            f"{args.output_dir} holds a generation_frontier.json without finished units ({UNITS_FILE}): a run made "
            "before resume existed (its answers' token ids, which agreement needs, were not kept), or one stopped "
            "before its first unit. Its results cannot be read back and a run here would overwrite them: use "
            "another --output-dir (or move generation_frontier.json away).")
    planned = {unit_key(n, i, s.name): unit_identity(run, _base_config(lm, n, args.block_length), s, p,
                                                     keywords[i] if keywords else None)
               for n in args.gen_lengths for i, p in enumerate(prompts) for s in strategies}
    units.check(planned, run)  # before anything is computed or written
    torch.set_num_threads(args.threads)
    print(f"{len(units.done)} finished units in {units.path}; {len(set(planned) - set(units.done))} of "
          f"{len(planned)} to run", flush=True)
    res: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "threads": args.threads, "command": command,
                           "machine": machine(), "session": units.session, "units_file": UNITS_FILE,
                           "load_before": load_before, "runs": []}
    args.output_dir.mkdir(parents=True, exist_ok=True)

    def write(run: dict, k: int) -> None:  # after every prompt: the rows so far, kept if the run is stopped
        res["runs"][k:] = [run]
        res["load_after"] = os.getloadavg()[0]
        res["units_computed"] = units.computed
        res["figure"] = plot(res, args.output_dir / "generation_frontier.png")
        atomic_write_text(args.output_dir / "generation_frontier.json", json.dumps(res, indent=1, default=str) + "\n")
        atomic_write_text(args.output_dir / "summary.md", summary_md(res))

    try:
        for k, n in enumerate(args.gen_lengths):
            run_generation_frontier(lm, prompts, keywords, strategies, gen_length=n, block_length=args.block_length,
                                    chat=chat, units=units, run=run, on_prompt=lambda r, k=k: write(r, k))
    finally:
        units.close()
    print(summary_md(res))
    return res
