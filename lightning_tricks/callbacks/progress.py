"""EpochLines: one line per epoch, for output that is not a terminal (SLURM, CI, ``nohup``)."""

from __future__ import annotations

import time

from lightning_tricks._lightning import Callback, LightningModule, Trainer, rank_zero_info
from lightning_tricks.plots import epoch_line

__all__ = ["EpochLines"]


class EpochLines(Callback):
    """Print one line per training epoch on rank zero and nothing per step.

    ``epoch 3/30  step 60  train/loss 0.1234  val/loss 0.0567  val/acc 0.9812  lr 0.0491  0.4 s``: the
    epoch-level metrics whose names hold ``loss`` or ``acc`` (from ``trainer.callback_metrics``, already
    on the host at epoch end), the LR of the first parameter group and the epoch's wall time.
    ``python -m lightning_tricks.train`` uses it when stdout is not a terminal.
    """

    def __init__(self) -> None:
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(self.line(trainer, time.perf_counter() - self._t0))

    @staticmethod
    def line(trainer: Trainer, seconds: float) -> str:
        """The line for the epoch that just ended: :func:`lightning_tricks.plots.epoch_line`."""
        metrics = trainer.callback_metrics
        scalars = {n: float(v) for n, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        lr = float(groups[0]["lr"]) if groups else None
        return epoch_line(trainer.current_epoch + 1, trainer.max_epochs, trainer.global_step, scalars, lr, seconds)
