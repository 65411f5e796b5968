"""EpochLines: one line per epoch, for output that is not a terminal (SLURM, CI, ``nohup``)."""

from __future__ import annotations

import math
import time

from lightning_tricks._lightning import Callback, LightningModule, Trainer, rank_zero_info

__all__ = ["EpochLines"]


class EpochLines(Callback):
    """Print one line per training epoch on rank zero and nothing per step.

    ``epoch 3/30  step 60  train/loss 0.1234  val/loss 0.0567  val/acc 0.9812  lr 0.0491  0.4 s``: the
    epoch-level metrics whose names hold ``loss`` or ``acc`` (from ``trainer.callback_metrics``, already
    on the host at epoch end), the LR of the first parameter group and the epoch's wall time.
    ``python -m lightning_tricks.train`` uses it instead of the progress bar when stdout is not a terminal,
    so a 100-epoch job leaves 100 short lines in its log rather than progress-bar frames.
    """

    def __init__(self) -> None:
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(self.line(trainer, time.perf_counter() - self._t0))

    @staticmethod
    def line(trainer: Trainer, seconds: float) -> str:
        """The line for the epoch that just ended."""
        total = "?" if trainer.max_epochs in (None, -1) else str(trainer.max_epochs)
        parts = [f"epoch {trainer.current_epoch + 1}/{total}", f"step {trainer.global_step}"]
        seen: set[str] = set()
        for name in sorted(trainer.callback_metrics):
            if name.endswith("_step") or not ("loss" in name or "acc" in name):
                continue
            value = trainer.callback_metrics[name]
            if getattr(value, "numel", lambda: 1)() != 1:
                continue
            v = float(value)
            label = name[: -len("_epoch")] if name.endswith("_epoch") else name
            if label in seen:
                continue
            seen.add(label)
            parts.append(f"{label} {v:.4f}" if math.isfinite(v) else f"{label} {v}")
        if trainer.optimizers and trainer.optimizers[0].param_groups:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.4g}")
        parts.append(f"{seconds:.1f} s")
        return "  ".join(parts)
