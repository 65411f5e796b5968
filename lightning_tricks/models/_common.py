from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from lightning_tricks.checks import check_bool, check_choice
from lightning_tricks.init import INITS
from lightning_tricks.nn import DropConnectLinear, PatchWhitening
from lightning_tricks.nn.norm import NORMS, check_norm

__all__ = ["NORMS", "HEADS", "check_common", "check_head", "check_init", "classifier", "numel", "whitening_layer"]

HEADS = ("linear", "dropconnect")


def check_common(
    input_shape: Sequence[int], num_classes: int, norm: str, dropout: float
) -> tuple[tuple[int, ...], str]:
    """The checked input shape and the canonical norm name (``"classic"`` -> ``"batch"``)."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, got {tuple(input_shape)!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    norm = check_norm(norm)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return shape, norm


def check_head(head: str, dropconnect_p: float) -> str:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if isinstance(dropconnect_p, bool) or not isinstance(dropconnect_p, (int, float)) or not 0 <= dropconnect_p < 1:
        raise ValueError(f"dropconnect_p must be in [0, 1), got {dropconnect_p!r}")
    return head


def check_init(init: str, zero_init_residual: bool, whiten: bool = False) -> None:
    """The ``init`` scheme (:data:`lightning_tricks.init.INITS`) and the boolean switches, checked."""
    check_choice("init", init, INITS)
    check_bool("zero_init_residual", zero_init_residual)
    check_bool("whiten", whiten)


def whitening_layer(
    shape: tuple[int, ...], whiten: bool, kernel: int, eps: float, model: str
) -> tuple[PatchWhitening | None, tuple[int, ...]]:
    """``model.whiten``: the (unfitted) :class:`PatchWhitening` first layer, or ``None``, and the shape
    ``(C, H, W)`` of what the next layer sees (``2 C k^2`` channels, ``H - k + 1`` by ``W - k + 1``)."""
    if not whiten:
        return None, shape
    layer = PatchWhitening(shape[0], kernel, eps)
    k = layer.kernel_size
    if min(shape[1:]) < k:
        raise ValueError(f"{model}: whiten_kernel={k} is larger than the input {shape[1]}x{shape[2]}")
    return layer, (layer.out_channels, shape[1] - k + 1, shape[2] - k + 1)


def classifier(in_features: int, num_classes: int, head: str, dropconnect_p: float) -> nn.Linear:
    """The last layer: ``nn.Linear`` or, for ``head="dropconnect"``, a :class:`DropConnectLinear`
    (each weight dropped with probability ``dropconnect_p`` in training, one mask per forward; Wan et al. 2013)."""
    if check_head(head, dropconnect_p) == "dropconnect":
        return DropConnectLinear(in_features, num_classes, p=float(dropconnect_p))
    return nn.Linear(in_features, num_classes)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
