"""Classification losses (no Lightning): cross-entropy for hard labels or soft targets, label smoothing.

:func:`classification_loss` takes logits; :func:`probability_nll` takes class probabilities (an
ensemble's or test-time augmentation's mean of softmax) and is the same cross-entropy on them.

Example:
    >>> import torch
    >>> logits = torch.zeros(2, 4)
    >>> round(float(classification_loss(logits, torch.tensor([0, 3]))), 4)   # log(4)
    1.3863
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tricks.augment import MixedTargets

__all__ = ["classification_loss", "probability_nll", "PROB_FLOOR"]

#: probabilities are clamped to at least this before the log (a float32 softmax can underflow to 0)
PROB_FLOOR = 1e-12


def classification_loss(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy for hard labels ``(N,)`` or soft targets ``(N, C)`` (rows summing to 1).

    Label smoothing ``eps`` replaces the target distribution ``q`` by ``(1 - eps) q + eps / C``
    (Szegedy et al. 2016, arXiv:1512.00567), for hard and soft targets alike. ``reduction`` is
    ``torch.nn.functional.cross_entropy``'s (``"none"`` gives the per-sample losses).
    """
    if isinstance(target, MixedTargets):  # a loss reads them as probabilities: the label guard's dispatch is not needed
        target = target.as_subclass(Tensor)
    dtype = target.dtype
    if dtype.is_floating_point and dtype != logits.dtype:
        target = target.to(logits.dtype)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)


def probability_nll(probs: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of class probabilities ``(N, C)``: ``-log p[y]``, or ``-sum_c q_c log p_c`` for soft ``q``.

    ``p`` is clamped to :data:`PROB_FLOOR` first, computed in float32. For ``probs = softmax(logits)``
    this equals :func:`classification_loss` without smoothing (up to rounding and the floor).

    Example:
        >>> import torch
        >>> round(float(probability_nll(torch.tensor([[0.25, 0.75]]), torch.tensor([1]))), 4)   # -log 0.75
        0.2877
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    log_p = probs.float().clamp_min(PROB_FLOOR).log()
    if not target.dtype.is_floating_point:
        return F.nll_loss(log_p, target, reduction=reduction)
    losses = -(target.float() * log_p).sum(dim=-1)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else torch.mean(losses)
