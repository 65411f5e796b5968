"""Algorithm 7.3's stop for the refit on training + validation data (the rules are in
:mod:`lightning_tricks.refit`; :func:`lightning_tricks.train.train` runs the refit)."""

from __future__ import annotations

from typing import Any

from lightning_tricks._lightning import Callback, LightningModule, Trainer, rank_zero_info
from lightning_tricks.refit import mean_loss, reached_target

__all__ = ["StopAtLossTarget"]


class StopAtLossTarget(Callback):
    """Stop at the first training epoch end where the mean loss over ``batches`` (the validation split, now
    also trained on) is below ``target`` (the training loss at the first fit's stopping point)."""

    def __init__(self, target: float, batches: Any) -> None:
        self.target = float(target)
        self.batches = batches
        self.last = float("nan")
        self.reached = False

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.last = mean_loss(pl_module, self.batches)
        self.reached = reached_target(self.last, self.target)
        rank_zero_info(
            f"refit: epoch {trainer.current_epoch + 1}: validation-split loss {self.last:.4f} "
            f"{'<' if self.reached else '>='} target {self.target:.4f}"
        )
        if self.reached:
            trainer.should_stop = True
