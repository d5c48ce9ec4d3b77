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

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from dllm_sparse.kernels.dispatch import backend as choose_backend
from dllm_sparse.kernels.ops import _colsparse_gemm_op, _rowsparse_op
from dllm_sparse.kernels.sparse_ffn import SparsePart, _role_path, is_accelerated, restore_ffn
from dllm_sparse.models.families import FFNModules, detect_family, find_ffns
from dllm_sparse.sparsity.hooks import align_positions, column_norms, select_layers
from dllm_sparse.steps import GenerationCallback, StepState

from .reuse import ReusePolicy, make_policy

__all__ = ["StepDelta", "StepDeltaRun", "step_delta", "apply_step_delta", "VARIANTS", "SELECTORS"]

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
    """select="held": S [B, k] chosen at the refresh, and h_c[S] [B, T, k] (kept apart from h_c so that a delta step
    neither gathers nor scatters over d_ff)."""

    s: torch.Tensor
    h_s: torch.Tensor
    gate_up: torch.Tensor  # [B, d, 2k]: W_gate[S]^T and W_up[S]^T side by side (one matmul)
    down: torch.Tensor  # [B, k, d]: W_down[:, S]^T
    bias: torch.Tensor | None  # [B, 2k], or None when neither projection has a bias

    def at(self, T: int) -> torch.Tensor:
        return self.s[:, None, :].expand(self.s.shape[0], T, self.s.shape[1])


def _batched_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """w [n, m] and idx [B, k] -> w[idx] [B, k, m] (each sample's kept rows, contiguous for the matmul)."""
    return w.index_select(0, idx.reshape(-1)).reshape(*idx.shape, w.shape[-1])


class StepDeltaFFN(nn.Module):
    """The step-delta computation of one FFN; its :class:`SparsePart` modules call :meth:`run`.

    The owner computes ``down(act(gate(x)) * up(x))``. The swapped ``gate`` computes the whole FFN output for x
    and returns a [..., 1] zero placeholder, ``up`` returns the same placeholder without any work (act(0) * 0 = 0
    for SiLU and tanh-GELU), and the swapped ``down`` returns the output ``gate`` computed.
    """

    def __init__(self, ffn: FFNModules, config: StepDelta, run: StepDeltaRun):
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

    # ---- gathered products: the only place the backend matters ------------------------------------------------
    def _triton(self, v: torch.Tensor) -> bool:
        return choose_backend(v, self.config.backend) == "triton"

    def _gathered(self, v: torch.Tensor, w_t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """v [B, T, n], w_t [n, m], idx [B, k] -> v[..., idx] @ w_t[idx] [B, T, m]: the rows idx of w_t only."""
        B, T, k = v.shape[0], v.shape[1], idx.shape[1]
        if self._triton(v):  # the kernel gathers the kept rows inside its tl.dot loop: no copy of the weights
            count = torch.full((1,), k, dtype=torch.int32, device=v.device)
            return torch.stack([_colsparse_gemm_op(v[b].contiguous(), w_t, idx[b].to(torch.int32).contiguous(), count,
                                                   "triton") for b in range(B)])
        return torch.bmm(v.gather(-1, idx[:, None, :].expand(B, T, k)), _batched_rows(w_t, idx))

    def _rows_of(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [B, T, d], w [n, d], idx [B, k] -> x @ w[idx]^T [B, T, k]: the outputs idx of w only."""
        B, T, k = x.shape[0], x.shape[1], idx.shape[1]
        if self._triton(x):  # computes the kept outputs only (zeros elsewhere), then the kept columns are read
            count = torch.full((1,), k, dtype=torch.int32, device=x.device)
            return torch.stack([_rowsparse_op(x[b].contiguous(), w, idx[b].to(torch.int32).contiguous(), count,
                                              "triton").gather(-1, idx[b][None].expand(T, k)) for b in range(B)])
        return torch.bmm(x, _batched_rows(w, idx).transpose(1, 2))

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
        gate, up = self._orig["gate"], self._orig["up"]
        gate_up = torch.cat([_batched_rows(gate.weight, s), _batched_rows(up.weight, s)], dim=1).transpose(1, 2)
        bias = None
        if gate.bias is not None or up.bias is not None:
            zeros = x.new_zeros(self.d_ff)
            bias = torch.cat([(gate.bias if gate.bias is not None else zeros)[s],
                              (up.bias if up.bias is not None else zeros)[s]], dim=-1)
        c.held = _Held(s, c.h.gather(-1, s[:, None, :].expand(s.shape[0], c.h.shape[1], k)),
                       gate_up.contiguous(), _batched_rows(self.down_t, s), bias)

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
            cp.g += self._gathered(dx, self.gate_t, s_x)  # g_c = W_gate x_c keeps holding: x_c moves by the same dx
            cp.u += self._gathered(dx, self.up_t, s_x)
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
            cp.y += self._gathered(dh, self.down_t, s_h)
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
                g_s, u_s = self._rows_of(xp, gate.weight, s), self._rows_of(xp, up.weight, s)
                if gate.bias is not None:
                    g_s = g_s + gate.bias[s][:, None, :]
                if up.bias is not None:
                    u_s = u_s + up.bias[s][:, None, :]
                macs += 2 * self.d * k * B * xp.shape[1]
            h_s = act(g_s) * u_s
            dh = torch.zeros_like(cp.h).scatter_(-1, at, h_s - cp.h.gather(-1, at)) if self._triton(xp) else None
            cp.y += self._gathered(dh, self.down_t, s) if dh is not None else torch.bmm(
                h_s - cp.h.gather(-1, at), _batched_rows(self.down_t, s))
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
            gu = torch.bmm(xp, held.gate_up)
            if held.bias is not None:
                gu = gu + held.bias[:, None, :]
            h_s = act(gu[..., :k]) * gu[..., k:]
            cp.y += torch.bmm(h_s - held.h_s, held.down)
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
    def generation_callback(self) -> StepDeltaRun:
        """The run every generation of the model must drive (see :func:`dllm_sparse.steps.attached_callbacks`)."""
        return self._run

    def extra_repr(self) -> str:
        return f"layer={self.layer}, {self.config.name}"


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
            parent, name = _role_path(ffn, role)
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
