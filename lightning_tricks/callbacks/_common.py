"""Plumbing every callback shares: argument checks with one wording, and "did an optimizer step happen?".

Argument checks raise ``ValueError`` naming the argument, what is allowed and the bad value
(``"every_n_steps must be an int >= 1, got 0"``), the house style of STYLE.md, written once here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["check_int", "check_choice", "check_bool", "StepWatch"]


def check_int(name: str, value: Any, minimum: int = 0, *, allow_none: bool = False) -> int | None:
    """``value`` as an int ``>= minimum`` (``None`` too with ``allow_none``); booleans are not ints here.

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


class StepWatch:
    """Tells, once per batch, whether an optimizer step happened since the last look.

    ``trainer.global_step`` counts optimizer steps, so with gradient accumulation (or a batch whose step
    was skipped) a batch end may come without a step. Per-step tricks (EMA and SWA updates, snapshots)
    act only when :meth:`stepped` says so. The last step seen is part of the callback's checkpoint
    state (:attr:`last`), so a resumed run continues the count exactly.

    Example:
        >>> watch = StepWatch()
        >>> watch.start(0); [watch.stepped(s) for s in (0, 1, 1, 2)]
        [False, True, False, True]
    """

    def __init__(self) -> None:
        self.last = -1

    def start(self, global_step: int) -> None:
        """At fit start: steps before ``global_step`` are not new (a resumed run keeps its loaded value)."""
        if self.last < 0:
            self.last = global_step

    def stepped(self, global_step: int) -> bool:
        """Whether ``global_step`` moved since the last call (and remember it)."""
        if global_step == self.last:
            return False
        self.last = global_step
        return True
