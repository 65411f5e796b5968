"""Lightning's own callbacks, re-exported so configs name ``lightning_tricks.callbacks.<Name>`` only."""

from lightning_tricks._lightning import LearningRateMonitor, ModelCheckpoint

__all__ = ["LearningRateMonitor", "ModelCheckpoint"]
