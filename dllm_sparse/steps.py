"""The step protocol: what a generator tells its callbacks before and after every forward pass.

This sits below everything that generates or observes generation: the samplers (``dllm_sparse.samplers``)
build a :class:`StepState` and run a :class:`CallbackList`; per-step sparsity, mask tracking and mask-reuse
policies are :class:`GenerationCallback` objects. Nothing here imports a sampler or a model.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Geometry", "StepState", "GenerationCallback", "CallbackList", "attached_callbacks"]


@dataclass(frozen=True)
class Geometry:
    """A generation's block schedule, resolved once by the generator (``StepState.geometry``).

    Diffusion: the ``gen_length`` generated positions are cut into ``num_blocks`` blocks of ``block_length``,
    decoded left to right; ``steps`` is the most steps the generation may take and ``steps_per_block`` the most
    one block may take. The fixed schedule (:func:`~dllm_sparse.samplers.step_rule.num_transfer_tokens`) spends
    exactly ``steps_per_block`` steps on every block; a sampler whose block ends when it has no mask left may
    spend fewer, so callbacks read the block boundaries from the step state (``block``, ``first_step_of_block``,
    ``last_step_of_block``), never from these numbers. Autoregressive: one block of ``max_new_tokens`` positions
    and as many steps (one token per step; the prefill is step 0)."""

    gen_length: int
    block_length: int
    num_blocks: int
    steps: int  # the most steps of the generation
    steps_per_block: int  # the most steps of one block


@dataclass
class StepState:
    """What callbacks see. Built by the generator before each forward pass and updated after it.

    At ``on_step_begin``: ``canvas`` is the (conditional) forward input; ``groups`` are boolean token masks
    shaped like the forward batch ([B_fwd, S], right-aligned to the activations' token dim, the convention of
    :meth:`dllm_sparse.sparsity.stats.SparsityStats.tagged`): ``prompt`` (real prompt tokens), ``masked`` (positions
    still holding the mask token, diffusion) and ``decoded`` (generated positions already written).
    ``forward_batch`` is B, or 2B with classifier-free guidance (conditional rows first). With a block cache
    (``GenerationConfig(block_cache=...)``) a step's forward may compute only some canvas rows: ``rows`` is then
    that slice of the canvas, the forward's activations have ``len(rows)`` positions and ``groups`` are cut to
    them (``canvas``, ``masked``, ``attention_mask`` and ``prompt_mask`` stay whole-canvas); None = every row.

    At ``on_step_end``: ``canvas`` includes this step's tokens, ``committed`` is a bool [B, S] of the positions
    written this step, ``new_tokens`` (AR) the [B] tokens appended, ``logits`` (diffusion) the logits the step
    chose from for the current block, [B, block_length, V] (after guidance and any logit shift). Return
    ``True`` or ``{"stop": True}`` from ``on_step_end`` (or call :meth:`request_stop`) to stop generation after
    this step.

    Geometry (set by the generator, read by callbacks instead of re-deriving it from the config):
    ``geometry`` (:class:`Geometry`) is the resolved schedule; per step, ``block`` is the current block's index,
    ``step_in_block`` the step's index within it, ``block_slice`` the block's canvas columns
    (``block_start``/``block_end``), ``first_step_of_block`` whether this is the block's first step and
    ``last_step_of_block`` whether it is its last: at ``on_step_begin`` by the plan (the block's step budget is
    spent after this step), at ``on_step_end`` by the outcome (budget spent, or no position of the block is still
    masked). Autoregressive: a single block, ``block`` 0, ``step_in_block`` = ``step``, ``block_slice`` the
    ``max_new_tokens`` columns after the prompt. :meth:`for_forward` lays a [B, S] canvas mask out as the forward
    batch (guidance's unconditional rows repeat the conditional ones; optionally cut to ``rows``).
    """

    kind: str  # "diffusion" or "ar"
    model: Any
    config: Any  # the generator's GenerationConfig
    batch_size: int
    prompt_length: int  # padded prompt length P
    num_steps: int  # planned steps (AR: max_new_tokens)
    geometry: Geometry | None = None
    step: int = 0
    block: int = 0
    step_in_block: int = 0
    block_slice: slice | None = None  # the current block's canvas columns
    first_step_of_block: bool = False
    last_step_of_block: bool = False
    tag: Hashable = 0
    canvas: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # [B, S] of real tokens
    prompt_mask: torch.Tensor | None = None  # [B, S] real prompt tokens
    masked: torch.Tensor | None = None  # [B, S] positions holding the mask token at the forward input
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: slice | None = None  # diffusion with a block cache: the canvas rows this forward computes (None = all)
    forward_batch: int = 0
    committed: torch.Tensor | None = None
    new_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # diffusion, at on_step_end: [B, block_length, V] of the current block
    nfe: int = 0
    elapsed: float = 0.0
    stop_requested: bool = False

    def request_stop(self) -> None:
        self.stop_requested = True

    @property
    def block_start(self) -> int:
        """The current block's first canvas column."""
        return self.block_slice.start

    @property
    def block_end(self) -> int:
        """One past the current block's last canvas column."""
        return self.block_slice.stop

    def for_forward(self, mask: torch.Tensor, *, computed_rows: bool = False) -> torch.Tensor:
        """A per-row canvas mask [B, S] as the forward batch sees it: [forward_batch, S], repeated for the
        unconditional rows of classifier-free guidance (conditional rows first); with ``computed_rows`` cut to the
        canvas rows this step's forward computes (``rows``, a block cache)."""
        if self.forward_batch and self.forward_batch != mask.shape[0]:
            if self.forward_batch % mask.shape[0]:
                raise ValueError(f"a mask of {mask.shape[0]} rows cannot be laid out as the forward batch of "
                                 f"{self.forward_batch} rows; give one row per prompt ({self.batch_size})")
            mask = mask.repeat(self.forward_batch // mask.shape[0], 1)
        return mask[:, self.rows] if computed_rows and self.rows is not None else mask


class GenerationCallback:
    """Base class of generation callbacks; override any subset. A plain callable ``fn(state)`` passed in
    ``callbacks=`` is used as ``on_step_end``.

    Order per call: ``on_generation_begin`` once, then per step ``on_step_begin`` (before the forward) and
    ``on_step_end`` (after the tokens were written), then ``on_generation_end`` (always, also when generation
    raises; callbacks are ended in reverse order).
    """

    def on_generation_begin(self, state: StepState) -> None:
        pass

    def on_step_begin(self, state: StepState) -> None:
        pass

    def on_step_end(self, state: StepState) -> bool | dict | None:
        pass

    def on_generation_end(self, state: StepState) -> None:
        pass


def attached_callbacks(model: Any) -> list[Any]:
    """The callbacks that modules inside ``model`` need at every generation step, once each, in module order: the
    ``generation_callback`` of each submodule that has one (a step-delta FFN swapped in by
    :func:`~dllm_sparse.samplers.step_delta.step_delta` names its run there). Without its step such a module would
    run its plain dense path, silently; so every generator runs these with the callbacks it is given."""
    out: list[Any] = []
    for m in model.modules() if hasattr(model, "modules") else ():
        cb = getattr(m, "generation_callback", None)
        if cb is not None and not any(cb is c for c in out):
            out.append(cb)
    return out


class CallbackList:
    """Runs callbacks in order at step begin/end (reverse order at the end of generation). With ``model``, the
    callbacks its modules need (:func:`attached_callbacks`) run after the given ones (once, also when given)."""

    def __init__(self, callbacks: Iterable[Any] = (), model: Any = None):
        callbacks = list(callbacks or ())
        callbacks += [cb for cb in attached_callbacks(model) if not any(cb is c for c in callbacks)]
        self.items: list[Any] = []
        for cb in callbacks or ():
            if cb is None:
                continue
            if not any(hasattr(cb, m) for m in ("on_step_begin", "on_step_end", "on_generation_begin",
                                                "on_generation_end")):
                if not callable(cb):
                    raise TypeError(f"callback {cb!r} is neither a GenerationCallback nor callable")
                cb = _FunctionCallback(cb)
            self.items.append(cb)
        self._started: list[Any] = []

    def _call(self, cb: Any, name: str, state: StepState):
        fn = getattr(cb, name, None)
        return fn(state) if fn is not None else None

    def generation_begin(self, state: StepState) -> None:
        for cb in self.items:
            self._started.append(cb)
            self._call(cb, "on_generation_begin", state)

    def step_begin(self, state: StepState) -> None:
        for cb in self.items:
            self._call(cb, "on_step_begin", state)

    def step_end(self, state: StepState) -> bool:
        """True when a callback asked to stop."""
        for cb in self.items:
            out = self._call(cb, "on_step_end", state)
            if out is True or (isinstance(out, dict) and out.get("stop")):
                state.stop_requested = True
        return state.stop_requested

    def generation_end(self, state: StepState) -> None:
        errors = []
        for cb in reversed(self._started):
            try:
                self._call(cb, "on_generation_end", state)
            except Exception as e:  # noqa: BLE001 - end every callback, re-raise the first error afterwards
                errors.append(e)
        self._started.clear()
        if errors:
            raise errors[0]


class _FunctionCallback(GenerationCallback):
    def __init__(self, fn: Callable[[StepState], Any]):
        self.fn = fn

    def on_step_end(self, state: StepState):
        return self.fn(state)
