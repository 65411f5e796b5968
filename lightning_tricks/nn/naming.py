"""Choosing parameters or layers by name: regexes matched with ``re.search``."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["compile_patterns", "matches"]


def compile_patterns(value: str | Sequence[str] | None, what: str = "include") -> list[re.Pattern[str]] | None:
    """``value`` (a regex or a list of regexes) compiled; ``None`` stays ``None`` (= no filter).

    Raises ``ValueError`` naming ``what`` for an empty list, a non-string or an invalid regex.
    """
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not items or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{what} must be a regex string or a non-empty list of them, got {value!r}")
    try:
        return [re.compile(v) for v in items]
    except re.error as err:
        raise ValueError(f"{what} has an invalid regex {value!r}: {err}") from None


def matches(name: str, patterns: list[re.Pattern[str]] | None, default: bool = True) -> bool:
    """Whether any pattern finds a match in ``name``; ``default`` when ``patterns`` is ``None``."""
    if patterns is None:
        return default
    return any(rx.search(name) for rx in patterns)
