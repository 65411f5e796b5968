"""The normalization switch shared by the block builders and the reference models.

``norm`` picks what normalizes the output of each weight layer (or, for ``"ic"``, its input):

- ``"batch"`` (alias ``"classic"``): BatchNorm after the weight layer (Ioffe and Szegedy 2015,
  arXiv:1502.03167): ``Linear/Conv -> BatchNorm -> activation``.
- ``"layer"``: LayerNorm after the weight layer (Ba, Kiros, Hinton 2016, arXiv:1607.06450). For
  features ``(N, C)`` it is ``nn.LayerNorm(C)``; for images ``(N, C, H, W)`` it is
  ``nn.GroupNorm(1, C)``, which normalizes each sample over the whole feature map ``(C, H, W)`` (LayerNorm's
  statistics) with a per-channel scale and shift, so it works at any spatial size. (ConvNeXt's
  "channels" LayerNorm normalizes each pixel over ``C`` only; it is not what ``"layer"`` means here.)
  Batch statistics play no part: the same in training and eval, and independent of the batch size.
- ``"weight"``: weight normalization of the weight layer, ``w = g * v / ||v||`` per output unit
  (Salimans and Kingma 2016, arXiv:1602.07868), through ``torch.nn.utils.parametrizations.weight_norm``;
  no normalization layer, and the weight layer keeps its bias. At construction ``g = ||v||``, so the
  initial function is the plain layer's (the paper's data-dependent initialization is not done).
- ``"ic"``: the IC layer (BatchNorm -> Dropout) *before* the weight layer (Chen et al. 2019,
  arXiv:1905.05928), see :class:`~lightning_tricks.nn.ICBlock`.
- ``"none"``: nothing.

A weight layer followed by a normalization with a shift (``"batch"``, ``"layer"``) has no bias: the
norm's shift replaces it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["NORMS", "NORM_ALIASES", "check_norm", "norm_layer", "norm_has_shift"]

NORMS = ("batch", "layer", "weight", "ic", "none")
NORM_ALIASES = {"classic": "batch"}


def check_norm(norm: Any) -> str:
    """The canonical name of ``norm`` (``"classic"`` -> ``"batch"``); anything else raises one line.

    Example:
        >>> check_norm("classic")
        'batch'
        >>> check_norm("group")
        Traceback (most recent call last):
        ...
        ValueError: norm must be one of ('batch', 'layer', 'weight', 'ic', 'none') ('classic' = 'batch'), got 'group'
    """
    if isinstance(norm, str) and norm in NORM_ALIASES:
        return NORM_ALIASES[norm]
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} ('classic' = 'batch'), got {norm!r}")
    return str(norm)


def norm_has_shift(norm: str) -> bool:
    """Whether a normalization layer with a learned shift follows the weight layer (so it needs no bias)."""
    return check_norm(norm) in ("batch", "layer")


def norm_layer(norm: str, num_features: int, dims: int) -> list[nn.Module]:
    """The layer that follows a weight layer for ``norm``: ``[]`` for ``"weight"``, ``"ic"`` and ``"none"``.

    ``dims`` is 1 for ``(N, C)`` features and 2 for ``(N, C, H, W)`` images.

    Example:
        >>> [type(m).__name__ for m in norm_layer("layer", 8, dims=2) + norm_layer("layer", 8, dims=1)]
        ['GroupNorm', 'LayerNorm']
        >>> norm_layer("layer", 8, dims=2)[0].num_groups, norm_layer("weight", 8, dims=2)
        (1, [])
    """
    norm = check_norm(norm)
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    if norm == "batch":
        return [nn.BatchNorm1d(num_features) if dims == 1 else nn.BatchNorm2d(num_features)]
    if norm == "layer":
        return [nn.LayerNorm(num_features) if dims == 1 else nn.GroupNorm(1, num_features)]
    return []
