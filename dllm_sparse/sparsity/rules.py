"""Sparsification rules: map a tensor [..., d] to a boolean keep-mask along its last dimension.

The contract is ``docs/sparsification.md``. Every rule is a small frozen object with two verbs:

    rule.mask(x)  -> bool tensor, True where the entry is kept
    rule(x)       -> x with every other entry set to exactly 0 (kept entries unchanged, no rescaling)

Zeros are never "kept": a keep-mask is always a subset of the non-zero entries, so an all-zero row gets an
empty mask and stays zero, and p = 1 keeps exactly the non-zero entries.

NaN is never hidden: a row holding a NaN has no meaningful mass or ranking, so every rule keeps the whole
row (its non-zero entries) and the NaN reaches the output exactly as in the dense model. Thresholds compare
as ``not |v| < tau``, so the kernels (which work with thresholds) keep the same entries.

The top-p selection functions (the reference and its fast equals) are in :mod:`dllm_sparse.sparsity.top_p` and
re-exported here.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from dllm_sparse.sparsity import native
from dllm_sparse.sparsity.names import RULE_NAMES, SCOPES, SHARED_SCOPES
from dllm_sparse.sparsity.top_p import (
    check_p,
    keep_nan_rows,
    top_p_mask,
    top_p_mask_histogram,
    top_p_mask_reference,
    top_p_mask_row_sort,
    top_p_threshold,
    top_p_threshold_reference,
)

__all__ = [
    "SparsityRule",
    "TopP",
    "TopK",
    "MaxP",
    "PaperTopP",
    "make_rule",
    "rule_name",
    "RULE_NAMES",
    "top_p_mask_reference",
    "top_p_threshold_reference",
    "top_p_threshold",
    "top_p_mask",
    "top_p_mask_histogram",
    "top_p_mask_row_sort",
    "SCOPES",
    "SHARED_SCOPES",
    "SharedSelection",
]


# --------------------------------------------------------------------------------------------------------
# Rule objects
# --------------------------------------------------------------------------------------------------------

# Where a rule selects (SCOPES, dllm_sparse.sparsity.names): per token (the default, the paper's rule), per sample
# over tokens x features ("sequence", the paper's LLaDA code), or one keep-set shared by the tokens of a call
# ("step", "step_wina").


class SparsityRule(ABC):
    """Base class. Subclasses set :attr:`name`, and implement :meth:`_row_mask` on a [..., d] tensor and
    :attr:`threshold`.

    Shared scopes (``scope="step"`` / ``"step_wina"``; definitions: docs/sparsification.md, "Shared keep-sets").
    For activations x [..., T, d] (T tokens of one sample) the rule selects once per sample, on the aggregate
    score over the *voting* tokens V of that sample:

        a_j = sum_{t in V} |x_tj|                  (scope "step", float64)
        a_j = ||W[:, j]||_2 * sum_{t in V} |x_tj|  (scope "step_wina": W the matrix the site's vector multiplies)

    The keep-set K = the rule applied to the vector a (for top-p: the smallest set of largest a_j holding a
    fraction p of sum_j a_j, with :func:`top_p_mask_reference`'s tie / zero / NaN conventions), and every token
    of the sample keeps ``K & (x_t != 0)``; a token holding a NaN keeps its whole row, as in every scope.
    ``voters`` (bool [..., T], default: every token) says which tokens vote (padding must not);
    ``token_positions`` (bool [..., T]) marks tokens that neither vote nor share K but take the per-token mask
    of the same rule (an AR model's scored continuation, so that no later token chooses an earlier one's
    mask). A sample with no voting token gets an empty K. Per sample: a row's keep-set never depends on the
    other rows of the batch.
    """

    name: ClassVar[str]  # the rule's name in configs, ids and rows ("top_p", ...); see make_rule
    scope: str = "token"

    def mask(self, x: torch.Tensor, *, voters: torch.Tensor | None = None,
             token_positions: torch.Tensor | None = None, column_norm: torch.Tensor | None = None) -> torch.Tensor:
        """Keep-mask of ``x`` (True = kept), same shape. A tensor with no entries (a last dimension of 0, or no
        rows) has nothing to keep: the result is the empty mask of its shape, for every rule. ``voters``,
        ``token_positions`` and ``column_norm`` apply to the shared scopes (see the class docstring); ``voters``
        also to scope ``"sequence"``, where it marks a sample's real tokens: only they hold mass and only they
        can be kept (padding keeps nothing), so a padded row selects what it selects alone, whichever side the
        padding is on."""
        shared = self.scope in SHARED_SCOPES
        sequence_voters = self.scope == "sequence" and token_positions is None and column_norm is None
        if not shared and not sequence_voters and (
                voters is not None or token_positions is not None or column_norm is not None):
            raise ValueError(f"voters / token_positions / column_norm apply to the shared scopes {SHARED_SCOPES} "
                             f"only (voters also to scope 'sequence'); this rule's scope is {self.scope!r}")
        if x.numel() == 0:
            return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        if shared:
            keep = self.shared_keep(x, voters=voters, token_positions=token_positions, column_norm=column_norm)
            keep = keep_nan_rows(x, keep & (x != 0))
            if token_positions is not None:
                per_token = _positions(token_positions, x, "token_positions")
                if bool(per_token.any()):
                    keep = torch.where(per_token[..., None], self._mask_rows(x), keep)
            return keep
        if self.scope == "sequence":
            # One selection over all tokens x features of a sample ([..., T, d] -> [..., T*d]); this is what the
            # paper's public code did for its LLaDA figure. Not the default.
            if x.dim() < 2:
                raise ValueError("scope='sequence' needs activations shaped [..., tokens, features]")
            real = None if voters is None else _positions(voters, x, "voters")
            if real is not None and not bool(real.all()):
                return self._sequence_mask_of_real_tokens(x, real)
            flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
            return self._mask_rows(flat).reshape(x.shape)
        return self._mask_rows(x)

    def _sequence_mask_of_real_tokens(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Scope "sequence" on a padded batch: each sample selects over its real tokens x features alone (its
        own mass, and for top-k its own entry count), and padded positions keep nothing. One selection per
        sample: a padded sample's row length is its real tokens x features, which no batched reshape gives."""
        T, d = x.shape[-2:]
        xs, rs = x.reshape(-1, T, d), real.reshape(-1, T)
        keep = torch.zeros(xs.shape, dtype=torch.bool, device=x.device)
        for i in range(xs.shape[0]):
            tokens = xs[i][rs[i]]
            if tokens.numel():
                keep[i][rs[i]] = self._mask_rows(tokens.reshape(1, -1)).reshape(tokens.shape)
        return keep.reshape(x.shape)

    def shared_score(self, x: torch.Tensor, *, voters: torch.Tensor | None = None,
                     token_positions: torch.Tensor | None = None,
                     column_norm: torch.Tensor | None = None) -> torch.Tensor:
        """The aggregate score a [..., d] (float64) of a shared scope over the voting tokens of ``x`` [..., T, d]."""
        if self.scope not in SHARED_SCOPES:
            raise ValueError(f"shared_score is defined for the shared scopes {SHARED_SCOPES}, not {self.scope!r}")
        if x.dim() < 2:
            raise ValueError(f"scope={self.scope!r} needs activations shaped [..., tokens, features], got "
                             f"{tuple(x.shape)}")
        if voters is None and token_positions is None:  # every token votes: one reduction, summed in float64
            score = x.detach().abs().sum(dim=-2, dtype=torch.float64)
        else:
            vote = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
            if voters is not None:
                vote = vote & _positions(voters, x, "voters")
            if token_positions is not None:
                vote = vote & ~_positions(token_positions, x, "token_positions")
            a = x.detach().abs().to(torch.float64)
            # where, not a product: a NaN of a non-voting token (0 * NaN = NaN) must not reach the score
            score = torch.where(vote[..., None], a, 0.0).sum(dim=-2)
        if self.scope == "step_wina":
            if column_norm is None:
                raise ValueError("scope='step_wina' weighs each feature by the norm of the weight column it "
                                 "multiplies: pass column_norm=[d] (the hooks and accelerate_ffn do), or use "
                                 "scope='step'")
            cn = torch.as_tensor(column_norm).to(device=x.device, dtype=torch.float64).reshape(-1)
            if cn.numel() != x.shape[-1]:
                raise ValueError(f"column_norm has {cn.numel()} entries for {x.shape[-1]} features")
            score = score * cn
        elif column_norm is not None:
            raise ValueError("column_norm applies to scope='step_wina' only; this rule's scope is 'step'")
        return score

    def shared_keep(self, x: torch.Tensor, *, voters: torch.Tensor | None = None,
                    token_positions: torch.Tensor | None = None,
                    column_norm: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample keep-set K of a shared scope, bool [..., 1, d] (broadcasts over the tokens of x)."""
        score = self.shared_score(x, voters=voters, token_positions=token_positions, column_norm=column_norm)
        return self.keep_from_score(score)

    def keep_from_score(self, score: torch.Tensor) -> torch.Tensor:
        """The keep-set [..., 1, d] of an aggregate score [..., d] from :meth:`shared_score` (the rule applied to
        it; a score holding a NaN keeps every non-zero feature)."""
        return self._mask_rows(score).unsqueeze(-2)

    def _mask_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The keep-mask of each row of ``x`` with NaN rows kept whole (a rule whose selection already does
        that, top-p's histogram path, overrides this to skip the extra NaN pass)."""
        return keep_nan_rows(x, self._row_mask(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(~self.mask(x), 0)

    def apply_fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x * keep, zeros per row)`` computed in one pass, or None where this rule has no fused kernel for
        ``x`` (the hooks then compute ``keep = mask(x)`` and ``x * keep``). ``x * keep`` as PyTorch computes it:
        a dropped entry is a zero with x's sign. Rules that return a result guarantee ``keep == (out != 0)``."""
        return None

    @abstractmethod
    def _row_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Keep-mask along the last dimension."""

    @property
    def is_identity(self) -> bool:
        """True when the rule keeps every non-zero entry (so it cannot change any output)."""
        return False

    @property
    @abstractmethod
    def threshold(self) -> float:
        """The rule's one number: p for top-p and max-p, the target sparsity s for top-k."""

    # True when a larger threshold keeps more entries (top-p); false for top-k (target sparsity) and max-p.
    # Orders a threshold grid from dense to sparse (critical sparsity scans curves in that order).
    denser_when_larger: ClassVar[bool] = False

    def to_dict(self) -> dict:
        """A JSON-able description, e.g. {"rule": "top_p", "threshold": 0.9, "scope": "token"}."""
        return {"rule": self.name, "threshold": self.threshold, "scope": self.scope}



def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _positions(m: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """A bool [..., T] token mask for x [..., T, d] (broadcast over leading dims where it fits)."""
    m = torch.as_tensor(m, device=x.device).bool()
    try:
        return torch.broadcast_to(m, x.shape[:-1])
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(m.shape)} but the activations' tokens are "
                         f"{tuple(x.shape[:-1])}; give one bool per token ([batch, tokens])") from None


@dataclass(frozen=True)
class SharedSelection:
    """A shared-scope (or ``"sequence"``-scope) rule bound to one call's voting tokens and column norms (for
    ``"sequence"``: its real tokens), so that code calling
    ``rule.mask(x)`` (a mask-reuse policy, for one) selects exactly as the hooks do. ``shared_keep(x)`` gives
    the keep-set [..., 1, d] itself."""

    rule: SparsityRule
    voters: torch.Tensor | None = None
    token_positions: torch.Tensor | None = None
    column_norm: torch.Tensor | None = None

    @property
    def scope(self) -> str:
        return self.rule.scope

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def threshold(self) -> float:
        return self.rule.threshold

    def _kw(self) -> dict:
        return {"voters": self.voters, "token_positions": self.token_positions, "column_norm": self.column_norm}

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.rule.mask(x, **self._kw())

    def shared_keep(self, x: torch.Tensor) -> torch.Tensor:
        return self.rule.shared_keep(x, **self._kw())

    def token_mask(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token mask of the same rule (what ``token_positions`` get)."""
        return self.rule._mask_rows(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(~self.mask(x), 0)


TOP_P_METHODS = ("auto", "native", "row_sort", "histogram", "bisect", "sort")
_native_fallback_said = False  # "auto" says once per process that it runs the row sort for want of the kernel


@dataclass(frozen=True)
class TopP(SparsityRule):
    """Keep the largest-magnitude entries holding a fraction ``p`` of the row's L1 mass (the paper's rule).

    ``method``: how the threshold is found; every method gives the reference's masks (tests/test_rules.py).

    - ``"sort"``: the reference itself (:func:`top_p_mask_reference`: a row sort and a float64 running sum);
    - ``"native"``: the compiled CPU kernel (:mod:`dllm_sparse.sparsity.native`: a mass histogram with exact sums,
      no sort, the masked output and zero counts in the same pass), bit-identical to the reference; fp32 / bf16 /
      fp16 CPU tensors;
    - ``"row_sort"``: :func:`top_p_mask_row_sort`, the reference's steps with NumPy's float32 row sort,
      bit-identical to the reference;
    - ``"histogram"``: :func:`top_p_mask_histogram`, the native kernel's idea in PyTorch ops (slower),
      bit-identical to the reference (rows it cannot prove exact go to the reference);
    - ``"bisect"``: :func:`top_p_mask`, 32 bisection passes on the threshold, no sort (the GPU path; equal to
      the reference up to the rounding of the mass sums);
    - ``"auto"`` (default): on CPU ``"native"`` where the kernel builds and serves the dtype (else
      ``"row_sort"``, said once), and ``"row_sort"`` inside ``torch.compile`` (ctypes cannot be traced);
      ``"bisect"`` elsewhere. Speeds: docs/results/masking_overhead.
    """

    name: ClassVar[str] = "top_p"
    denser_when_larger: ClassVar[bool] = True
    p: float
    scope: str = "token"
    method: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "p", check_p(self.p))
        _check_scope(self.scope)
        if self.method not in TOP_P_METHODS:
            raise ValueError(f"method must be one of {TOP_P_METHODS}, got {self.method!r}")

    def _method_for(self, x: torch.Tensor) -> str:
        if self.method != "auto":
            return self.method
        if x.device.type != "cpu":
            return "bisect"
        if x.dtype not in native.DTYPES or self.p >= 1.0 or torch.compiler.is_compiling():
            return "row_sort"
        if native.available():
            return "native"
        global _native_fallback_said
        if not _native_fallback_said:
            _native_fallback_said = True
            warnings.warn(f"top-p runs NumPy's row sort (the same masks, 2-3x slower): the compiled CPU kernel is "
                          f"not available ({native.unavailable_reason()})", RuntimeWarning, stacklevel=3)
        return "row_sort"

    def apply_fused(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x * keep, zeros per row)`` in one pass where the native kernel serves ``x`` (see
        :meth:`SparsityRule.apply_fused`); the keep-mask is then exactly ``out != 0``."""
        if self.scope != "token" or self.p >= 1.0 or (torch.is_grad_enabled() and x.requires_grad):
            return None
        if x.numel() == 0 or self._method_for(x) != "native":
            return None
        return native.top_p_rows(x, self.p)

    def _mask_rows(self, x):
        method = self._method_for(x)
        if method == "native":
            return self._native_mask(x)  # NaN rows keep every non-zero entry, in the kernel
        if method == "histogram":
            return top_p_mask_histogram(x, self.p)  # keeps NaN rows itself, in the same pass
        if method == "row_sort":
            return top_p_mask_row_sort(x, self.p)  # keeps NaN rows itself
        return super()._mask_rows(x)  # "sort" / "bisect": _row_mask

    def _native_mask(self, x):
        if self.p >= 1.0 or x.numel() == 0:
            return x.detach() != 0
        return native.top_p_rows(x, self.p)[0] != 0

    def _row_mask(self, x):
        # Reached (through SparsityRule._mask_rows, which adds the NaN rows) only for "sort" and "bisect": the
        # other methods keep NaN rows themselves and are dispatched in _mask_rows above.
        return top_p_mask_reference(x, self.p) if self._method_for(x) == "sort" else top_p_mask(x, self.p)

    @property
    def threshold(self) -> float:
        return self.p

    @property
    def is_identity(self):
        return self.p >= 1.0


@dataclass(frozen=True)
class TopK(SparsityRule):
    """Keep the k = ceil((1 - sparsity) * d) largest |v_i| of each row."""

    name: ClassVar[str] = "top_k"
    sparsity: float
    scope: str = "token"

    def __post_init__(self):
        s = float(self.sparsity)
        if not (0.0 <= s < 1.0) or math.isnan(s):
            raise ValueError(f"sparsity must be in [0, 1), got {s}. Use 0 for the dense model.")
        object.__setattr__(self, "sparsity", s)
        _check_scope(self.scope)

    def _row_mask(self, x):
        d = x.shape[-1]
        # ceil((1 - s) d) of the decimal s the caller meant: (1 - 0.7) * 10 is 3.0000000000000004 in binary
        # floats, and a bare ceil would keep 4 entries instead of 3. Snap products within rounding of an integer.
        kf = (1.0 - self.sparsity) * d
        k = round(kf) if abs(kf - round(kf)) <= 1e-9 * max(1.0, kf) else math.ceil(kf)
        k = min(d, max(k, 1 if d else 0))
        a = x.detach().abs()
        idx = torch.topk(a, k, dim=-1, sorted=False).indices
        keep = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True)
        return keep & (a > 0)

    @property
    def threshold(self) -> float:
        return self.sparsity

    @property
    def is_identity(self):
        return self.sparsity == 0.0


@dataclass(frozen=True)
class MaxP(SparsityRule):
    """Keep entries with |v_i| >= p * max|v| (always keeps the largest entry)."""

    name: ClassVar[str] = "max_p"
    p: float
    scope: str = "token"

    def __post_init__(self):
        object.__setattr__(self, "p", check_p(self.p))
        _check_scope(self.scope)

    @property
    def threshold(self) -> float:
        return self.p

    def _row_mask(self, x):
        a = x.detach().abs()
        a = a if a.dtype == torch.float64 else a.float()  # float32 would round float64 near-ties together
        return (a >= self.p * a.amax(dim=-1, keepdim=True)) & (a > 0)


@dataclass(frozen=True)
class PaperTopP(SparsityRule):
    """The top-p of the paper's public LLaDA scripts (docs/sparsification.md, "Paper-code compatibility"), for
    reproducing the paper's LLaDA figure; not the spec's rule (:class:`TopP`), and never used to compare models.

    ``p`` is in percent (e.g. 90). One selection per sample over all its tokens × features (``scope`` is always
    ``"sequence"``), computed as the paper's hook computes it, in the activations' own dtype (bf16 for a bf16
    model, float32 for a float32 one): sort |v| descending, take the cumulative sum (``torch.cumsum`` in that
    dtype), divide by the total (the last prefix sum), and keep the entries whose cumulative share is
    ``<= p / 100`` (strict: the entry that crosses p is dropped, unlike :class:`TopP`, which keeps it; the
    comparison is in that dtype, so in bf16 p / 100 is rounded to bf16). When that keeps nothing (the largest
    entry alone holds more than p of the mass) the largest entry is kept, as the paper does. Zeros are never
    reported as kept (the paper's mask keeps them when p = 100 or a sample is all zeros; the sparsified output
    is the same either way). Ties: the paper's ``torch.sort`` is not stable, so when the cut falls inside a run
    of equal magnitudes, which of them it keeps is its sort kernel's choice; this rule keeps the lowest-index
    ones (a stable sort). How many are kept, and the output's kept mass, are the same. On the ``input`` site the
    paper's hook pattern matched ``up_proj`` only, so this rule feeds the sparse input to the up projection and
    the dense one to the gate projection (:attr:`input_projections`).
    """

    name: ClassVar[str] = "paper_top_p"
    denser_when_larger: ClassVar[bool] = True
    input_projections: ClassVar[str] = "up"  # the input site sparsifies up_proj's input only
    p: float
    scope: str = "sequence"

    def __post_init__(self):
        p = float(self.p)
        if not (0.0 < p <= 100.0) or math.isnan(p):
            raise ValueError(f"PaperTopP takes p in percent, in (0, 100], got {self.p} (e.g. PaperTopP(90) keeps "
                             "90 % of a sample's mass)")
        object.__setattr__(self, "p", p)
        if self.scope != "sequence":
            raise ValueError(f"paper_top_p is one selection over a sample's tokens x features: scope must be "
                             f"'sequence', got {self.scope!r}")

    def _row_mask(self, x):
        a = x.detach().abs()
        a = a if a.is_floating_point() else a.float()
        sorted_a, order = torch.sort(a, dim=-1, descending=True, stable=True)
        csum = torch.cumsum(sorted_a, dim=-1)  # stays in a's dtype, as in the paper
        share = csum / csum[..., -1:]
        keep_sorted = share <= self.p / 100.0  # compared in a's dtype (an all-zero row gives NaN)
        keep_sorted[..., :1] |= ~keep_sorted.any(dim=-1, keepdim=True)  # at least the largest entry
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return keep & (a != 0)

    @property
    def threshold(self) -> float:
        return self.p

    @property
    def is_identity(self):
        return False  # even p = 100 drops nothing only up to the rounding of the share


# The one table of rules: configs, ids, sweep rows and command lines all go through it. Its names are also
# written out in the torch-free dllm_sparse.sparsity.names (for command-line parsers); the two must agree.
_RULES: dict[str, type[SparsityRule]] = {cls.name: cls for cls in (TopP, TopK, MaxP, PaperTopP)}
if tuple(_RULES) != RULE_NAMES:
    raise ImportError(f"dllm_sparse.sparsity.names.RULE_NAMES {RULE_NAMES} does not list the registered rules "
                      f"{tuple(_RULES)}: add the new rule's name there, in the registry's order")


def rule_name(name: str) -> str:
    """The canonical name of a rule: ``"top-p"``, ``"TOP_P"`` -> ``"top_p"``; unknown names raise."""
    key = str(name).strip().replace("-", "_").lower()
    if key not in _RULES:
        raise ValueError(f"unknown rule {name!r}; choose one of {sorted(_RULES)}")
    return key


def make_rule(name: str, threshold: float, scope: str | None = None) -> SparsityRule:
    """Build a rule from its name (``top_p``, ``top_k``, ``max_p``, ``paper_top_p``) and threshold, e.g. from a
    CLI flag; ``scope`` None = the rule's default (``"token"``; ``"sequence"`` for ``paper_top_p``)."""
    cls = _RULES[rule_name(name)]
    return cls(threshold) if scope is None else cls(threshold, scope=scope)
