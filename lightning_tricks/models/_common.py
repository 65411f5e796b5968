from __future__ import annotations

import math
from collections.abc import Sequence

NORMS = ("classic", "ic", "none")


def check_common(input_shape: Sequence[int], num_classes: int, norm: str, dropout: float) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be positive sizes, got {tuple(input_shape)!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return shape


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
