"""lm-evaluation-harness model ``dllm_sparse``: an AR or masked-diffusion model plus one sparsity configuration.

Python API (the supported path; lm-eval >= 0.4.9, tested with 0.4.13)::

    import lm_eval
    from dllm_sparse.eval.lm_eval_model import DllmSparseLM
    lm = DllmSparseLM(pretrained="smollm2-135m", sparsity="input:top_p:0.9")   # or a SparsityConfig
    out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)
    lm.stats.mean("input")                       # measured sparsity of every forward pass of the run

Command line: ``dllm-sparse-lm-eval`` (also ``python -m dllm_sparse.eval.lm_eval_model``) is lm-eval's own CLI,
every flag unchanged, with the ``dllm_sparse`` model registered and this package's task folder
(:data:`dllm_sparse.eval.lm_eval_tasks.TASK_DIR`: ``dllm_sparse_mc``, ``dllm_sparse_ppl``) given as
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
:mod:`dllm_sparse.eval.lm_eval_tasks`, whose import registers the model, so
``lm_eval --model dllm_sparse --tasks "$(python -m dllm_sparse.eval.lm_eval_tasks)/dllm_sparse_mc.yaml"`` works
(tested; it relies on that order inside lm-eval, the console script does not).

Data parallel: under ``accelerate launch`` / ``torchrun`` a model built from ``pretrained`` reports the launcher's
``rank`` / ``world_size`` (``accelerate.PartialState``) and one device per process (``cuda:<local rank>``
unless ``device`` names one), so lm-eval gives each process its share of the requests and gathers the results
on rank 0 (as lm-eval's HFLM does). A model wrapped around an existing scorer (:meth:`DllmSparseLM.from_scorer`)
stays single-process unless ``data_parallel=True`` (the sweep splits cells between ranks itself); HFLM does the
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
generation 1024/1024/1024 with the task's cfg and the official confidence; see :mod:`dllm_sparse.eval.presets`;
explicit arguments win, an explicit ``mc_num`` or ``mc_batch`` for every task),
``max_gen_toks``, ``gen_steps``, ``block_length``, ``block_cache`` (prefix / dual: Fast-dLLM's approximate
block KV cache in ``generate_until``, native LLaDA only), ``head_chunk`` (the LM head on that many scored rows at
a time in the log-likelihoods: the bound on logit memory for long rolling windows; refused with the
``llada-official`` preset, whose official arithmetic runs the head over every position), ``trust_remote_code``,
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

Semantics:

* ``loglikelihood`` returns ``(ll, is_greedy)``. AR: exact. Diffusion: the Monte-Carlo ELBO of
  ``dllm_sparse.eval.likelihood`` with masks drawn per request from (seed, task, doc_id, request index), so
  dense and sparse runs use identical masks; with ``cfg`` > 0 the guided ELBO on the same masks. ``is_greedy``
  for diffusion: ``greedy_check=iterative`` (default here; ``True``) is the official check (unmask one answer
  position per forward pass, the most confident one; greedy iff the answer is reproduced, L extra passes per
  request); ``one_pass`` checks the one-shot argmax of the fully masked answer (a weaker definition); ``off``
  (``False``) always answers False.
* ``loglikelihood_rolling``: AR exact (windows of the model's context length); diffusion: the ELBO of the
  whole text given the prefix token (BOS, else EOS). The number of tokens scored per document is kept in
  :attr:`DllmSparseLM.rolling_tokens` (token-level perplexity).
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
sparsity argument would otherwise give a dense run. Values are read strictly (:mod:`dllm_sparse.eval.model_args`;
the error names the argument, the value and the accepted form): booleans are true/false (yes/no, on/off, 1/0),
counts (``batch_size``, ``max_batch_size``, ``mc_num``, ``mc_batch``, ``max_gen_toks``, ``gen_steps``,
``block_length``, ``head_chunk``) whole numbers >= 1, ``seed`` a whole number >= 0, ``cfg`` a finite number >= 0,
``threshold``/``p`` finite numbers. A sparsity piece (``rule``, ``scope``, ...) next to a whole ``sparsity`` id,
or without a ``site``, is refused (it would be dropped); layer indices are checked against the loaded model;
``cfg`` > 0 and ``preset`` are refused for an autoregressive model (they are settings of the diffusion ELBO). With
``scorer=`` / :meth:`from_scorer` the scorer's own settings (``batch_size``, ``mc_num``, ``seed``, ...) cannot be
given again.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dllm_sparse.eval.lm_eval_model needs lm-evaluation-harness: pip install -e '.[eval]' (or pip install lm-eval)"
    ) from e

import dataclasses
import logging
import os
from collections.abc import Hashable
from contextlib import contextmanager

from tqdm.auto import tqdm

from dllm_sparse.eval.identity import RunIdentity, run_identity, weights_hash
from dllm_sparse.eval.likelihood import SCORER_DEFAULT, Scorer, greedy_check_mode
from dllm_sparse.eval.model_args import (
    as_bool,
    as_finite_float,
    as_int,
    as_nonneg_float,
    as_optional_bool,
    as_positive_int,
)
from dllm_sparse.eval.presets import get_preset
from dllm_sparse.eval.tasks import LM_EVAL_TASKS, builtin_request_key
from dllm_sparse.sparsity.config import DENSE, SparsityConfig, slug
from dllm_sparse.sparsity.rules import make_rule, rule_name
from dllm_sparse.sparsity.stats import SparsityStats

__all__ = ["DllmSparseLM", "IDENTITY_KEY", "MODEL_ARGS", "sparsity_from_args", "merge_lm_eval_args"]

eval_logger = logging.getLogger("lm_eval")

IDENTITY_KEY = "__dllm_sparse_identity__"  # lm-eval's own keys are sha256 hex digests, so no collision


_NO_SPARSITY = (None, "", "none", DENSE)


def _is_dense(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NO_SPARSITY)


def sparsity_from_args(sparsity: SparsityConfig | str | None = None, site: str | None = None,
                       rule: str | None = None, threshold: float | None = None, p: float | None = None,
                       scope: str | None = None) -> SparsityConfig | None:
    """The model's one :class:`SparsityConfig` from its model arguments: ``sparsity=input:top_p:0.9`` (or a
    config object), or the pieces ``site``, ``rule`` (default top_p), ``threshold`` (alias ``p``; default 1.0 for
    top_p only, p = 1 keeping every entry; another rule without one is refused, naming what its threshold means)
    and ``scope`` (default token). None means dense. A piece given next to a whole ``sparsity`` id, or without a
    site, is refused: it would be dropped silently (the id already says site, rule, threshold and scope; without
    a site the run is dense)."""
    if _is_dense(sparsity):
        sparsity = None
    if _is_dense(site):
        site = None
    threshold = None if threshold is None else as_finite_float("threshold", threshold)
    p = None if p is None else as_finite_float("p", p)
    if p is not None and threshold is not None and p != threshold:
        raise ValueError(f"threshold={threshold} and p={p} disagree: give one of them (p is an alias of threshold)")
    threshold = threshold if threshold is not None else p
    pieces = {k: v for k, v in (("site", site), ("rule", rule), ("threshold", threshold), ("scope", scope))
              if v is not None}
    if sparsity is not None:
        if pieces:
            given = ", ".join(f"{k}={v!r}" for k, v in pieces.items())
            raise ValueError(f"give either sparsity={sparsity!r} or site/rule/threshold/scope, not both (got {given}): "
                             "the id already names site, rule, threshold and scope, so the extra argument would be "
                             "dropped; write it into the id instead, e.g. sparsity=input:top_p:0.9:step")
        return SparsityConfig.parse(sparsity)
    if site is None:
        if pieces:  # without a site the other pieces would be dropped and the run silently dense
            given = ", ".join(f"{k}={v!r}" for k, v in pieces.items())
            raise ValueError(f"{given} given without a site, so it would be ignored and the run dense: give "
                             "site=... too (e.g. site=input,threshold=0.9), or sparsity=input:top_p:0.9")
        return None
    rule = rule_name(rule) if rule is not None else "top_p"
    if threshold is None:
        if rule != "top_p":  # 1.0 is top-p's identity (keep all the mass); for another rule it means something else
            raise ValueError(f"site={site!r},rule={rule!r} without a threshold: the default threshold (1.0, top_p's "
                             f"p = 1, the dense model) applies to rule=top_p only; give {rule}'s threshold "
                             f"({_THRESHOLD_MEANING[rule]}), e.g. site={site},rule={rule},threshold="
                             f"{_THRESHOLD_EXAMPLE[rule]}")
        threshold = 1.0
    return SparsityConfig(site, make_rule(rule, threshold, scope=scope))


# What a rule's threshold means, for the message when it is missing.
_THRESHOLD_MEANING = {"top_k": "the target sparsity s in [0, 1): keep ceil((1 - s) d) entries",
                      "max_p": "p in (0, 1]: keep |v_i| >= p max|v|",
                      "paper_top_p": "p in percent: the paper's LLaDA top-p"}
_THRESHOLD_EXAMPLE = {"top_k": "0.5", "max_p": "0.1", "paper_top_p": "90"}


def _batch_size(value: Any, max_batch_size: Any = None) -> int:
    """``batch_size``: a whole number >= 1, or ``auto`` / ``auto:N`` / None (16, at most ``max_batch_size``: this
    model sizes its own batches, lm-eval's automatic search does not apply to it). ``max_batch_size`` (lm-eval's
    bound on an automatic batch size): a whole number >= 1; a whole ``batch_size`` above it is refused."""
    cap = None if max_batch_size is None else as_positive_int("max_batch_size", max_batch_size)
    if value is None or (isinstance(value, str) and value.strip().lower().startswith("auto")):
        return 16 if cap is None else min(16, cap)
    try:
        bs = as_positive_int("batch_size", value)
    except ValueError as e:
        raise ValueError(f"{e} (or auto)") from None
    if cap is not None and bs > cap:
        raise ValueError(f"batch_size={bs} is above max_batch_size={cap} (lm-eval's bound on an automatic batch "
                         "size): lower batch_size, or drop max_batch_size")
    return bs


#: The model arguments DllmSparseLM accepts (``--model_args k=v,...``); anything else is refused.
MODEL_ARGS = ("pretrained", "sparsity", "site", "rule", "threshold", "p", "scope", "kind", "dtype", "device",
              "batch_size", "max_batch_size", "mc_num", "mc_batch", "seed", "shift_logits", "greedy_check",
              "max_gen_toks", "gen_steps", "block_length", "trust_remote_code", "add_bos_token", "cfg", "cfg_scale",
              "preset", "progress", "data_parallel", "block_cache", "head_chunk")

#: lm-eval's own defaults of the arguments it passes to every model beside ``--model_args`` (the CLI's
#: ``EvaluatorConfig``), used when lm-eval cannot be asked.
_LM_EVAL_DEFAULTS = {"device": "cuda:0", "batch_size": 1, "max_batch_size": None}


def _lm_eval_defaults() -> dict[str, Any]:
    """What lm-eval's CLI passes for ``device`` / ``batch_size`` / ``max_batch_size`` when they are not given
    (0.4.13: ``cuda:0``, 1, None; read from its ``EvaluatorConfig``)."""
    try:
        from lm_eval.config.evaluate_config import EvaluatorConfig
    except ImportError:  # pragma: no cover - other lm-eval versions
        return dict(_LM_EVAL_DEFAULTS)
    fields = {f.name: f.default for f in dataclasses.fields(EvaluatorConfig)}
    return {k: fields.get(k, v) for k, v in _LM_EVAL_DEFAULTS.items()}


def _same_value(a: Any, b: Any) -> bool:
    return str(a).strip().lower() == str(b).strip().lower()


def merge_lm_eval_args(model_args: dict[str, Any], lm_eval_args: dict[str, Any] | None) -> dict[str, Any]:
    """The model's keyword arguments from ``--model_args`` and the ones lm-eval passes beside them
    (``create_from_arg_string``'s ``additional_config``: ``device``, ``batch_size``, ``max_batch_size`` from
    ``--device`` / ``--batch_size`` / ``--max_batch_size`` or ``simple_evaluate(...)``; None = not given).

    Precedence: an argument given in one place only is taken from there. Given in both with the same value: that
    value. Given in both with different values: the ``--model_args`` value wins when lm-eval's is lm-eval's own
    default (its CLI always passes ``device=cuda:0`` and ``batch_size=1`` when the flags are left out, even on
    a machine without a GPU, so ``--model_args device=cpu`` or ``device=auto`` must not be overridden by it; an
    explicit ``--device cuda:0`` / ``--batch_size 1`` cannot be told from the default and reads the same);
    otherwise the pair contradicts itself and is refused with a ``ValueError`` naming both values."""
    out = dict(model_args)
    defaults = _lm_eval_defaults()
    for name, value in (lm_eval_args or {}).items():
        if value is None:
            continue
        if name not in out or out[name] is None:
            out[name] = value
        elif _same_value(out[name], value):
            continue
        elif name in defaults and _same_value(value, defaults[name]):
            eval_logger.info(f"{name}={out[name]!r} from --model_args (lm-eval's {name}={value!r} is its default "
                             f"when --{name} is not given, and is not applied)")
        else:
            raise ValueError(f"{name} is given twice with different values: --model_args {name}={out[name]} and "
                             f"lm-eval's --{name} {value} (or simple_evaluate({name}=...)); give it in one place "
                             f"(a --model_args value wins only over lm-eval's default {defaults.get(name)!r})")
    return out

def _refuse_diffusion_only_args(kind: str | None, cfg: float | None, preset, block_cache: str | None = None) -> None:
    """Guidance (``cfg``) and the ``llada-official`` preset are settings of the diffusion ELBO, ``block_cache`` one
    of the diffusion sampler: an AR model is scored exactly and generates with its own KV cache, and would ignore
    them (or fail deep inside), so they are refused for it."""
    if kind != "ar":
        return
    if block_cache is not None:
        raise ValueError(f"block_cache={block_cache} is a cache of the masked-diffusion sampler; this model is "
                         "autoregressive (it decodes with its own KV cache): drop block_cache")
    if cfg:
        raise ValueError(f"cfg={cfg} is the guided ELBO of a diffusion model; this model is autoregressive (scored "
                         "exactly, no guidance): drop cfg (or load a diffusion model)")
    if preset is not None:
        raise ValueError(f"preset={preset.name} holds the official settings of a diffusion model's evaluation; this "
                         "model is autoregressive: drop the preset (or load a diffusion model)")


def _check_layers_exist(model, configs) -> None:
    """Every layer index of the sparsity configs exists in ``model`` (else the hooks would fail only at the first
    request, after lm-eval has built every task)."""
    from dllm_sparse.models.families import count_layers, find_ffns
    from dllm_sparse.sparsity.hooks import select_layers

    picked = [c for c in configs if c.layers is not None]
    if not picked:
        return
    ffns = find_ffns(model)
    n_layers = count_layers(model)  # block count: an MoE block may hold experts instead of a dense FFN
    for config in picked:
        try:
            select_layers(ffns, config.layers, n_layers)
        except ValueError as e:
            raise ValueError(f"sparsity={config.id}: {e}; give layer indices in that range (negative ones count "
                             "from the end)") from None


_BUILTIN_NAME = {v: k for k, v in LM_EVAL_TASKS.items()}  # lm-eval task name -> built-in task name


def _launcher_state():
    """accelerate's ``PartialState`` when this process is one of several started by ``accelerate launch`` /
    ``torchrun`` (``WORLD_SIZE`` > 1; it sets up the process group), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: a gloo group (accelerate's default: none)
    return state if state.num_processes > 1 else None


class DllmSparseLM(LM):
    """lm-eval model wrapping a :class:`dllm_sparse.eval.likelihood.Scorer` (see the module docstring)."""

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
        scorer: Scorer | None = None,
        stats: SparsityStats | None = None,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:
            raise TypeError(
                f"DllmSparseLM: unknown model argument(s) {sorted(unknown)}; valid ones: {', '.join(MODEL_ARGS)}. "
                "(A misspelt sparsity argument would silently give a dense run.)")
        # Every value is read strictly here, before a long load (dllm_sparse.eval.model_args).
        cfg = None if cfg is None else as_nonneg_float("cfg", cfg)
        cfg_scale = None if cfg_scale is None else as_nonneg_float("cfg_scale", cfg_scale)
        if cfg is not None and cfg_scale is not None and cfg != cfg_scale:
            raise ValueError(f"cfg={cfg} and cfg_scale={cfg_scale} disagree: give one of them (cfg is the official "
                             "evaluation's name, cfg_scale an alias)")
        cfg = cfg if cfg is not None else cfg_scale
        mc_num, mc_batch, max_gen_toks, gen_steps, block_length = (
            None if v is None else as_positive_int(name, v) for name, v in (
                ("mc_num", mc_num), ("mc_batch", mc_batch), ("max_gen_toks", max_gen_toks),
                ("gen_steps", gen_steps), ("block_length", block_length)))
        block_cache = None if block_cache in (None, "", "none") else str(block_cache).strip().lower()
        if block_cache not in (None, "prefix", "dual"):
            raise ValueError(f"block_cache={block_cache!r}: use prefix or dual (Fast-dLLM's approximate block KV "
                             "caches of the diffusion sampler, for generate_until), or none")
        self.block_cache = block_cache
        head_chunk = None if head_chunk in (None, "", "none") else as_positive_int("head_chunk", head_chunk)
        self.preset = None if preset in (None, "", "none") else get_preset(preset)
        if self.preset is not None and head_chunk is not None and self.preset.precision == "official":
            raise ValueError(f"head_chunk={head_chunk} with preset={self.preset.name}: the preset scores in the "
                             "official arithmetic, which runs the LM head over every position at once; drop "
                             "head_chunk (or the preset)")
        # The preset's per-task mc_num / mc_batch (MMLU-style tasks: 1 / 1) apply unless either is given.
        self._preset_mc = self.preset is not None and mc_num is None and mc_batch is None
        if self.preset is not None:
            if cfg is not None:
                raise ValueError(f"preset={self.preset.name} sets the guidance per task; drop cfg={cfg} (or the "
                                 "preset)")
            if scorer is None:  # a given scorer keeps its own ELBO settings
                mc_num = self.preset.mc_num if mc_num is None else mc_num
                mc_batch = self.preset.mc_batch if mc_batch is None else mc_batch
                greedy_check = self.preset.greedy_check if greedy_check is None else greedy_check
            max_gen_toks = self.preset.gen_length if max_gen_toks is None else max_gen_toks
            gen_steps = self.preset.steps if gen_steps is None else gen_steps
            block_length = self.preset.block_length if block_length is None else block_length
        max_gen_toks = 256 if max_gen_toks is None else max_gen_toks
        # What this model's calls pass to the scorer: its own defaults unless from_scorer is given others.
        self._sparsity, self._stats = SCORER_DEFAULT, SCORER_DEFAULT
        # Data parallel (see the module docstring): lm-eval splits requests by rank / world_size.
        data_parallel = as_optional_bool("data_parallel", data_parallel)
        self._dist = _launcher_state() if (scorer is None if data_parallel is None else data_parallel) else None
        if self._dist is not None:
            self._rank, self._world_size = self._dist.process_index, self._dist.num_processes
        self._peer_stats: list[dict] = []  # rank 0: the other ranks' statistics (SparsityStats.snapshot)
        self.progress = as_bool("progress", progress)
        #: Tokens scored per ``loglikelihood_rolling`` document, by (task name, doc id).
        self.rolling_tokens: dict[tuple, int] = {}
        if scorer is not None:
            if any(v is not None for v in (sparsity, site, rule, threshold, p, scope, stats)):
                raise TypeError("DllmSparseLM(scorer=...) takes the scorer's sparsity; to score with another one "
                                "use DllmSparseLM.from_scorer(scorer, sparsity=..., stats=...)")
            if cfg is not None:
                raise TypeError("DllmSparseLM(scorer=...) takes the scorer's cfg_scale; build the scorer with "
                                f"Scorer(..., cfg_scale={cfg})")
            scorer_args = dict(pretrained=pretrained, kind=kind, dtype=dtype, device=device, batch_size=batch_size,
                               max_batch_size=max_batch_size, mc_num=mc_num, mc_batch=mc_batch, seed=seed,
                               shift_logits=shift_logits, greedy_check=greedy_check,
                               trust_remote_code=trust_remote_code, add_bos_token=add_bos_token,
                               head_chunk=head_chunk)
            if self.preset is not None:
                # With a preset, mc_num / mc_batch equal to the scorer's say "the scorer's for every task" (instead of
                # the preset's per-task values): allowed; any other value would be ignored, so it is refused below.
                for name in ("mc_num", "mc_batch"):
                    if scorer_args[name] is not None and scorer_args[name] == getattr(scorer, name, None):
                        scorer_args[name] = None
            given = sorted(k for k, v in scorer_args.items() if v is not None)
            if given:  # they would be dropped: the scorer was built with its own
                raise TypeError(f"DllmSparseLM(scorer=...) takes the scorer's settings; {', '.join(given)} would be "
                                f"ignored: build the scorer with them instead (Scorer(..., {given[0]}=...))")
        else:
            import torch

            from dllm_sparse.models.loading import load_model

            sparsity = sparsity_from_args(sparsity, site, rule, threshold, p, scope)  # fails before a long load
            bs = _batch_size(batch_size, max_batch_size)
            seed = 1234 if seed is None else as_int("seed", seed, minimum=0)
            shift_logits = as_optional_bool("shift_logits", shift_logits)
            trust = False if trust_remote_code is None else as_bool("trust_remote_code", trust_remote_code)
            add_bos = False if add_bos_token is None else as_bool("add_bos_token", add_bos_token)
            greedy_check = greedy_check_mode("iterative" if greedy_check is None else greedy_check)
            _refuse_diffusion_only_args(kind, cfg, self.preset)
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                eval_logger.warning(f"device {device!r} requested (lm-eval's CLI default) but CUDA is not available; "
                                    "using the CPU")
                device = "cpu"
            if self._dist is not None and device in (None, "auto", "cuda") and torch.cuda.is_available():
                device = str(self._dist.device)  # one full copy per process (device=auto would shard each one)
                eval_logger.info(f"rank {self.rank}/{self.world_size}: model on {device}")

            lm = load_model("smollm2-135m" if pretrained is None else pretrained, dtype=dtype, device=device,
                            kind=kind, trust_remote_code=trust)
            _refuse_diffusion_only_args(lm.kind, cfg, self.preset, block_cache)
            scorer = Scorer.from_loaded(
                lm, batch_size=bs, mc_num=128 if mc_num is None else mc_num,
                mc_batch=16 if mc_batch is None else mc_batch, seed=seed, shift_logits=shift_logits,
                greedy_check=greedy_check, cfg_scale=cfg or 0.0, add_bos_token=add_bos, sparsity=sparsity,
                head_chunk=head_chunk,
                stats=stats if stats is not None else SparsityStats() if sparsity is not None else None)
        _refuse_diffusion_only_args(scorer.kind, None, self.preset, block_cache)
        _check_layers_exist(scorer.model, scorer.sparsity)
        self.scorer = scorer
        self.max_gen_toks, self.gen_steps, self.block_length = max_gen_toks, gen_steps, block_length
        from dllm_sparse.models.loading import model_device

        self._device = model_device(scorer.model)
        self._weights = weights_hash(scorer.model)  # once: the identity is read for every cache check

    @classmethod
    def from_scorer(cls, scorer: Scorer, *, sparsity=SCORER_DEFAULT, stats=SCORER_DEFAULT,
                    **kwargs: Any) -> DllmSparseLM:
        """Wrap an existing scorer (its model and statistics are shared, not copied). ``sparsity``: a
        :class:`SparsityConfig`, a list of them or None (dense) for every call of this model, leaving the
        scorer as it is; ``stats``: where those calls measure. Defaults: the scorer's own (as in
        :meth:`Scorer.loglikelihood`)."""
        lm = cls(scorer=scorer, **kwargs)
        _check_layers_exist(scorer.model, scorer.configs_for(sparsity))  # a bad value fails here, not at a request
        lm._sparsity, lm._stats = sparsity, stats
        return lm

    @property
    def sparsity(self) -> list[SparsityConfig]:
        """The sparsity of every call of this model."""
        return self.scorer.configs_for(self._sparsity)

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

    @property
    def stats(self) -> SparsityStats | None:
        """The measured sparsity of every forward pass made through this model (None when dense)."""
        return self.scorer.stats if self._stats is SCORER_DEFAULT else self._stats

    @staticmethod
    def _key(req) -> Hashable:
        """Names a request for the ELBO's per-item generator: (task, document, choice index), independent of
        which other requests are in the batch (a partly cached run draws the same masks as a fresh one). This
        package's tasks use the built-in scoring's names (:func:`~dllm_sparse.eval.tasks.builtin_request_key`)."""
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
                    res = self.scorer.loglikelihood(pairs, keys=keys, sparsity=self._sparsity, stats=self._stats,
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
            scores = self.scorer.loglikelihood_rolling(texts, keys=keys, sparsity=self._sparsity, stats=self._stats)
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
            config = GenerationConfig(**cfg_kw)
            for s in range(0, len(idxs), sc.batch_size):
                chunk = idxs[s:s + sc.batch_size]
                prompts = [requests[i].args[0] for i in chunk]
                configs = self.sparsity
                if len(configs) == 1:
                    if self._stats is SCORER_DEFAULT and sc.stats is None:
                        sc.stats = SparsityStats()
                    res = generate(sc.model, sc.tokenizer, prompts, config, kind=sc.kind,
                                   sparsity=StepSparsity(configs[0], stats=self.stats))
                else:
                    with sc.sparsified(self._sparsity, self._stats):
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


# Registered under its package name only: `python -m` runs this file as __main__ and the task YAMLs import it
# again as dllm_sparse.eval.lm_eval_model, whose class must be the one lm-eval finds (a second class under the
# same name would be refused by lm-eval's registry).
if __name__ != "__main__":
    register_model("dllm_sparse", "dllm-sparse")(DllmSparseLM)


def _with_task_dir(argv: list[str]) -> list[str]:
    """lm-eval CLI arguments with this package's task folder as ``--include_path`` when a ``run`` names none (a
    run naming its own folder cannot also have ours: lm-eval 0.4.13's CLI takes one path; it then reaches
    ``dllm_sparse_mc`` through the YAML file itself, see the error below)."""
    from dllm_sparse.eval.lm_eval_tasks import TASK_DIR

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
    ours = sorted(t for v in values for t in v.split(",") if t in _BUILTIN_NAME)
    if ours:
        raise SystemExit(f"--tasks {','.join(ours)} with your own --include_path: lm-eval's CLI takes one include "
                         f"path, so give this package's tasks as files instead: --tasks "
                         + ",".join(f"{TASK_DIR}/{t}.yaml" for t in ours))
    return argv


def main(argv: list[str] | None = None) -> None:
    """``dllm-sparse-lm-eval`` / ``python -m dllm_sparse.eval.lm_eval_model``: lm-eval's CLI (all of its flags)
    with ``--model dllm_sparse`` registered and this package's tasks on the include path."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *_with_task_dir(list(sys.argv[1:] if argv is None else argv))]
    cli_evaluate()


if __name__ == "__main__":
    from dllm_sparse.eval.lm_eval_model import main as _package_main  # the registered module's main

    _package_main()
