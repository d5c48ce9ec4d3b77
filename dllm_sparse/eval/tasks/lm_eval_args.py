"""Strict readers for ``--model_args`` values: one small typed parser per kind of argument.

lm-eval hands model arguments over half-typed (``handle_arg_string`` turns ``true`` into True, ``4`` into 4,
``2.7`` into 2.7, ``inf`` into ``float('inf')`` and leaves anything else a string), and a Python caller passes
whatever it likes. Every reader here accepts the value's meaning in either form and refuses anything else
with a ``ValueError`` that names the argument, the value and the accepted form: a typo must not read as a
default (``add_bos_token=ture`` as False), a fraction must not be truncated (``batch_size=2.7`` as 2), and a
value that would fail deep inside a run (``batch_size=0``) or poison every number (``cfg=inf``) fails here.
Torch-free.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["as_bool", "as_optional_bool", "as_positive_int", "as_int", "as_finite_float", "as_nonneg_float"]

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
