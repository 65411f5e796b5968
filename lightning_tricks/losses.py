"""Classification losses (no Lightning): cross-entropy for hard labels or soft targets, label smoothing.

Example:
    >>> import torch
    >>> logits = torch.zeros(2, 4)
    >>> round(float(classification_loss(logits, torch.tensor([0, 3]))), 4)   # log(4)
    1.3863
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["classification_loss"]


def classification_loss(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy for hard labels ``(N,)`` or soft targets ``(N, C)`` (rows summing to 1).

    Label smoothing ``eps`` replaces the target distribution ``q`` by ``(1 - eps) q + eps / C``
    (Szegedy et al. 2016, arXiv:1512.00567), for hard and soft targets alike. ``reduction`` is
    ``torch.nn.functional.cross_entropy``'s (``"none"`` gives the per-sample losses).
    """
    if target.dtype.is_floating_point:
        target = target.to(logits.dtype)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
