"""A user's own small model for the LightningCLI tests of ``test_namespaces.py``, in either namespace."""

from __future__ import annotations

import functools
import importlib

import torch
from torch import nn


class _DigitsNet:
    """The body of the user's model: a linear classifier of the 8x8 digits."""

    def __init__(self, hidden: int = 16, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@functools.cache
def user_model_class(namespace: str) -> type:
    """The user's model class derived from ``namespace``'s ``LightningModule``."""
    pl = importlib.import_module(namespace)
    return type("DigitsNet", (_DigitsNet, pl.LightningModule), {"__module__": __name__})
