"""Builders for weight-layer blocks with a choice of normalization and of its placement.

The switch ``norm`` (the same names as :mod:`lightning_tricks.models`, see :mod:`lightning_tricks.nn.norm`):

- ``"ic"``: ``IC(BatchNorm -> Dropout) -> Linear/Conv -> activation`` (Chen et al. 2019,
  arXiv:1905.05928): the IC layer whitens and decorrelates the *inputs* of the weight layer.
- ``"batch"`` (alias ``"classic"``): ``Linear/Conv -> BatchNorm -> activation -> Dropout`` (Ioffe and
  Szegedy 2015, arXiv:1502.03167); the weight layer has no bias since BatchNorm's shift replaces it.
- ``"layer"``: ``Linear/Conv -> LayerNorm -> activation -> Dropout`` (``GroupNorm(1, C)`` for convolutions),
  no bias either.
- ``"weight"``: ``WeightNorm(Linear/Conv) -> activation -> Dropout`` (Salimans and Kingma 2016).
- ``"none"``: ``Linear/Conv -> activation -> Dropout``.

Dropout ``p`` is element-wise inside the IC layer (as in the paper) and after the activation
otherwise (channel-wise ``Dropout2d`` for convolutions, as in :class:`lightning_tricks.models.ResNet`).
Convolution blocks can end in a pooling layer: ``"max"`` (2x2 max pooling) or ``"fractional"``
(:class:`~lightning_tricks.nn.pool.FractionalMaxPool2d`, ratio ``1/sqrt(2)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_tricks.nn.ic import ICBlock
from lightning_tricks.nn.norm import NORMS, check_norm, norm_has_shift, norm_layer
from lightning_tricks.nn.pool import FractionalMaxPool2d

__all__ = ["NORMS", "POOLS", "linear_block", "conv_block", "mlp_stack", "conv_stack"]

POOLS = (None, "max", "fractional")

Activation = Callable[[], nn.Module] | None


def _check(norm: str, p: float, pool: str | None = None) -> str:
    norm = check_norm(norm)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return norm


def _act(activation: Activation) -> list[nn.Module]:
    return [] if activation is None else [activation()]


def linear_block(
    in_features: int,
    out_features: int,
    norm: str = "ic",
    p: float = 0.0,
    activation: Activation = nn.ReLU,
    ic_input: bool = True,
) -> nn.Sequential:
    """One fully connected block with the chosen placement.

    Args:
        in_features, out_features: layer sizes.
        norm: ``"ic"``, ``"batch"`` (``"classic"``), ``"layer"``, ``"weight"`` or ``"none"`` (module docstring).
        p: dropout probability in ``[0, 1)``.
        activation: a zero-argument factory (``nn.ReLU``, ``nn.GELU``, ...) or ``None`` for no activation.
        ic_input: with ``norm="ic"``, put the IC layer in front (``False`` for a block whose input is
            already normalized data, e.g. the first layer).

    Example:
        >>> [type(m).__name__ for m in linear_block(4, 8, "ic", p=0.1)]
        ['ICBlock', 'Linear', 'ReLU']
        >>> [type(m).__name__ for m in linear_block(4, 8, "classic", p=0.1)]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Dropout']
    """
    norm = _check(norm, p)
    if norm == "ic":
        ic = [ICBlock(in_features, p, dims=1)] if ic_input else []
        return nn.Sequential(*ic, nn.Linear(in_features, out_features), *_act(activation))
    linear = nn.Linear(in_features, out_features, bias=not norm_has_shift(norm))
    if norm == "weight":
        weight_norm(linear)
    layers: list[nn.Module] = [linear, *norm_layer(norm, out_features, dims=1)]
    layers += _act(activation)
    if p > 0:
        layers.append(nn.Dropout(p))
    return nn.Sequential(*layers)


def conv_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
    norm: str = "ic",
    p: float = 0.0,
    activation: Activation = nn.ReLU,
    ic_input: bool = True,
    pool: str | None = None,
) -> nn.Sequential:
    """One convolution block with the chosen placement, optionally followed by pooling.

    Args:
        in_channels, out_channels, kernel_size, stride: the convolution.
        padding: ``None`` = ``kernel_size // 2`` ("same" for odd kernels at stride 1).
        norm, p, activation, ic_input: as in :func:`linear_block` (IC uses ``BatchNorm2d``).
        pool: ``None``, ``"max"`` (2x2) or ``"fractional"`` (fractional max pooling, ratio ``1/sqrt(2)``).

    Example:
        >>> import torch
        >>> conv_block(3, 8, norm="classic", pool="fractional")(torch.zeros(2, 3, 16, 16)).shape
        torch.Size([2, 8, 11, 11])
    """
    norm = _check(norm, p, pool)
    padding = kernel_size // 2 if padding is None else padding
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=not norm_has_shift(norm)
    )
    if norm == "ic":
        layers: list[nn.Module] = [ICBlock(in_channels, p, dims=2)] if ic_input else []
        layers += [conv, *_act(activation)]
    else:
        if norm == "weight":
            weight_norm(conv)
        layers = [conv, *norm_layer(norm, out_channels, dims=2)]
        layers += _act(activation)
        if p > 0:
            layers.append(nn.Dropout2d(p))
    if pool == "max":
        layers.append(nn.MaxPool2d(2))
    elif pool == "fractional":
        layers.append(FractionalMaxPool2d())
    return nn.Sequential(*layers)


def mlp_stack(
    in_features: int,
    sizes: Sequence[int],
    norm: str = "ic",
    p: float = 0.0,
    activation: Activation = nn.ReLU,
    ic_first: bool = False,
) -> nn.Sequential:
    """``len(sizes)`` :func:`linear_block` s, ``in_features -> sizes[0] -> ... -> sizes[-1]``.

    With ``norm="ic"`` every block but the first gets an IC layer in front (``ic_first=True`` gives
    the first one too); a following head should then start with ``ICBlock(sizes[-1], p)``.

    Example:
        >>> [type(m).__name__ for m in mlp_stack(64, [32, 16], "ic", 0.1).modules()][:6]
        ['Sequential', 'Sequential', 'Linear', 'ReLU', 'Sequential', 'ICBlock']
    """
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive ints, got {sizes}")
    blocks, width = [], in_features
    for i, s in enumerate(sizes):
        blocks.append(linear_block(width, s, norm, p, activation, ic_input=ic_first or i > 0))
        width = s
    return nn.Sequential(*blocks)


def conv_stack(
    in_channels: int,
    widths: Sequence[int],
    norm: str = "ic",
    p: float = 0.0,
    activation: Activation = nn.ReLU,
    ic_first: bool = False,
    pool: str | None = None,
    kernel_size: int = 3,
) -> nn.Sequential:
    """``len(widths)`` :func:`conv_block` s, each followed by ``pool`` (the IC rule as in :func:`mlp_stack`).

    Example:
        >>> import torch
        >>> conv_stack(1, [8, 16], "ic", 0.1, pool="max")(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 16, 7, 7])
    """
    widths = [int(w) for w in widths]
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
    blocks, cin = [], in_channels
    for i, w in enumerate(widths):
        blocks.append(
            conv_block(
                cin, w, kernel_size, norm=norm, p=p, activation=activation, ic_input=ic_first or i > 0, pool=pool
            )
        )
        cin = w
    return nn.Sequential(*blocks)
