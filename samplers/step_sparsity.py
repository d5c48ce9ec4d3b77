"""Step-aware sparsification: sparsify a whole generation and keep the statistics of every step apart.

    sp = StepSparsity(SparsityConfig("input", TopP(0.9)))     # or StepSparsity("input", TopP(0.9))
    out = generate(model, tok, prompts, cfg, sparsity=sp)     # or callbacks=[sp]
    sp.stats.per_layer("input", tag=3, group="masked")        # step 3, still-masked positions
    sp.per_step()                                              # {tag: mean sparsity over layers}

It is an ordinary generation callback: at generation begin it enters :func:`dllm_sparse.sparsity.hooks` (hooks on
every selected layer, masks computed afresh at every forward), before every forward it enters
``stats.tagged(state.tag, groups=state.groups)`` and leaves it after the step. Tags: the step index for
diffusion, ``"prefill"`` then the decode step index for autoregressive runs. Token groups (besides ``"all"``,
the real tokens): diffusion ``prompt`` / ``masked`` (still masked at the forward input) / ``decoded``
(already committed); AR ``prompt`` at the prefill and ``decoded`` at decode steps.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from contextlib import ExitStack
from typing import Any

import torch

from dllm_sparse.sparsity.config import SparsityConfig, as_config
from dllm_sparse.sparsity.hooks import MaskEvent, MaskSelector, sparsify
from dllm_sparse.sparsity.rules import SHARED_SCOPES, SparsityRule
from dllm_sparse.sparsity.sites import FFNSite
from dllm_sparse.sparsity.stats import ALL, SparsityStats
from dllm_sparse.steps import GenerationCallback, StepState

__all__ = ["StepSparsity", "VOTERS"]

VOTERS = ("all", "masked", "block")
"""Which tokens vote for a shared keep-set (scope "step" / "step_wina") at a diffusion step: ``all`` real tokens
of the forward (the default), the ``masked`` positions (still holding the mask token) or the current ``block``."""


def _tag_key(tag: Hashable):
    # "prefill" first, then steps in numeric order, then anything else by name.
    if tag == "prefill":
        return (0, 0, "")
    if isinstance(tag, int):
        return (1, tag, "")
    return (2, 0, str(tag))


class StepSparsity(GenerationCallback):
    """Apply a :class:`SparsityConfig` (site, rule, layers) during generation, with per-step statistics.

    ``StepSparsity(config)``, or ``StepSparsity(site, rule, layers)`` which builds the config. ``stats``: a
    :class:`SparsityStats` to accumulate into (kept across generations); by default a fresh one is made at each
    generation begin. ``record_masks``, ``mask_observers`` (e.g. a
    :class:`~dllm_sparse.samplers.tracking.MaskOverlapTracker`) and ``select_mask`` are passed to
    :func:`~dllm_sparse.sparsity.hooks`. ``groups=False`` counts only the ``"all"`` group (cheaper).
    ``voters`` (shared scopes only, see :data:`VOTERS`): which positions of a diffusion step choose the one keep-set
    that every position then uses; AR runs always use ``all`` (the prefill's prompt, then one token per step).
    """

    def __init__(
        self,
        config: SparsityConfig | FFNSite | str | None = None,
        rule: SparsityRule | None = None,
        layers: Iterable[int] | None = None,
        stats: SparsityStats | None = None,
        record_masks: bool = False,
        mask_observers: Iterable[Callable[[MaskEvent], None]] = (),
        select_mask: MaskSelector | None = None,
        groups: bool = True,
        *,
        site: FFNSite | str | None = None,
        voters: str = "all",
    ):
        self.config = as_config(config, rule, layers, site=site, caller="StepSparsity")
        if voters not in VOTERS:
            raise ValueError(f"voters must be one of {VOTERS}, got {voters!r}")
        if voters != "all" and self.config.rule.scope not in SHARED_SCOPES:
            raise ValueError(f"voters={voters!r} chooses who votes for a shared keep-set; the rule's scope is "
                             f"{self.config.rule.scope!r}: use scope 'step' or 'step_wina', or voters='all'")
        self.voters = voters
        self.site = self.config.site
        self.rule = self.config.rule
        self.layers = None if self.config.layers is None else list(self.config.layers)
        self._given_stats = stats
        self.stats: SparsityStats | None = stats
        self.record_masks = record_masks
        self.mask_observers = list(mask_observers)
        self.select_mask = select_mask
        self.use_groups = groups
        self._run: ExitStack | None = None
        self._step: ExitStack | None = None

    # ---- callback hooks ----------------------------------------------------------------------------------
    def on_generation_begin(self, state: StepState) -> None:
        if self._run is not None:
            raise RuntimeError("this StepSparsity is already active in another generation")
        stats = self._given_stats if self._given_stats is not None else SparsityStats(record_masks=self.record_masks)
        self._run = ExitStack()
        self._sparsifier = None
        self.stats = self._run.enter_context(sparsify(
            state.model, self.config, stats=stats, record_masks=self.record_masks,
            mask_observers=self.mask_observers, select_mask=self.select_mask,
            on_attach=self._keep_sparsifier,
        ))

    def _keep_sparsifier(self, sparsifier) -> None:
        self._sparsifier = sparsifier

    def _step_voters(self, state: StepState):
        """[B_fwd, S] bool: the positions that vote at this step (None: the default, the real tokens)."""
        if self.voters == "all" or state.kind != "diffusion":
            return None
        if self.voters == "masked":
            return state.groups.get("masked") if state.groups else state.masked
        block = torch.zeros(state.canvas.shape, dtype=torch.bool, device=state.canvas.device)
        block[:, state.block_slice] = True
        return state.for_forward(block, computed_rows=True)  # a block cache computes state.rows only

    def on_step_begin(self, state: StepState) -> None:
        self._close_step()
        if self._sparsifier is not None:
            self._sparsifier.voters = self._step_voters(state)
        self._step = ExitStack()
        self._step.enter_context(self.stats.tagged(state.tag, groups=state.groups if self.use_groups else None))

    def on_step_end(self, state: StepState) -> None:
        self._close_step()

    def on_generation_end(self, state: StepState) -> None:
        self._close_step()
        if self._run is not None:
            run, self._run = self._run, None
            run.close()

    def _close_step(self) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.close()

    # ---- reports -------------------------------------------------------------------------------------------
    def _need_stats(self) -> SparsityStats:
        if self.stats is None:
            raise RuntimeError("no statistics yet: run a generation with this StepSparsity first")
        return self.stats

    def tags(self) -> list:
        """Step tags seen, in step order (``"prefill"`` first)."""
        return sorted(self._need_stats().tags, key=_tag_key)

    def per_step(self, group: str = ALL, site: str | None = None) -> dict[Hashable, float]:
        """{tag: mean over layers of the measured sparsity} for one token group."""
        stats = self._need_stats()
        site = str(site or self.site)
        return {t: stats.mean(site, tag=t, group=group) for t in self.tags()}

    def per_step_layer(self, group: str = ALL, site: str | None = None) -> dict[Hashable, dict[int, float]]:
        """{tag: {layer: sparsity}} for one token group."""
        stats = self._need_stats()
        site = str(site or self.site)
        return {t: stats.per_layer(site, tag=t, group=group) for t in self.tags()}

    def records(self) -> list[dict]:
        """Tidy rows (tag, group, layer, site, tokens, width, sparsity), in step order."""
        rows = self._need_stats().records()
        return sorted(rows, key=lambda r: (_tag_key(r["tag"]), r["group"], r["site"], r["layer"]))

    def mean(self, group: str = ALL, tag: Hashable | None = None) -> float:
        """Mean over layers of the sparsity pooled over all steps (or one ``tag``)."""
        return self._need_stats().mean(str(self.site), tag=tag, group=group)

    def pooled(self, tags: Iterable[Hashable] | None = None, group: str = ALL) -> float:
        """Mean over layers of the per-layer sparsity pooled (token-weighted) over ``tags`` (all by default),
        e.g. ``pooled([t for t in sp.tags() if t != "prefill"])`` for the decode phase of an AR run."""
        wanted = None if tags is None else set(tags)
        zeros: dict[int, float] = {}
        entries: dict[int, float] = {}
        for r in self._need_stats().records():
            if r["group"] != group or r["site"] != str(self.site) or (wanted is not None and r["tag"] not in wanted):
                continue
            if r["tokens"]:
                zeros[r["layer"]] = zeros.get(r["layer"], 0.0) + r["sparsity"] * r["tokens"] * r["width"]
                entries[r["layer"]] = entries.get(r["layer"], 0.0) + r["tokens"] * r["width"]
        per = [zeros[k] / entries[k] for k in entries if entries[k]]
        return sum(per) / len(per) if per else float("nan")

    def describe(self) -> dict[str, Any]:
        return {"site": str(self.site), "rule": self.rule.to_dict(), "layers": self.layers, "id": self.config.id}
