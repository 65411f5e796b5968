"""DataModules: embedded digits (default), Fashion-MNIST/MNIST (idx files), CIFAR-10 (python batches)."""

from lightning_tricks.data.base import TensorDataModule
from lightning_tricks.data.digits import DigitsDataModule
from lightning_tricks.data.loader import TensorBatchLoader

__all__ = ["TensorDataModule", "DigitsDataModule", "TensorBatchLoader"]
