"""Lightning's loggers, re-exported so configs name ``lightning_tricks.loggers.<Name>`` only."""

from lightning_tricks._lightning import CSVLogger, TensorBoardLogger

__all__ = ["CSVLogger", "TensorBoardLogger"]
