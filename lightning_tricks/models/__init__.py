"""Small reference models with switches for normalization placement, dropout and drop path."""

from lightning_tricks.models.cnn import ResNet
from lightning_tricks.models.mlp import MLP

__all__ = ["MLP", "ResNet"]
