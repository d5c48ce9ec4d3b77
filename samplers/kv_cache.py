"""The KV cache of a ``transformers`` causal LM: which keyword carries it, and a check that it is really used.

transformers renamed the forward keyword that carries the cache: ``past_key_values`` up to 5.23, ``cache``
from 5.24 on (the old name is then a deprecated alias). Guessing it from ``model.forward``'s signature is
fragile, and a wrong guess used to be silent: the loop re-ran the whole sequence at every step. So the name is
asked from transformers itself (its generation code keeps the list of cache keywords, the default first), and
:func:`check_cache_length` verifies after every cached forward that the cache really grew by the tokens fed.
"""

from __future__ import annotations

from typing import Any

from dllm_sparse.models.wrappers import forward_parameters, unwrap_model, wrapper_chain

__all__ = ["KVCacheError", "cache_keyword", "new_cache", "check_cache_length"]


class KVCacheError(RuntimeError):
    """The model cannot be decoded with a KV cache (or its cache did not record what it was fed)."""


def _transformers_cache_names() -> list[str]:
    """The cache keywords the installed transformers' generation loop knows, its default first."""
    from transformers.generation import utils as generation_utils

    names = getattr(generation_utils, "ALL_CACHE_NAMES", None)
    if not names:
        raise KVCacheError(
            "the installed transformers does not list its cache keywords (transformers.generation.utils."
            "ALL_CACHE_NAMES); install a version inside the range dllm-sparse declares")
    return list(names)


def cache_keyword(model: Any) -> str:
    """The forward keyword that carries the KV cache for ``model`` with the installed transformers.

    transformers' default name comes first (``cache`` from 5.24, ``past_key_values`` before); a model whose
    forward takes one of transformers' other cache names (e.g. ``cache_params``) gets that one. A model that
    takes none raises :class:`KVCacheError`: it cannot be decoded with a cache. A wrapped model (``torch.compile``,
    peft, DataParallel: :mod:`dllm_sparse.models.wrappers`) is asked about the model it wraps, whose ``forward``
    receives the keyword; :func:`check_cache_length` still catches a wrapper that drops it.
    """
    _refuse_prompt_learning(model)
    names = _transformers_cache_names()
    params = forward_parameters(model)
    for name in names:
        if name in params:
            return name
    raise KVCacheError(
        f"{type(unwrap_model(model)).__name__}.forward takes none of the KV-cache keywords of transformers "
        f"{_transformers_version()} ({', '.join(names)}), so it cannot be decoded with a cache. Pass "
        "kv_cache=False to AutoregressiveGenerator to re-run the whole sequence at every step (slow; the "
        "result then records kv_cache=False)")


def _refuse_prompt_learning(model: Any) -> None:
    """A peft prompt-learning adapter (prefix tuning, prompt tuning, p-tuning) adds its virtual tokens through
    the cache or the inputs of every call, so a cache the loop owns would drop them (prefix tuning decodes as
    the bare model, silently) or misalign the positions."""
    for layer in wrapper_chain(model):
        config = getattr(layer, "active_peft_config", None) if hasattr(type(layer), "get_base_model") else None
        if getattr(config, "is_prompt_learning", False):
            raise KVCacheError(
                f"the peft adapter is {type(config).__name__} (prompt learning): it feeds its virtual tokens through "
                "the KV cache / the inputs of each forward, which a cached decoding loop would drop or misalign. "
                "Pass kv_cache=False to AutoregressiveGenerator (every step re-runs the sequence through the "
                "adapter), or use a LoRA-type adapter")


def new_cache(model: Any):
    """An empty ``DynamicCache`` for ``model``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # versions whose DynamicCache takes no config
        return DynamicCache()


def check_cache_length(cache: Any, expected: int, model: Any) -> None:
    """Raise unless ``cache`` holds exactly ``expected`` positions (the tokens fed so far).

    Catches a model that accepted the cache keyword but did not fill the cache (a renamed keyword swallowed by
    ``**kwargs``), which would otherwise make the next step attend to nothing.
    """
    got = cache.get_seq_length()
    if got != expected:
        raise KVCacheError(
            f"{type(model).__name__} was fed {expected} positions but its KV cache holds {got}: the cache "
            f"keyword {cache_keyword(model)!r} is not honoured with transformers {_transformers_version()}. "
            "Install a transformers version inside the range dllm-sparse declares, or pass kv_cache=False")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
