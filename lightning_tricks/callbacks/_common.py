"""Plumbing callbacks share: "did an optimizer step happen?", the AMP scale gradients still carry,
and the argument checks of :mod:`lightning_tricks.checks` (re-exported).
"""

from __future__ import annotations

from typing import Any

from lightning_tricks._lightning import Trainer, pending_grad_scale
from lightning_tricks.checks import check_bool, check_choice, check_float, check_int

__all__ = ["check_int", "check_float", "check_choice", "check_bool"]
__all__ += ["StepWatch", "MemoStateKey", "pending_grad_scale", "log_to_loggers"]


class MemoStateKey:
    """A mixin (before Lightning's ``Callback`` in the bases) that memoizes ``_generate_state_key``.

    Lightning reads ``state_key`` at every hook call; the key is rebuilt only when the arguments
    change. Worth it only where ``benchmarks/overhead.py`` shows the formatting in the step time.

    Example:
        >>> from lightning_tricks.callbacks import Mixup
        >>> cb = Mixup(alpha=0.5)
        >>> cb.state_key is cb.state_key, cb.state_key
        (True, "Mixup{'alpha': 0.5, 'p': 1.0}")
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

    With gradient accumulation (or a skipped step) a batch end may come without an optimizer step;
    :attr:`last` goes into the callback's checkpoint so a resumed run continues the count.

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
