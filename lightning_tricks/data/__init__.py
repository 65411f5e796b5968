"""DataModules: embedded digits (default), Fashion-MNIST/MNIST (idx files), CIFAR-10 (python batches)."""

from lightning_tricks.data.base import TensorDataModule
from lightning_tricks.data.digits import DigitsDataModule
from lightning_tricks.data.files import DataFileError, read_cifar_batches, read_idx
from lightning_tricks.data.images import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    IdxImageDataModule,
    MNISTDataModule,
)
from lightning_tricks.data.loader import TensorBatchLoader

__all__ = [
    "TensorDataModule",
    "DigitsDataModule",
    "IdxImageDataModule",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "CIFAR10DataModule",
    "TensorBatchLoader",
    "DataFileError",
    "read_idx",
    "read_cifar_batches",
]
