"""The common generation interface: a config in, a result out, and the per-step state callbacks see.

Both generators (:class:`~dllm_sparse.samplers.diffusion.MaskedDiffusionGenerator` and
:class:`~dllm_sparse.samplers.autoregressive.AutoregressiveGenerator`) take a :class:`GenerationConfig` and
return a :class:`GenerationResult`. During generation they call :class:`GenerationCallback` objects with a
:class:`StepState` before (``on_step_begin``) and after (``on_step_end``) every forward pass; sparsification,
statistics and mask tracking attach there (and through module hooks), never inside a sampler loop.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from dllm_sparse.atomic import atomic_write_json

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "StepInfo",
    "REMASKING",
    "CONFIDENCE",
    "DIFFUSION_ONLY",
]

REMASKING = ("low_confidence", "random")
BLOCK_CACHES = ("prefix", "dual")  # dllm_sparse.samplers.block_cache: kept here so a config imports no sampler
CONFIDENCE = ("float64", "official")


def _whole(name: str, value) -> int:
    """A positive whole number (7.0 is fine; 7.9, True, NaN and 0 are errors, never silently truncated)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and value == value and int(value) == value
    if not ok or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _finite_nonneg(name: str, value, meaning: str) -> float:
    """A finite number >= 0 (NaN and infinity are errors: an infinite temperature or guidance scale turns every
    logit into NaN or inf and the sampler would commit arbitrary tokens)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 ({meaning}), got {value!r}")
    return x


def _positive_or_none(name: str, meaning: str):
    """None, or a finite number > 0 (0, negatives, NaN and infinity are errors naming the setting)."""
    def check(value):
        if value is None:
            return None
        x = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
        if not (math.isfinite(x) and x > 0):  # a string is not parsed
            raise ValueError(f"{name} must be None or a finite number > 0 ({meaning}), got {value!r}")
        return x
    return check


def _whole_or_none(name: str):
    return lambda value: None if value is None else _whole(name, value)


def _integer(value) -> int | None:
    """value as an int when it is an integer (an int, numpy int or one-element integer tensor), else None (7.9,
    "7" and True are not: never truncated or parsed)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _items(name: str, value, what: str) -> tuple:
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None


def _token_id(name: str, value) -> int:
    """A token id: an integer >= 0."""
    i = _integer(value)
    if i is None or i < 0:
        raise ValueError(f"{name} must be a token id (an integer >= 0), got {value!r}")
    return i


def _token_ids(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    name = "stop_token_ids (eos_token_id)"
    items = (value,) if _integer(value) is not None else _items(name, value, "a token id or a sequence of them")
    return tuple(_token_id(name, i) for i in items)


def _stop_strings(value) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else _items("stop_strings", value, "a string or a sequence of strings")
    bad = [s for s in items if not isinstance(s, str)]
    if bad:
        raise ValueError(f"stop_strings must be strings, got {bad[0]!r} in {value!r}")
    return items


def _seed(value):
    """None, an int, or one int per row."""
    what = "None, an int, or a sequence of one int per row"
    if value is None or _integer(value) is not None:
        return value if value is None else _integer(value)
    items = () if isinstance(value, (str, bytes)) else _items("seed", value, what)
    if not items or any(_integer(s) is None for s in items):
        raise ValueError(f"seed must be {what}, got {value!r}")
    return tuple(_integer(s) for s in items)


def _one_of(name: str, choices: tuple, meaning: str = ""):
    def check(value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}{meaning}, got {value!r}")
        return value
    return check


def _bool_or_none(name: str, meaning: str):
    def check(value):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True, False or None ({meaning}), got {value!r}")
        return value
    return check


# Each field's check, run on every assignment (so by the constructor too: the dataclass __init__ assigns each
# field): ``c.gen_length = 7.9`` fails as GenerationConfig(gen_length=7.9) does. Returns the normalised value.
_CHECKS = {
    "max_new_tokens": lambda v: _whole("max_new_tokens / gen_length", v),
    "temperature": lambda v: _finite_nonneg("temperature", v, "0 = greedy, T > 0 samples"),
    "stop_token_ids": _token_ids,
    "stop_strings": _stop_strings,
    "seed": _seed,
    "pad_id": lambda v: None if v is None else _token_id("pad_id (pad_token_id)", v),
    "steps": _whole_or_none("steps"),
    "block_length": _whole_or_none("block_length"),
    "cfg_scale": lambda v: _finite_nonneg("cfg_scale", v, "0 disables guidance"),
    "remasking": _one_of("remasking", REMASKING),
    "mask_id": lambda v: None if v is None else _token_id("mask_id", v),
    "logit_shift": _bool_or_none("logit_shift", "None = the model family's convention"),
    "confidence": _one_of("confidence", CONFIDENCE, " ('float64' = the definition, 'official' = the official "
                          "LLaDA code bit for bit)"),
    "block_cache": _one_of("block_cache", (None, *BLOCK_CACHES), " (None = exact: every step over the whole canvas; "
                           "'prefix' / 'dual' = Fast-dLLM's approximate block caches)"),
    "confidence_threshold": _positive_or_none("confidence_threshold", "None = the fixed schedule; t commits every "
                                              "masked position of the block with confidence >= t, at least one"),
    "confidence_factor": _positive_or_none("confidence_factor", "None = the fixed schedule; f commits the n most "
                                           "confident positions while the n-th has confidence >= 1 - f / (n + 1)"),
}

# The settings only the masked-diffusion sampler reads, with their defaults: an autoregressive generation refuses
# a config that changes one (it would be ignored).
DIFFUSION_ONLY = {"steps": None, "block_length": None, "cfg_scale": 0.0, "remasking": "low_confidence",
                  "mask_id": None, "logit_shift": None, "confidence": "float64", "block_cache": None,
                  "confidence_threshold": None, "confidence_factor": None}


@dataclass
class _GenerationFields:
    """The fields of :class:`GenerationConfig` (documented there)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    stop_token_ids: Sequence[int] | None = None
    stop_strings: Sequence[str] = ()
    seed: int | Sequence[int] | None = None
    pad_id: int | None = None
    # diffusion only
    steps: int | None = None
    block_length: int | None = None
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    mask_id: int | None = None
    logit_shift: bool | None = None
    confidence: str = "float64"
    block_cache: str | None = None
    confidence_threshold: float | None = None
    confidence_factor: float | None = None

    def __setattr__(self, name: str, value) -> None:
        check = _CHECKS.get(name)
        if check is None and not isinstance(getattr(type(self), name, None), property):  # a typo would be ignored
            raise AttributeError(f"GenerationConfig has no setting {name!r}; its settings are {sorted(_CHECKS)} "
                                 "(and the alias gen_length)")
        super().__setattr__(name, value if check is None else check(value))

    def diffusion_settings(self) -> dict[str, Any]:
        """The diffusion-only settings this config changes from their defaults (``{name: value}``)."""
        return {k: getattr(self, k) for k, default in DIFFUSION_ONLY.items() if getattr(self, k) != default}

    @property
    def gen_length(self) -> int:
        return self.max_new_tokens

    @gen_length.setter
    def gen_length(self, value: int) -> None:
        self.max_new_tokens = value  # checked like the constructor's gen_length

    # transformers' spellings, read-only (set the canonical field).
    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def eos_token_id(self) -> tuple[int, ...] | None:
        return self.stop_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self.pad_id

    def replace(self, **changes) -> GenerationConfig:
        """A copy with some fields changed (the aliases ``gen_length``, ``do_sample``, ``eos_token_id`` and
        ``pad_token_id`` accepted; an alias replaces its canonical field)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if changes.get("do_sample") is True and "temperature" not in changes and self.temperature > 0:
            changes["temperature"] = self.temperature  # already sampling: keep its temperature
        changes = _canonical(changes)
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"unknown GenerationConfig fields: {sorted(unknown)}")
        values.update(changes)
        return type(self)(**values)

    @classmethod
    def from_transformers(cls, hf_config: Any, **overrides) -> GenerationConfig:
        """This config from a ``transformers.GenerationConfig`` (e.g. ``model.generation_config``): its
        ``max_new_tokens``, ``do_sample`` / ``temperature``, ``eos_token_id``, ``pad_token_id`` and
        ``stop_strings``; ``overrides`` set further fields (the diffusion-only ones, say). Settings it has no
        counterpart for here (``top_k``, ``top_p``, ``num_beams``, ``max_length``, penalties, ...) raise
        ``ValueError`` naming them rather than being dropped; ``bos_token_id`` / ``decoder_start_token_id``
        (which start generation without a prompt) and transformers' bookkeeping keys are not read."""
        given = {k: v for k, v in hf_config.to_diff_dict().items() if v is not None}
        kwargs = {k: given.pop(k) for k in _FROM_TRANSFORMERS if k in given}
        if kwargs.get("do_sample") is False:
            kwargs.pop("temperature", None)  # transformers ignores the temperature of a greedy config
        for k in _NOT_READ:
            given.pop(k, None)
        if given:
            raise ValueError(f"this transformers GenerationConfig sets {sorted(given)}, which "
                             "dllm_sparse.samplers.GenerationConfig does not implement; unset them (or use "
                             "transformers' own generate)")
        return cls(**_canonical(kwargs), **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gen_length"] = self.max_new_tokens
        return d


class GenerationConfig(_GenerationFields):
    """Settings of one generation call. ``gen_length`` is an alias of ``max_new_tokens`` (constructor keyword
    and attribute).

    Not ``transformers.GenerationConfig``, but its spellings are accepted where they mean the same thing (one
    canonical field each; the alias as constructor / :meth:`replace` keyword and read-only attribute; both given
    and different is an error): ``max_new_tokens`` (the same name), ``do_sample`` (``False`` = temperature 0,
    ``True`` = temperature 1 unless one > 0 is given), ``eos_token_id`` = ``stop_token_ids``,
    ``pad_token_id`` = ``pad_id``. :meth:`from_transformers` converts a transformers config. The
    diffusion-only fields below (``steps``, ``block_length``, ``cfg_scale``, ``remasking``, ``mask_id``,
    ``confidence``, ``logit_shift``) have no transformers counterpart; transformers' ``top_k``, ``top_p``,
    ``num_beams``, ``max_length`` and penalties have none here.

    Common fields:
        max_new_tokens: tokens to generate (diffusion: the canvas length after the prompt, ``gen_length``).
        temperature: 0 = greedy / argmax; T > 0 samples softmax(logits / T).
        stop_token_ids: ids that end a sequence. ``None`` = the model's and tokenizer's end-of-sequence and
            end-of-turn ids; ``()`` = none. AR: generation of a row stops there; diffusion: the output is cut
            there (the canvas is always filled).
        stop_strings: strings that end a sequence (AR: stops the row; both: the text is cut before them).
        seed: int, a sequence of one int per row, or None (drawn from torch's global RNG). Row r uses a
            ``torch.Generator`` seeded with ``seed + r`` (or ``seed[r]``), so a row of a batch draws the same
            numbers as the same prompt generated alone with that row's seed.
        pad_id: padding id for left-padded batches (default: tokenizer's pad, else the model config's, else
            the end-of-sequence id).

    Every field is checked when it is set, in the constructor and by assignment alike (``c.gen_length = 7.9`` is
    refused as ``GenerationConfig(gen_length=7.9)`` is); setting a name that is not a field is an error.

    Diffusion-only fields (LLaDA sampler, ``docs/generation.md``; an autoregressive generation refuses a config
    that changes one from its default, naming it, since its loop would ignore it):
        steps: denoising steps (default ``gen_length``), a multiple of the number of blocks and at most
            ``gen_length`` (each step commits at least one token; more steps would change nothing).
        block_length: block size (default ``gen_length``: pure diffusion); must divide ``gen_length``.
        cfg_scale: classifier-free guidance w; logits = uncond + (w + 1)(cond - uncond). 0 = off.
        remasking: ``"low_confidence"`` or ``"random"``.
        mask_id: mask token id (default: model config ``mask_token_id``, tokenizer, or the family profile's).
        confidence: how ``low_confidence`` scores and ranks positions. ``"float64"`` (default, the definition):
            softmax in float64, ties committed lowest position first (a stable sort). ``"official"``: as the
            official LLaDA ``generate.py``: softmax in the model's dtype (bf16 for a bf16 model) and the k
            positions taken in ``torch.topk`` order over the whole canvas row, which reproduces its tokens bit
            for bit (in bf16 the two differ in a few percent of cases, on near-ties). Random numbers stay ours.
        logit_shift: Dream-style shift (position i predicted from the output at i - 1). ``None`` = the family
            profile's ``logit_shift`` (on for Dream), off for unknown families.
        block_cache: ``None`` (default: every step is a forward over the whole canvas, the exact sampler),
            ``"prefix"`` or ``"dual"``: Fast-dLLM's approximate block KV caches (native LLaDA only). A block's
            first step runs over the whole canvas and stores every layer's keys and values; its later steps
            recompute the block and what follows it (prefix) or the block alone (dual) and read the other
            positions' keys and values from the store (:mod:`dllm_sparse.samplers.block_cache`).
        confidence_threshold: ``None`` (default: the fixed schedule, n // s (+1) tokens per step) or t > 0:
            Fast-dLLM's parallel decoding. Each step commits every masked position of the current block whose
            confidence is >= t, and at least the most confident one; a block ends when none of its positions is
            masked, so the number of steps varies (t > 1 commits one token per step: the exact sampler with
            ``steps = gen_length``). ``steps`` is then the upper bound: it must be ``gen_length`` (the default),
            the most steps a block of one token per step can take (:mod:`dllm_sparse.samplers.step_rule`).
        confidence_factor: ``None`` or f > 0: Fast-dLLM's factor rule. Each step commits the n most confident
            masked positions of the block for the largest n such that the i-th most confident (i = 2..n) has
            confidence >= 1 - f / (i + 1); at least one. Same step bound as ``confidence_threshold``; the two
            are exclusive.
    """


    def __init__(self, *args, **kwargs):
        super().__init__(*args, **_canonical(kwargs))


# transformers.GenerationConfig fields read by GenerationConfig.from_transformers, and those it skips.
_FROM_TRANSFORMERS = ("max_new_tokens", "do_sample", "temperature", "eos_token_id", "pad_token_id", "stop_strings")
_NOT_READ = ("transformers_version", "_from_model_config", "bos_token_id", "decoder_start_token_id")


def _canonical(kwargs: dict) -> dict:
    """Keywords with the aliases replaced by their canonical field: ``gen_length`` (LLaDA's name) and
    transformers' ``eos_token_id`` / ``pad_token_id`` / ``do_sample``. An alias given with its canonical field
    must say the same; anything else is an error naming both."""
    kwargs = dict(kwargs)

    def merge(alias: str, field_name: str, same) -> None:
        if alias not in kwargs:
            return
        value = kwargs.pop(alias)
        if field_name in kwargs and not same(kwargs[field_name], value):
            raise ValueError(f"{alias}={value!r} and {field_name}={kwargs[field_name]!r} are the same setting "
                             f"({alias} is an alias of {field_name}); give one of them")
        kwargs[field_name] = value

    def ids(v):
        return None if v is None else (int(v),) if isinstance(v, numbers.Integral) else tuple(int(i) for i in v)

    merge("gen_length", "max_new_tokens", lambda a, b: int(a) == int(b))
    merge("eos_token_id", "stop_token_ids", lambda a, b: ids(a) == ids(b))
    merge("pad_token_id", "pad_id", lambda a, b: a == b)
    if "do_sample" in kwargs:
        do_sample = kwargs.pop("do_sample")
        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
        if "temperature" in kwargs and (float(kwargs["temperature"]) > 0) != do_sample:
            raise ValueError(f"do_sample={do_sample} and temperature={kwargs['temperature']!r} disagree: here "
                             "temperature 0 is greedy and T > 0 samples; give temperature alone (or do_sample "
                             "with a temperature that agrees)")
        # transformers samples at temperature 1 unless told otherwise
        kwargs.setdefault("temperature", 1.0 if do_sample else 0.0)
    return kwargs


@dataclass
class StepInfo:
    """One step of the per-step trace (JSON-able)."""

    step: int
    block: int
    tag: Hashable  # the statistics tag of this step's forward: step index, or "prefill" (AR step 0)
    nfe: int  # forward passes so far (cumulative, after this step)
    time: float  # seconds since the start of generation, at the end of this step
    committed: list[list[int]]  # per row: generated-token indices (0 = first new token) written this step
    tokens: list[list[int]]  # per row: the ids written there

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    """What a generator returns.

    ``sequences``: [B, P + n] left-padded prompts followed by the generated canvas (diffusion) or tokens (AR;
    rows that stopped early are filled with the pad id). ``ids``: per row, the generated ids cut before the
    first stop id / stop string / (diffusion stopped early) mask id. ``texts``: their decoding (empty
    strings without a tokenizer). ``num_tokens``: tokens the sampler produced (diffusion: committed canvas
    positions; AR: tokens decoded per row until it stopped, stop token included), the numerator of
    ``tokens_per_second``. ``nfe``: forward passes (with classifier-free guidance the conditional and
    unconditional halves are batched in one call and count as 2).
    """

    sequences: torch.Tensor
    prompt_length: int
    ids: list[list[int]]
    texts: list[str]
    nfe: int
    wall_time: float
    num_tokens: int
    trace: list[StepInfo] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # "stop", "length" or "callback" per row
    kind: str = ""
    config: GenerationConfig | None = None
    stats: Any = None  # SparsityStats when generated with sparsity=...
    kv_cache: bool | None = None  # AR: True = KV-cached decoding, False = whole sequence re-run per step

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.wall_time if self.wall_time > 0 else float("nan")

    @property
    def generated(self) -> torch.Tensor:
        """[B, n]: the generated part of ``sequences`` (not cut at stop ids)."""
        return self.sequences[:, self.prompt_length:]

    def summary(self) -> dict:
        return {
            "kind": self.kind, "nfe": self.nfe, "wall_time": self.wall_time, "num_tokens": self.num_tokens,
            "tokens_per_second": self.tokens_per_second, "finish_reasons": list(self.finish_reasons),
            **({"kv_cache": self.kv_cache} if self.kv_cache is not None else {}),
        }

    def to_dict(self) -> dict:
        return {
            **self.summary(),
            "config": self.config.to_dict() if self.config is not None else None,
            "ids": self.ids,
            "texts": self.texts,
            "trace": [s.to_dict() for s in self.trace],
        }

    def save_trace(self, path) -> None:
        """Write :meth:`to_dict` (summary, config, outputs and the per-step trace) as JSON."""
        atomic_write_json(path, self.to_dict(), default=str)
