"""A progress bar for long generations, as a generation callback.

    from dllm_sparse.samplers import ProgressBar, generate
    out = generate(lm, prompts=["Hello"], gen_length=256, callbacks=[ProgressBar(desc="LLaDA")])

One tick per step: a denoising step (diffusion; the bar's total is ``steps``) or a decoded token (AR; the total is
``max_new_tokens``, and the bar ends early when every row stopped). The bar is tqdm's, written to stderr and
hidden when stderr is not a terminal (tqdm's ``disable=None``); keyword arguments go to ``tqdm``.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from dllm_sparse.steps import GenerationCallback, StepState

__all__ = ["ProgressBar"]


class ProgressBar(GenerationCallback):
    """A tqdm bar over a generation's steps (one bar per generation; ``bar`` is the last one, closed at the end)."""

    def __init__(self, desc: str | None = None, **tqdm_kwargs: Any):
        self.desc = desc
        self.tqdm_kwargs = {"disable": None, "leave": False, "dynamic_ncols": True, **tqdm_kwargs}
        self.bar: tqdm | None = None

    def on_generation_begin(self, state: StepState) -> None:
        unit = "step" if state.kind == "diffusion" else "token"
        self.bar = tqdm(total=state.num_steps, desc=self.desc, unit=unit, **self.tqdm_kwargs)

    def on_step_end(self, state: StepState) -> None:
        self.bar.update(1)

    def on_generation_end(self, state: StepState) -> None:
        if self.bar is not None:
            self.bar.close()
