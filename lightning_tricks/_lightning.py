"""The one place that imports Lightning.

Everything in ``lightning_tricks`` imports Lightning names from here, so supporting the unified
``lightning`` package (``lightning.pytorch``) as well is a change to this file only.
"""

from __future__ import annotations

import pytorch_lightning as pl
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

    The same test Lightning's ``LearningRateMonitor`` uses; a step-level ``self.log`` on other steps costs
    host time and is never written. Lightning keeps it private, so it is read here, in one place.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


__all__ = [
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
