"""Argument types shared by the callback's signature and the command line.

`Count`: a non-negative whole number that also accepts the scientific notation people write
for budgets (``max_samples=1e6`` on the command line or ``max_samples: 1e6`` in YAML, which
YAML reads as a string). Registered with jsonargparse, so a LightningCLI parameter
annotated ``Count`` or ``Count | None`` parses ``1e6``, ``1_000_000`` and ``1000000`` alike
and refuses ``1.5e3``-style non-integers with the value named.

Example::

    >>> Count("1e6"), Count(2.5e3 * 2), Count("1_000")
    (1000000, 5000, 1000)
    >>> Count("1.5")
    Traceback (most recent call last):
    ...
    ValueError: '1.5' is not a whole number (a count such as 1000000 or 1e6)
"""

from __future__ import annotations

import math
from typing import Any


class Count(int):
    """A whole number written as an int, an integral float (``1e6``) or such a string."""

    def __new__(cls, value: Any) -> Count:
        return super().__new__(cls, _parse_count(value))


def _parse_count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a bool, not a count")
    if isinstance(value, int):
        return int(value)
    number: float
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a number (a count such as 1000000 or 1e6)")\
                from None
    else:
        raise ValueError(f"{value!r} is not a count (a whole number such as 1000000 or 1e6)")
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{value!r} is not a whole number (a count such as 1000000 or 1e6)")
    return int(number)


def _register() -> None:
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # pragma: no cover - jsonargparse is a dependency
        return
    register_type(Count, serializer=int, deserializer=Count)


_register()
