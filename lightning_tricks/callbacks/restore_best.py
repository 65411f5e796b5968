"""Put the weights of the best validation back into the module at the end of fit.

Works beside any early stopping or none; restores the weights the best value was measured on (an
``EMA``/``SWA`` average when one was evaluated, else the raw weights).

Example:
    >>> from lightning_tricks.callbacks import RestoreBest
    >>> RestoreBest(monitor="val/acc", mode="max").state_key
    "RestoreBest{'monitor': 'val/acc', 'mode': 'max'}"
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    ModelCheckpoint,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_tricks.averaging import averaged_state_dict, raw_state_dict
from lightning_tricks.callbacks._common import check_bool, check_choice
from lightning_tricks.callbacks._weights import BEST, RAW, copy_into, weights_of
from lightning_tricks.stopping import MODES, to_score

__all__ = ["RestoreBest", "SOURCES"]

SOURCES = ("memory", "checkpoint")


class RestoreBest(Callback):
    """Copies the measured weights at each new best validation value; hands them to the module after fit.

    Args:
        monitor: the validation metric; ``None`` takes the ``monitor`` of the trainer's early stopping
            callback at ``setup``.
        mode: ``"min"`` or ``"max"``; ``None`` takes the early stopping callback's (else ``"min"``).
        source: ``"memory"`` (a copy at each new best) or ``"checkpoint"`` (the best checkpoint of a
            ``ModelCheckpoint`` on the same metric, no copy).
        on_cpu: keep the in-memory copy on the CPU.
        save_weights: keep the in-memory copy in checkpoints (a resumed run can restore an earlier best).

    The best is the first minimum (``mode="max"``: maximum); under DDP, rank zero's value.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: str | None = None,
        source: str = "memory",
        on_cpu: bool = False,
        save_weights: bool = True,
    ) -> None:
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be a non-empty metric name or None, got {monitor!r}")
        if mode is not None:
            check_choice("mode", mode, MODES)
        self.monitor, self.mode = monitor, mode
        self.source = check_choice("source", source, SOURCES)
        self.on_cpu = check_bool("on_cpu", on_cpu)
        self.save_weights = check_bool("save_weights", save_weights)
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.measured_on = RAW  # what the best value was measured on ("raw", "ema", "swa", ...)
        self._weights: dict[str, Tensor] = {}  # state_dict name -> preallocated copy of the best weights
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def best_weights(self) -> dict[str, Tensor] | None:
        """The in-memory copy of the best weights (``state_dict`` names; the buffers, not copies), or ``None``."""
        return dict(self._weights) if self._weights else None

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        stopper = trainer.early_stopping_callback
        if self.monitor is None:
            if stopper is None:
                raise ValueError(
                    "RestoreBest(monitor=None) takes the early stopping callback's monitor; add one or name it"
                )
            self.monitor = stopper.monitor
        if self.mode is None:
            self.mode = stopper.mode if stopper is not None and stopper.monitor == self.monitor else "min"
        if self.source == "memory":
            weights_of(pl_module).track_measured(True)  # the measured average survives its swap back
        elif self._checkpoint_callback(trainer) is None:
            found = [
                (type(cb).__name__, getattr(cb, "monitor", None), getattr(cb, "mode", None))
                for cb in trainer.checkpoint_callbacks
            ]
            raise ValueError(
                f"source='checkpoint' needs a ModelCheckpoint(monitor={self.monitor!r}, mode={self.mode!r}, "
                f"save_top_k != 0) among the trainer's callbacks; found {found or 'none'}. Add one, or use "
                "source='memory'"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).fit_start()  # a second fit trains the raw weights, not the restored best

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).evaluation_start()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights = weights_of(pl_module)
        weights.evaluation_end()  # what this validation ran on, whoever swaps back first
        value = trainer.callback_metrics.get(self.monitor or "")
        if value is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        current = float(torch.as_tensor(value).squeeze())
        if trainer.world_size > 1:  # rank zero's value: every rank keeps the same best
            current = trainer.strategy.broadcast(current, src=0)
        self.record(pl_module, current, trainer.current_epoch)

    def record(self, pl_module: LightningModule, value: float, epoch: int) -> None:
        """Take ``value`` (measured on the weights the last validation ran on) as the best if it is one."""
        mode = self.mode or "min"
        if not math.isfinite(value):
            return
        if self.best_value is not None and not to_score(value, mode) < to_score(self.best_value, mode):
            return
        weights = weights_of(pl_module)
        self.best_value, self.best_epoch, self.measured_on = value, epoch, weights.measured or RAW
        if self.source == "memory":
            live = weights.measured_tensors() if weights.measured is not None else weights.raw_tensors()
            self._weights = copy_into(self._weights, live, torch.device("cpu") if self.on_cpu else None)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module is None:
            return
        if self.best_epoch is None:
            self._warn_once(
                f"RestoreBest: no finite value of {self.monitor!r} was recorded, no best weights to restore"
            )
            return
        if self.source == "checkpoint":
            self._restore_from_checkpoint(trainer, pl_module)
            return
        if not self._weights:
            self._warn_once(
                f"RestoreBest: the weights of the best epoch {self.best_epoch} ({self.monitor}={self.best_value:.4g}) "
                "are not available (the run resumed from a checkpoint saved with save_weights=False); the module "
                "keeps its final weights"
            )
            return
        weights_of(pl_module).hand_over(BEST, "best", self._weights)
        rank_zero_info(
            f"RestoreBest: restored the weights of epoch {self.best_epoch} ({self.monitor}={self.best_value:.4g}, "
            f"measured on {self.measured_on!r})"
        )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.save_weights_into(pl_module, checkpoint, self.state_key)

    def save_weights_into(self, pl_module: LightningModule, checkpoint: dict[str, Any], state_key: str) -> None:
        """After fit the module holds the best weights: the state dict keeps them, ``state_key``'s state the raw."""
        if pl_module is not None:
            weights_of(pl_module).save_into(checkpoint, state_key)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if pl_module is not None:
            weights_of(pl_module).load_raw(checkpoint)  # a resumed fit trains the raw weights

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The best value, its epoch, what it was measured on and (``save_weights``) a copy of the weights."""
        state: dict[str, Any] = {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "measured_on": self.measured_on,
        }
        if self.source == "memory" and self.save_weights and self._weights:
            state["best_weights"] = {n: t.detach().clone() for n, t in self._weights.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_value = state_dict.get("best_value")
        self.best_epoch = state_dict.get("best_epoch")
        self.measured_on = str(state_dict.get("measured_on", RAW))
        weights = state_dict.get("best_weights")
        self._weights = {n: t.detach().clone() for n, t in weights.items()} if weights else {}

    # -- helpers -----------------------------------------------------------------------------------
    def _checkpoint_callback(self, trainer: Trainer) -> ModelCheckpoint | None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and (cb.monitor, cb.mode) == (self.monitor, self.mode) and cb.save_top_k:
                return cb
        return None

    def _restore_from_checkpoint(self, trainer: Trainer, pl_module: LightningModule) -> None:
        cb = self._checkpoint_callback(trainer)
        path = cb.best_model_path if cb is not None else ""
        if not path:
            self._warn_once(
                "RestoreBest(source='checkpoint'): the ModelCheckpoint saved no best checkpoint; "
                "the module keeps its final weights"
            )
            return
        checkpoint = trainer.strategy.load_checkpoint(path)
        state = raw_state_dict(checkpoint)
        if self.measured_on != RAW:  # the best value was measured on an average: the one stored in that checkpoint
            try:
                state = averaged_state_dict(checkpoint, which=self.measured_on.upper())
            except KeyError:
                rank_zero_warn(
                    f"RestoreBest: the best validation measured {self.measured_on!r} weights, but {path} holds no "
                    "such average; restoring its raw weights"
                )
        weights_of(pl_module).hand_over(BEST, "best", state)
        saved = checkpoint.get("epoch")
        if saved is not None and saved != self.best_epoch:
            rank_zero_warn(
                f"RestoreBest: the best checkpoint {path} is from epoch {saved}, the best validation from "
                f"epoch {self.best_epoch} (the ModelCheckpoint saves on another schedule)"
            )
        rank_zero_info(f"RestoreBest: restored the weights of {path}")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message)
