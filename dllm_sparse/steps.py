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

__all__ = ["StepState", "GenerationCallback", "CallbackList", "attached_callbacks"]


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
    """

    kind: str  # "diffusion" or "ar"
    model: Any
    config: Any  # the generator's GenerationConfig
    batch_size: int
    prompt_length: int  # padded prompt length P
    num_steps: int  # planned steps (AR: max_new_tokens)
    step: int = 0
    block: int = 0
    step_in_block: int = 0
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
