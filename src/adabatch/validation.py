"""Argument checks shared by every public constructor: one place, the value named.

Bools are not numbers here (``True`` is not a batch size of 1), NaN and infinities are
refused, and counts written as ``1e6`` (a float with an integral value, as a YAML file or a
command line gives them) are accepted as ints.

Example::

    >>> count("max_samples", 1e6)
    1000000
    >>> count("max_samples", 0)
    Traceback (most recent call last):
    ...
    ValueError: max_samples=0 must be an int >= 1
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["choice", "count", "flag", "number"]


def count(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> Any:
    """An int ``>= minimum`` (an integral float such as ``1e6`` is converted)."""
    if value is None and optional:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return value


def number(name: str, value: Any, minimum: float = -math.inf, maximum: float = math.inf, *,
           strict: bool = False, optional: bool = False) -> Any:
    """A finite float within ``[minimum, maximum]`` (``(minimum, maximum]`` if ``strict``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    v = float(value)
    if not math.isfinite(v) or v < minimum or v > maximum or (strict and v == minimum):
        left = "(" if strict else "["
        raise ValueError(f"{name}={value!r} must be a finite number in {left}{minimum}, "
                         f"{maximum}]")
    return v


def flag(name: str, value: Any) -> bool:
    """A bool (not a truthy string such as ``"no"``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
    return value
