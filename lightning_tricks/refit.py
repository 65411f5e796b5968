"""Refit on training + validation data after early stopping (Goodfellow, Bengio & Courville, *Deep Learning*,
2016, §7.8, Algorithms 7.2 and 7.3).

A first fit early-stops (or picks its best epoch) on the validation split; the validation examples then
go unused for learning. The refit trains the final model on the merged data:

- ``epochs`` (Algorithm 7.2): re-initialize with the same seed and train on training + validation data for
  as many passes as the best run had (its best epoch + 1). Counted in passes, not steps: the merged data are
  larger, so equal steps would give each example fewer visits than the first fit gave it, and the first
  fit's best length was found as a number of passes over its data.
- ``loss`` (Algorithm 7.3): keep the stopped weights and continue on the merged data until the loss on the
  validation split falls below the training loss at the stopping point, with a cap on the passes.

The functions here are the rules, with no Lightning: the Trainer side is in :mod:`lightning_tricks.train`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["REFIT_MODES", "refit_epochs", "mean_loss", "reached_target", "merge_splits"]

REFIT_MODES = ("none", "epochs", "loss")


def refit_epochs(best_epoch: int) -> int:
    """Algorithm 7.2's length: the passes the first fit had made when it reached its best (epoch index + 1).

    Example:
        >>> refit_epochs(7)
        8
    """
    if isinstance(best_epoch, bool) or not isinstance(best_epoch, int) or best_epoch < 0:
        raise ValueError(f"best_epoch must be an int >= 0, got {best_epoch!r}")
    return best_epoch + 1


def reached_target(validation_loss: float, target: float) -> bool:
    """Algorithm 7.3's stop: the validation split's loss is below the training loss at the stopping point.

    Example:
        >>> reached_target(0.20, 0.25), reached_target(0.30, 0.25), reached_target(float("nan"), 0.25)
        (True, False, False)
    """
    return math.isfinite(validation_loss) and validation_loss < target


def mean_loss(model: torch.nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """The mean cross-entropy of ``model`` (in eval mode, no gradients) over ``batches`` of (x, class index),
    weighted by batch size: the objective J the two algorithms compare."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for x, y in batches:
                logits = model(x)
                total += float(torch.nn.functional.cross_entropy(logits, y.to(logits.device), reduction="sum"))
                count += len(y)
    finally:
        model.train(was_training)
    return total / count if count else math.nan


def merge_splits(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The training split followed by the validation split.

    Example:
        >>> x, y = merge_splits((torch.zeros(3, 2), torch.tensor([0, 1, 0])), (torch.ones(1, 2), torch.tensor([1])))
        >>> x.shape, y.tolist()
        (torch.Size([4, 2]), [0, 1, 0, 1])
    """
    return torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])
