"""Step-delta FFN: keep each position's FFN values from earlier steps and recompute only the largest change.

    from dllm_sparse.samplers import GenerationConfig, generate
    from dllm_sparse.samplers.step_delta import StepDelta, step_delta

    with step_delta(model, StepDelta("input", fraction=0.25, down_fraction=0.5)) as delta:
        out = generate(model, tok, prompts, GenerationConfig(gen_length=64, steps=64, block_length=32))
    delta.report()      # FFN multiply-adds per step vs dense, refresh steps, (with measure=True) drift per layer

While the FFNs are swapped (inside the ``with`` block, or from :func:`apply_step_delta` to
:func:`~dllm_sparse.kernels.restore_ffn`), every generation of that model runs the delta: the swapped FFNs name
their run as their ``generation_callback`` and the generators run it with the callbacks they are given
(:func:`dllm_sparse.steps.attached_callbacks`), so ``callbacks=[delta]`` is optional (and runs it once). Passing a
run to a generation of another model, or after its FFNs were restored, is refused: that model would run dense.

Why. Per-token activation masks skip nothing on a denoising step (the canvas is a batch: the union of its
tokens' masks is dense) and a keep-set shared by the step's positions zeroes features the model needs. But
between two steps of a masked-diffusion sampler a position's FFN input barely changes unless its own token
changed. So instead of zeroing weak activations, keep what did not change and recompute only the change, with
one set of features per sample shared by its positions, which runs as dense matmuls over gathered weights.

Definitions (``docs/sparsification.md``, "Step-delta FFN"). The FFN is y = W_down (act(W_gate x) * (W_up x)),
x of size d, the intermediate h of size d_ff. Per FFN and forward row (sample), the cache holds, for every
position, x_c, g_c = W_gate x_c, u_c = W_up x_c, h_c = act(g_c) * u_c and y_c (the intermediate variant reads only
h_c and y_c and keeps only those current between refreshes).

* A **refresh** (the refresh policy's step, the first step of a generation, or any call outside one) is a dense
  step: every value is computed and cached.
* **Intermediate delta** (``variant="intermediate"``, ``fraction`` f = |S| / d_ff): S is chosen from the cache
  (``select="contribution"``: the features with the largest summed cached contribution |h_c,i| * ||W_down[:, i]||
  over the sample's positions; ``select="oracle"``, a measurement reference only: the largest exact change
  |h_t,i - h_c,i| * ||W_down[:, i]||, which costs the full gate and up matmuls). Then
  h_t[S] = act(W_gate[S] x_t) * (W_up[S] x_t), y_t = y_c + W_down[:, S] (h_t[S] - h_c[S]); h_c[S] and y_c are
  updated. Features outside S keep their cached contribution (nothing is zeroed).
  ``select="held"``: the same contribution rule, applied once at the refresh (over the refresh's h and the
  positions the delta will cover) and S held until the next refresh. Between refreshes h_c changes only on S and
  on recomputed rows, so the set a per-step choice would make moves little; holding it lets the refresh pack
  W_gate[S], W_up[S] and W_down[:, S] once and keep h_c[S] as its own [T, |S|] tensor, so a delta step is three
  dense matmuls of width |S| and elementwise work on [T, |S|] (no per-step scoring, top-k, gather or scatter over
  [T, d_ff]).
  Work: 3 d |S| multiply-adds per position (dense: 3 d d_ff).
* **Input delta** (``variant="input"``, ``fraction`` f = |S_x| / d, ``down_fraction`` f_h = |S_h| / d_ff):
  dx = x_t - x_c is exact and cheap, so S_x holds the input features with the largest summed
  |dx_j| * ||[W_gate; W_up][:, j]||; g_c += W_gate[:, S_x] dx[S_x], u_c likewise, x_c[S_x] = x_t[S_x] (so
  g_c = W_gate x_c holds at every step, and the change left out waits in dx for a later step). h = act(g_c) * u_c
  is then exact for x_c (elementwise), S_h holds the features with the largest summed |h - h_c| * ||W_down[:, i]||,
  and y_t = y_c + W_down[:, S_h] (h - h_c)[S_h]; h_c[S_h] and y_c are updated. Work: (2 d_ff |S_x| + d |S_h|)
  multiply-adds per position.
* Positions whose token changed since the last step (newly decoded: mask -> token; read from the sampler's
  step state) are recomputed exactly, densely, and refresh their rows of the cache (a few rows per step).
  Their change is not a delta: their input changed completely.
* Sets are chosen per forward row (a sample; with classifier-free guidance the conditional and unconditional
  rows each get their own), and only real positions vote (not padding).

Measured per forward: FFN work = multiply-adds done / dense multiply-adds of the same rows (selection, cache
updates and elementwise work are not multiply-adds; their cost shows in timings). With ``measure=True`` each
call also computes the exact dense y of its input and records the drift ||y_t - y_exact|| / ||y_exact|| (over the
sample's real positions) per layer and step: the measurement path, which costs a dense FFN on top.

The cache is state of the FFN path (this module), not of the sampler: the sampler only tells the callback the
step, the block and which positions are masked (:class:`~dllm_sparse.steps.StepState`). A cache never crosses
generations; inside one, a call whose shape, dtype or device differs from the cache is refused (never a silent
dense or stale run). Masked diffusion only: an AR loop sees every position once (nothing to reuse).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dllm_sparse.kernels.sparse_ffn import SparsePart, is_accelerated, restore_ffn, role_path
from dllm_sparse.models.families import detect_family, find_ffns
from dllm_sparse.sparsity.hooks import align_positions, select_layers
from dllm_sparse.steps import GenerationCallback, StepState

from .reuse import ReusePolicy, make_policy
from .step_delta_ffn import SELECTORS, VARIANTS, StepDelta, StepDeltaFFN

__all__ = ["StepDelta", "StepDeltaRun", "step_delta", "apply_step_delta", "VARIANTS", "SELECTORS"]

@dataclass
class StepDeltaRun(GenerationCallback):
    """The callback side of a step-delta FFN: every generation of the swapped model runs it (the swapped FFNs name it
    as their ``generation_callback``; passing it in ``callbacks=`` too is fine). It learns the step (and decides
    refreshes with the policy), and collects the counts :meth:`report` returns."""

    config: StepDelta
    measure: bool = False
    policy: ReusePolicy = field(init=False)
    state: StepState | None = field(default=None, init=False)
    refresh: bool = field(default=True, init=False)
    ffns: list[StepDeltaFFN] = field(default_factory=list, init=False)
    model: Any = field(default=None, init=False, repr=False, compare=False)  # what apply_step_delta swapped

    def __post_init__(self):
        self.policy = make_policy(self.config.refresh)
        self.reset_counts()

    def reset_counts(self) -> None:
        self.steps: list[dict] = []  # per step: step, refresh, macs, dense_macs
        self.drift: dict[int, list[tuple[int, float]]] = {}  # layer -> [(step, drift)]
        self._first = True
        self._masked: torch.Tensor | None = None  # the forward's "masked" group at the previous step
        self._exact: torch.Tensor | None = None
        self._block: slice | None = None
        self._rows: slice | None = None  # the canvas rows of this step's forward (a block cache), None = all

    # ---- callback ----------------------------------------------------------------------------------------
    def on_generation_begin(self, state: StepState) -> None:
        if state.kind != "diffusion":
            raise ValueError(f"a step-delta FFN needs a masked-diffusion sampler, got a {state.kind!r} generation: an "
                             "autoregressive loop feeds every position once, so there is no earlier value to reuse")
        self._check_model(state.model)
        for f in self.ffns:
            f.cache = None
        self._first = True
        self._masked = self._exact = None

    def _check_model(self, model: Any) -> None:
        """Refuse a generation whose model does not hold this run's FFNs: it would run dense, and nothing would be
        measured."""
        if model is None or not self.ffns:
            return
        inside = {id(m) for m in model.modules()} if isinstance(model, nn.Module) else set()
        if all(id(f) in inside for f in self.ffns):
            return
        applied = _model_name(self.model)
        if isinstance(self.model, nn.Module) and all(id(f) in {id(m) for m in self.model.modules()}
                                                     for f in self.ffns):
            raise ValueError(f"this step-delta run ({self.config.name}) belongs to {applied}, but the generation "
                             f"runs {_model_name(model)}, which does not hold its FFNs: that model would run dense. "
                             f"Generate {applied} (its generations run the delta by themselves), or apply a step "
                             "delta to this model: with step_delta(model, ...)")
        raise ValueError(f"this step-delta run ({self.config.name}) was restored: its FFNs are no longer in "
                         f"{applied} (the `with step_delta(...)` block ended, or restore_ffn ran), so "
                         f"{_model_name(model)} would run dense. Generate inside the with block")

    def on_step_begin(self, state: StepState) -> None:
        self.state = state
        self.refresh = self._first or bool(self.policy.refresh_step(state))
        self._first = False
        # Positions whose token changed since the last step: their cached rows are recomputed densely (with
        # exact_block the whole current block is, and they lie inside it). Decided once per step (one host sync),
        # not per layer: every layer's cache rows are written at every step.
        # whole canvas (the forward may compute only some rows: ``state.rows``), one row per forward row
        masked = state.for_forward(state.masked) if state.masked is not None else None
        self._rows = state.rows
        exact = None
        if masked is not None and self._masked is not None and masked.shape == self._masked.shape:
            exact = self._masked & ~masked
        self._exact = exact if exact is not None and bool(exact.any()) else None
        self._masked = masked
        self._block = state.block_slice if self.config.exact_block else None
        self.steps.append({"step": int(state.step), "refresh": self.refresh, "macs": 0, "dense_macs": 0})

    def on_step_end(self, state: StepState) -> None:
        self.state = None

    def on_generation_end(self, state: StepState) -> None:
        self.state = None
        for f in self.ffns:
            f.cache = None

    # ---- what the FFNs ask --------------------------------------------------------------------------------
    def rows_of(self, x: torch.Tensor) -> slice | None:
        """The canvas rows x holds when the step's forward computes only some (a block cache), else None."""
        rows = self._rows if self.state is not None else None
        if rows is not None and x.shape[1] != rows.stop - rows.start:
            raise ValueError(f"step-delta FFN: the step computes canvas rows {rows.start}..{rows.stop - 1} but the FFN "
                             f"sees {x.shape[1]} positions")
        return rows

    def _on_rows(self, mask: torch.Tensor) -> torch.Tensor:
        return mask if self._rows is None else mask[:, self._rows]

    def exact_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """[B_fwd, T] positions decoded (mask -> token) since the previous step, aligned to x (None if none)."""
        return None if self._exact is None else align_positions(self._on_rows(self._exact), x, "exact rows")

    def block_slice(self, x: torch.Tensor) -> slice | None:
        """The current block's positions in x's token dimension (right-aligned to the canvas, or relative to the
        rows a block cache computes), or None."""
        if self._block is None:
            return None
        if self._rows is not None:
            first = self._rows.start
            return slice(max(self._block.start - first, 0), min(self._block.stop - first, x.shape[1]))
        return self._block if x.shape[1] >= self._block.stop else None

    def real_positions(self, x: torch.Tensor) -> torch.Tensor:
        am = self.state.attention_mask if self.state is not None else None
        out = None if am is None else align_positions(self._on_rows(am.bool()), x, "attention_mask")
        return out if out is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def count(self, macs: int, dense_macs: int) -> None:
        if self.steps:
            self.steps[-1]["macs"] += int(macs)
            self.steps[-1]["dense_macs"] += int(dense_macs)

    def record_drift(self, layer: int, y: torch.Tensor, exact: torch.Tensor, real: torch.Tensor) -> None:
        err = ((y - exact).float().pow(2).sum(-1) * real).sum()
        ref = (exact.float().pow(2).sum(-1) * real).sum()
        step = int(self.state.step) if self.state is not None else -1
        self.drift.setdefault(layer, []).append((step, float((err / ref.clamp_min(1e-30)).sqrt())))

    # ---- results --------------------------------------------------------------------------------------------
    def _check_ran(self) -> None:
        if not self.steps:
            raise RuntimeError(f"no generation step ran with this step-delta run ({self.config.name}), so there is "
                               f"nothing to report: generate {_model_name(self.model)} inside the "
                               "`with step_delta(model, ...)` block (or between apply_step_delta and restore_ffn); "
                               "its generations run the delta by themselves")

    def ffn_work(self) -> float:
        """Mean over steps of (multiply-adds done / dense multiply-adds), refresh steps included. ``RuntimeError``
        when no generation step ran."""
        self._check_ran()
        fr = [s["macs"] / s["dense_macs"] for s in self.steps if s["dense_macs"]]
        return sum(fr) / len(fr) if fr else float("nan")

    def report(self) -> dict[str, Any]:
        """Steps, refresh steps, FFN work (and with ``measure=True`` drift). ``RuntimeError`` when no generation
        step ran with this run (never a report of zero steps)."""
        self._check_ran()
        delta_steps = [s for s in self.steps if not s["refresh"] and s["dense_macs"]]
        out = {**self.config.describe(), "name": self.config.name, "steps": len(self.steps),
               "refresh_steps": [s["step"] for s in self.steps if s["refresh"]],
               "ffn_work": self.ffn_work(),
               "ffn_work_delta_steps": (sum(s["macs"] / s["dense_macs"] for s in delta_steps) / len(delta_steps)
                                        if delta_steps else None)}
        if self.drift:
            all_d = [v for series in self.drift.values() for _, v in series]
            out["drift_mean"] = sum(all_d) / len(all_d)
            out["drift_max"] = max(all_d)
            out["drift_per_layer"] = {lay: sum(v for _, v in s) / len(s) for lay, s in sorted(self.drift.items())}
        return out


def _model_name(model: Any) -> str:
    """A model as error messages name it: class, checkpoint path when known, and id (two models of one class differ)."""
    if model is None:
        return "no model"
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"{type(model).__name__}{f' {path!r}' if path else ''} (id {id(model):#x})"


def apply_step_delta(model: nn.Module, config: StepDelta | None = None, *, measure: bool = False,
                     **kwargs) -> StepDeltaRun:
    """Swap every selected FFN of ``model`` (in place) for a step-delta FFN; returns its run, which every generation
    of ``model`` (:func:`dllm_sparse.samplers.generate`, :func:`~dllm_sparse.samplers.replay`) drives until the
    FFNs are restored (giving it in ``callbacks=`` as well is fine). Undo with
    :func:`dllm_sparse.kernels.restore_ffn`. ``StepDelta`` fields may be given as keywords instead of ``config``.
    ``measure=True`` also computes the dense FFN at every call and records the drift (the measurement path)."""
    if config is None:
        config = StepDelta(**kwargs)
    elif kwargs:
        raise TypeError(f"give a StepDelta or its fields as keywords, not both (got {sorted(kwargs)})")
    if not isinstance(config, StepDelta):
        raise TypeError(f"config must be a StepDelta, got {type(config).__name__}")
    profile = detect_family(model)
    if profile.kind != "diffusion":
        raise ValueError(f"a step-delta FFN is for masked-diffusion models; {profile.family!r} is {profile.kind!r}: "
                         "an autoregressive loop feeds every position once, so there is no earlier value to reuse")
    if is_accelerated(model):
        raise ValueError("this model's FFNs are already swapped (accelerate_ffn or step delta); call "
                         "restore_ffn(model) first")
    ffns = select_layers(find_ffns(model, profile), config.layers)
    for ffn in ffns:
        if ffn.gate_up is not None:
            raise ValueError(f"layer {ffn.layer} ({profile.family}): a fused gate_up projection is not supported by "
                             "the step-delta FFN yet; it needs separate gate and up projections")
        for role in ("gate", "up", "down"):
            m = getattr(ffn, role)
            if not isinstance(m, nn.Linear) or m.weight.is_meta:
                raise ValueError(f"layer {ffn.layer}: the {role} projection must be an nn.Linear with real weights "
                                 f"(got {type(m).__name__}); dequantise or load the model onto one device first")
    run = StepDeltaRun(config, measure=measure)
    run.model = model
    swaps = []
    for ffn in ffns:
        delta = StepDeltaFFN(ffn, config, run)
        run.ffns.append(delta)
        for role in ("gate", "up", "down"):
            parent, name = role_path(ffn, role)
            swaps.append((parent, name, SparsePart(delta, role, getattr(parent, name))))
    for parent, name, part in swaps:
        setattr(parent, name, part)
    return run


@contextmanager
def step_delta(model: nn.Module, config: StepDelta | None = None, *, measure: bool = False,
               **kwargs) -> Iterator[StepDeltaRun]:
    """``with step_delta(model, StepDelta(...)) as delta: generate(model, ...)`` - swap in, restore on exit (also
    when the body raises). Every generation of ``model`` inside the block runs the delta (``callbacks=[delta]`` is
    optional); ``delta.report()`` after it."""
    run = apply_step_delta(model, config, measure=measure, **kwargs)
    try:
        yield run
    finally:
        restore_ffn(model)
