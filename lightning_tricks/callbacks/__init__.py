"""Lightning callbacks, one module per trick family.

Names are resolved lazily (PEP 562) so ``import lightning_tricks.callbacks`` stays cheap and a
trick's module is only imported when it is used. Add a trick by adding one line to ``_WHERE``.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of lightning_tricks.callbacks that defines it
_WHERE: dict[str, str] = {
    # learning rate
    "LRSchedule": "lr_schedule",
    "LinearScaling": "lr_scaling",
    "LRRangeTest": "lr_range_test",
    "BatchSizeFinder": "batch_size",
    # early stopping
    "EarlyStopping": "early_stopping",
    "RestoreBest": "restore_best",
    # weight averaging and ensembles
    "EMA": "ema",
    "SWA": "swa",
    "SnapshotEnsemble": "snapshot_ensemble",
    # batch augmentation and regularization
    "Mixup": "augment",
    "CutMix": "augment",
    "MixupCutmix": "augment",
    "Cutout": "augment",
    "L1Regularization": "regularize",
    # the training recipe
    "InitialLossCheck": "sanity",
    "OverfitCheck": "sanity",
    "UpdateRatioMonitor": "sanity",
    "GradNormMonitor": "sanity",
    "DeadUnitMonitor": "sanity",
    "LayerStats": "layer_stats",
    "AGC": "clipping",
    "FreezeUnfreeze": "finetune",
    # run output
    "DivergenceGuard": "divergence_guard",
    "CurvePlot": "plots",
    "EpochLines": "progress",
    "RandomState": "random_state",
    "ModelCheckpoint": "checkpoint",
    # Lightning's own, re-exported for configs
    "LearningRateMonitor": "lightning",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
