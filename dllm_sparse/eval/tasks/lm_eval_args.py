"""The lm-eval model's arguments (``--model_args``): strict readers of their values, the sparsity they name, the
batch size, and how they meet the arguments lm-eval passes beside them.

lm-eval hands model arguments over half-typed (``handle_arg_string`` turns ``true`` into True, ``4`` into 4,
``2.7`` into 2.7, ``inf`` into ``float('inf')`` and leaves anything else a string), and a Python caller passes
whatever it likes. Every reader here accepts the value's meaning in either form and refuses anything else
with a ``ValueError`` that names the argument, the value and the accepted form: a typo must not read as a
default (``add_bos_token=ture`` as False), a fraction must not be truncated (``batch_size=2.7`` as 2), and a
value that would fail deep inside a run (``batch_size=0``) or poison every number (``cfg=inf``) fails here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from typing import Any

from dllm_sparse.sparsity.config import DENSE, SparsityConfig
from dllm_sparse.sparsity.rules import make_rule, rule_name

__all__ = ["as_bool", "as_optional_bool", "as_positive_int", "as_int", "as_finite_float", "as_nonneg_float",
           "MODEL_ARGS", "sparsity_from_args", "batch_size_arg", "merge_lm_eval_args", "refuse_diffusion_only_args",
           "check_layers_exist"]

eval_logger = logging.getLogger("lm_eval")

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def _refuse(name: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"model argument {name}={value!r}: expected {accepted}")


def as_bool(name: str, value: Any) -> bool:
    """True/False, 1/0, or one of the words true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _refuse(name, value, f"a boolean: true or false (also {'/'.join(_TRUE[1:])} or {'/'.join(_FALSE[1:])})")


def as_optional_bool(name: str, value: Any) -> bool | None:
    """None (or the word none / an empty string: the default decides) or a boolean as :func:`as_bool`."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return as_bool(name, value)


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is one exactly (an int, a float with no fraction, digits in a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():
            return int(text)
    return None


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """A whole number (``4``, ``4.0``, ``"4"``; not ``4.5`` or ``True``), at least ``minimum`` when given."""
    n = _whole_number(value)
    accepted = "a whole number" + ("" if minimum is None else f" >= {minimum}")
    if n is None or (minimum is not None and n < minimum):
        raise _refuse(name, value, accepted)
    return n


def as_positive_int(name: str, value: Any) -> int:
    """A whole number >= 1."""
    return as_int(name, value, minimum=1)


def as_finite_float(name: str, value: Any) -> float:
    """A finite number (not NaN or infinite; a numeric string is read)."""
    if isinstance(value, bool):
        raise _refuse(name, value, "a finite number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _refuse(name, value, "a finite number") from None
    if not math.isfinite(x):
        raise _refuse(name, value, "a finite number")
    return x


def as_nonneg_float(name: str, value: Any) -> float:
    """A finite number >= 0."""
    x = as_finite_float(name, value)
    if x < 0:
        raise _refuse(name, value, "a finite number >= 0")
    return x


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


def batch_size_arg(value: Any, max_batch_size: Any = None) -> int:
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
              "preset", "progress", "data_parallel", "block_cache", "head_chunk",
              "confidence_threshold")

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

def refuse_diffusion_only_args(kind: str | None, cfg: float | None, preset, block_cache: str | None = None) -> None:
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


def check_layers_exist(model, configs) -> None:
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
