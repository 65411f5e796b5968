"""PreemptionCheckpoint: a SIGTERM (SLURM pre-emption, time limit) saves the run where it stands.

Lightning only records a SIGTERM and stops after the current batch without saving; this callback saves
right after that batch, so a resume continues with the next batch exactly (``docs/method_cards.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_tricks._lightning import Callback, LightningModule, Trainer, pl, rank_zero_info
from lightning_tricks.callbacks.checkpoint import use_atomic_checkpoint_io

__all__ = ["PreemptionCheckpoint", "is_sigterm_stop"]


class PreemptionCheckpoint(Callback):
    """Save ``dirpath/filename`` when the run receives SIGTERM, then let Lightning stop it.

    Put it after the callbacks whose state changes at a batch's end (averages, schedules), so the
    checkpoint holds the state after the whole batch; ``python -m lightning_tricks.train`` appends it
    last. The file is written with ``trainer.save_checkpoint``, atomically beside its target where the
    Trainer uses Lightning's default checkpoint I/O (made atomic at ``setup``, as our ``ModelCheckpoint`` does).

    Args:
        dirpath: folder of the checkpoint.
        filename: its file name; ``last.ckpt`` by default, so the usual resume command picks it up.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        if not filename or "/" in filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.dirpath = Path(dirpath)
        self.filename = filename
        #: the checkpoint written at the signal (None while none was)
        self.saved_path: Path | None = None
        self._saved_step: int | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        use_atomic_checkpoint_io(trainer)

    def _save(self, trainer: Trainer) -> None:
        if self._saved_step == trainer.global_step and self.saved_path is not None:
            return
        trainer.save_checkpoint(self.path)
        self.saved_path, self._saved_step = self.path, trainer.global_step
        rank_zero_info(f"SIGTERM: checkpoint of step {trainer.global_step} saved to {self.path}")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Under DDP the ranks may see the signal at different batches; Lightning makes them agree (rank 0's
        # flag, broadcast before each batch) and raises on all of them together: they save in on_exception.
        if trainer.received_sigterm and trainer.world_size == 1:
            self._save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if is_sigterm_stop(exception, trainer) and trainer.state.fn == "fit":
            self._save(trainer)


def is_sigterm_stop(exception: BaseException, trainer: Trainer) -> bool:
    """Whether ``exception`` is Lightning stopping the loops after a SIGTERM (on this rank or, broadcast, rank 0)."""
    sigterm = getattr(pl.utilities.exceptions, "SIGTERMException", None)
    return isinstance(exception, SystemExit) and (
        (sigterm is not None and isinstance(exception, sigterm)) or trainer.received_sigterm
    )
