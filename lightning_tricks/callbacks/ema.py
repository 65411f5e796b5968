"""EMA: an exponential moving average of the weights, over :func:`lightning_tricks.averaging.ema_decay`."""

from __future__ import annotations

import math
from typing import Any

from lightning_tricks._lightning import LightningModule, Trainer
from lightning_tricks.averaging import ema_decay
from lightning_tricks.callbacks._averaging import _Averaging
from lightning_tricks.callbacks._common import StepWatch
from lightning_tricks.checks import check_choice, check_float, check_int

__all__ = ["EMA"]


class EMA(_Averaging):
    r"""Exponential moving average of the weights (Polyak averaging), evaluated in place of them.

    After each optimizer step, ``avg <- d_k * avg + (1 - d_k) * w`` with ``d_k = min(d, (1 + k) / (10 + k))``
    (warmup) or ``d``, ``k`` counting updates; the average is float32, updated with one
    ``torch._foreach_lerp_`` per (device, dtype) list. Why, cost and citations: ``docs/method_cards.md`` (EMA).

    Args:
        decay: the decay ``d`` in (0, 1); 0.999 averages over about the last 1000 updates.
        warmup: use ``min(decay, (1 + k) / (10 + k))`` so early updates follow the weights faster.
        every_n_steps: update every n optimizer steps, with the decay ``decay ** n`` per update (the
            horizon in steps of an every-step EMA).
        start_step: optimizer step at which the average starts as a copy of the weights; before it,
            evaluation uses the raw weights.
        evaluate: ``"ema"`` (validation/test/predict on the average), ``"raw"``, or ``"both"``: the
            average under the module's metric names and the raw weights as ``name + raw_suffix``
            (a second evaluation pass through the module's ``evaluation_outputs`` hook).
            After fit, weights handed over by restore-best are evaluated as they are.
        on_cpu: keep the average in host memory (saves accelerator memory; each update then copies
            the weights to the host and waits for the copy: use ``every_n_steps`` to amortize it).
        buffers: ``"copy"``: evaluation uses the module's own buffers (BatchNorm statistics of the
            raw weights); ``"average"``: floating-point buffers are averaged like the parameters.
        average_at_end: at the end of fit, leave the averaged weights in the module (the raw ones are
            kept by the weights service, and by checkpoints for resume), unless
            ``EarlyStopping(restore_best=True)`` hands over the best measured weights (it wins).
        raw_suffix: suffix of the raw weights' metric names with ``evaluate="both"``.

    Example:
        >>> ema = EMA(decay=0.99, evaluate="both")
        >>> ema.state_key
        "EMA{'decay': 0.99, 'every_n_steps': 1, 'start_step': 0}"
    """

    _AVERAGE = "ema"

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        every_n_steps: int = 1,
        start_step: int = 0,
        evaluate: str = "ema",
        on_cpu: bool = False,
        buffers: str = "copy",
        average_at_end: bool = True,
        raw_suffix: str = "_raw",
    ) -> None:
        super().__init__(evaluate, average_at_end, on_cpu, raw_suffix)
        check_float("decay", decay, 0, 1, low_open=True, high_open=True)
        check_int("every_n_steps", every_n_steps, 1)
        check_int("start_step", start_step, 0)
        check_choice("buffers", buffers, ("copy", "average"))
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every_n_steps = every_n_steps
        self.start_step = start_step
        self.buffers = buffers
        self.num_updates = 0  # EMA updates so far (the warmup counter k)
        self._steps = StepWatch()  # did an optimizer step happen in this batch?
        self._last_update_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, every_n_steps=self.every_n_steps, start_step=self.start_step)

    def _include_buffers(self) -> bool:
        return self.buffers == "average"

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return ema_decay(self.num_updates, self.decay, self.warmup, self.every_n_steps)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.max_steps is not None and 0 <= trainer.max_steps <= self.start_step:
            raise ValueError(
                f"EMA start_step={self.start_step} is not before the end of the run (max_steps={trainer.max_steps})"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        step = trainer.global_step
        self._steps.start(step)
        if not self._started and step >= self.start_step:
            self._start(step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not at fit start: reading the run length sets up the train loader, which before the
        # checkpoint's RNG states are restored would make a resumed run draw other batches.
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and self.start_step >= total:
            raise ValueError(
                f"EMA start_step={self.start_step} is beyond the run ({int(total)} optimizer steps in total)"
            )

    def _start(self, step: int) -> None:
        assert self._average is not None
        self._average.reset_()
        self._started = True
        self.num_updates = 0
        self._last_update_step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._steps.stepped(step):
            return  # no optimizer step in this batch (gradient accumulation)
        if not self._started:
            if step >= self.start_step:
                self._start(step)
            return
        if step - self._last_update_step >= self.every_n_steps:
            decay = ema_decay(self.num_updates, self.decay, self.warmup, self.every_n_steps)  # host arithmetic
            self._average.update_(1.0 - decay)  # type: ignore[union-attr]
            self.num_updates += 1
            self._last_update_step = step

    def _extra_state(self) -> dict[str, Any]:
        return {
            "num_updates": self.num_updates,
            "last_step": self._steps.last,
            "last_update_step": self._last_update_step,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state.get("num_updates", 0))
        self._steps.last = int(state.get("last_step", -1))
        self._last_update_step = int(state.get("last_update_step", -1))
