"""The one place that imports Lightning.

Everything in ``lightning_tricks`` imports Lightning names from here, so supporting the unified
``lightning`` package (``lightning.pytorch``) as well is a change to this file only.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning import (
    Callback,
    LightningDataModule,
    LightningModule,
    Trainer,
    seed_everything,
)
from pytorch_lightning.callbacks import (
    EarlyStopping as PLEarlyStopping,
)
from pytorch_lightning.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,  # benchmarks compare with Lightning's SWA
)
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.loggers.logger import (
    DummyLogger,  # LRRangeTest mutes loggers during its sweep
)
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.seed import isolate_rng

try:  # Lightning >= 2.5; benchmarks compare our EMA with it
    from pytorch_lightning.callbacks import EMAWeightAveraging
except ImportError:  # pragma: no cover - older Lightning
    EMAWeightAveraging = None  # type: ignore[assignment,misc]


def trainer_callbacks(trainer: Trainer) -> list[Callback]:
    """``trainer.callbacks``: set by Lightning's callback connector at ``Trainer.__init__``, so a type
    checker does not see it on the class; read here, typed, in one place."""
    return trainer.callbacks  # type: ignore[attr-defined,no-any-return]


def trainer_datamodule(trainer: Trainer) -> LightningDataModule | None:
    """``trainer.datamodule`` (the fit's DataModule, or ``None``), typed for the same reason."""
    return getattr(trainer, "datamodule", None)


def should_log_step(trainer: Trainer) -> bool:
    """Whether the loggers write step metrics at this training step (``trainer.log_every_n_steps``).

    The same test Lightning's ``LearningRateMonitor`` uses (its logger connector's ``should_update_logs``);
    a step-level ``self.log`` on other steps costs host time and is never written. Lightning keeps it
    private, so it is read here, in one place. In training the test is made here, on the same counter
    (``fit_loop.epoch_loop._batches_that_stepped``), at a fraction of the host time of the property chain
    behind ``should_update_logs`` (~20 µs right after a training step on a CPU). Not ``global_step``: the
    counter Lightning logs by is the batches that stepped, which differs from the optimizer steps under
    manual optimization with several optimizers.
    """
    every = getattr(trainer, "log_every_n_steps", 0)
    if not every:
        return False
    if trainer.state.stage == "train":
        return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0 or trainer.should_stop
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


class FitClock:
    """``trainer.global_step`` and :func:`should_log_step` in the training loop of one fit, cheaply.

    Made at ``on_train_start`` (after a checkpoint's loop state is restored), it looks up once the progress
    counter behind ``global_step`` (automatic or manual optimization, as Lightning's property chooses) and
    the batches-that-stepped counter the loggers go by, so each read is an attribute read or two instead
    of a chain of Lightning properties (~5 µs for ``global_step`` and ~20 µs for ``should_update_logs`` of
    host time right after a training step on a CPU). Where Lightning's loop layout is not the one this was
    written for, it falls back to the public properties.

    Example:
        >>> clock = FitClock(None)   # no trainer: the fallback, which reads trainer.global_step
        >>> clock.fast
        False
    """

    def __init__(self, trainer: Trainer | None) -> None:
        self.trainer = trainer
        #: the progress counter behind ``global_step`` (its ``completed``) and the epoch loop, or None (fallback)
        self.steps: Any = None
        self.loop: Any = None
        self.every = getattr(trainer, "log_every_n_steps", 0)
        try:
            loop = trainer.fit_loop.epoch_loop  # type: ignore[union-attr]
            module = trainer.lightning_module  # type: ignore[union-attr]
            if module is None or module.automatic_optimization:
                steps = loop.automatic_optimization.optim_progress.optimizer.step.total
            else:
                steps = loop.manual_optimization.optim_step_progress.total
            if steps.completed != trainer.global_step or not isinstance(loop._batches_that_stepped, int):  # type: ignore[union-attr]
                return
            self.steps, self.loop = steps, loop
        except AttributeError:
            return

    def __reduce__(self) -> tuple[type, tuple[None]]:
        return (FitClock, (None,))  # pickled or copied: the fallback, without the trainer

    @property
    def fast(self) -> bool:
        """Whether the counters were found (else every read goes through the trainer's properties)."""
        return self.steps is not None

    @property
    def global_step(self) -> int:
        """``trainer.global_step``."""
        if self.steps is None:
            return int(self.trainer.global_step)  # type: ignore[union-attr]
        return int(self.steps.completed)

    def should_log(self) -> bool:
        """:func:`should_log_step` in the training loop."""
        if self.loop is None:
            return should_log_step(self.trainer)  # type: ignore[arg-type]
        every = self.every
        return bool(every) and (
            (self.loop._batches_that_stepped + 1) % every == 0 or bool(self.trainer.should_stop)  # type: ignore[union-attr]
        )


def global_step_of(trainer: Trainer, clock: FitClock | None) -> int:
    """``trainer.global_step``, through ``clock`` when it was made for this trainer (see :class:`FitClock`)."""
    if clock is not None and clock.trainer is trainer:
        return clock.global_step
    return int(trainer.global_step)


def publish_step_metrics(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Write step ``metrics`` to every logger (rank zero) at the step Lightning logs this batch under, and put
    them in ``trainer.callback_metrics`` (as float64 CPU tensors, as ``LightningModule.log`` would) for other
    callbacks and the run's final metrics.

    What ``LightningModule.log(..., on_step=True, on_epoch=False)`` does for a value that is already a
    number, at a fraction of its host time: ``log`` walks the whole result collection and costs about
    1 ms per call on a CPU right after a training step; this is a dict update and the loggers' own
    ``log_metrics`` (what Lightning's ``LearningRateMonitor`` calls).
    """
    if not metrics:
        return
    if trainer.is_global_zero:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})


__all__ = [
    "FitClock",
    "global_step_of",
    "publish_step_metrics",
    "trainer_callbacks",
    "trainer_datamodule",
    "should_log_step",
    "pl",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Trainer",
    "seed_everything",
    "PLEarlyStopping",
    "EarlyStoppingReason",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "StochasticWeightAveraging",
    "EMAWeightAveraging",
    "CSVLogger",
    "Logger",
    "TensorBoardLogger",
    "DummyLogger",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
    "MisconfigurationException",
    "isolate_rng",
]
