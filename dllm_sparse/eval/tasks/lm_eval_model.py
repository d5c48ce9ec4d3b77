"""lm-evaluation-harness model ``dllm_sparse``: an AR or masked-diffusion model plus one sparsity configuration.

Python API (the supported path; lm-eval >= 0.4.9, tested with 0.4.13)::

    import lm_eval
    from dllm_sparse.eval.tasks.lm_eval_model import DllmSparseLM
    lm = DllmSparseLM(pretrained="smollm2-135m", sparsity="input:top_p:0.9")   # or a SparsityConfig
    out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)
    lm.stats.mean("input")                       # measured sparsity of every forward pass of the run

Command line: ``dllm-sparse-lm-eval`` (also ``python -m dllm_sparse.eval.tasks.lm_eval_model``) is lm-eval's own CLI,
every flag unchanged, with the ``dllm_sparse`` model registered and this package's task folder
(:data:`dllm_sparse.eval.tasks.lm_eval_tasks.TASK_DIR`: ``dllm_sparse_mc``, ``dllm_sparse_ppl``) given as
``--include_path`` when the command line names none::

    dllm-sparse-lm-eval --model dllm_sparse --model_args pretrained=smollm2-135m,sparsity=input:top_p:0.9 \
        --tasks dllm_sparse_mc --limit 4 --batch_size 16 --device cpu      # offline, 40 s on a 2-core CPU
    dllm-sparse-lm-eval run --model dllm_sparse \
        --model_args pretrained=GSAI-ML/LLaDA-8B-Base,sparsity=input:top_p:0.9,dtype=bf16,device=auto,mc_num=128 \
        --tasks arc_easy --batch_size 16

Why not the stock ``lm_eval --model dllm_sparse``: lm-eval 0.4.13 builds the model from its registry before it
imports any task code, and offers no supported way for another package to fill that registry: it scans no
entry-point group (its ``Registry`` can hold ``EntryPoint`` placeholders, but only ``lm_eval.models``' fixed
``MODEL_MAPPING`` is registered), ``get_model`` looks ``--model`` up as given (no ``module:Class`` or dotted
name), no environment variable names plugins, ``--config`` is read with ``yaml.safe_load``, and
``--include_path`` is only indexed (``!function`` tags unresolved) before the model is built. The one side
effect that works: a YAML *file* (or folder) given to ``--tasks`` is loaded with its ``!function`` tags
resolved before the model is built, and this package's task YAMLs name a function of
:mod:`dllm_sparse.eval.tasks.lm_eval_tasks`, whose import registers the model, so
``lm_eval --model dllm_sparse --tasks "$(python -m dllm_sparse.eval.tasks.lm_eval_entry)/dllm_sparse_mc.yaml"`` works
(tested; it relies on that order inside lm-eval, the console script does not).

Data parallel: under ``accelerate launch`` / ``torchrun`` a model built from ``pretrained`` reports the launcher's
``rank`` / ``world_size`` (``accelerate.PartialState``) and one device per process (``cuda:<local rank>``
unless ``device`` names one), so lm-eval gives each process its share of the requests and gathers the results
on rank 0 (as lm-eval's HFLM does). A model wrapped around an existing scorer (:meth:`DllmSparseLM.from_scorer`)
stays single-process unless ``data_parallel=True`` ; HFLM does the
same for a model object it is given. lm-eval evens the ranks' shares by repeating a rank's last request; such
copies are scored once, so the pooled measured sparsity counts each real request once (it equals a
one-process run's).

Results file: :meth:`get_model_info` (which lm-eval calls after the evaluation, so the values are final) puts
the configured sparsity and the measured one into ``results["config"]``: ``measured_sparsity`` =
``{"ranks": n, "sites": {site: {"mean", "per_layer", "forward_passes"}}}`` (mean over layers, per-layer values,
forward passes counted; pooled over all ranks); it is in the JSON written by ``--output_path``.

Model arguments: ``pretrained`` (hub id, local dir, .gguf or embedded name), ``kind`` (ar/diffusion, detected),
``dtype``, ``device`` (``auto`` = accelerate placement), ``sparsity`` (a
:class:`~dllm_sparse.sparsity.config.SparsityConfig` id ``site:rule:threshold[:scope][:layers=i/j]``, e.g.
``input:top_p:0.9``; ``dense``/none = dense), or the same in pieces: ``site``, ``rule`` (top_p, top_k, max_p),
``threshold`` (alias ``p``; p for top-p / max-p, the target sparsity for top-k; required unless the rule is top_p,
whose default 1.0 is the dense model), ``scope``; ``batch_size``, ``max_batch_size`` (see lm-eval's own arguments
below), ``mc_num``, ``mc_batch``, ``seed``, ``shift_logits`` (Dream-style; default by family), ``greedy_check``
(``iterative``/true, ``one_pass``, ``off``/false), ``cfg`` (alias ``cfg_scale``: guided ELBO w, as the official
LLaDA evaluation's ``cfg``), ``preset`` (``llada-official``: the official per-task cfg and mc_num / mc_batch (128 / 8;
1 / 1 on mmlu, cmmlu, ceval-valid), greedy check off, the ELBO in the official arithmetic (``precision="official"``),
generation 1024/1024/1024 with the task's cfg and the official confidence; see :mod:`dllm_sparse.eval.scoring.presets`;
explicit arguments win, an explicit ``mc_num`` or ``mc_batch`` for every task),
``max_gen_toks``, ``gen_steps``, ``block_length``, ``block_cache`` (prefix / dual: Fast-dLLM's approximate
block KV cache in ``generate_until``, native LLaDA only), ``confidence_threshold`` (Fast-dLLM's parallel decoding
in ``generate_until``: each step commits every masked position of the block with confidence >= it, and at least the
most confident one; the steps are then bounded by the tokens, so no ``gen_steps``), ``head_chunk`` (the LM head on
that many scored rows at a time in the log-likelihoods: the bound on logit memory for long rolling windows; refused
with the ``llada-official`` preset, whose official arithmetic runs the head over every position), ``trust_remote_code``,
``add_bos_token``, ``progress`` (progress bars, default true; lm-eval's ``disable_tqdm`` and ranks other than 0
turn them off), ``data_parallel`` (default: true for a model built from ``pretrained``).

lm-eval's own arguments: lm-eval passes ``device``, ``batch_size`` and ``max_batch_size`` to every model beside
``--model_args`` (from ``--device`` / ``--batch_size`` / ``--max_batch_size``; its CLI passes ``device=cuda:0`` and
``batch_size=1`` when those flags are left out, even on a machine without a GPU). Each may be given in either
place (:func:`merge_lm_eval_args`): in one place, that value; in both with the same value, that value; a
``--model_args`` value wins over lm-eval's default (so ``--model_args device=auto`` or ``device=cpu`` is kept
when ``--device`` is not given; an explicit ``--device cuda:0`` or ``--batch_size 1`` cannot be told from the
default and reads the same); two different explicit values are refused naming both. ``max_batch_size`` bounds
``batch_size=auto`` (16 otherwise) and refuses a larger whole ``batch_size``. With ``device`` a CUDA device and no
CUDA available, the CPU is used with a warning.

Chat templates: ``--apply_chat_template`` (optionally ``--system_instruction``, ``--fewshot_as_multiturn``) renders
every request with the tokenizer's chat template (``tokenizer.apply_chat_template``, as HFLM does; both kinds),
and the template's text is then scored or continued as any other request.

Semantics (of :class:`~dllm_sparse.eval.tasks.scorer_lm.ScorerLM`, which this class extends with its model
arguments, its own sparsity, opened around every request (:meth:`Scorer.sparsified
<dllm_sparse.eval.scoring.scorer.Scorer.sparsified>`), and the response-cache identity):

* ``loglikelihood`` returns ``(ll, is_greedy)``. AR: exact. Diffusion: the Monte-Carlo ELBO of
  ``dllm_sparse.eval.scoring.scorer`` with masks drawn per request from (seed, task, doc_id, request index), so
  dense and sparse runs use identical masks; with ``cfg`` > 0 the guided ELBO on the same masks. ``is_greedy``
  for diffusion: ``greedy_check=iterative`` (default here; ``True``) is the official check (unmask one answer
  position per forward pass, the most confident one; greedy iff the answer is reproduced, L extra passes per
  request); ``one_pass`` checks the one-shot argmax of the fully masked answer (a weaker definition); ``off``
  (``False``) always answers False.
* ``loglikelihood_rolling``: AR exact (windows of the model's context length); diffusion: the ELBO of the
  whole text given the prefix token (BOS, else EOS). The number of tokens scored per document is kept in
  :attr:`~dllm_sparse.eval.tasks.scorer_lm.ScorerLM.rolling_tokens` (token-level perplexity).
* Requests of this package's tasks (``dllm_sparse_mc``, ``dllm_sparse_ppl``) are named like the built-in
  scoring's (``builtin_mc/<id>/<choice>``), so a diffusion model draws the same ELBO masks in the sweep and here.
* ``generate_until``: through ``dllm_sparse.samplers.generate`` (LLaDA sampler or AR loop), sparsified with
  per-step statistics.

Response cache: lm-eval's ``--use_cache PATH`` keys responses by the request alone, not by the model, so a
sparse run reading a dense run's cache would silently return dense answers. This class therefore writes its
identity (:attr:`identity`, a :class:`~dllm_sparse.eval.identity.RunIdentity`: model name and weights hash, kind,
parameter dtype, device type, sparsity, batch size, ELBO settings, ``greedy_check``, ``max_gen_toks``,
``gen_steps``, ``block_length``, ``max_length``) into the cache database and refuses, with a message naming each
field that differs, a database made by any other configuration (or by an older version, whose identity left
fields out). Use one cache path per configuration, e.g. ``--use_cache cache/{lm.cache_slug}``.

Unknown model arguments (a typo such as ``sitee=input``) are refused with the list of valid ones: a misspelt
sparsity argument would otherwise give a dense run. Values are read strictly
(:mod:`dllm_sparse.eval.tasks.lm_eval_args`; the error names the argument, the value and the accepted form):
booleans are true/false (yes/no, on/off, 1/0), counts (``batch_size``, ``max_batch_size``, ``mc_num``, ``mc_batch``,
``max_gen_toks``, ``gen_steps``, ``block_length``, ``head_chunk``) whole numbers >= 1, ``seed`` a whole number >= 0,
``cfg`` a finite number >= 0, ``threshold``/``p`` finite numbers. A sparsity piece (``rule``, ``scope``, ...) next
to a whole ``sparsity`` id, or without a ``site``, is refused (it would be dropped); layer indices are checked
against the loaded model; ``cfg`` > 0 and ``preset`` are refused for an autoregressive model (they are settings of
the diffusion ELBO). With ``scorer=`` / :meth:`from_scorer` the scorer's own settings (``batch_size``, ``mc_num``,
``seed``, ...) cannot be given again.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

try:
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dllm_sparse.eval.tasks.lm_eval_model needs lm-evaluation-harness: pip install -e '.[eval]' (or pip install "
        "lm-eval)"
    ) from e

from dllm_sparse.eval.identity import RunIdentity, run_identity, weights_hash
from dllm_sparse.eval.scoring.common import as_configs
from dllm_sparse.eval.scoring.defaults import MC_BATCH, MC_NUM, SEED
from dllm_sparse.eval.scoring.masked_forward import greedy_check_mode
from dllm_sparse.eval.scoring.presets import get_preset
from dllm_sparse.eval.scoring.scorer import Scorer
from dllm_sparse.eval.tasks.base import LM_EVAL_TASKS
from dllm_sparse.eval.tasks.lm_eval_args import (
    MODEL_ARGS,
    as_bool,
    as_int,
    as_nonneg_float,
    as_optional_bool,
    as_positive_int,
    batch_size_arg,
    check_layers_exist,
    merge_lm_eval_args,
    refuse_diffusion_only_args,
    sparsity_from_args,
)
from dllm_sparse.eval.tasks.lm_eval_tasks import TASK_DIR
from dllm_sparse.eval.tasks.scorer_lm import ScorerLM, launcher_state
from dllm_sparse.sparsity.config import DENSE, SparsityConfig, slug
from dllm_sparse.sparsity.stats import SparsityStats

# MODEL_ARGS, sparsity_from_args and merge_lm_eval_args live in lm_eval_args; named here as the model's own.
__all__ = ["DllmSparseLM", "IDENTITY_KEY", "MODEL_ARGS", "sparsity_from_args", "merge_lm_eval_args", "main"]

eval_logger = logging.getLogger("lm_eval")

IDENTITY_KEY = "__dllm_sparse_identity__"  # lm-eval's own keys are sha256 hex digests, so no collision


def _read_cfg(cfg: Any, cfg_scale: Any) -> float | None:
    """The guidance from ``cfg`` or its alias ``cfg_scale`` (a finite number >= 0; both: the same value)."""
    cfg = None if cfg is None else as_nonneg_float("cfg", cfg)
    cfg_scale = None if cfg_scale is None else as_nonneg_float("cfg_scale", cfg_scale)
    if cfg is not None and cfg_scale is not None and cfg != cfg_scale:
        raise ValueError(f"cfg={cfg} and cfg_scale={cfg_scale} disagree: give one of them (cfg is the official "
                         "evaluation's name, cfg_scale an alias)")
    return cfg if cfg is not None else cfg_scale


def _read_block_cache(block_cache: Any) -> str | None:
    block_cache = None if block_cache in (None, "", "none") else str(block_cache).strip().lower()
    if block_cache not in (None, "prefix", "dual"):
        raise ValueError(f"block_cache={block_cache!r}: use prefix or dual (Fast-dLLM's approximate block KV "
                         "caches of the diffusion sampler, for generate_until), or none")
    return block_cache


def _read_confidence_threshold(threshold: Any, gen_steps: int | None) -> float | None:
    if threshold in (None, "", "none"):
        return None
    value = as_nonneg_float("confidence_threshold", threshold)
    if value == 0 or gen_steps is not None:
        raise ValueError(f"confidence_threshold={threshold!r}: give a number > 0 and no gen_steps (the threshold "
                         "sets the steps; at most one token per step = max_gen_toks)")
    return value


def _read_preset(preset: Any, head_chunk: int | None, cfg: float | None):
    """The named preset (None: none), refused next to ``head_chunk`` (when it scores in the official arithmetic)
    or ``cfg`` (it sets the guidance per task)."""
    preset = None if preset in (None, "", "none") else get_preset(preset)
    if preset is not None and head_chunk is not None and preset.precision == "official":
        raise ValueError(f"head_chunk={head_chunk} with preset={preset.name}: the preset scores in the "
                         "official arithmetic, which runs the LM head over every position at once; drop "
                         "head_chunk (or the preset)")
    if preset is not None and cfg is not None:
        raise ValueError(f"preset={preset.name} sets the guidance per task; drop cfg={cfg} (or the preset)")
    return preset


def _refuse_scorer_args(scorer: Scorer, preset, cfg: float | None, sparsity_args: dict[str, Any],
                        scorer_args: dict[str, Any]) -> None:
    """``DllmSparseLM(scorer=...)`` takes the scorer's sparsity and settings: any of them given again would be
    dropped, so it is refused (a preset's mc_num / mc_batch equal to the scorer's say "the scorer's for every
    task" and are allowed)."""
    if any(v is not None for v in sparsity_args.values()):
        raise TypeError("DllmSparseLM(scorer=...) takes the scorer's sparsity; to score with another one "
                        "use DllmSparseLM.from_scorer(scorer, sparsity=..., stats=...)")
    if cfg is not None:
        raise TypeError("DllmSparseLM(scorer=...) takes the scorer's cfg_scale; build the scorer with "
                        f"Scorer(..., cfg_scale={cfg})")
    scorer_args = dict(scorer_args)
    if preset is not None:
        for name in ("mc_num", "mc_batch"):
            if scorer_args[name] is not None and scorer_args[name] == getattr(scorer, name, None):
                scorer_args[name] = None
    given = sorted(k for k, v in scorer_args.items() if v is not None)
    if given:  # they would be dropped: the scorer was built with its own
        raise TypeError(f"DllmSparseLM(scorer=...) takes the scorer's settings; {', '.join(given)} would be "
                        f"ignored: build the scorer with them instead (Scorer(..., {given[0]}=...))")


def _load_scorer(*, pretrained, kind, dtype, device, batch_size, max_batch_size, mc_num, mc_batch, seed,
                 shift_logits, greedy_check, trust_remote_code, add_bos_token, cfg, head_chunk, sparsity_args,
                 stats, preset, block_cache, dist) -> Scorer:
    """Load ``pretrained`` and build its scorer with the model arguments (each read strictly before the load)."""
    import torch

    from dllm_sparse.models.loading import load_model

    sparsity = sparsity_from_args(**sparsity_args)  # fails before a long load
    bs = batch_size_arg(batch_size, max_batch_size)
    seed = SEED if seed is None else as_int("seed", seed, minimum=0)
    shift_logits = as_optional_bool("shift_logits", shift_logits)
    trust = False if trust_remote_code is None else as_bool("trust_remote_code", trust_remote_code)
    add_bos = False if add_bos_token is None else as_bool("add_bos_token", add_bos_token)
    greedy_check = greedy_check_mode("iterative" if greedy_check is None else greedy_check)
    refuse_diffusion_only_args(kind, cfg, preset)
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        eval_logger.warning(f"device {device!r} requested (lm-eval's CLI default) but CUDA is not available; "
                            "using the CPU")
        device = "cpu"
    if dist is not None and device in (None, "auto", "cuda") and torch.cuda.is_available():
        device = str(dist.device)  # one full copy per process (device=auto would shard each one)
        eval_logger.info(f"rank {dist.process_index}/{dist.num_processes}: model on {device}")
    lm = load_model("smollm2-135m" if pretrained is None else pretrained, dtype=dtype, device=device,
                    kind=kind, trust_remote_code=trust)
    refuse_diffusion_only_args(lm.kind, cfg, preset, block_cache)
    return Scorer.from_loaded(
        lm, batch_size=bs, mc_num=MC_NUM if mc_num is None else mc_num,
        mc_batch=MC_BATCH if mc_batch is None else mc_batch, seed=seed, shift_logits=shift_logits,
        greedy_check=greedy_check, cfg_scale=cfg or 0.0, add_bos_token=add_bos, sparsity=sparsity,
        head_chunk=head_chunk,
        stats=stats if stats is not None else SparsityStats() if sparsity is not None else None)


class DllmSparseLM(ScorerLM):
    """lm-eval model ``dllm_sparse``: a :class:`~dllm_sparse.eval.tasks.scorer_lm.ScorerLM` built from model
    arguments, with its own sparsity opened around every request (see the module docstring)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DllmSparseLM:
        """lm-eval's constructor from ``--model_args`` (a ``k=v,...`` string) plus its own ``device`` /
        ``batch_size`` / ``max_batch_size``, merged by :func:`merge_lm_eval_args` (lm-eval's base class would pass
        an argument given in both places twice: a TypeError before any model loads)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> DllmSparseLM:
        """As :meth:`create_from_arg_string` for ``--model_args`` already parsed (lm-eval's CLI passes a dict)."""
        return cls(**merge_lm_eval_args(dict(arg_dict), additional_config))

    def __init__(
        self,
        pretrained: str | None = None,
        sparsity: SparsityConfig | str | None = None,
        site: str | None = None,
        rule: str | None = None,
        threshold: float | None = None,
        p: float | None = None,
        scope: str | None = None,
        kind: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | str | None = None,
        mc_num: int | None = None,
        mc_batch: int | None = None,
        seed: int | None = None,
        shift_logits: bool | None = None,
        greedy_check: bool | str | None = None,
        cfg: float | None = None,
        cfg_scale: float | None = None,
        preset: str | None = None,
        max_gen_toks: int | None = None,
        gen_steps: int | None = None,
        block_length: int | None = None,
        trust_remote_code: bool | None = None,
        add_bos_token: bool | None = None,
        progress: bool | str = True,
        data_parallel: bool | str | None = None,
        block_cache: str | None = None,
        head_chunk: int | None = None,
        confidence_threshold: float | str | None = None,
        scorer: Scorer | None = None,
        stats: SparsityStats | None = None,
        **unknown: Any,
    ):
        if unknown:
            raise TypeError(
                f"DllmSparseLM: unknown model argument(s) {sorted(unknown)}; valid ones: {', '.join(MODEL_ARGS)}. "
                "(A misspelt sparsity argument would silently give a dense run.)")
        # Every value is read strictly here, before a long load (dllm_sparse.eval.tasks.lm_eval_args).
        cfg = _read_cfg(cfg, cfg_scale)
        mc_num, mc_batch, max_gen_toks, gen_steps, block_length = (
            None if v is None else as_positive_int(name, v) for name, v in (
                ("mc_num", mc_num), ("mc_batch", mc_batch), ("max_gen_toks", max_gen_toks),
                ("gen_steps", gen_steps), ("block_length", block_length)))
        block_cache = _read_block_cache(block_cache)
        confidence_threshold = _read_confidence_threshold(confidence_threshold, gen_steps)
        head_chunk = None if head_chunk in (None, "", "none") else as_positive_int("head_chunk", head_chunk)
        preset = _read_preset(preset, head_chunk, cfg)
        # The preset's per-task mc_num / mc_batch (MMLU-style tasks: 1 / 1) apply unless either is given.
        per_task_mc = preset is not None and mc_num is None and mc_batch is None
        if preset is not None:
            if scorer is None:  # a given scorer keeps its own ELBO settings
                mc_num = preset.mc_num if mc_num is None else mc_num
                mc_batch = preset.mc_batch if mc_batch is None else mc_batch
                greedy_check = preset.greedy_check if greedy_check is None else greedy_check
            max_gen_toks = preset.gen_length if max_gen_toks is None else max_gen_toks
            gen_steps = preset.steps if gen_steps is None else gen_steps
            block_length = preset.block_length if block_length is None else block_length
        max_gen_toks = 256 if max_gen_toks is None else max_gen_toks
        # Data parallel (see the module docstring): lm-eval splits requests by rank / world_size.
        data_parallel = as_optional_bool("data_parallel", data_parallel)
        dist = launcher_state() if (scorer is None if data_parallel is None else data_parallel) else None
        progress = as_bool("progress", progress)
        sparsity_args = dict(sparsity=sparsity, site=site, rule=rule, threshold=threshold, p=p, scope=scope)
        if scorer is not None:
            _refuse_scorer_args(scorer, preset, cfg, {**sparsity_args, "stats": stats}, dict(
                pretrained=pretrained, kind=kind, dtype=dtype, device=device, batch_size=batch_size,
                max_batch_size=max_batch_size, mc_num=mc_num, mc_batch=mc_batch, seed=seed,
                shift_logits=shift_logits, greedy_check=greedy_check, trust_remote_code=trust_remote_code,
                add_bos_token=add_bos_token, head_chunk=head_chunk))
        else:
            scorer = _load_scorer(
                pretrained=pretrained, kind=kind, dtype=dtype, device=device, batch_size=batch_size,
                max_batch_size=max_batch_size, mc_num=mc_num, mc_batch=mc_batch, seed=seed, shift_logits=shift_logits,
                greedy_check=greedy_check, trust_remote_code=trust_remote_code, add_bos_token=add_bos_token, cfg=cfg,
                head_chunk=head_chunk, sparsity_args=sparsity_args, stats=stats, preset=preset,
                block_cache=block_cache, dist=dist)
        refuse_diffusion_only_args(scorer.kind, None, preset, block_cache)
        if confidence_threshold is not None and scorer.kind == "ar":
            raise ValueError("confidence_threshold is parallel decoding of the masked-diffusion sampler; this model "
                             "is autoregressive: drop confidence_threshold")
        check_layers_exist(scorer.model, scorer.sparsity)
        super().__init__(scorer, progress=progress, preset=preset, per_task_mc=per_task_mc, max_gen_toks=max_gen_toks,
                         gen_steps=gen_steps, block_length=block_length, block_cache=block_cache,
                         confidence_threshold=confidence_threshold, dist=dist)
        # What every request runs with: the scorer's own sparsity unless from_scorer is given another.
        self._configs, self._stats = scorer.sparsity, scorer.measured_into
        from dllm_sparse.models.loading import model_device

        self._device = model_device(scorer.model)
        self._weights = weights_hash(scorer.model)  # once: the identity is read for every cache check

    @classmethod
    def from_scorer(cls, scorer: Scorer, *, sparsity=None, stats: SparsityStats | None = None,
                    **kwargs: Any) -> DllmSparseLM:
        """Wrap an existing scorer (its model and statistics are shared, not copied). ``sparsity``: a
        :class:`SparsityConfig`, a list of them, or ``[]`` (dense) for every request of this model, opened around
        each request and leaving the scorer as it is (default None: the scorer's own sparsity); ``stats``: where
        those requests measure (default: the scorer's own statistics for its own sparsity, else a fresh
        :class:`SparsityStats`)."""
        lm = cls(scorer=scorer, **kwargs)
        if sparsity is not None:
            configs = as_configs(sparsity)
            check_layers_exist(scorer.model, configs)  # a bad value fails here, not at a request
            lm._configs, lm._stats = configs, stats if stats is not None else SparsityStats() if configs else None
        elif stats is not None:
            lm._stats = stats
        return lm

    @property
    def sparsity(self) -> list[SparsityConfig]:
        """The sparsity of every request of this model."""
        return list(self._configs)

    @property
    def stats(self) -> SparsityStats | None:
        """The measured sparsity of every forward pass made through this model (None when dense)."""
        return self._stats

    # ---- requests: the base class's, with this model's sparsity in force ----------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        with self.scorer.sparsified(self._configs, self._stats):
            return super().loglikelihood(requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        with self.scorer.sparsified(self._configs, self._stats):
            return super().loglikelihood_rolling(requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        with self.scorer.sparsified(self._configs, self._stats):
            return super().generate_until(requests, disable_tqdm)

    # ---- identity and cache safety ------------------------------------------------------------------------

    @property
    def run_identity(self) -> RunIdentity:
        """Everything that changes the answers (see :mod:`dllm_sparse.eval.identity`): model and weights hash,
        kind, dtype, device type, sparsity (site, rule, full-precision threshold, scope, layers), batch size,
        ELBO and generation settings."""
        sc = self.scorer
        diffusion = sc.kind == "diffusion"
        return run_identity(
            sc, model=sc.name, weights=self._weights, sparsity=self.sparsity, batch_size=sc.batch_size,
            max_length=sc.max_length, add_bos_token=sc.add_bos_token, greedy_check=sc.greedy_check,
            max_gen_toks=self.max_gen_toks, gen_steps=self.gen_steps, block_length=self.block_length,
            mc_num=sc.mc_num if diffusion else None, mc_batch=sc.mc_batch if diffusion else None,
            seed=sc.seed, shift_logits=bool(sc.shift_logits) if diffusion else None,
            mask_id=sc.mask_id if diffusion else None, cfg_scale=sc.cfg_scale if diffusion else None,
            preset=self.preset.name if self.preset is not None else None, **self._preset_identity())

    def _preset_identity(self) -> dict[str, Any]:
        """The fields a preset or a non-default ELBO precision adds (absent otherwise, so the identities of other
        runs are unchanged): the preset's every setting, since its per-task values change numbers."""
        extra: dict[str, Any] = {}
        if self.preset is not None:
            extra["preset_settings"] = {**dataclasses.asdict(self.preset), "per_task_mc": self._preset_mc}
        if getattr(self.scorer, "precision", "float32") != "float32":
            extra["precision"] = self.scorer.precision
        if self.block_cache is not None:  # generate_until's tokens change with it
            extra["block_cache"] = self.block_cache
        if self.confidence_threshold is not None:  # generate_until's tokens change with it
            extra["confidence_threshold"] = self.confidence_threshold
        if getattr(self.scorer, "head_chunk", None) is not None:  # another row count per head product: rounding
            extra["head_chunk"] = self.scorer.head_chunk
        return extra

    @property
    def identity(self) -> str:
        """:attr:`run_identity` as canonical JSON (what the response cache stores)."""
        return self.run_identity.to_json()

    @property
    def cache_slug(self) -> str:
        """A file-name-safe, configuration-specific name for ``--use_cache``."""
        ident = self.run_identity
        return f"{slug(ident['model'] + '-' + ident['sparsity'])[:80]}-{ident.digest[:10]}"

    def set_cache_hook(self, cache_hook) -> None:
        db = getattr(cache_hook, "dbdict", None)
        if db is not None:
            where = f"lm-eval response cache {getattr(db, 'filename', '')!r}"
            fresh = f"Use one cache path per configuration, e.g. --use_cache cache/{self.cache_slug}"
            stored = db.get(IDENTITY_KEY)
            if stored is None:
                if len(db) > 0:
                    raise RuntimeError(
                        f"{where} holds answers of an unknown model configuration; it cannot be reused by a "
                        f"dllm_sparse run (the cache key ignores the sparsity). {fresh}")
                db[IDENTITY_KEY] = self.identity
                db.commit()
            else:
                try:
                    stored_identity = RunIdentity.from_json(stored)
                except ValueError:
                    raise RuntimeError(
                        f"{where} was written by an older dllm_sparse whose identity ({stored!r}) left out the "
                        f"dtype, batch size, weights and generation settings, so it cannot be checked against "
                        f"this run. {fresh}") from None
                self.run_identity.require_same(stored_identity, what=where, fix=fresh)
        super().set_cache_hook(cache_hook)

    def get_model_info(self) -> dict:
        """What lm-eval writes into ``results["config"]`` (it calls this after the evaluation, on rank 0): the
        configuration and the measured sparsity of the run (:meth:`measured_sparsity`)."""
        return {"dllm_sparse_identity": self.identity, "model_kind": self.scorer.kind,
                "sparsity": [s.to_dict() for s in self.sparsity] or DENSE, "mc_num": self.scorer.mc_num,
                "cfg_scale": self.scorer.cfg_scale, "greedy_check": self.scorer.greedy_check,
                "preset": None if self.preset is None else self.preset.name,
                "measured_sparsity": self.measured_sparsity()}


# Registered under its package name only: `python -m` runs this file as __main__ and the task YAMLs import it
# again as dllm_sparse.eval.tasks.lm_eval_model, whose class must be the one lm-eval finds (a second class under the
# same name would be refused by lm-eval's registry).
if __name__ != "__main__":
    register_model("dllm_sparse", "dllm-sparse")(DllmSparseLM)


def _with_task_dir(argv: list[str]) -> list[str]:
    """lm-eval CLI arguments with this package's task folder as ``--include_path`` when a ``run`` names none (a
    run naming its own folder cannot also have ours: lm-eval 0.4.13's CLI takes one path; it then reaches
    ``dllm_sparse_mc`` through the YAML file itself, see the error below)."""
    commands = ("run", "ls", "validate")
    command = argv[0] if argv and argv[0] in commands else "run"
    if command != "run" or not argv or argv[0] in ("-h", "--help"):
        return argv
    given = any(a == "--include_path" or a.startswith("--include_path=") for a in argv)
    if not given:
        at = 1 if argv[0] == "run" else 0
        return argv[:at] + ["--include_path", TASK_DIR] + argv[at:]
    values = [b for a, b in zip(argv[:-1], argv[1:], strict=True) if a == "--tasks"]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--tasks=")]
    ours = sorted(t for v in values for t in v.split(",") if t in LM_EVAL_TASKS.values())
    if ours:
        raise SystemExit(f"--tasks {','.join(ours)} with your own --include_path: lm-eval's CLI takes one include "
                         f"path, so give this package's tasks as files instead: --tasks "
                         + ",".join(f"{TASK_DIR}/{t}.yaml" for t in ours))
    return argv


def main(argv: list[str] | None = None) -> None:
    """``dllm-sparse-lm-eval`` / ``python -m dllm_sparse.eval.tasks.lm_eval_model``: lm-eval's CLI (all of its flags)
    with ``--model dllm_sparse`` registered and this package's tasks on the include path."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *_with_task_dir(list(sys.argv[1:] if argv is None else argv))]
    cli_evaluate()


if __name__ == "__main__":
    from dllm_sparse.eval.tasks.lm_eval_model import main as _package_main  # the registered module's main

    _package_main()
