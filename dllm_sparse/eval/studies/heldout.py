"""Held-out perplexity of the twin's distillation answers, and calibration of a degradation to a target perplexity.

    rows = heldout_answers(lm.tokenizer)                      # 64 (instruction, answer) token pairs
    heldout_perplexity(lm, rows)                              # AR: exact; diffusion: ELBO bound (mc_num, seed)
    cal = calibrate(lm, "noise", target=31.5, rows=rows)      # Calibration(degradation, ppl, steps, ...)

Held-out text: ``dllm_sparse/data/mdm_corpus/heldout.jsonl``, the 64 answers the twin never trained on; each answer
is scored given its instruction under the chat template (the prompt is never scored), as the twin's model card
measures it. Perplexity = exp(−Σ log p / Σ answer tokens); for a masked-diffusion model the Monte-Carlo ELBO of
:class:`~dllm_sparse.eval.scoring.scorer.Scorer` (an upper bound on its true perplexity).

Calibration (docs/advantage.md): the AR parent's exact perplexity after a degradation
(:mod:`dllm_sparse.models.degrade`) is brought to ``target``. Search runs on the first ``search_rows`` answers (fast),
then the result is measured on every answer; it is accepted when that full measurement lies within ``tolerance``
(relative) of the target, after at most a few refinement steps on the full set. A degradation that cannot reach the
target raises :class:`CalibrationError` naming the closest perplexity reached.

* ``noise``: bisection on log σ in ``sigma_range``, the next σ interpolated on log perplexity (regula falsi, with
  the Illinois fix against a stuck end); an error when σ's upper end stays below the target or its lower end is
  already above it.
* ``quant``: the bit width is lowered from 8 until every block at ``b`` bits passes the target, then the number
  ``k`` of blocks at ``b`` bits (the others at ``b + 1``) is bisected; an error when 2 bits everywhere stays below
  the target.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from dllm_sparse.models.degrade import Degradation, apply_degradation, block_linears, noise_tensors

__all__ = ["HELDOUT_PATH", "heldout_answers", "heldout_perplexity", "CalibrationError", "Calibration", "calibrate",
           "check_target"]

HELDOUT_PATH = Path(str(resources.files("dllm_sparse") / "data" / "mdm_corpus" / "heldout.jsonl"))


def heldout_answers(tok, path: str | Path = HELDOUT_PATH,
                    limit: int | None = None) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids)`` per held-out row: the instruction under the chat template with the generation
    prompt, then the answer (+ the end-of-turn token when the answer finished). ``limit``: the first rows only."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            prompt = tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                             add_generation_prompt=True)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(r["response"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if r["finished"]
                                                                              else [])
            rows.append((p, a))
            if limit is not None and len(rows) == limit:
                break
    return rows


def heldout_perplexity(lm, rows, *, batch_size: int = 8, mc_num: int = 32, mc_batch: int = 8, seed: int = 0) -> float:
    """exp(−Σ log p / Σ answer tokens) of ``rows`` (:func:`heldout_answers`): exact for an AR model, the ELBO bound
    for a diffusion one (``mc_num`` samples, masks seeded by ``seed`` per answer)."""
    from dllm_sparse.eval.scoring.scorer import Scorer

    kw = {} if lm.kind == "ar" else {"mc_num": mc_num, "mc_batch": mc_batch, "seed": seed}
    scorer = Scorer.from_loaded(lm, batch_size=batch_size, **kw)
    keys = [f"heldout/{i}" for i in range(len(rows))]
    with torch.no_grad():
        lls = [ll for ll, _ in scorer.loglikelihood_tokens(rows, keys=keys)]
    n_tok = sum(len(a) for _, a in rows)
    return math.exp(-sum(lls) / n_tok)


class CalibrationError(ValueError):
    """A degradation cannot bring the model to the requested perplexity (the message names what it reached)."""


def check_target(target) -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise ValueError(f"the calibration target perplexity must be a finite number > 0, got {target!r} "
                         "(e.g. the twin's held-out ELBO perplexity, 31.5)")
    return float(target)


@dataclass
class Calibration:
    degradation: Degradation
    target: float
    ppl: float  # on every held-out answer
    tolerance: float
    parent_ppl: float  # the undegraded parent, every held-out answer
    answers: int
    steps: list[dict] = field(default_factory=list)  # every evaluation: setting, perplexity, answers scored

    @property
    def within(self) -> bool:
        return abs(self.ppl / self.target - 1) <= self.tolerance

    def to_dict(self) -> dict:
        return {"degradation": self.degradation.to_dict(), "target": self.target, "ppl": self.ppl,
                "ratio_to_target": self.ppl / self.target, "tolerance": self.tolerance, "within": self.within,
                "parent_ppl": self.parent_ppl, "ratio_to_parent": self.ppl / self.parent_ppl,
                "answers": self.answers, "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        g = d["degradation"]
        return cls(Degradation(g["method"], g["params"], g["seed"]), d["target"], d["ppl"], d["tolerance"],
                   d["parent_ppl"], d["answers"], list(d.get("steps", [])))


class _Probe:
    """One working copy of the parent whose block weights are reset and re-degraded for every evaluation."""

    def __init__(self, lm, rows, search_rows: int, batch_size: int, seed: int):
        import copy

        from dllm_sparse.models.loading import LoadedModel

        self.work = LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.kind, lm.name, lm.mask_id, lm.family)
        self.original = {(i, n): lin.weight.detach().clone()
                         for i, ls in enumerate(block_linears(self.work.model)) for n, lin in ls}
        self.rows, self.search = rows, rows[:search_rows]
        self.batch_size, self.seed = batch_size, seed
        self._noise = None
        self._seen: dict[tuple[str, bool], float] = {}
        self.steps: list[dict] = []

    def noise(self):
        if self._noise is None:
            self._noise = noise_tensors(self.work.model, self.seed)
        return self._noise

    @torch.no_grad()
    def ppl(self, d: Degradation, full: bool = False) -> float:
        """The perplexity of the parent under ``d`` on the search rows (or all rows); each setting computed once."""
        key = (d.id, full)
        if key in self._seen:
            return self._seen[key]
        for i, ls in enumerate(block_linears(self.work.model)):
            for n, lin in ls:
                lin.weight.copy_(self.original[(i, n)])
        apply_degradation(self.work.model, d, self.noise() if d.method == "noise" else None)
        rows = self.rows if full else self.search
        p = heldout_perplexity(self.work, rows, batch_size=self.batch_size)
        self.steps.append({"setting": d.id, "ppl": p, "answers": len(rows)})
        self._seen[key] = p
        return p


def _noise(probe: _Probe, target: float, tol: float, aim: float, sigma_range, seed: int, max_steps: int,
           full: bool) -> Degradation:
    lo, hi = (math.log(s) for s in sigma_range)

    def f(log_s):
        return math.log(probe.ppl(Degradation("noise", {"sigma": math.exp(log_s)}, seed), full) / target)

    f_lo, f_hi = f(lo), f(hi)
    if f_hi < 0:
        raise CalibrationError(f"noise range exhausted: the largest sigma {sigma_range[1]:g} gives perplexity "
                               f"{target * math.exp(f_hi):.3g}, below the target {target:.3g}; raise the upper end of "
                               "sigma_range (--sigma-max)")
    if f_lo > 0:
        raise CalibrationError(f"noise too large already: the smallest sigma {sigma_range[0]:g} gives perplexity "
                               f"{target * math.exp(f_lo):.3g}, above the target {target:.3g}; lower the lower end of "
                               "sigma_range")
    best = min(((lo, f_lo), (hi, f_hi)), key=lambda t: abs(t[1]))
    side = 0
    for _ in range(max_steps):
        if abs(best[1]) <= math.log1p(aim):
            break
        x = hi - f_hi * (hi - lo) / (f_hi - f_lo) if f_hi != f_lo else (lo + hi) / 2
        x = min(max(x, lo + 0.02 * (hi - lo)), hi - 0.02 * (hi - lo))  # keep inside the bracket
        fx = f(x)
        if abs(fx) < abs(best[1]):
            best = (x, fx)
        if fx > 0:
            hi, f_hi = x, fx
            if side == 1:
                f_lo /= 2  # Illinois: the end that stayed twice is weighted down
            side = 1
        else:
            lo, f_lo = x, fx
            if side == -1:
                f_hi /= 2
            side = -1
    return Degradation("noise", {"sigma": math.exp(best[0])}, seed)


def _quant(probe: _Probe, target: float, group: int, full: bool, start_bits: int = 8) -> Degradation:
    n_blocks = len(block_linears(probe.work.model))
    prev = None
    for bits in range(start_bits, 1, -1):  # every block at `bits`
        p = probe.ppl(Degradation("quant", {"bits": bits, "k": n_blocks, "group": group}), full)
        if p >= target:
            break
        prev = p
    else:
        raise CalibrationError(f"quantisation too mild: every block at 2 bits (groups of {group}) gives perplexity "
                               f"{p:.3g}, below the target {target:.3g}; use a larger group or another method")
    if prev is None:  # already 8 bits everywhere overshoots: no finer knob above it
        return Degradation("quant", {"bits": 8, "k": n_blocks, "group": group})
    # k blocks at `bits`, the rest at bits + 1: k = 0 is below the target, k = n_blocks at or above it.
    lo, hi = 0, n_blocks
    scores = {0: prev, n_blocks: p}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        scores[mid] = probe.ppl(Degradation("quant", {"bits": bits, "k": mid, "group": group}), full)
        if scores[mid] >= target:
            hi = mid
        else:
            lo = mid
    k = min((lo, hi), key=lambda k: abs(math.log(scores[k] / target)))
    if k == 0:  # no block at `bits`: say it as every block at bits + 1 (the same model, a plainer name)
        return Degradation("quant", {"bits": bits + 1, "k": n_blocks, "group": group})
    return Degradation("quant", {"bits": bits, "k": k, "group": group})


def calibrate(lm, method: str, target: float, rows, *, tolerance: float = 0.15, search_rows: int = 16,
              aim: float = 0.03, seed: int = 0, sigma_range=(1e-3, 1.0), group: int = 32, max_steps: int = 16,
              batch_size: int = 8) -> Calibration:
    """Degrade a copy of the AR model ``lm`` by ``method`` to ``target`` perplexity on ``rows`` (module
    docstring); ``lm`` is untouched. Raises :class:`CalibrationError` when the target is out of reach or the
    full-set perplexity misses it by more than ``tolerance``."""
    target = check_target(target)
    if lm.kind != "ar":
        raise ValueError(f"calibration degrades an autoregressive parent (exact perplexity); {lm.name!r} is "
                         f"{lm.kind}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must lie in (0, 1), e.g. 0.15; got {tolerance!r}")
    if method not in ("noise", "quant"):
        raise ValueError(f"calibration method {method!r} is not one of ('noise', 'quant')")
    if not rows:
        raise ValueError("no held-out rows to calibrate on")
    probe = _Probe(lm, rows, max(1, min(search_rows, len(rows))), batch_size, seed)
    parent = heldout_perplexity(lm, rows, batch_size=batch_size)
    if parent >= target:
        raise CalibrationError(f"the parent {lm.name!r} already has perplexity {parent:.3g} >= the target "
                               f"{target:.3g}: nothing to degrade (is the target the twin's perplexity?)")
    if method == "noise":
        d = _noise(probe, target, tolerance, aim, sigma_range, seed, max_steps, full=False)
    else:
        d = _quant(probe, target, group, full=False)
    ppl = probe.ppl(d, full=True)
    refine = min(tolerance / 3, 0.05)  # refine on the full text when the subset's setting is off by more
    if method == "noise" and abs(ppl / target - 1) > refine and len(probe.search) < len(rows):
        # The search subset and the full text disagree: refine on the full text, from the subset's sigma.
        s = d.params["sigma"]
        try:
            d = _noise(probe, target, tolerance, aim, (s / 1.5, s * 1.5), seed, max_steps, full=True)
        except CalibrationError:  # the subset was far off: the whole range again, on the full text
            d = _noise(probe, target, tolerance, aim, sigma_range, seed, max_steps, full=True)
        ppl = probe.ppl(d, full=True)
    elif method == "quant" and abs(ppl / target - 1) > tolerance and len(probe.search) < len(rows):
        # the bit search again on the full text, from one bit above the subset's setting
        d = _quant(probe, target, group, full=True, start_bits=min(16, d.params["bits"] + 1))
        ppl = probe.ppl(d, full=True)
    cal = Calibration(d, target, ppl, tolerance, parent, len(rows), probe.steps)
    if not cal.within:
        raise CalibrationError(f"{method}: the closest setting {d.id} gives perplexity {ppl:.3g} on all "
                               f"{len(rows)} answers, {100 * (ppl / target - 1):+.0f} % from the target "
                               f"{target:.3g} (tolerance ±{100 * tolerance:g} %)")
    return cal
