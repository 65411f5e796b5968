"""DropConnect: drop weights, not units.

Wan, Zeiler, Zhang, LeCun, Fergus, "Regularization of Neural Networks using DropConnect", ICML 2013.
In training each weight is kept with probability ``1 - p`` and the kept ones are scaled by
``1 / (1 - p)`` (inverted scaling, so eval uses the plain weights):

    y = x @ (W * M / (1 - p)).T + b,    M_ij ~ Bernoulli(1 - p)

One mask per forward pass (shared by the batch), the common simplification used for example by
AWD-LSTM's weight drop; the paper draws a mask per sample and approximates inference with a
Gaussian moment-matching step. Biases are not dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["dropconnect_weight", "DropConnectLinear", "DropConnectConv2d"]


def _check_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")


def dropconnect_weight(
    weight: Tensor,
    p: float,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(W * M / (1 - p), M)`` with ``M ~ Bernoulli(1 - p)`` drawn from ``generator``.

    ``(W, None)`` in eval or at ``p=0``.

    The mask is ``torch.empty_like(W).bernoulli_(1 - p, generator=generator)``, so a generator in the
    same state reproduces it. The generator must live on ``W``'s device.

    Example:
        >>> w = torch.ones(2, 3)
        >>> dropped, mask = dropconnect_weight(w, 0.5, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.equal(dropped, w * mask / 0.5))
        True
    """
    _check_p(p)
    if not training or p == 0.0:
        return weight, None
    keep = 1.0 - p
    mask = torch.empty_like(weight).bernoulli_(keep, generator=generator)
    return weight * mask / keep, mask


class _DropsWeights:
    """What the DropConnect layers share: the weight with a fresh mask in training, and ``p`` in the repr."""

    weight: Tensor
    p: float
    generator: torch.Generator | None
    training: bool

    def dropped_weight(self) -> Tensor:
        return dropconnect_weight(self.weight, self.p, self.training, self.generator)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"  # type: ignore[misc]


class DropConnectLinear(_DropsWeights, nn.Linear):
    """``nn.Linear`` whose weights are dropped with probability ``p`` in training (one mask per call).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        p: drop probability of each weight, in ``[0, 1)``.
        generator: optional ``torch.Generator`` (on the weights' device) for the masks; ``None`` uses
            the global RNG. Settable later as ``layer.generator``.

    Example:
        >>> layer = DropConnectLinear(4, 2, p=0.5).eval()
        >>> x = torch.randn(3, 4)
        >>> bool(torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        p: float = 0.5,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> None:
        _check_p(p)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.p = float(p)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dropped_weight(), self.bias)


class DropConnectConv2d(_DropsWeights, nn.Conv2d):
    """``nn.Conv2d`` whose kernel weights are dropped with probability ``p`` in training (one mask per call).

    Args:
        in_channels, out_channels, kernel_size, **kwargs: as ``nn.Conv2d``.
        p: drop probability of each weight, in ``[0, 1)``.
        generator: optional ``torch.Generator`` for the masks (see :class:`DropConnectLinear`).

    Example:
        >>> conv = DropConnectConv2d(1, 2, 3, padding=1, p=0.3)
        >>> conv(torch.zeros(1, 1, 5, 5)).shape
        torch.Size([1, 2, 5, 5])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        p: float = 0.5,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> None:
        _check_p(p)
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.p = float(p)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.dropped_weight(), self.bias)
