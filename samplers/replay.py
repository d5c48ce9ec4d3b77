"""Teacher-forced replay of a recorded masked-diffusion trajectory.

    from dllm_sparse.samplers import GenerationConfig, generate, replay
    cfg = GenerationConfig(gen_length=64, steps=64, block_length=16)
    dense = generate(model, tok, prompts, cfg)                         # record a trajectory
    sp, policy = reuse_sparsity("input", TopP(0.9), "every2")
    rep = replay(model, prompts, dense, sparsity=sp, callbacks=[policy])
    rep.predictions()       # per step: argmax at the still-masked positions of the block (row-major)
    rep.commit_agreement    # fraction of recorded commits the configuration predicts (1.0 for dense greedy)
    rep.nll_per_token       # -log p of the recorded tokens, per token, along the recorded reveal order

A replay re-runs every recorded step on the canvas the trajectory had at that step and writes the recorded
tokens, whatever the model predicts: every configuration (dense, sparse, each reuse policy) sees the very same
canvases, so its per-step predictions compare position by position, free of the divergence of free-running
generation. It is the sampler itself (``MaskedDiffusionGenerator.generate(..., forced_commits=...)``): the same
forward passes, classifier-free guidance, logit shift (``MaskedDiffusionGenerator.logit_shift``) and callbacks
with the same :class:`~dllm_sparse.steps.StepState` sequence, so :class:`StepSparsity`, reuse policies and
trackers attach unchanged.

With a trajectory that writes a text's true tokens in a fixed order (block by block, the sampler's n // s (+1)
tokens per step), ``log_likelihood`` is an any-order bound of the text's likelihood along that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dllm_sparse.steps import GenerationCallback, StepState

from .config import GenerationConfig, GenerationResult, StepInfo
from .generate import make_generator

__all__ = ["replay", "ReplayResult", "ReplayStep", "trajectory_of", "prediction_agreement"]


def trajectory_of(recorded: GenerationResult | Sequence[Any]) -> list[dict]:
    """A trajectory as ``[{"committed": per row the generated indices, "tokens": the ids}, ...]`` from a
    :class:`GenerationResult` (its trace), a list of :class:`StepInfo` or a list of such dicts (JSON-able)."""
    if isinstance(recorded, GenerationResult):
        if recorded.kind != "diffusion":
            raise ValueError(f"replay needs a masked-diffusion trajectory; this result is of kind {recorded.kind!r}")
        recorded = recorded.trace
    out = []
    for t, entry in enumerate(recorded):
        if isinstance(entry, StepInfo):
            out.append({"committed": entry.committed, "tokens": entry.tokens})
        elif isinstance(entry, dict) and "committed" in entry and "tokens" in entry:
            out.append({"committed": entry["committed"], "tokens": entry["tokens"]})
        else:
            raise TypeError(f"trajectory step {t} is {type(entry).__name__}; give a GenerationResult, StepInfo "
                            "objects or dicts with 'committed' and 'tokens'")
    return out


@dataclass
class ReplayStep:
    """One replayed step. Positions are generated indices (0 = first generated token), per row."""

    step: int
    block: int
    positions: list[list[int]]  # still masked in the current block at the forward input
    argmax: list[list[int]]  # the argmax prediction at ``positions``
    committed: list[list[int]]  # the recorded positions written at this step (trajectory order)
    tokens: list[list[int]]  # the recorded tokens written there
    logprobs: list[list[float]]  # log p(recorded token) there (float32 log-softmax of the step's logits)
    hits: list[list[bool]]  # argmax == recorded token at each committed position


@dataclass
class ReplayResult:
    """What :func:`replay` returns: the per-step predictions and the sampler's own result of the forced run."""

    steps: list[ReplayStep] = field(default_factory=list)
    result: GenerationResult | None = None  # sequences = the recorded canvas; stats with sparsity=...

    def predictions(self) -> list[list[int]]:
        """Per step, the argmax at the still-masked positions of the current block, row-major (rows in order,
        positions ascending): the form :func:`prediction_agreement` compares."""
        return [[t for row in s.argmax for t in row] for s in self.steps]

    @property
    def log_likelihood(self) -> float:
        """Sum of log p(recorded token) over every committed position (step, row, trajectory order)."""
        return sum(lp for s in self.steps for row in s.logprobs for lp in row)

    @property
    def num_tokens(self) -> int:
        return sum(len(row) for s in self.steps for row in s.committed)

    @property
    def nll_per_token(self) -> float:
        n = self.num_tokens
        return -self.log_likelihood / n if n else float("nan")

    @property
    def commit_agreement(self) -> float:
        """Fraction of committed positions whose argmax equals the recorded token (1.0 when a dense greedy
        trajectory is replayed densely)."""
        hits = [h for s in self.steps for row in s.hits for h in row]
        return sum(hits) / len(hits) if hits else float("nan")


def prediction_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Fraction of equal predictions of two replays of the same trajectory (:meth:`ReplayResult.predictions`,
    or the same lists read back from JSON); NaN when they cover different positions or none."""
    x = [u for step in a for u in step]
    y = [v for step in b for v in step]
    if len(x) != len(y) or not x:
        return float("nan")
    return sum(u == v for u, v in zip(x, y, strict=True)) / len(x)


class _Recorder(GenerationCallback):
    """Last callback of a replay: reads the block logits at every step end."""

    def __init__(self, trajectory: list[dict]):
        self.trajectory = trajectory
        self.steps: list[ReplayStep] = []

    def on_step_end(self, state: StepState) -> None:
        B = state.batch_size
        start = state.block_start - state.prompt_length  # generated index of the block's first position
        logits = state.logits
        x0 = logits.argmax(dim=-1)  # the sampler's x0 at temperature 0
        logp = torch.log_softmax(logits.float(), dim=-1)
        block_masked = state.masked[:B, state.block_slice]
        rec = self.trajectory[int(state.step)]
        positions, argmax, logprobs, hits = [], [], [], []
        for r in range(B):
            cols = block_masked[r].nonzero().squeeze(-1)
            positions.append([start + int(c) for c in cols])
            argmax.append(x0[r, cols].tolist())
            lp, hit = [], []
            for c, t in zip(rec["committed"][r], rec["tokens"][r], strict=True):
                lp.append(float(logp[r, int(c) - start, int(t)]))
                hit.append(int(x0[r, int(c) - start]) == int(t))
            logprobs.append(lp)
            hits.append(hit)
        self.steps.append(ReplayStep(int(state.step), int(state.block), positions, argmax,
                                     [list(c) for c in rec["committed"]], [list(t) for t in rec["tokens"]],
                                     logprobs, hits))


@torch.no_grad()
def replay(
    model: Any,
    prompts: Any,
    trajectory: GenerationResult | Sequence[Any],
    config: GenerationConfig | None = None,
    *,
    tokenizer: Any = None,
    callbacks: Iterable[Any] = (),
    sparsity: Any = None,
    attention_mask: torch.Tensor | None = None,
    apply_chat_template: bool = False,
    **overrides,
) -> ReplayResult:
    """Replay ``trajectory`` (a :class:`GenerationResult`, its ``trace`` or the same as dicts) on ``prompts``.

    ``model``: an ``nn.Module`` or a ``LoadedModel``; ``prompts`` as for :func:`generate` (the prompts the
    trajectory was recorded with). ``config``: the geometry it was recorded with (default: the result's
    config); ``overrides`` change fields. ``sparsity`` / ``callbacks`` as for :func:`generate` (sparsity
    first). Returns per step the argmax at the still-masked positions of the block and the log-probability of
    every recorded token; ``result`` is the sampler's result of the forced run (``result.stats`` with
    sparsity).
    """
    if config is None:
        config = trajectory.config if isinstance(trajectory, GenerationResult) else None
    if config is None:
        raise ValueError("replay needs the GenerationConfig the trajectory was recorded with (pass config=...)")
    if overrides:
        config = config.replace(**overrides)
    steps = trajectory_of(trajectory)
    gen = make_generator(model, tokenizer, kind="diffusion")
    recorder = _Recorder(steps)
    sparsity_cbs = [] if sparsity is None else (list(sparsity) if isinstance(sparsity, (list, tuple)) else [sparsity])
    result = gen.generate(prompts, config, attention_mask=attention_mask, apply_chat_template=apply_chat_template,
                          callbacks=[*sparsity_cbs, *(callbacks or ()), recorder], forced_commits=steps)
    if sparsity_cbs:
        stats = [getattr(s, "stats", None) for s in sparsity_cbs]
        result.stats = stats[0] if len(stats) == 1 else stats
    return ReplayResult(recorder.steps, result)
