"""lm-evaluation-harness's model interface over a :class:`~dllm_sparse.eval.scoring.scorer.Scorer`: every request is
scored (or generated) with the sparsity in force on the scorer, so a caller runs an lm-eval task sparsified with
``with scorer.sparsified(config): lm_eval.evaluator.evaluate(lm=ScorerLM(scorer), ...)``.

This is what the sweep and the tasks of :mod:`~dllm_sparse.eval.tasks.lm_eval_tasks` use. The registered model
``dllm_sparse`` (:class:`~dllm_sparse.eval.tasks.lm_eval_model.DllmSparseLM`, for lm-eval's command line and
``simple_evaluate``) is this class plus its model arguments, its own sparsity and the response-cache identity.

Semantics:

* ``loglikelihood`` returns ``(ll, is_greedy)``. AR: exact. Diffusion: the Monte-Carlo ELBO of
  :mod:`dllm_sparse.eval.scoring.elbo` with masks drawn per request from (seed, task, doc_id, request index), so
  dense and sparse runs use identical masks; with ``cfg`` > 0 the guided ELBO on the same masks; ``is_greedy`` as
  the scorer's ``greedy_check`` says.
* ``loglikelihood_rolling``: AR exact (windows of the model's context length); diffusion: the ELBO of the
  whole text given the prefix token (BOS, else EOS). The number of tokens scored per document is kept in
  :attr:`ScorerLM.rolling_tokens` (token-level perplexity).
* Requests of this package's tasks (``dllm_sparse_mc``, ``dllm_sparse_ppl``) are named like the built-in
  scoring's (``builtin_mc/<id>/<choice>``), so a diffusion model draws the same ELBO masks in either scoring.
* ``generate_until``: through ``dllm_sparse.samplers.generate`` (LLaDA sampler or AR loop), sparsified with
  per-step statistics (one config in force; several: attached for the whole generation).
* ``preset`` (:mod:`dllm_sparse.eval.scoring.presets`): the per-task guidance, precision and (``per_task_mc``)
  mc_num / mc_batch of a published evaluation, and its generation settings.

Data parallel (``dist``: accelerate's ``PartialState`` of a launcher, or None): lm-eval gives each process its share
of the requests and gathers the results on rank 0 (as lm-eval's HFLM does); each rank sends its sparsity
statistics to rank 0 after each request type (:meth:`ScorerLM.measured_sparsity` pools them). lm-eval evens the
ranks' shares by repeating a rank's last request; such copies are scored once, so the pooled measured sparsity
counts each real request once (it equals a one-process run's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable
from contextlib import contextmanager
from typing import Any

from lm_eval.api.model import LM
from tqdm.auto import tqdm

from dllm_sparse.eval.tasks.base import LM_EVAL_TASKS, builtin_request_key
from dllm_sparse.eval.tasks.lm_eval_args import as_bool
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = ["ScorerLM", "launcher_state"]

eval_logger = logging.getLogger("lm_eval")

_BUILTIN_NAME = {v: k for k, v in LM_EVAL_TASKS.items()}  # lm-eval task name -> built-in task name


def launcher_state():
    """accelerate's ``PartialState`` when this process is one of several started by ``accelerate launch`` /
    ``torchrun`` (``WORLD_SIZE`` > 1; it sets up the process group), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: a gloo group (accelerate's default: none)
    return state if state.num_processes > 1 else None


class ScorerLM(LM):
    """lm-eval model over ``scorer`` (see the module docstring). ``progress``: the scorer's progress bars during
    requests (lm-eval's ``disable_tqdm`` and ranks other than 0 turn them off); ``preset``: an
    :class:`~dllm_sparse.eval.scoring.presets.EvalPreset` (``per_task_mc``: its per-task mc_num / mc_batch apply);
    ``max_gen_toks`` / ``gen_steps`` / ``block_length`` / ``block_cache`` / ``confidence_threshold``:
    ``generate_until``'s defaults; ``dist``:
    the launcher state of a data-parallel run (:func:`launcher_state`), None for one process."""

    def __init__(self, scorer, *, progress: bool = True, preset=None, per_task_mc: bool = False,
                 max_gen_toks: int = 256, gen_steps: int | None = None, block_length: int | None = None,
                 block_cache: str | None = None, confidence_threshold: float | None = None, dist=None):
        super().__init__()
        self.scorer, self.progress, self.preset, self._preset_mc = scorer, bool(progress), preset, per_task_mc
        self.max_gen_toks, self.gen_steps, self.block_length = max_gen_toks, gen_steps, block_length
        self.block_cache, self.confidence_threshold = block_cache, confidence_threshold
        self._dist = dist
        if dist is not None:
            self._rank, self._world_size = dist.process_index, dist.num_processes
        self._peer_stats: list[dict] = []  # rank 0: the other ranks' statistics (SparsityStats.snapshot)
        #: Tokens scored per ``loglikelihood_rolling`` document, by (task name, doc id).
        self.rolling_tokens: dict[tuple, int] = {}

    @property
    def stats(self) -> SparsityStats | None:
        """Where the requests measure their sparsity: the statistics in force on the scorer (None when dense)."""
        return self.scorer.measured_into

    def measured_sparsity(self) -> dict | None:
        """``{"ranks": n, "sites": {site: {"mean", "per_layer", "forward_passes"}}}``: per sparsified site the mean
        over layers, {layer: sparsity} and the forward passes counted, pooled over every rank of a data-parallel
        run (each rank sends its counts to rank 0 after every request type); None when no forward pass was
        sparsified (a dense run measures nothing)."""
        own = self.stats
        if (own is None or not own.counts) and not any(self._peer_stats):
            return None
        pooled = SparsityStats()
        for snap in [own.snapshot() if own is not None else {}, *self._peer_stats]:
            pooled.merge(snap)
        return {"ranks": self.world_size,
                "sites": {site: {"mean": pooled.mean(site), "per_layer": pooled.per_layer(site),
                                 "forward_passes": pooled.forward_passes(site)} for site in pooled.sites()}}

    def _share_stats(self) -> None:
        """Data parallel: send this rank's statistics to rank 0 (every rank calls this after each request type,
        as lm-eval's own barrier there)."""
        if self.world_size <= 1:
            return
        own = self.stats
        gathered = self.gather_object(own.snapshot() if own is not None else {}, dst=0)
        if self.rank == 0:
            self._peer_stats = [g for i, g in enumerate(gathered) if i != 0]

    # ---- lm-eval properties --------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.scorer.tokenizer

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name (lm-eval fingerprints chat-templated request caches with it), as HFLM's."""
        return str(getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The chat template ``--apply_chat_template`` uses (lm-eval's own selection: the tokenizer's template,
        or the named one of several)."""
        from lm_eval.api.model import TemplateLM

        return TemplateLM.chat_template(self, chat_template)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat as the tokenizer's template renders it (as lm-eval's HFLM; the same for both kinds)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) is None or not hasattr(tok, "apply_chat_template"):
            raise ValueError(f"--apply_chat_template: the tokenizer {self.tokenizer_name!r} has no chat template; "
                             "run without --apply_chat_template, or use an instruct model's tokenizer")
        import jinja2

        kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                  continue_final_message=not add_generation_prompt)
        try:
            return tok.apply_chat_template(chat_history, **kw)
        except jinja2.exceptions.TemplateError:
            # Some templates refuse a system turn (HFLM retries the same way).
            eval_logger.warning("the chat template refused the chat; retrying without its system message")
            return tok.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kw)

    # ---- data parallel (lm-eval's distributed primitives, as HFLM's) ----------------------------------------
    def all_gather(self, tensor):
        if self.world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            self._dist.wait_for_everyone()

    @staticmethod
    def _key(req) -> Hashable:
        """Names a request for the ELBO's per-item generator: (task, document, choice index), independent of
        which other requests are in the batch (a partly cached run draws the same masks as a fresh one). This
        package's tasks use the built-in scoring's names (:func:`~dllm_sparse.eval.tasks.base.builtin_request_key`)."""
        builtin = _BUILTIN_NAME.get(req.task_name)
        if builtin is not None and isinstance(req.doc, dict) and "id" in req.doc:
            return builtin_request_key(builtin, req.doc["id"], req.idx if req.request_type == "loglikelihood"
                                       else None)
        if req.doc_id is None:
            return ("args", repr(req.args))
        return (req.task_name, req.doc_id, req.idx)

    # ---- requests ------------------------------------------------------------------------------------------
    def _cfg_groups(self, requests) -> dict[tuple[float | None, tuple[int, int] | None], list[int]]:
        """Request indices by the (guidance, (mc_num, mc_batch)) they are scored with: the preset's per-task
        values, else None = the scorer's."""
        groups: dict[tuple[float | None, tuple[int, int] | None], list[int]] = {}
        for i, req in enumerate(requests):
            task = req.task_name or ""
            w = None if self.preset is None else self.preset.cfg_for(task)
            mc = self.preset.mc_override(task) if self._preset_mc else None
            groups.setdefault((w, mc), []).append(i)
        return groups

    @contextmanager
    def _preset_scorer(self, mc: tuple[int, int] | None = None):
        """The scorer with the preset's ELBO settings for the calls inside (its precision; ``mc``: mc_num and
        mc_batch), restored after; unchanged without a preset or for an autoregressive scorer."""
        sc = self.scorer
        if self.preset is None or sc.kind != "diffusion":
            yield
            return
        old = sc.precision, sc.mc_num, sc.mc_batch
        sc.precision = self.preset.precision
        if mc is not None:
            sc.mc_num, sc.mc_batch = mc
        try:
            yield
        finally:
            sc.precision, sc.mc_num, sc.mc_batch = old

    def _show_progress(self, disable_tqdm: bool) -> bool:
        return self.progress and not disable_tqdm and self.rank == 0

    @contextmanager
    def _scorer_progress(self, disable_tqdm: bool):
        """The scorer's tqdm bar (sequences for AR, forward-pass chunks for the ELBO) for the calls inside."""
        old = self.scorer.progress
        self.scorer.progress = self._show_progress(disable_tqdm)
        try:
            yield
        finally:
            self.scorer.progress = old

    @staticmethod
    def _distinct(requests) -> tuple[list, list[int]]:
        """The distinct request objects and, per request, its index among them. lm-eval repeats an ``Instance``
        object when it pads a data-parallel rank's share (and for ``repeats``); a log-likelihood is the same for
        every copy, so each is scored once and the measured sparsity counts real requests only."""
        first: dict[int, int] = {}
        distinct, where = [], []
        for req in requests:
            if id(req) not in first:
                first[id(req)] = len(distinct)
                distinct.append(req)
            where.append(first[id(req)])
        return distinct, where

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        requests, where = self._distinct(requests)
        out: list = [None] * len(requests)
        with self._scorer_progress(disable_tqdm):
            for (w, mc), idx in self._cfg_groups(requests).items():
                pairs = [requests[i].args[:2] for i in idx]
                keys = [self._key(requests[i]) for i in idx]
                with self._preset_scorer(mc):
                    res = self.scorer.loglikelihood(pairs, keys=keys,
                                                    cfg_scale=w if self.scorer.kind == "diffusion" else None)
                for i, r in zip(idx, res, strict=True):
                    out[i] = r
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        self._share_stats()
        return [out[i] for i in where]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        requests, where = self._distinct(requests)
        texts = [req.args[0] for req in requests]
        keys = [self._key(req) for req in requests]
        with self._scorer_progress(disable_tqdm), self._preset_scorer():
            scores = self.scorer.loglikelihood_rolling(texts, keys=keys)
        out = [ll for ll, _ in scores]
        for req, res, (_, n) in zip(requests, out, scores, strict=True):
            self.rolling_tokens[(req.task_name, req.doc_id)] = n
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        self._share_stats()
        return [out[i] for i in where]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from dllm_sparse.samplers import GenerationConfig, StepSparsity, fit_geometry, generate

        sc = self.scorer
        # Requests by their generation arguments and their guidance (the preset's per-task value, else the
        # scorer's cfg_scale), as the official generate_until passes its cfg to the sampler.
        groups: dict[tuple[str, float], list[int]] = {}
        for i, req in enumerate(requests):
            w = sc.cfg_scale if self.preset is None else self.preset.cfg_for(req.task_name or "")
            groups.setdefault((repr(sorted((req.args[1] or {}).items())), w), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=not self._show_progress(disable_tqdm),
                   leave=False)
        for (_, w), idxs in groups.items():
            kw = dict(requests[idxs[0]].args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if as_bool("do_sample", kw.get("do_sample", False)) else 0.0
            cfg_kw: dict[str, Any] = dict(max_new_tokens=n_new, temperature=temperature, stop_strings=until,
                                          seed=sc.seed)
            if sc.kind == "diffusion":
                if (self.gen_steps or 0) > n_new:  # a step past one token per step commits nothing
                    eval_logger.warning(f"gen_steps={self.gen_steps} is more than the {n_new} tokens this task "
                                        f"generates; using {n_new} steps (one token per step)")
                steps, block = fit_geometry(n_new, self.gen_steps, self.block_length)
                cfg_kw.update(steps=steps, block_length=block, mask_id=sc.mask_id,
                              logit_shift=sc.shift_logits, cfg_scale=w)
                if self.preset is not None:
                    cfg_kw["confidence"] = self.preset.confidence
                cfg_kw["block_cache"] = self.block_cache
                if self.confidence_threshold is not None:  # steps become the bound: one token per step at worst
                    cfg_kw.update(steps=n_new, confidence_threshold=self.confidence_threshold)
            config = GenerationConfig(**cfg_kw)
            for s in range(0, len(idxs), sc.batch_size):
                chunk = idxs[s:s + sc.batch_size]
                prompts = [requests[i].args[0] for i in chunk]
                configs = sc.sparsity
                if len(configs) == 1:  # per-step statistics (and a step-scoped rule sees its steps)
                    res = generate(sc.model, sc.tokenizer, prompts, config, kind=sc.kind,
                                   sparsity=StepSparsity(configs[0], stats=sc.measured_into))
                else:
                    with sc.attached():
                        res = generate(sc.model, sc.tokenizer, prompts, config, kind=sc.kind)
                for i, text in zip(chunk, res.texts, strict=True):
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        self._share_stats()
        return out  # type: ignore[return-value]
