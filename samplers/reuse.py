"""Mask reuse across denoising steps: compute FFN keep-masks on some steps only and reuse them on the others.

    from dllm_sparse import TopP
    from dllm_sparse.samplers.reuse import Every, reuse_sparsity
    from dllm_sparse.samplers import GenerationConfig, generate

    sp, policy = reuse_sparsity("input", TopP(0.9), Every(4))
    out = generate(model, tok, prompts, GenerationConfig(gen_length=64, steps=64, block_length=16),
                   sparsity=sp, callbacks=[policy])
    policy.report()        # {"policy": "every4", "selections": ..., "selections_per_layer": {...}, ...}

A policy is two things at once and plugs in without touching a sampler (``docs/sparsification.md``, "Mask
reuse across denoising steps"):

* a :data:`~dllm_sparse.sparsity.hooks.MaskSelector` (``StepSparsity(select_mask=policy)``): called by the hooks
  with ``(layer, site, x, rule)`` at every selection, it returns either a fresh keep-mask ``rule.mask(x)`` or
  the cached one;
* a :class:`~dllm_sparse.samplers.GenerationCallback` (``callbacks=[policy]``): it learns the step, the block
  and which canvas positions are still masked, and decides at every step whether to refresh.

Policies:

===================  =====================================================================================
``Fresh()``          a fresh selection at every step (the paper's setting; the reference of every comparison)
``Every(k)``         refresh at steps 0, k, 2k, ... of every block (the count restarts at each block)
``BlockStart()``     refresh at the first step of each block only
``Adaptive(bound)``  refresh at each block start and whenever a cheap probe says the cached masks went stale:
                     at every other step the rule also runs on the probe layer (default: the middle
                     sparsified layer; generated positions, optionally a sample) and the mean overlap
                     (Jaccard by default) between that fresh mask and the cached one is compared with
                     ``bound``; below it, the probe layer and every later layer refresh in this forward,
                     the layers before the probe refresh at the next step.
===================  =====================================================================================

``Adaptive`` bounds: ``bound >= 1`` always refreshes (one probe layer cannot certify that every layer's
masks are unchanged, so a bound of 1 means "never trust the cache" and equals ``Fresh``); ``bound <= 0``
never refreshes after the block start (equals ``BlockStart``); neither runs the probe.

**Positions.** A reused mask applies to the very positions it was computed for: the canvas of a diffusion
sampler has a constant shape, so the cache holds one mask per (row, position) and is keyed by layer, site
and activation shape (classifier-free guidance doubles the forward batch, [cond; uncond], and simply gets
its own [2B, S, d] entry). Positions decoded since their cached mask was computed (mask token -> real token,
so their FFN input changed completely) get a fresh mask with ``new_positions="fresh"`` (default; the rule
runs on those positions only, a *partial selection*, and the cache is updated there) or keep the cached one
with ``new_positions="reuse"``.

**Shared scopes.** With a shared rule (``TopP(p, scope="step")``, docs/sparsification.md) a policy caches the
keep-set itself, one [B, 1, d] set per layer and site, and reuses it for every position (``new_positions`` does
not apply: there is no per-position mask). The same policy drives the fast path:
``accelerate_ffn(model, config, reuse=policy)`` with ``callbacks=[policy]`` keeps the weights packed for the set
too (:meth:`ReusePolicy.lookup_shared` / :meth:`ReusePolicy.store_shared`); ``Adaptive`` is masking-path only.

**Autoregressive runs.** A KV-cached AR loop feeds one new token per step, so no position is ever seen twice.
Reuse there means *the mask of the last token of the last refresh is reused for the following tokens* (the
prefill's last prompt token for ``BlockStart``, since an AR run is a single block whose step 0 is the
prefill); ``new_positions`` does not apply (every AR token is new: with "fresh" there would be no reuse).

**Counts.** :meth:`ReusePolicy.report` gives the number of mask selections (full: the rule ran on a layer's
whole activation), partial selections (on newly decoded positions only), probe selections (Adaptive), the
token-vectors the rule ran on and the token-vectors whose mask was reused, per layer and in total.

Outside a generation step (no ``on_step_begin`` seen, e.g. a plain ``sparsify`` forward) a policy selects
fresh masks. Caveat at p = 1: a reused identity mask keeps the entries that were non-zero at the refresh
step; activations with exact zeros that move would differ from dense (never seen with real activations).
"""

from __future__ import annotations

import math
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch

from dllm_sparse.samplers.step_sparsity import StepSparsity
from dllm_sparse.samplers.tracking import mask_overlap
from dllm_sparse.sparsity.rules import SHARED_SCOPES, SparsityRule
from dllm_sparse.sparsity.sites import FFNSite
from dllm_sparse.steps import GenerationCallback, StepState

__all__ = [
    "ReusePolicy", "Fresh", "Every", "BlockStart", "Adaptive", "make_policy", "reuse_sparsity", "NEW_POSITIONS",
]

NEW_POSITIONS = ("fresh", "reuse")


class _Entry:
    """One cached keep-mask with the positions' masked state when each position's mask was computed. A shared
    entry (``shared``) holds one keep-set per sample, [B, 1, d], and (on the fast path) ``payload``: the weights
    packed for it, so that a reused mask reuses the packed weights too."""

    __slots__ = ("keep", "masked", "step", "shared", "payload")

    def __init__(self, keep: torch.Tensor, masked: torch.Tensor | None, step: int, shared: bool = False,
                 payload: Any = None):
        self.keep, self.masked, self.step, self.shared, self.payload = keep, masked, step, shared, payload


def _is_shared(rule) -> bool:
    return getattr(rule, "scope", "token") in SHARED_SCOPES and hasattr(rule, "shared_keep")


class ReusePolicy(GenerationCallback, ABC):
    """Base class: a mask selector plus a generation callback. Subclasses implement :meth:`refresh_step`
    (and may override :meth:`_select_stale` for a per-layer decision, as :class:`Adaptive` does)."""

    name = "policy"
    # accelerate_ffn(..., reuse=policy) can drive this policy: its decision depends on the step only (Adaptive's
    # probe needs a fresh mask of a layer at every step, which the fast path does not compute).
    fast_path = True

    def __init__(self, new_positions: str = "fresh"):
        if new_positions not in NEW_POSITIONS:
            raise ValueError(f"new_positions must be one of {NEW_POSITIONS}, got {new_positions!r}")
        self.new_positions = new_positions
        self._cache: dict[tuple[int, str, tuple[int, ...]], _Entry] = {}
        self._state: StepState | None = None
        self._refresh = True
        self._kind = "diffusion"
        self.reset_counts()

    # ---- the decision -----------------------------------------------------------------------------------
    @abstractmethod
    def refresh_step(self, state: StepState) -> bool:
        """True when every layer computes fresh masks at this step."""

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "new_positions": self.new_positions}

    # ---- counts ---------------------------------------------------------------------------------------------
    def reset_counts(self) -> None:
        """Zero every counter (they accumulate over generations otherwise)."""
        self.selections: dict[int, int] = {}  # full selections per layer
        self.partial_selections: dict[int, int] = {}  # the rule ran on newly decoded positions only
        self.probe_selections: dict[int, int] = {}  # Adaptive's probe runs
        self.positions_selected: dict[int, int] = {}  # token vectors the rule ran on (full + partial + probe)
        self.positions_reused: dict[int, int] = {}  # token vectors whose mask came from the cache
        self.positions_total: dict[int, int] = {}  # token vectors seen
        self.calls: dict[int, int] = {}  # selector calls (forwards x layers)
        self.refresh_steps: list[int] = []  # steps at which the policy refreshed every layer
        self.steps_seen = 0

    @staticmethod
    def _bump(d: dict[int, int], layer: int, n: int = 1) -> None:
        d[layer] = d.get(layer, 0) + int(n)

    def total_selections(self) -> int:
        return sum(self.selections.values())

    def report(self) -> dict[str, Any]:
        """Counts per layer and in total (JSON-able)."""
        tot = sum(self.positions_total.values())
        return {
            **self.describe(),
            "steps": self.steps_seen,
            "selections": self.total_selections(),
            "partial_selections": sum(self.partial_selections.values()),
            "probe_selections": sum(self.probe_selections.values()),
            "positions_selected": sum(self.positions_selected.values()),
            "positions_reused": sum(self.positions_reused.values()),
            "positions_total": tot,
            "selected_fraction": sum(self.positions_selected.values()) / tot if tot else float("nan"),
            "selections_per_layer": dict(sorted(self.selections.items())),
            "partial_selections_per_layer": dict(sorted(self.partial_selections.items())),
            "probe_selections_per_layer": dict(sorted(self.probe_selections.items())),
            "refresh_steps": list(self.refresh_steps),
        }

    # ---- generation callback ---------------------------------------------------------------------------------
    def on_generation_begin(self, state: StepState) -> None:
        self._cache.clear()
        self._state = None
        self._kind = state.kind

    def on_step_begin(self, state: StepState) -> None:
        if getattr(state, "rows", None) is not None:
            raise ValueError(f"mask reuse ({type(self).__name__}) with a block cache: the step's forward computes "
                             f"only canvas rows {state.rows.start}..{state.rows.stop - 1}, while the reused masks "
                             "hold every position; generate with block_cache=None, or use StepSparsity / the "
                             "step-delta FFN, which follow the rows")
        self._state = state
        self.steps_seen += 1
        self._refresh = bool(self.refresh_step(state))
        if self._refresh:
            self.refresh_steps.append(int(state.step))

    def on_step_end(self, state: StepState) -> None:
        self._state = None

    def on_generation_end(self, state: StepState) -> None:
        self._state = None
        self._cache.clear()

    # ---- the mask selector -------------------------------------------------------------------------------------
    def __call__(self, layer: int, site: FFNSite, x: torch.Tensor, rule: SparsityRule) -> torch.Tensor:
        layer = int(layer)
        n_pos = int(x[..., 0].numel())
        self._bump(self.calls, layer)
        self._bump(self.positions_total, layer, n_pos)
        state = self._state
        key = self._key(layer, site, x)
        entry = self._cache.get(key)
        if state is None or entry is None or not self._compatible_entry(entry, x):
            return self._full(layer, key, x, rule)
        if self._refresh:
            return self._full(layer, key, x, rule)
        return self._select_stale(layer, key, entry, x, rule)

    def _key(self, layer: int, site, x: torch.Tensor) -> tuple:
        return (int(layer), str(site), tuple(x.shape[:-1]) if self._kind != "ar" else (x.shape[0], x.shape[-1]))

    # ---- the fast path (accelerate_ffn(..., reuse=policy)) --------------------------------------------------
    def lookup_shared(self, layer: int, site, x: torch.Tensor) -> _Entry | None:
        """The cached shared keep-set entry to reuse for this call of the fast path, or None when a fresh
        selection is due (a refresh step, no entry yet, outside a generation step). Counts the call."""
        layer = int(layer)
        n_pos = int(x[..., 0].numel())
        self._bump(self.calls, layer)
        self._bump(self.positions_total, layer, n_pos)
        entry = self._cache.get(self._key(layer, site, x))
        if self._state is None or self._refresh or entry is None or not entry.shared \
                or not self._compatible_entry(entry, x):
            return None
        self._bump(self.positions_reused, layer, n_pos)
        return entry

    def store_shared(self, layer: int, site, x: torch.Tensor, keep_set: torch.Tensor, payload: Any = None) -> None:
        """Cache a fresh shared keep-set [B, 1, d] (and its packed weights) selected by the fast path."""
        layer = int(layer)
        self._bump(self.selections, layer)
        self._bump(self.positions_selected, layer, x[..., 0].numel())
        step = int(self._state.step) if self._state is not None else -1
        self._cache[self._key(layer, site, x)] = _Entry(keep_set.detach(), None, step, shared=True, payload=payload)

    def _select_stale(self, layer: int, key, entry: _Entry, x: torch.Tensor, rule: SparsityRule) -> torch.Tensor:
        """A step without a refresh: the cached masks (plus fresh ones at newly decoded positions)."""
        return self._reuse(layer, key, entry, x, rule)

    def _compatible_entry(self, entry: _Entry, x: torch.Tensor) -> bool:
        keep = entry.keep
        if entry.shared:  # one keep-set per sample: [B, 1, d] for x [B, T, d]
            return keep.shape[-1] == x.shape[-1] and keep.device == x.device and keep.dim() == x.dim() \
                and keep.shape[:-2] == x.shape[:-2]
        return self._compatible(keep, x)

    def _compatible(self, keep: torch.Tensor, x: torch.Tensor) -> bool:
        if keep.shape[-1] != x.shape[-1] or keep.device != x.device:
            return False
        if self._kind == "ar":
            return keep.dim() == x.dim() and keep.shape[0] == x.shape[0]
        return keep.shape == x.shape

    def _masked_now(self, x: torch.Tensor) -> torch.Tensor | None:
        """[B_fwd, T] bool: positions holding the mask token at this forward (right-aligned), or None."""
        state = self._state
        if state is None or x.dim() != 3:
            return None
        g = state.groups.get("masked") if state.groups else None
        if g is None or g.shape[0] != x.shape[0] or g.shape[1] < x.shape[1]:
            return None
        return g[:, g.shape[1] - x.shape[1]:].to(device=x.device, dtype=torch.bool)

    def _full(self, layer: int, key, x: torch.Tensor, rule: SparsityRule) -> torch.Tensor:
        keep = rule.mask(x)
        self._bump(self.selections, layer)
        self._bump(self.positions_selected, layer, x[..., 0].numel())
        if _is_shared(rule) and x.dim() >= 2:
            # A shared scope caches the keep-set itself: reused, it is the same set for every position.
            step = int(self._state.step) if self._state is not None else -1
            self._cache[key] = _Entry(rule.shared_keep(x).detach(), None, step, shared=True)
        else:
            self._store(key, keep, x)
        return keep

    def _store(self, key, keep: torch.Tensor, x: torch.Tensor) -> None:
        step = int(self._state.step) if self._state is not None else -1
        if self._kind == "ar":  # the last token's mask stands for the following tokens
            self._cache[key] = _Entry(keep[..., -1:, :].detach(), None, step)
        else:
            self._cache[key] = _Entry(keep.detach(), self._masked_now(x), step)

    def _reused_keep(self, entry: _Entry, x: torch.Tensor) -> torch.Tensor:
        if entry.shared:
            return entry.keep.expand(x.shape)
        if self._kind == "ar":
            return entry.keep.expand(*x.shape[:-2], x.shape[-2], x.shape[-1])
        return entry.keep

    def _changed(self, entry: _Entry, x: torch.Tensor) -> torch.Tensor | None:
        """[B, T] positions decoded since their cached mask was computed (diffusion, new_positions='fresh')."""
        if self._kind == "ar" or self.new_positions != "fresh" or entry.masked is None or entry.shared:
            return None
        now = self._masked_now(x)
        if now is None:
            return None
        changed = entry.masked & ~now
        return changed if bool(changed.any()) else None

    def _reuse(self, layer: int, key, entry: _Entry, x: torch.Tensor, rule: SparsityRule,
               fresh: torch.Tensor | None = None) -> torch.Tensor:
        """Cached masks; positions decoded since (``new_positions="fresh"``) get fresh ones (from ``fresh`` when
        the caller already ran the rule on the whole activation, uncounted then)."""
        keep = self._reused_keep(entry, x)
        n_pos = int(x[..., 0].numel())
        changed = self._changed(entry, x)
        if changed is None:
            self._bump(self.positions_reused, layer, n_pos)
            return keep
        n_new = int(changed.sum())
        keep = keep.clone()
        if fresh is not None:
            keep[changed] = fresh[changed]
        else:
            if rule.scope == "token":
                keep[changed] = rule.mask(x[changed])
            else:  # a sequence-scope selection needs the whole sample: run it, take the new positions
                keep[changed] = rule.mask(x)[changed]
            self._bump(self.partial_selections, layer)
            self._bump(self.positions_selected, layer, n_new)
        self._bump(self.positions_reused, layer, n_pos - n_new)
        entry.keep = keep
        entry.masked = entry.masked & ~changed
        return keep


class Fresh(ReusePolicy):
    """Fresh masks at every step (no reuse): the paper's setting."""

    name = "fresh"

    def refresh_step(self, state: StepState) -> bool:
        return True


class Every(ReusePolicy):
    """Refresh at steps 0, k, 2k, ... of each block; ``Every(1)`` is :class:`Fresh`."""

    def __init__(self, k: int, new_positions: str = "fresh"):
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        super().__init__(new_positions)
        self.k = int(k)
        self.name = f"every{self.k}"

    def refresh_step(self, state: StepState) -> bool:
        return int(state.step_in_block) % self.k == 0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": self.k}


class BlockStart(ReusePolicy):
    """Refresh at the first step of each block (AR: at the prefill only)."""

    name = "block_start"

    def refresh_step(self, state: StepState) -> bool:
        return bool(state.first_step_of_block)


class Adaptive(ReusePolicy):
    """Refresh at block starts and when the probe's overlap between fresh and cached masks drops below ``bound``.

    ``probe_layer``: the layer whose fresh mask is compared: ``"middle"`` (default: the median of the layers
    seen in the generation's first forward; deep layers' masks drift faster than the first layer's, which
    sits right after the embedding and barely changes), ``"first"`` (the first sparsified layer of each
    forward, so a refresh covers the whole step with no lag) or a layer index. When the probe sits after other
    layers, those refresh at the next step (one step of lag). ``probe_region``: ``"generated"`` (default:
    canvas positions after the prompt, whose input changes while decoding) or ``"all"`` real positions; in
    both cases positions re-selected as newly decoded are left out. ``probe_positions``: compare only this
    many of them, evenly spaced (default: all); with a sample the probe costs a selection on those positions
    only (token-scope rules). ``metric``: ``"jaccard"`` or ``"recall"`` (of the fresh mask by the cached one).
    ``decisions`` lists {step, layer, overlap, refreshed} for every probe.
    """

    def __init__(self, bound: float = 0.7, probe_layer: int | str | None = "middle",
                 probe_positions: int | None = None, metric: str = "jaccard", probe_region: str = "generated",
                 new_positions: str = "fresh"):
        if metric not in ("jaccard", "recall"):
            raise ValueError(f"metric must be 'jaccard' or 'recall', got {metric!r}")
        if math.isnan(float(bound)):
            raise ValueError("bound must be a number")
        if probe_positions is not None and int(probe_positions) < 1:
            raise ValueError(f"probe_positions must be >= 1 or None, got {probe_positions!r}")
        if probe_region not in ("generated", "all"):
            raise ValueError(f"probe_region must be 'generated' or 'all', got {probe_region!r}")
        if probe_layer is None:
            probe_layer = "first"
        if isinstance(probe_layer, str) and probe_layer not in ("first", "middle"):
            raise ValueError(f"probe_layer must be 'first', 'middle' or a layer index, got {probe_layer!r}")
        super().__init__(new_positions)
        self.bound = float(bound)
        self.probe_layer: int | str = probe_layer if isinstance(probe_layer, str) else int(probe_layer)
        self.probe_positions = None if probe_positions is None else int(probe_positions)
        self.metric = metric
        self.probe_region = probe_region
        self.name = f"adaptive{self.bound:g}"
        self.decisions: list[dict] = []
        self._seen: set[int] = set()  # layers of the generation (from its first forward)
        self._step_probe: int | None = None  # the probe layer of the current step
        self._refresh_from: int | None = None  # layers >= this refresh in the current forward
        self._pending: set[int] = set()  # layers before the probe that refresh at their next call

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "bound": self.bound, "probe_layer": self.probe_layer,
                "probe_positions": self.probe_positions, "metric": self.metric, "probe_region": self.probe_region}

    def reset_counts(self) -> None:
        super().reset_counts()
        self.decisions = []

    fast_path = False  # the probe needs a fresh mask of one layer at every step: the masking path only

    def refresh_step(self, state: StepState) -> bool:
        return bool(state.first_step_of_block) or self.bound >= 1.0

    def on_generation_begin(self, state: StepState) -> None:
        super().on_generation_begin(state)
        self._pending.clear()
        self._seen.clear()

    def on_step_begin(self, state: StepState) -> None:
        super().on_step_begin(state)
        self._step_probe = None
        self._refresh_from = None
        if self._refresh:
            self._pending.clear()

    def __call__(self, layer: int, site: FFNSite, x: torch.Tensor, rule: SparsityRule) -> torch.Tensor:
        self._seen.add(int(layer))
        return super().__call__(layer, site, x, rule)

    def _probe_for(self, layer: int) -> int:
        if isinstance(self.probe_layer, int):
            return self.probe_layer
        if self.probe_layer == "middle" and self._seen:
            seen = sorted(self._seen)
            return seen[len(seen) // 2]
        if self._step_probe is None:  # "first": the first layer that reaches a stale selection in this step
            self._step_probe = layer
        return self._step_probe

    def _select_stale(self, layer: int, key, entry: _Entry, x: torch.Tensor, rule: SparsityRule) -> torch.Tensor:
        if self.bound <= 0.0:
            return self._reuse(layer, key, entry, x, rule)
        if layer in self._pending or (self._refresh_from is not None and layer >= self._refresh_from):
            self._pending.discard(layer)
            return self._full(layer, key, x, rule)
        if layer != self._probe_for(layer) or self._refresh_from is not None:
            return self._reuse(layer, key, entry, x, rule)
        # The probe: fresh mask on (a sample of) the reusable positions, compared with the cached one.
        sel = self._probe_positions(entry, x)
        full_probe = self.probe_positions is None or rule.scope != "token"
        fresh = rule.mask(x) if full_probe else None
        if sel is None or not bool(sel.any()):
            overlap = 1.0
        else:
            cached = self._reused_keep(entry, x)[sel]
            f = fresh[sel] if fresh is not None else rule.mask(x[sel])
            jac, rec = mask_overlap(f, cached)
            overlap = float((jac if self.metric == "jaccard" else rec).mean())
        refresh = overlap < self.bound
        step = int(self._state.step) if self._state is not None else -1
        self.decisions.append({"step": step, "layer": layer, "overlap": overlap, "refreshed": refresh})
        if refresh:
            self._refresh_from = layer
            self._pending = {lay for (lay, _, _) in self._cache if lay < layer}
            self.refresh_steps.append(step)
            if fresh is not None:  # the probe already ran the full selection: it becomes the new mask
                self._bump(self.selections, layer)
                self._bump(self.positions_selected, layer, x[..., 0].numel())
                self._store(key, fresh, x)
                return fresh
            return self._full(layer, key, x, rule)
        self._bump(self.probe_selections, layer)
        if fresh is not None:
            self._bump(self.positions_selected, layer, x[..., 0].numel())
        elif sel is not None:
            self._bump(self.positions_selected, layer, int(sel.sum()))
        return self._reuse(layer, key, entry, x, rule, fresh=fresh)

    def _probe_positions(self, entry: _Entry, x: torch.Tensor) -> torch.Tensor | None:
        """[B, T] bool: the real positions whose mask is reused (sampled down to ``probe_positions``)."""
        if x.dim() < 2:
            return None
        lead = x.shape[:-1]
        sel = torch.ones(lead, dtype=torch.bool, device=x.device)
        state = self._state
        if state is not None and state.attention_mask is not None and x.dim() == 3:
            am = state.attention_mask.bool().to(x.device)
            if x.shape[0] > am.shape[0] and x.shape[0] % am.shape[0] == 0:
                am = am.repeat(x.shape[0] // am.shape[0], 1)
            if am.shape[0] == x.shape[0] and am.shape[1] >= x.shape[1]:
                sel = am[:, am.shape[1] - x.shape[1]:].clone()
        if self.probe_region == "generated" and state is not None and state.prompt_mask is not None \
                and x.dim() == 3:
            pm = state.prompt_mask.bool().to(x.device)
            if x.shape[0] > pm.shape[0] and x.shape[0] % pm.shape[0] == 0:
                pm = pm.repeat(x.shape[0] // pm.shape[0], 1)
            if pm.shape[0] == x.shape[0] and pm.shape[1] >= x.shape[1]:
                sel &= ~pm[:, pm.shape[1] - x.shape[1]:]
        changed = self._changed(entry, x) if self._kind != "ar" else None
        if changed is not None:
            sel &= ~changed
        if self.probe_positions is not None:
            idx = sel.reshape(-1).nonzero().squeeze(-1)
            if idx.numel() > self.probe_positions:
                pick = torch.linspace(0, idx.numel() - 1, self.probe_positions).round().long().to(idx.device)
                keep_idx = idx[pick]
                flat = torch.zeros(sel.numel(), dtype=torch.bool, device=x.device)
                flat[keep_idx] = True
                sel = flat.reshape(sel.shape)
        return sel


_SPEC = re.compile(r"^(fresh|block_start|blockstart|every|adaptive)(?:[:=]?(.*))$")
_FORMS = "fresh, block_start, every<k> (k a positive integer: every4 or every:4) or adaptive[<bound>] (adaptive0.8)"


def make_policy(spec: str | ReusePolicy, new_positions: str = "fresh", **adaptive_kwargs) -> ReusePolicy:
    """A policy from a short name: ``fresh``, ``every4`` / ``every:4``, ``block_start``, ``adaptive0.8`` /
    ``adaptive:0.8`` (``adaptive_kwargs`` go to :class:`Adaptive`, e.g. ``probe_layer=0``; bare ``adaptive``
    is ``Adaptive(0.7)``)."""
    if isinstance(spec, ReusePolicy):
        return spec
    m = _SPEC.match(str(spec).strip().lower())
    if not m:
        raise ValueError(f"unknown reuse policy {spec!r}; use {_FORMS}")
    kind, arg = m.groups()
    if kind in ("fresh", "block_start", "blockstart"):
        if arg:
            raise ValueError(f"reuse policy {spec!r}: {kind} takes no number; use {_FORMS}")
        return Fresh(new_positions) if kind == "fresh" else BlockStart(new_positions)
    if kind == "every":
        if not re.fullmatch(r"[0-9]+", arg) or int(arg) < 1:  # every2.5 / every0.5 are not read as every2 / every0
            raise ValueError(f"reuse policy {spec!r}: k must be a positive integer (every<k>, e.g. every4), got "
                             f"{arg!r}; use {_FORMS}")
        return Every(int(arg), new_positions)
    if not arg:
        return Adaptive(0.7, new_positions=new_positions, **adaptive_kwargs)
    try:
        bound = float(arg)
    except ValueError:
        raise ValueError(f"reuse policy {spec!r}: the bound {arg!r} is not a number; use {_FORMS}") from None
    return Adaptive(bound, new_positions=new_positions, **adaptive_kwargs)


def reuse_sparsity(site: FFNSite | str, rule: SparsityRule, policy: str | ReusePolicy,
                   layers: Iterable[int] | None = None, **step_sparsity_kwargs) -> tuple[StepSparsity, ReusePolicy]:
    """``(StepSparsity(site, rule, select_mask=policy, ...), policy)``: pass the first as ``sparsity=`` and the
    second in ``callbacks=`` of :func:`dllm_sparse.samplers.generate`."""
    policy = make_policy(policy)
    if "select_mask" in step_sparsity_kwargs:
        raise TypeError("reuse_sparsity sets select_mask itself (to the policy)")
    sp = StepSparsity(site, rule, layers=layers, select_mask=policy, **step_sparsity_kwargs)
    return sp, policy
