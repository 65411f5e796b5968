"""The one place that imports Lightning.

Everything in ``lightning_tricks`` imports Lightning names from here, so supporting the unified
``lightning`` package (``lightning.pytorch``) as well is a change to this file only.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from pytorch_lightning.callbacks import (
    EarlyStopping as PLEarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

__all__ = [
    "pl",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Trainer",
    "seed_everything",
    "PLEarlyStopping",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "CSVLogger",
    "Logger",
    "TensorBoardLogger",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
    "MisconfigurationException",
]
from pytorch_lightning.loggers.logger import DummyLogger  # noqa: E402  (LRRangeTest: mute loggers during the sweep)
from pytorch_lightning.utilities.seed import isolate_rng  # noqa: E402  (LRRangeTest: leave the RNG as it was)

__all__ += ["DummyLogger", "isolate_rng"]
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason  # noqa: E402  (EarlyStopping: stop kinds)

__all__ += ["EarlyStoppingReason"]
from pytorch_lightning.callbacks import StochasticWeightAveraging  # noqa: E402  (benchmarks/overhead.py: Lightning's SWA, for comparison)

try:  # noqa: SIM105 - EMAWeightAveraging is in pytorch-lightning >= 2.5 only (benchmarks/overhead.py compares with it)
    from pytorch_lightning.callbacks import EMAWeightAveraging  # noqa: E402
except ImportError:  # pragma: no cover - older Lightning
    EMAWeightAveraging = None  # type: ignore[assignment,misc]

__all__ += ["StochasticWeightAveraging", "EMAWeightAveraging"]
