"""Argument checks for cores and callbacks, with one wording.

Each raises ``ValueError`` naming the argument, what is allowed and the bad value
(``"every_n_steps must be an int >= 1, got 0"``). Booleans are never numbers here, so a YAML ``yes``
given where a count belongs is refused rather than read as 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_int", "check_float", "check_choice", "check_bool"]


def check_int(name: str, value: Any, minimum: int = 0, *, allow_none: bool = False) -> int | None:
    """``value`` as an int ``>= minimum`` (``None`` too with ``allow_none``).

    Example:
        >>> check_int("cycles", 3, 1)
        3
        >>> check_int("cycles", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: cycles must be an int >= 1, got 0
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= {minimum}{extra}, got {value!r}")
    return value


def check_float(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite float in the interval from ``low`` to ``high`` (ends open or closed).

    Example:
        >>> check_float("decay", 0.99, 0, 1, low_open=True, high_open=True)
        0.99
        >>> check_float("decay", 1.5, 0, 1, low_open=True, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: decay must be a number in (0, 1), got 1.5
    """
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or value < low
        or value > high
        or (low_open and value == low)
        or (high_open and value == high)
    ):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    Example:
        >>> check_choice("keep", "tape", ("memory", "disk"))
        Traceback (most recent call last):
        ...
        ValueError: keep must be one of ('memory', 'disk'), got 'tape'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (a YAML ``yes``/``1`` typo is refused rather than read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value
