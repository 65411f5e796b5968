"""A small ResNet-style CNN with normalization, pooling, head, dropout and drop path switches."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_tricks.init import init_weights, zero_last_norm_scale
from lightning_tricks.models._common import check_common, check_head, check_init, classifier, whitening_layer
from lightning_tricks.nn import (
    DropPath,
    FractionalMaxPool2d,
    ICBlock,
    apply_weight_norm,
    drop_path_rates,
    norm_layer,
)
from lightning_tricks.nn.norm import norm_has_shift

POOLS = ("stride", "max", "fractional")


def _conv(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut.

    batch:  ``conv -> BN -> ReLU -> conv -> BN`` (+ shortcut) ``-> ReLU``
    layer:  the same with ``GroupNorm(1, C)`` (LayerNorm over ``(C, H, W)``) in place of BN
    weight: ``conv -> ReLU -> conv`` (+ shortcut) ``-> ReLU``, weight-normalized by the model, convs with bias
    ic:     ``IC -> conv -> ReLU -> IC -> conv`` (+ shortcut) ``-> ReLU``
    none:   ``conv -> ReLU -> conv`` (+ shortcut) ``-> ReLU``
    """

    def __init__(self, cin: int, cout: int, stride: int, norm: str, dropout: float, drop_path: float) -> None:
        super().__init__()
        if norm == "ic":
            self.branch = nn.Sequential(
                ICBlock(cin, dropout, dims=2),
                _conv(cin, cout, stride),
                nn.ReLU(inplace=True),
                ICBlock(cout, dropout, dims=2),
                _conv(cout, cout),
            )
        else:
            bias = norm == "weight"  # weight norm has no shift; BN/LN have one; "none" stays bias-free as before
            drop = [nn.Dropout2d(dropout)] if dropout > 0 else []
            self.branch = nn.Sequential(
                _conv(cin, cout, stride, bias),
                *norm_layer(norm, cout, dims=2),
                nn.ReLU(inplace=True),
                *drop,
                _conv(cout, cout, bias=bias),
                *norm_layer(norm, cout, dims=2),
            )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride, bias=False)]
            if norm != "ic":
                layers += norm_layer(norm, cout, dims=2)
            self.shortcut = nn.Sequential(*layers)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.shortcut(x) + self.drop_path(self.branch(x)))


class ResNet(nn.Module):
    """Stem conv, ``len(widths)`` stages of ``blocks_per_stage`` basic blocks, global pool, classifier head.

    ``widths=(64, 128, 256, 512), blocks_per_stage=2`` is ResNet-18 sized (11M parameters);
    the default is a small net that trains on CPU. Drop path rates rise linearly over the blocks to
    ``drop_path_rate`` (stochastic depth's linear rule). ``self.backbone``/``self.head`` are named
    for fine-tuning tools.

    Switches:

    - ``norm``: ``"batch"`` (alias ``"classic"``), ``"layer"`` (``GroupNorm(1, C)``: LayerNorm statistics
      over ``(C, H, W)`` with a per-channel affine), ``"weight"`` (every conv and the head weight-normalized,
      ``w = g * v / ||v||``), ``"ic"`` or ``"none"``; see :class:`BasicBlock` and :mod:`lightning_tricks.nn.norm`.
    - ``pool``: how each stage after the first downsamples. ``"stride"``: its first block's convolutions
      have stride 2 (the ResNet way, halving height and width). ``"max"``: a 2x2 max pooling layer before
      the stage (also halving). ``"fractional"``: fractional max pooling before the stage (Graham 2014,
      arXiv:1412.6071), output ``floor(pool_ratio * size)`` with random pooling regions in training and
      fixed ones in eval (:class:`~lightning_tricks.nn.FractionalMaxPool2d`). The default ratio ``1/sqrt(2)``
      is the paper's ``alpha = sqrt(2)``: it keeps more resolution than halving (8x8 digits go 8 -> 5 -> 3
      instead of 8 -> 4 -> 2; more compute in later stages). A ratio of exactly 0.5 makes the regions
      regular 2x2 windows again (no randomness left), so ratios in ``(0.5, 1)`` are the useful ones.
      Pooled sizes must stay >= 1: a too-small input for the number of stages is refused at construction.
    - ``head``: ``"linear"`` or ``"dropconnect"`` (DropConnect on the classifier weights, ``dropconnect_p``).
    - ``init``: the convolution and linear weights' initialization (:func:`lightning_tricks.init.init_weights`,
      ReLU's gain, 0.1 for the classifier; ``"default"``: PyTorch's); ``zero_init_residual``: the last
      normalization scale of every block's branch starts at 0, so each block starts as its shortcut
      (needs ``norm="batch"`` or ``"layer"``).
    - ``whiten``: a frozen :class:`~lightning_tricks.nn.PatchWhitening` layer (``whiten_kernel`` x
      ``whiten_kernel`` patches, ``whiten_eps``) and a ReLU before the stem, fitted on training images with
      :func:`~lightning_tricks.nn.fit_patch_whitening` (the training entry point does it); the stem then sees
      ``2 C k^2`` channels of ``(H - k + 1) x (W - k + 1)``.

    Example:
        >>> import torch
        >>> ResNet((1, 28, 28), 10, widths=(8, 16))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> ResNet((1, 8, 8), 10, widths=(8, 16, 32), pool="fractional").backbone(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
        norm: str = "batch",
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        pool: str = "stride",
        pool_ratio: float = 2**-0.5,
        head: str = "linear",
        dropconnect_p: float = 0.5,
        init: str = "default",
        zero_init_residual: bool = False,
        whiten: bool = False,
        whiten_kernel: int = 2,
        whiten_eps: float = 5e-4,
    ) -> None:
        super().__init__()
        shape, norm = check_common(input_shape, num_classes, norm, dropout)
        check_head(head, dropconnect_p)
        check_init(init, zero_init_residual, whiten)
        if len(shape) != 3:
            raise ValueError(f"ResNet needs input_shape (C, H, W), got {shape!r}")
        if zero_init_residual and norm not in ("batch", "layer"):
            raise ValueError(
                f"zero_init_residual=true needs a normalization at the end of each block (norm=batch or layer), "
                f"got norm={norm!r}"
            )
        whitening, shape = whitening_layer(shape, whiten, whiten_kernel, whiten_eps, "ResNet")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if isinstance(pool_ratio, bool) or not isinstance(pool_ratio, (int, float)) or not 0 < pool_ratio < 1:
            raise ValueError(f"pool_ratio must be in (0, 1), got {pool_ratio!r}")
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be positive, got {widths}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage!r}")
        if pool != "stride":
            _check_pooled_sizes(shape[1:], len(widths) - 1, pool, float(pool_ratio))
        self.norm, self.pool = norm, pool
        rates = iter(drop_path_rates(drop_path_rate, len(widths) * blocks_per_stage))
        stem: list[nn.Module] = [nn.Conv2d(shape[0], widths[0], 3, padding=1, bias=not norm_has_shift(norm))]
        stem += norm_layer(norm, widths[0], dims=2)
        stem.append(nn.ReLU(inplace=True))
        layers: list[nn.Module] = [nn.Sequential(*stem)]
        if whitening is not None:
            layers[:0] = [whitening, nn.ReLU(inplace=True)]  # both signs of each filter: the ReLU loses nothing
        cin = widths[0]
        for s, w in enumerate(widths):
            if s > 0 and pool == "max":
                layers.append(nn.MaxPool2d(2))
            elif s > 0 and pool == "fractional":
                layers.append(FractionalMaxPool2d(float(pool_ratio)))
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0 and pool == "stride") else 1
                layers.append(BasicBlock(cin, w, stride, norm, dropout, next(rates)))
                cin = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.backbone = nn.Sequential(*layers)
        heads: list[nn.Module] = [ICBlock(cin, dropout, dims=1)] if norm == "ic" else []
        heads.append(classifier(cin, num_classes, head, dropconnect_p))
        self.head = nn.Sequential(*heads)
        init_weights(self, init)
        if zero_init_residual:
            zero_last_norm_scale(m.branch for m in self.modules() if isinstance(m, BasicBlock))
        if norm == "weight":
            apply_weight_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _check_pooled_sizes(size: Sequence[int], times: int, pool: str, ratio: float) -> None:
    """Refuse an input too small to be pooled ``times`` times (a pooled size below 1)."""
    sizes = [tuple(size)]
    for _ in range(times):
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2) if pool == "max" else (math.floor(h * ratio), math.floor(w * ratio)))
    if min(min(s) for s in sizes) < 1:
        path = " -> ".join(f"{h}x{w}" for h, w in sizes)
        what = "pool='max'" if pool == "max" else f"pool='fractional' (pool_ratio={ratio:.3g})"
        raise ValueError(
            f"ResNet: input {sizes[0][0]}x{sizes[0][1]} cannot be pooled {times} times with {what}: {path}; "
            "use fewer widths, a larger input or pool='stride'"
        )
