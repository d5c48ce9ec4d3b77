"""The mask-reuse study (``experiments/mask_reuse.py``): recorders, overlap vs step gap, kernel timing on recorded
masks, one study cell (a site x policy run with its quality and cost numbers) and the policy table.

Definitions: ``docs/sparsification.md`` ("Mask reuse across denoising steps"), ``docs/mask_reuse.md``; the
policies are :mod:`dllm_sparse.samplers.reuse`, the teacher-forced replay :func:`dllm_sparse.samplers.replay`.

    settings = StudySettings(p=0.9, track_layers=[0, 10, 20, 29], gaps=[1, 2, 4, 8])
    row = run_cell(lm, prompt_ids, gcfg, "input", "every2", settings, out_dir, key, track=False,
                   kernel_layers=[], kernel_steps=[])
    table = derive(rows)          # agreement with fresh / dense, quality differences, cost ratios

Cells are keyed by every setting that changes their result (:func:`cell_key`), the loaded model's part of the
run identity included (:func:`model_fields`: weights hash, parameter dtype, device type; a bf16 rerun into an
fp32 folder computes its own cells), and appended as resumable rows (:mod:`dllm_sparse.eval.rows`). A folder
of cells keyed before the model fields were part of the key is refused (:func:`check_cell_keys`).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dllm_sparse.eval.identity import run_identity
from dllm_sparse.eval.rows import atomic_write_csv
from dllm_sparse.models.loading import LoadedModel
from dllm_sparse.samplers import (
    GenerationCallback,
    GenerationConfig,
    MaskOverlapTracker,
    generate,
    mask_overlap,
    prediction_agreement,
    replay,
    trajectory_of,
)
from dllm_sparse.samplers.reuse import ReusePolicy, make_policy, reuse_sparsity
from dllm_sparse.sparsity.rules import TopP
from dllm_sparse.sparsity.sites import FFNSite

__all__ = [
    "StudySettings", "GroupRecorder", "KernelRecorder", "diffusion_overlap_rows", "ar_overlap_rows",
    "step_matrix", "time_masks", "ffn_weights", "cell_key", "key_hash", "model_fields", "check_cell_keys",
    "MODEL_FIELDS", "passage_trajectories", "run_cell",
    "agreement", "edit_similarity", "first_divergence", "derive", "TABLE_COLS", "OVERLAP_COLS", "n_layers",
    "spread",
]

OVERLAP_COLS = ["model", "kind", "site", "p", "layer", "gap", "group", "same_block", "jaccard", "recall",
                "positions"]


@dataclass
class StudySettings:
    """The settings every cell of one study shares (the command line of ``experiments/mask_reuse.py``).

    ``p``: top-p threshold of every cell, ``scope`` its scope (``token``, or a shared ``step`` / ``step_wina``
    keep-set, which a policy then reuses as one set per sample); ``new_positions`` and the ``probe_*`` fields go
    to the policies (:func:`dllm_sparse.samplers.reuse.make_policy`); ``track_layers`` / ``gaps``: layers of the overlap
    tracker and the step gaps of the overlap analysis (``fresh`` runs); ``kernel_repeats``: timing repeats;
    ``teacher_forced``: also replay the dense trajectory with every policy; ``passage_ids`` /
    ``passage_trajectory``: prompts and reveal order of the likelihood check (:func:`passage_trajectories`;
    empty = skipped); ``keywords``: per prompt the expected keywords of the task metric (None = skipped).
    """

    p: float = 0.9
    scope: str = "token"  # "step" / "step_wina": one keep-set per sample and step (docs/sparsification.md)
    new_positions: str = "fresh"
    probe_layer: int | str = "middle"
    probe_region: str = "generated"
    probe_positions: int | None = None
    probe_metric: str = "jaccard"
    track_layers: list[int] = field(default_factory=list)
    gaps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    kernel_repeats: int = 3
    teacher_forced: bool = False
    passage_ids: list[list[int]] = field(default_factory=list)
    passage_trajectory: list[dict] = field(default_factory=list)
    keywords: list[list[str]] | None = None

    @property
    def rule(self) -> TopP:
        """The top-p rule of every cell: ``TopP(p, scope=scope)``."""
        return TopP(self.p, scope=self.scope)

    def policy(self, spec: str) -> ReusePolicy:
        """A fresh policy object for ``spec`` (``fresh``, ``every2``, ``adaptive0.7``, ...) with these settings."""
        adaptive = {"probe_layer": self.probe_layer, "probe_positions": self.probe_positions,
                    "metric": self.probe_metric, "probe_region": self.probe_region}
        return make_policy(spec, new_positions=self.new_positions, **(adaptive if spec.startswith("adaptive") else {}))


def n_layers(model) -> int:
    from dllm_sparse.models.families import find_ffns

    return len(find_ffns(model))


def spread(n: int, k: int) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


# --------------------------------------------------------------------------------------------------------
# callbacks that record what the analysis needs
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# overlap vs gap
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# kernel timing on recorded masks
# --------------------------------------------------------------------------------------------------------


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
    if site != "input":
        mods = [ffn.down]
    else:  # a fused [gate; up] projection is one matrix whose columns the input mask skips
        mods = [ffn.gate_up] if ffn.gate_up is not None else [ffn.gate, ffn.up]
    return [m.weight.detach().t().contiguous() for m in mods]


def _time_point(x, ws, keep, rule, repeats, matmul) -> tuple[float, float, float, float]:
    """(dense, union GEMM, per-token GEMVs, selection) seconds for one step's tokens and masks."""
    T = x.shape[0]
    dense = _median_time(lambda: [x @ w for w in ws], repeats)
    union = _median_time(lambda: [matmul(x, w, keep=keep) for w in ws], repeats)
    per_token = _median_time(lambda: [matmul(x[t:t + 1], w, keep=keep[t:t + 1]) for w in ws for t in range(T)],
                             repeats)
    # step_wina weighs by weight-column norms: time its selection with unit norms (the same work)
    kw = {"column_norm": torch.ones(x.shape[-1], dtype=torch.float64)} if rule.scope == "step_wina" else {}
    select = _median_time(lambda: rule.mask(x, **kw), repeats)
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


# --------------------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------------------


#: The loaded model's fields of every cell key (:func:`model_fields`).
MODEL_FIELDS = ("weights", "dtype", "device_type")


def model_fields(lm: LoadedModel) -> dict[str, str]:
    """The loaded model's part of a cell's identity (:func:`dllm_sparse.eval.identity.run_identity`): the hash
    of its weights, the dtype of its parameters and its device type."""
    ident = run_identity(lm)
    return {f: ident.get(f) for f in MODEL_FIELDS}


def cell_key(**fields) -> str:
    """The key of a cell: every setting that changes its result, as canonical JSON; give the model's
    :func:`model_fields` among them."""
    return json.dumps(fields, sort_keys=True, default=str)


def check_cell_keys(done: dict[str, dict], path: Path | str) -> None:
    """Refuse a folder whose cells were keyed without the model fields (weights, dtype, device type): their
    numbers could belong to another dtype or other weights, and they would never match a key again."""
    old = [k for k in done if not all(f in json.loads(k) for f in MODEL_FIELDS)]
    if old:
        raise RuntimeError(
            f"{path} holds {len(old)} cells keyed without the model's weights hash, dtype and device type (written "
            f"by an older version); they cannot be told apart from cells of another dtype or other weights. Start "
            f"a fresh --output-dir (or move {Path(path).name} away).")


def key_hash(key: str) -> str:
    """A short, file-name-safe digest of a cell key (names the per-cell files)."""
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def passage_trajectories(tok, gcfg: GenerationConfig, n: int, prompt_len: int, seed: int):
    """Built-in held-out passages as (prompt ids, trajectory): the first ``prompt_len`` tokens are the prompt, the
    next ``gen_length`` the answer, written block by block in a random order seeded per passage (the sampler's
    n // s (+1) tokens per step). The same order serves every configuration (common random numbers)."""
    from dllm_sparse.eval.tasks.builtin import load_builtin_passages
    from dllm_sparse.samplers import num_transfer_tokens, resolve_geometry

    geometry = resolve_geometry(gcfg)
    G, bl = geometry.gen_length, geometry.block_length
    counts = num_transfer_tokens(torch.full((1, 1), bl), geometry.steps_per_block)[0].tolist()
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


def run_cell(lm: LoadedModel, prompt_ids, gcfg: GenerationConfig, site: str | None, policy_spec: str | None,
             settings: StudySettings, out_dir: Path, key: str, track: bool, kernel_layers, kernel_steps,
             dense_row: dict | None = None) -> dict:
    """One cell: dense (``site=None``) or ``site`` x ``policy_spec`` at ``settings.p``. Generates greedily with
    the policy, records its counts and sparsity, with ``track`` the overlap files (under ``out_dir``, named by
    :func:`key_hash` of ``key``), with ``kernel_layers`` the kernel timings, with ``settings.teacher_forced`` the
    replay of the dense trajectory (``dense_row``), with passages the NLL along their reveal order, with
    keywords the task metric. Returns the row's measurements (JSON-able)."""
    model = lm.model
    t0 = time.perf_counter()
    row: dict[str, Any] = {}
    if site is None:  # dense
        out = generate(lm, prompts=prompt_ids, config=gcfg)
    else:
        policy = settings.policy(policy_spec)
        tracker = groups = krec = None
        observers, callbacks = [], []
        if track:
            tracker = MaskOverlapTracker(layers=settings.track_layers, sites=[site], store=True)
            groups = GroupRecorder()
            observers.append(tracker)
            callbacks += [tracker, groups]
        if kernel_layers and lm.kind == "diffusion":
            krec = KernelRecorder(kernel_layers, kernel_steps, policy)
            observers.append(krec)
        sp, policy = reuse_sparsity(site, settings.rule, policy, mask_observers=observers)
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
            row.update(_overlap_files(tracker, groups, lm, site, settings, gcfg, out_dir, key))
        if krec is not None:
            row.update(time_masks(model, str(FFNSite.parse(site)), settings.rule, krec, settings.kernel_repeats))
    if settings.teacher_forced and lm.kind == "diffusion":
        if site is None:
            row["trajectory"] = trajectory_of(out)
            row["tf_pred"] = replay(lm, prompt_ids, row["trajectory"], gcfg).predictions()
        elif dense_row is not None and dense_row.get("trajectory"):
            sp2, pol2 = reuse_sparsity(site, settings.rule, settings.policy(policy_spec))
            row["tf_pred"] = replay(lm, prompt_ids, dense_row["trajectory"], gcfg, sparsity=sp2,
                                    callbacks=[pol2]).predictions()
            row["tf_agreement_vs_dense"] = prediction_agreement(row["tf_pred"], dense_row["tf_pred"])
    if settings.passage_trajectory and lm.kind == "diffusion":
        sp_pol = () if site is None else reuse_sparsity(site, settings.rule, settings.policy(policy_spec))
        rep_p = replay(lm, settings.passage_ids, settings.passage_trajectory, gcfg, callbacks=sp_pol)
        row["elbo_nll_per_token"] = rep_p.nll_per_token
    if settings.keywords:
        hits = [any(k.lower() in text.lower() for k in kws) for text, kws in zip(out.texts, settings.keywords,
                                                                                  strict=True)]
        row["task_acc"] = float(np.mean(hits))
    row.update({"generated": out.sequences[:, out.prompt_length:].tolist(), "texts": out.texts, "nfe": out.nfe,
                "gen_wall_s": out.wall_time, "cell_s": time.perf_counter() - t0})
    return row


def _overlap_files(tracker: MaskOverlapTracker, groups: GroupRecorder, lm: LoadedModel, site: str,
                   settings: StudySettings, gcfg: GenerationConfig, out_dir: Path, key: str) -> dict:
    """Write the overlap-vs-gap rows, the tracker rows and (diffusion) the step matrix of a ``fresh`` cell;
    returns their paths relative to ``out_dir``."""
    row: dict[str, Any] = {}
    sname = str(FFNSite.parse(site))
    if lm.kind == "diffusion":
        ov = diffusion_overlap_rows(tracker, groups, settings.track_layers, sname, settings.gaps)
        mid = settings.track_layers[len(settings.track_layers) // 2]
        mat = step_matrix(tracker, groups, mid, sname)
        np.save(out_dir / "overlap_steps" / f"{key_hash(key)}_stepmatrix_L{mid}.npy", mat)
        row["step_matrix"] = f"overlap_steps/{key_hash(key)}_stepmatrix_L{mid}.npy"
        row["step_matrix_layer"] = mid
    else:
        ov = ar_overlap_rows(tracker, settings.track_layers, sname, gcfg.max_new_tokens, settings.gaps)
    base = {"model": lm.name, "kind": lm.kind, "site": sname, "p": settings.p}
    atomic_write_csv(out_dir / "overlap_cells" / f"{key_hash(key)}.csv", [{**base, **r} for r in ov], OVERLAP_COLS)
    tracker.to_csv(out_dir / "overlap_steps" / f"{key_hash(key)}.csv")
    row["overlap_file"] = f"overlap_cells/{key_hash(key)}.csv"
    row["tracker_file"] = f"overlap_steps/{key_hash(key)}.csv"
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


# --------------------------------------------------------------------------------------------------------
# the policy table
# --------------------------------------------------------------------------------------------------------


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
            t["tf_agreement_vs_fresh"] = prediction_agreement(r["tf_pred"], fresh["tf_pred"])
        if r.get("dense_s"):
            t["union_vs_dense"] = r["step_union_s"] / r["dense_s"]
            t["per_token_vs_dense"] = r["step_per_token_s"] / r["dense_s"]
            t["select_vs_dense"] = r["select_s"] / r["dense_s"]
        table.append(t)
    return table
