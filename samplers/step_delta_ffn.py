"""The step-delta FFN's computation: its settings (:class:`StepDelta`) and one FFN's cache and delta steps
(:class:`StepDeltaFFN`). The definitions, and how to run it, are in :mod:`dllm_sparse.samplers.step_delta`, which
swaps these modules in and holds the run (``StepDeltaRun``: the generation callback every FFN here reports to,
``run`` below). The per-sample gathered and packed products are kernels (:mod:`dllm_sparse.kernels.gathered`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from dllm_sparse.kernels.dispatch import backend as choose_backend
from dllm_sparse.kernels.gathered import (
    PackedFFNRows,
    compact_gathered_matmul,
    gathered_matmul,
    selected_outputs_matmul,
)
from dllm_sparse.models.families import FFNModules
from dllm_sparse.sparsity.hooks import column_norms
from dllm_sparse.steps import GenerationCallback

from .reuse import make_policy

__all__ = ["StepDelta", "StepDeltaFFN", "VARIANTS", "SELECTORS"]

VARIANTS = ("input", "intermediate")
SELECTORS = {"input": ("magnitude",), "intermediate": ("contribution", "held", "oracle")}


@dataclass(frozen=True)
class StepDelta:
    """What a step-delta FFN recomputes (see the module docstring for the definitions).

    ``variant``: ``"input"`` (delta on the input x, then on W_down) or ``"intermediate"`` (delta on h).
    ``fraction``: |S| / d for the input variant, |S| / d_ff for the intermediate one, in (0, 1].
    ``down_fraction``: input variant only, |S_h| / d_ff in (0, 1].
    ``select``: how S is chosen: input ``"magnitude"``; intermediate ``"contribution"`` (every step), ``"held"``
    (the contribution set chosen at the refresh and held to the next one: packed weights, the fast CPU path) or
    ``"oracle"`` (reads the exact change: a measurement reference, it costs the full gate and up projections).
    ``"held"`` runs its packed matmuls on every backend (the gathered kernels are for sets that change per step).
    ``refresh``: the refresh policy, a reuse policy of :mod:`dllm_sparse.samplers.reuse` or its name
    (``"block_start"`` default, ``"every4"``, ``"fresh"`` = dense every step).
    ``exact_block``: also recompute the current block's positions exactly at every step (the rows the LM head
    reads); the delta then covers the prompt, the decoded positions of earlier blocks and the later blocks.
    ``layers``: FFN layer indices (default all).
    ``backend``: the gathered products run as ``torch`` matmuls over the gathered weight rows (CPU, and the
    reference) or the ``triton`` kernels that read the kept rows in place (``colsparse_gemm``, ``rowsparse``:
    no gathered copy; CUDA, or the interpreter); None / ``"auto"``: Triton on CUDA tensors (see
    :func:`dllm_sparse.kernels.backend`).
    """

    variant: str = "input"
    fraction: float = 0.25
    down_fraction: float = 0.5
    select: str | None = None
    refresh: Any = "block_start"
    exact_block: bool = False
    layers: tuple[int, ...] | None = None
    backend: str | None = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"StepDelta variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("fraction", "down_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < float(v) <= 1.0):
                raise ValueError(f"StepDelta {name} must be a number in (0, 1] (a share of the features "
                                 f"recomputed per step), got {v!r}")
        select = self.select if self.select is not None else SELECTORS[self.variant][0]
        if select not in SELECTORS[self.variant]:
            raise ValueError(f"StepDelta select={select!r} is not a selector of the {self.variant} variant; "
                             f"use one of {SELECTORS[self.variant]}")
        object.__setattr__(self, "select", select)
        if not isinstance(self.exact_block, bool):
            raise ValueError(f"StepDelta exact_block must be True or False, got {self.exact_block!r}")
        policy = make_policy(self.refresh)  # raises on an unknown name or Every(k < 1)
        if not getattr(policy, "fast_path", True):
            raise ValueError(f"refresh={self.refresh!r}: {type(policy).__name__} decides from a fresh mask probe, "
                             "which a step-delta FFN does not compute; use fresh, every<k> or block_start")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        choose_backend(None, self.backend)  # a bad backend name fails here, not at the first step

    @property
    def name(self) -> str:
        """A short name for tables and figures, e.g. ``delta-input:0.25/0.5@block_start``."""
        pol = self.refresh if isinstance(self.refresh, str) else getattr(self.refresh, "name", "policy")
        frac = f"{self.fraction:g}/{self.down_fraction:g}" if self.variant == "input" else f"{self.fraction:g}"
        sel = "" if self.select == SELECTORS[self.variant][0] else f",{self.select}"
        block = "+block" if self.exact_block else ""
        return f"delta-{self.variant}:{frac}{sel}{block}@{pol}"

    def describe(self) -> dict[str, Any]:
        pol = make_policy(self.refresh)
        return {"variant": self.variant, "fraction": float(self.fraction),
                "down_fraction": float(self.down_fraction) if self.variant == "input" else None,
                "select": self.select, "refresh": pol.describe(), "exact_block": self.exact_block,
                "layers": self.layers}


@dataclass
class _Cache:
    """One FFN's cached values for one canvas shape: [B_fwd, T, d] and [B_fwd, T, d_ff] tensors."""

    x: torch.Tensor
    g: torch.Tensor
    u: torch.Tensor
    h: torch.Tensor
    y: torch.Tensor
    held: _Held | None = None  # select="held": the set S and h_c[S], between two refreshes

    def view(self, rows: slice) -> _Cache:
        """The cache of the positions ``rows``: views, so in-place updates reach this cache."""
        held = None if self.held is None else replace(self.held, h_s=self.held.h_s[:, rows])
        return _Cache(*(getattr(self, k)[:, rows] for k in ("x", "g", "u", "h", "y")), held=held)

    def write(self, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
              kept: tuple[str, ...] = ("x", "g", "u", "h", "y")) -> None:
        """Overwrite every position of this (view of the) cache with freshly computed values (the ``kept`` ones:
        the values the variant reads)."""
        for k, v in zip(("x", "g", "u", "h", "y"), (x, g, u, h, y), strict=True):
            if k in kept:
                getattr(self, k).copy_(v)
        if self.held is not None:
            self.held.h_s.copy_(h.gather(-1, self.held.at(h.shape[1])))

    def fits(self, x: torch.Tensor) -> str | None:
        """None when x can be a later step of this cache, else what differs."""
        if x.shape != self.x.shape:
            return f"shape {tuple(x.shape)} vs the cached {tuple(self.x.shape)}"
        if x.dtype != self.x.dtype:
            return f"dtype {x.dtype} vs the cached {self.x.dtype}"
        if x.device != self.x.device:
            return f"device {x.device} vs the cached {self.x.device}"
        return None


@dataclass
class _Held:
    """select="held": S [B, k] chosen at the refresh, h_c[S] [B, T, k] (kept apart from h_c so that a delta step
    neither gathers nor scatters over d_ff) and the weights of S, packed."""

    s: torch.Tensor
    h_s: torch.Tensor
    packed: PackedFFNRows

    def at(self, T: int) -> torch.Tensor:
        return self.s[:, None, :].expand(self.s.shape[0], T, self.s.shape[1])


class StepDeltaFFN(nn.Module):
    """The step-delta computation of one FFN; its :class:`SparsePart` modules call :meth:`run`.

    The owner computes ``down(act(gate(x)) * up(x))``. The swapped ``gate`` computes the whole FFN output for x
    and returns a [..., 1] zero placeholder, ``up`` returns the same placeholder without any work (act(0) * 0 = 0
    for SiLU and tanh-GELU), and the swapped ``down`` returns the output ``gate`` computed.
    """

    def __init__(self, ffn: FFNModules, config: StepDelta, run: GenerationCallback):
        super().__init__()
        self.layer, self.config, self._run = ffn.layer, config, run
        self._orig = {"gate": ffn.gate, "up": ffn.up, "act": ffn.act, "down": ffn.down}
        self.d_ff, self.d = ffn.down.weight.shape[1], ffn.down.weight.shape[0]
        self._out: torch.Tensor | None = None
        self.cache: _Cache | None = None
        # The cached values a delta step reads (and so keeps current): the intermediate variant reads h_c and y_c
        # only; x_c, g_c, u_c stay as the refresh wrote them (copies over d and d_ff saved on every recomputed row).
        self.kept = ("x", "g", "u", "h", "y") if config.variant == "input" else ("h", "y")
        # Under torch.compile the step-delta FFN runs eagerly (a graph break per layer): the cache and the step's
        # decisions are Python state that changes at every step, which a traced graph would recompile for. Bound
        # here, not as a decorator: torch.compiler.disable imports dynamo, seconds that every import would pay.
        self.forward_ffn = torch.compiler.disable(self._forward_ffn)
        with torch.no_grad():
            # Transposed copies: a kept input feature (input variant) or intermediate feature (W_down) is then one
            # contiguous row to gather. Non-persistent: the state_dict stays the original one; model.to() moves them.
            self.register_buffer("down_t", ffn.down.weight.t().contiguous(), persistent=False)
            self.register_buffer("down_norm", column_norms(ffn, "intermediate").to(ffn.down.weight), persistent=False)
            if config.variant == "input":
                self.register_buffer("gate_t", ffn.gate.weight.t().contiguous(), persistent=False)
                self.register_buffer("up_t", ffn.up.weight.t().contiguous(), persistent=False)
                self.register_buffer("input_norm", column_norms(ffn, "input").to(ffn.down.weight), persistent=False)

    # ---- the parts -----------------------------------------------------------------------------------------
    def run(self, role: str, v: torch.Tensor) -> torch.Tensor:
        if role == "gate":
            self._out = self.forward_ffn(v)
            return v.new_zeros(*v.shape[:-1], 1)
        if role == "up":
            return v.new_zeros(*v.shape[:-1], 1)
        out, self._out = self._out, None
        if out is None:
            raise RuntimeError("step-delta FFN: the down projection ran before the gate projection; the family's FFN "
                               "must compute down(act(gate(x)) * up(x))")
        return out

    # ---- dense pieces ----------------------------------------------------------------------------------------
    def _dense(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate, up, act, down = (self._orig[r] for r in ("gate", "up", "act", "down"))
        g, u = gate(x), up(x)
        h = act(g) * u
        return g, u, h, down(h)

    # ---- one call --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward_ffn(self, x: torch.Tensor) -> torch.Tensor:
        run = self._run
        dense_macs = 3 * self.d * self.d_ff * x[..., 0].numel()
        if x.dim() != 3 or run.state is None:  # outside a generation step: the plain FFN, nothing cached
            self.cache = None
            return self._dense(x)[3]
        rows = run.rows_of(x)  # with a block cache the forward computes some canvas rows: their part of the cache
        if self.cache is None and rows is not None:
            raise ValueError(f"step-delta FFN, layer {self.layer}: the first forward of a generation computes only "
                             f"canvas rows {rows.start}..{rows.stop - 1}; the cache starts from a whole-canvas step")
        if run.refresh or self.cache is None:
            g, u, h, y = self._dense(x)
            if rows is None:
                self.cache = _Cache(x.clone(), g, u, h, y.clone())
            else:
                self._cache_part(x, rows).write(x, g, u, h, y, self.kept)
            if self.config.select == "held":
                self._hold(x, rows)
            run.count(dense_macs, dense_macs)
            exact = y
        else:
            c = self._cache_part(x, rows)
            macs = self._delta_step(x, c)
            y = c.y.clone()  # the cache is updated in place at the next step
            run.count(macs, dense_macs)
            exact = None
        if run.measure:
            if exact is None:
                exact = self._dense(x)[3]
            run.record_drift(self.layer, y, exact, run.real_positions(x))
        return y

    def _hold(self, x: torch.Tensor, rows: slice | None) -> None:
        """select="held", at a refresh: choose S from the refreshed rows (the positions later deltas cover: real
        ones, outside the current block with exact_block) and pack the weights of S for the steps to the next
        refresh."""
        c, run = self.cache, self._run
        if c.held is not None:  # rows this refresh did not compute keep h_c[old S] current in h_c
            c.h.scatter_(-1, c.held.at(c.h.shape[1]), c.held.h_s)
        part = c if rows is None else c.view(rows)
        votes = run.real_positions(x).clone()
        block = run.block_slice(x) if self.config.exact_block else None
        if block is not None:
            votes[:, block] = False
        k = max(1, math.ceil(self.config.fraction * self.d_ff))
        s = self._summed_score([part.h], [(x, part, votes.to(x.dtype))], self.down_norm).topk(k, dim=-1).indices
        packed = PackedFFNRows.pack(self._orig["gate"], self._orig["up"], self.down_t, s)
        c.held = _Held(s, c.h.gather(-1, s[:, None, :].expand(s.shape[0], c.h.shape[1], k)), packed)

    def _cache_part(self, x: torch.Tensor, rows: slice | None) -> _Cache:
        """The cache of this forward's positions (all of it, or a view of the canvas rows computed), checked
        against x."""
        c = self.cache if rows is None else self.cache.view(rows)
        problem = c.fits(x)
        if problem is not None:
            raise ValueError(f"step-delta FFN, layer {self.layer}: this forward's activations do not continue the "
                             f"cached canvas ({problem}); a cache holds one canvas of one model in one dtype. "
                             "Start a new generation (the cache is cleared at its first step) or refresh.")
        return c

    def _delta_step(self, x: torch.Tensor, c: _Cache) -> int:
        """One step after the refresh: the delta on the cached rows ``c`` (x's positions), dense recomputation of
        the exact rows. Returns the multiply-adds done."""
        run = self._run
        T = x.shape[1]
        votes = run.real_positions(x)
        block = run.block_slice(x) if self.config.exact_block else None
        if block is not None:
            # The current block is recomputed densely (newly decoded positions are inside it); the delta runs on the
            # rows before and after it, as views of the cache (updated in place, no copies).
            macs = self._recompute_rows(x, block, c)
            slices = [sl for sl in (slice(0, block.start), slice(block.stop, T)) if sl.stop > sl.start]
            parts = [(x[:, sl], c.view(sl), votes[:, sl]) for sl in slices]
            exact = None
        else:
            exact = run.exact_rows(x)  # decoded since the previous step: they do not vote, recomputed after
            if exact is not None:
                votes = votes & ~exact
            parts = [(x, c, votes)]
            macs = 0
        if parts:
            parts = [(xp, cp, vp.to(x.dtype)) for xp, cp, vp in parts]
            if self.config.variant == "input":
                macs += self._input_delta(parts)
            elif self.config.select == "held":
                macs += self._held_delta(parts)
            else:
                macs += self._intermediate_delta(parts)
        if exact is not None:
            macs += self._recompute_mask(x, exact, c)
        return macs

    @staticmethod
    def _summed_score(values: list[torch.Tensor], parts: list, norm: torch.Tensor) -> torch.Tensor:
        """[B, n]: sum over the voting positions of |value| (over every part), times the weight norm."""
        return sum((v.abs() * vp[..., None]).sum(dim=1) for v, (_, _, vp) in zip(values, parts, strict=True)) * norm

    def _input_delta(self, parts: list) -> int:
        B, _, d = parts[0][0].shape
        dxs = [xp - cp.x for xp, cp, _ in parts]
        k_x = max(1, math.ceil(self.config.fraction * d))
        s_x = self._summed_score(dxs, parts, self.input_norm).topk(k_x, dim=-1).indices  # [B, k_x]
        hs, macs = [], 0
        for dx, (xp, cp, _) in zip(dxs, parts, strict=True):
            at = s_x[:, None, :].expand(B, xp.shape[1], k_x)
            # g_c = W_gate x_c keeps holding: x_c moves by the same dx
            cp.g += gathered_matmul(dx, self.gate_t, s_x, self.config.backend)
            cp.u += gathered_matmul(dx, self.up_t, s_x, self.config.backend)
            cp.x.scatter_(-1, at, xp.gather(-1, at))
            hs.append(self._orig["act"](cp.g) * cp.u)
            macs += 2 * self.d_ff * k_x * B * xp.shape[1]
        return macs + self._down_delta(parts, hs, max(1, math.ceil(self.config.down_fraction * self.d_ff)))

    def _down_delta(self, parts: list, hs: list[torch.Tensor], k_h: int) -> int:
        """y_c += W_down[:, S_h] (h - h_c)[S_h] for the S_h with the largest summed |h - h_c| ||W_down[:, i]||."""
        B = hs[0].shape[0]
        dhs = [h - cp.h for h, (_, cp, _) in zip(hs, parts, strict=True)]
        s_h = self._summed_score(dhs, parts, self.down_norm).topk(k_h, dim=-1).indices
        macs = 0
        for h, dh, (_, cp, _) in zip(hs, dhs, parts, strict=True):
            at = s_h[:, None, :].expand(B, h.shape[1], k_h)
            cp.y += gathered_matmul(dh, self.down_t, s_h, self.config.backend)
            cp.h.scatter_(-1, at, h.gather(-1, at))
            macs += self.d * k_h * B * h.shape[1]
        return macs

    def _intermediate_delta(self, parts: list) -> int:
        B = parts[0][0].shape[0]
        k = max(1, math.ceil(self.config.fraction * self.d_ff))
        gate, up, act = self._orig["gate"], self._orig["up"], self._orig["act"]
        oracle = self.config.select == "oracle"
        if oracle:  # a measurement reference: reads the exact change (the full gate and up matmuls)
            full = [(gate(xp), up(xp)) for xp, _, _ in parts]
            hs = [act(g) * u for g, u in full]
            score = self._summed_score([h - cp.h for h, (_, cp, _) in zip(hs, parts, strict=True)], parts,
                                       self.down_norm)
        else:  # the features with the largest cached contribution |h_c| ||W_down[:, i]||
            score = self._summed_score([cp.h for _, cp, _ in parts], parts, self.down_norm)
        s = score.topk(k, dim=-1).indices
        macs = 0
        for i, (xp, cp, _) in enumerate(parts):
            at = s[:, None, :].expand(B, xp.shape[1], k)
            if oracle:
                g_s, u_s = full[i][0].gather(-1, at), full[i][1].gather(-1, at)
                macs += 2 * self.d * self.d_ff * B * xp.shape[1]
            else:
                g_s = selected_outputs_matmul(xp, gate.weight, s, self.config.backend)
                u_s = selected_outputs_matmul(xp, up.weight, s, self.config.backend)
                if gate.bias is not None:
                    g_s = g_s + gate.bias[s][:, None, :]
                if up.bias is not None:
                    u_s = u_s + up.bias[s][:, None, :]
                macs += 2 * self.d * k * B * xp.shape[1]
            h_s = act(g_s) * u_s
            cp.y += compact_gathered_matmul(h_s - cp.h.gather(-1, at), self.down_t, s, self.config.backend)
            # Only h_c and y_c are read by this variant: g_c, u_c and x_c are left as the last refresh wrote them
            # (two [T, d_ff] scatters and a copy per layer saved; the input variant keeps all of them current).
            cp.h.scatter_(-1, at, h_s)
            macs += self.d * k * B * xp.shape[1]
        return macs

    def _held_delta(self, parts: list) -> int:
        """select="held": h_t[S] from the packed W_gate[S], W_up[S] (one matmul), y_c += W_down[:, S] (h_t[S] -
        h_c[S]) from the packed W_down[:, S], h_c[S] = h_t[S]: the intermediate delta with the refresh's S."""
        act, macs = self._orig["act"], 0
        for xp, cp, _ in parts:
            held = cp.held
            k = held.s.shape[1]
            h_s = held.packed.intermediate(xp, act)
            cp.y += held.packed.down_product(h_s - held.h_s)
            held.h_s.copy_(h_s)
            macs += 3 * self.d * k * xp.shape[0] * xp.shape[1]
        return macs

    def _recompute_rows(self, x: torch.Tensor, rows: slice, c: _Cache) -> int:
        """Recompute the positions ``rows`` (a slice of x) densely into the cache ``c``; returns their work."""
        xr = x[:, rows]
        c.view(rows).write(xr, *self._dense(xr), self.kept)
        return 3 * self.d * self.d_ff * xr[..., 0].numel()

    def _recompute_mask(self, x: torch.Tensor, rows: torch.Tensor, c: _Cache) -> int:
        """Recompute the positions where ``rows`` [B, T] is True densely into the cache ``c``; returns their work."""
        g, u, h, y = self._dense(x[rows])
        for k, v in zip(("x", "g", "u", "h", "y"), (x[rows], g, u, h, y), strict=True):
            if k in self.kept:
                getattr(c, k)[rows] = v
        if c.held is not None:  # the rows' samples' S: [n, k]
            c.held.h_s[rows] = h.gather(-1, c.held.s[rows.nonzero(as_tuple=True)[0]])
        return 3 * self.d * self.d_ff * int(rows.sum())

    @property
    def generation_callback(self) -> GenerationCallback:
        """The run every generation of the model must drive (see :func:`dllm_sparse.steps.attached_callbacks`)."""
        return self._run

    def extra_repr(self) -> str:
        return f"layer={self.layer}, {self.config.name}"
