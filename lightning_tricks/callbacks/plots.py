"""CurvePlot: record loss/accuracy per epoch and the LR per optimizer step, write a PNG at the end."""

from __future__ import annotations

import os
from typing import Any

from lightning_tricks._lightning import Callback, LightningModule, Trainer, rank_zero_info
from lightning_tricks.plots import plot_curves, record_epoch_metrics


class CurvePlot(Callback):
    """Keep the curves of a run and save them as ``curves.png`` when fit ends.

    Epoch-level ``train/`` and ``val/`` metrics once per epoch, each group's LR at every optimizer step;
    the history is in checkpoints, so a resumed run plots the whole curve.

    Args:
        dirpath: folder of the PNG; defaults to the Trainer's ``log_dir`` (or ``default_root_dir``).
        filename: name of the PNG.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "curves.png") -> None:
        if not filename.endswith(".png"):
            raise ValueError(f"filename must end with .png, got {filename!r}")
        self.dirpath = dirpath
        self.filename = filename
        self.epoch_metrics: dict[str, list[tuple[float, float]]] = {}
        self.lr: dict[str, list[tuple[float, float]]] = {}
        self.path: str | None = None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # the LR this step uses, whatever the callback order (the LR owner, LRSchedule, has set it already)
        step = trainer.global_step
        optimizers = trainer.optimizers
        i = next((k for k, o in enumerate(optimizers) if o is optimizer), 0)
        for j, group in enumerate(optimizer.param_groups):
            name = group.get("name", f"group{j}")
            key = name if len(optimizers) == 1 else f"opt{i}/{name}"
            series = self.lr.setdefault(key, [])
            if not series or series[-1][0] != step:
                series.append((step, float(group["lr"])))

    def _record(self, trainer: Trainer, keys: tuple[str, ...]) -> None:
        if not trainer.sanity_checking:
            metrics = {n: float(v) for n, v in trainer.callback_metrics.items() if any(k in n for k in keys)}
            record_epoch_metrics(self.epoch_metrics, metrics, keys, trainer.current_epoch + 1)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, ("val/",))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, ("train/",))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on every rank: Trainer.log_dir broadcasts rank zero's value, so asked on rank zero alone it would hang
        directory = self.dirpath or trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        net = type(getattr(pl_module, "net", pl_module)).__name__
        self.path = plot_curves(
            self.epoch_metrics,
            self.lr,
            os.path.join(directory, self.filename),
            title=f"{type(pl_module).__name__}({net}), {trainer.current_epoch} epochs, {trainer.global_step} steps",
        )
        rank_zero_info(f"CurvePlot: wrote {self.path}")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_metrics": self.epoch_metrics, "lr": self.lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_metrics = {k: [tuple(p) for p in v] for k, v in state_dict.get("epoch_metrics", {}).items()}
        self.lr = {k: [tuple(p) for p in v] for k, v in state_dict.get("lr", {}).items()}
