"""Lightning's ``ModelCheckpoint`` with ``last.ckpt`` always the latest state and every write atomic.

Arguments, defaults and checkpoint keys are Lightning's; why each guarantee: ``docs/method_cards.md``.
"""

from __future__ import annotations

import os
from typing import Any

from lightning_tricks._lightning import LightningModule, Trainer
from lightning_tricks._lightning import ModelCheckpoint as _LightningModelCheckpoint
from lightning_tricks.checkpoint_io import atomic_torch_save, remove_partial_files

__all__ = ["AtomicCheckpointIO", "ModelCheckpoint", "use_atomic_checkpoint_io"]


class AtomicCheckpointIO:
    """Lightning's ``TorchCheckpointIO`` (either namespace, wrapped) with saving made atomic."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            self.wrapped.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, os.fspath(path))

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)


def use_atomic_checkpoint_io(trainer: Trainer) -> bool:
    """Make the Trainer's checkpoint writes atomic when it uses Lightning's default local ``TorchCheckpointIO``;
    a user's own checkpoint I/O (async, cloud, sharded strategies) is left as it is. Returns whether it did."""
    strategy = trainer.strategy
    io = strategy.checkpoint_io
    if isinstance(io, AtomicCheckpointIO):
        return True
    if type(io).__name__ != "TorchCheckpointIO":
        return False
    strategy.checkpoint_io = AtomicCheckpointIO(io)  # type: ignore[assignment]  # duck-typed: either namespace
    return True


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; ``last.ckpt`` is always the latest state and every write is atomic.

    Example:
        >>> ModelCheckpoint(monitor="val/acc", mode="max", save_last=True).save_last
        True
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_atomic_checkpoint_io(trainer)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            remove_partial_files(self.dirpath)  # left by a writer that was killed mid-write

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Where Lightning saves at the train epoch end, that save comes after this one: saving here would
        # make it skip its top-k save at this step.
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_latest(trainer)

    def _save_latest(self, trainer: Trainer) -> None:
        # Skipped when anything (top-k or last) was saved at this step already, in sanity checks and
        # outside fitting: Lightning's own rule for when not to save.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
