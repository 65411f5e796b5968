"""The Lightning namespace a user-path test is written against, imported as a user would import it.

``LT_LIGHTNING_NAMESPACE=lightning`` (or ``lightning.pytorch``): ``lightning.pytorch``, the name Lightning's
docs use; unset or ``pytorch_lightning``: ``pytorch_lightning``. A user-path test imports its Lightning names
from here instead of from Lightning (``from lightning_namespace import LightningModule, Trainer, ...``), so
``.ci/run`` runs the same tests under both namespaces. ``NAME`` is the namespace's import name.
"""

from __future__ import annotations

import importlib
import os

_CHOICES = {"lightning": "lightning.pytorch", "lightning.pytorch": "lightning.pytorch"}
_CHOICES["pytorch_lightning"] = "pytorch_lightning"

_asked = os.environ.get("LT_LIGHTNING_NAMESPACE", "") or "pytorch_lightning"
if _asked not in _CHOICES:
    raise ValueError(f"LT_LIGHTNING_NAMESPACE must be one of {sorted(_CHOICES)}, got {_asked!r}")

NAME: str = _CHOICES[_asked]
pl = importlib.import_module(NAME)
Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
seed_everything = pl.seed_everything
ModelCheckpoint = pl.callbacks.ModelCheckpoint
EarlyStopping = pl.callbacks.EarlyStopping

__all__ = [
    "NAME",
    "pl",
    "Callback",
    "LightningModule",
    "LightningDataModule",
    "Trainer",
    "seed_everything",
    "ModelCheckpoint",
    "EarlyStopping",
]
