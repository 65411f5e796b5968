"""Plumbing callbacks share: "did an optimizer step happen?", the AMP scale gradients still carry,
and the argument checks of :mod:`lightning_tricks.checks` (re-exported).
"""

from __future__ import annotations

from typing import Any

from lightning_tricks._lightning import Trainer, pending_grad_scale
from lightning_tricks.checks import check_bool, check_choice, check_float, check_int

__all__ = [
    "check_int",
    "check_float",
    "check_choice",
    "check_bool",
    "StepWatch",
    "MemoStateKey",
    "pending_grad_scale",
    "log_to_loggers",
]


class MemoStateKey:
    """A mixin (before Lightning's ``Callback`` in the bases) that memoizes ``_generate_state_key``.

    Lightning reads ``state_key`` at every hook call; a key built from the current arguments is
    compared with the last ones, so a changed argument still gives the new key. Only worth it where
    ``benchmarks/overhead.py`` shows the formatting in a callback's step ratio; a plain
    ``state_key`` property is the default.

    Example:
        >>> from lightning_tricks._lightning import Callback
        >>> class Probe(MemoStateKey, Callback):
        ...     def __init__(self, alpha):
        ...         self.alpha = alpha
        ...     @property
        ...     def state_key(self):
        ...         return self._generate_state_key(alpha=self.alpha)
        >>> probe = Probe(0.5)
        >>> probe.state_key, probe.state_key is probe.state_key
        ("Probe{'alpha': 0.5}", True)
        >>> probe.alpha = 0.25
        >>> probe.state_key
        "Probe{'alpha': 0.25}"
    """

    def _generate_state_key(self, **kwargs: Any) -> str:
        inputs = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())
        memo = self.__dict__.get("_state_key_memo")
        if memo is not None and memo[0] == inputs:
            return memo[1]  # type: ignore[no-any-return]
        key = super()._generate_state_key(**kwargs)  # type: ignore[misc]
        self.__dict__["_state_key_memo"] = (inputs, key)
        return key  # type: ignore[no-any-return]


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


def log_to_loggers(trainer: Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at ``step`` (default ``global_step``), rank zero only."""
    if not metrics or not trainer.is_global_zero:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
