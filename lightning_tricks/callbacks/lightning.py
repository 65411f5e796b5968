"""Lightning's own callbacks, re-exported so configs name ``lightning_tricks.callbacks.<Name>`` only.

Each is Lightning's class joined across its two namespaces (:mod:`lightning_tricks._lightning`): a
``pytorch_lightning`` and a ``lightning.pytorch`` callback at once, so either Trainer and either LightningCLI
accept it.
"""

from lightning_tricks._lightning import LearningRateMonitor, ModelCheckpoint

__all__ = ["LearningRateMonitor", "ModelCheckpoint"]
