"""Checks of a sweep folder's rows and cell keys as they are read back (:func:`row_problem`), and the cell keys of
earlier releases (:func:`old_key_to_new`; :func:`~dllm_sparse.eval.sweep.store.upgrade_cell_keys` rewrites them)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from dllm_sparse.eval.sweep.config import KEY_FIELDS, make_key
from dllm_sparse.sparsity.config import DENSE, SparsityConfig
from dllm_sparse.sparsity.rules import make_rule

__all__ = ["OLD_KEY_FORMS", "old_key_to_new", "key_problem", "is_old_key", "row_problem"]

OLD_KEY_FORMS = {
    11: "[model, task, site, rule, p, scope, limit, mc_num, mc_batch, seed, dtype]",
    8: "[model, task, sparsity config id, limit, mc_num, mc_batch, seed, dtype]",
}


def old_key_to_new(key: str, batch_size: int | None) -> str | None:
    """The current key of a cell keyed an old way (:data:`OLD_KEY_FORMS`: without the config id, or without
    the batch size, which ``batch_size`` supplies); None when ``key`` is not an old key."""
    try:
        k = json.loads(key)
    except (TypeError, ValueError):
        return None
    if not isinstance(k, list) or len(k) not in OLD_KEY_FORMS:
        return None
    if len(k) == 11:
        model, task, site, rule, p, scope, limit, mc_num, mc_batch, seed, dtype = k
        sparsity_id = DENSE if site == DENSE else SparsityConfig(site, make_rule(rule, p, scope=scope)).id
    else:
        model, task, sparsity_id, limit, mc_num, mc_batch, seed, dtype = k
    return make_key(model, task, sparsity_id, limit, mc_num, mc_batch, seed, dtype, -1 if batch_size is None
                else batch_size)


def key_problem(key: Any) -> str | None:
    """What is wrong with a cell key of the current form (:data:`KEY_FIELDS`, plus ``{"cfg": w, "head_chunk": n}``
    holding the options that are set), or None when it is one."""
    if not isinstance(key, str):
        return f"its key is {type(key).__name__} {key!r:.60}, not a string"
    try:
        k = json.loads(key)
    except ValueError:
        return f"its key {key!r:.80} is not JSON"
    if not isinstance(k, list):
        return f"its key {key!r:.80} is not a JSON list"
    if len(k) not in (len(KEY_FIELDS), len(KEY_FIELDS) + 1):
        return f"its key has {len(k)} fields, not the {len(KEY_FIELDS)} of [{', '.join(KEY_FIELDS)}]"
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {"model": lambda v: isinstance(v, str), "task": lambda v: isinstance(v, str),
              "sparsity": lambda v: isinstance(v, str) and (v == DENSE or _parses(v)),
              "limit": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
              "mc_num": whole, "mc_batch": whole, "seed": whole, "dtype": lambda v: isinstance(v, str),
              "batch_size": whole}
    for name, value in zip(KEY_FIELDS, k, strict=False):
        if not checks[name](value):
            return f"its key's {name} field is {value!r:.60}, which is not a valid {name}"
    if len(k) > len(KEY_FIELDS):
        opts = k[-1]
        number = {"cfg": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "head_chunk": whole}
        if not (isinstance(opts, dict) and opts and set(opts) <= set(number)
                and all(number[n](v) for n, v in opts.items())):
            return (f"its key's last field {opts!r:.60} is not the options "
                    "{\"cfg\": w, \"head_chunk\": n} (either or both)")
    return None


def _parses(sparsity_id: str) -> bool:
    try:
        SparsityConfig.parse(sparsity_id)
    except (TypeError, ValueError):
        return False
    return True


def is_old_key(key: Any) -> bool:
    """A well-formed key of an earlier release (:data:`OLD_KEY_FORMS`), which :func:`upgrade_cell_keys` rewrites;
    not a garbled one."""
    try:
        new = old_key_to_new(key, 1)
    except (TypeError, ValueError):  # an old-length list whose site / rule / threshold do not read
        return False
    return new is not None and key_problem(new) is None


def _row_key_problem(key: Any) -> str | None:
    """What is wrong with a row's key; None for a current key and for a well-formed old one."""
    problem = key_problem(key)
    if problem is None:
        return None
    try:
        new = old_key_to_new(key, 1)
    except (TypeError, ValueError) as e:  # the length of an old form, but its fields do not read
        return f"its key {key!r:.80} has the length of an old form, but {e}"
    if new is None:
        return problem
    old_problem = key_problem(new)
    return None if old_problem is None else f"{old_problem} (in a key of the old {len(json.loads(key))}-field form)"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _number(v) and math.isfinite(v)


#: What each field of a row must hold when present (:func:`row_problem`); ``None`` stands for JSON null.
_ROW_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model": ("a string", lambda v: isinstance(v, str) and v != ""),
    "task": ("a string", lambda v: isinstance(v, str) and v != ""),
    "site": ("a string", lambda v: isinstance(v, str) and v != ""),
    "metric": ("a string", lambda v: isinstance(v, str) and v != ""),
    "value": ("a finite number", _finite),
    "kind": ("'ar' or 'diffusion'", lambda v: v in ("ar", "diffusion")),
    "p": ("a finite number", _finite),
    "sparsity": ("a number in [0, 1], or null (the dense row)", lambda v: v is None or (_finite(v) and 0 <= v <= 1)),
    "relative_performance": ("a number (NaN: undefined, the dense score is 0), or null (its dense row is not in yet)",
                             lambda v: v is None or _number(v)),
    "dense_value": ("a finite number, or null (its dense row is not in yet)", lambda v: v is None or _finite(v)),
    "metrics": ("an object of metric name -> number",
                lambda v: isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items())),
    "n_items": ("a whole number >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
}
#: Fields every row has (the rest are checked when present: rows of older versions lack some).
_REQUIRED_FIELDS = ("key", "model", "task", "site", "metric", "value")


def row_problem(row: Any) -> str | None:
    """What is wrong with a row read back from a sweep folder, or None. A row is a JSON object with the fields
    :data:`_REQUIRED_FIELDS`, a key of the current (or an old, upgradable) form, and, for each field of
    :data:`_ROW_FIELDS` it holds, a value of that form: ``value`` a finite number; ``sparsity`` a number in
    [0, 1] or null (dense rows); ``relative_performance`` a number (NaN where the dense score is 0) or null (its
    dense row was not written yet); ``p`` a finite number; ``kind`` ar / diffusion. A hand-edited or damaged row
    (``"value": "abc"``) would otherwise be kept and poison every table."""
    if not isinstance(row, dict):
        return f"it is a JSON {type(row).__name__}, not an object"
    missing = [f for f in _REQUIRED_FIELDS if f not in row]
    if missing:
        return f"it has no {missing[0]} field"
    why = _row_key_problem(row["key"])
    if why is not None:
        return why
    for name, (form, ok) in _ROW_FIELDS.items():
        if name in row and not ok(row[name]):
            return f"its {name} field is {row[name]!r:.60}, not {form}"
    return None
