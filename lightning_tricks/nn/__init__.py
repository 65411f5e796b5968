"""Layers: IC blocks, drop path (stochastic depth) and friends."""

from lightning_tricks.nn.drop import DropPath, drop_path, drop_path_rates
from lightning_tricks.nn.ic import ICBlock

__all__ = ["ICBlock", "DropPath", "drop_path", "drop_path_rates"]
