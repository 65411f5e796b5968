"""A small CNN shaped for a compute budget: pool before normalization, channels_last, a small head.

:class:`SpeedNet` is the network of the CPU speedrun (``benchmarks/speedrun.py --dataset fashion_mnist``).
It spends its compute where accuracy per second is best on a CPU:

- **pool first**: each stage is ``conv3x3 -> MaxPool2d(2) -> BatchNorm -> ReLU``, so the normalization and
  the activation (memory-bound ops) run on a quarter of the pixels the convolution produced (the order
  of airbench's ``ConvGroup``, Jordan 2024, arXiv:2404.00498). Max pooling commutes with the ReLU and with
  a BatchNorm whose scale is positive, so this is the classic ``conv -> BN -> ReLU -> pool`` up to the sign
  of the scale and the statistics being taken after pooling;
- **extra convolutions at the pooled resolution** (``convs_per_stage``): ``conv3x3 -> BN -> ReLU``, with
  an identity shortcut around each when ``residual`` (a ResNet-9-like stage);
- **a small head**: ``head="max"``, a global max pool and one linear layer; ``head="flatten"``, the last
  feature map flattened into a hidden fully connected layer (``hidden`` units, ReLU) and the linear layer,
  which keeps *where* a feature was found (on Fashion-MNIST, 6 epochs, one seed: 92.8% vs 92.4% for
  ``head="max"`` with widths ``(24, 48, 96)``);
- **channels_last** (``NHWC``): the weights are stored channels-last and every input is converted once at
  the start of ``forward``; oneDNN's convolutions and PyTorch's max pooling are faster on it on CPUs, and
  cuDNN's on GPUs with tensor cores. The output does not depend on the memory format.

On one CPU thread, ``SpeedNet((1, 28, 28), 10, widths=(24, 64), head="flatten", hidden=128)`` trains an
epoch of Fashion-MNIST in about 0.42 of the time of the classic ``Conv(32)-BN-ReLU-Pool-Conv(64)-BN-ReLU-Pool-
Linear(3136, 128)-Linear(128, 10)`` network in NCHW (pool-first and channels_last: 0.56 at equal widths; the
narrower first stage: 0.42), in a training-step microbenchmark (batch 256 vs 128) on a 2-core AMD EPYC.

Example:
    >>> import torch
    >>> net = SpeedNet((1, 28, 28), 10, widths=(8, 16, 32))
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> net.feature_sizes
    [(14, 14), (7, 7), (3, 3)]
    >>> SpeedNet((1, 28, 28), 10, widths=(8, 16), head="flatten", hidden=32).head
    Sequential(
      (0): Linear(in_features=784, out_features=32, bias=True)
      (1): ReLU(inplace=True)
      (2): Linear(in_features=32, out_features=10, bias=True)
    )
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_tricks.init import init_weights, zero_last_norm_scale
from lightning_tricks.models._common import check_common, check_init, whitening_layer

__all__ = ["HEADS", "SpeedNet"]

HEADS = ("max", "flatten")


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)  # a BatchNorm follows: its shift is the bias


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(_conv(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """``x + f(x)``."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


class SpeedNet(nn.Module):
    """``len(widths)`` stages of ``conv -> pool -> BN -> ReLU`` (+ extra convolutions), then a max-pooled or a
    flattened head.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        num_classes: outputs of the linear head, >= 2.
        widths: output channels of each stage; every stage halves height and width (2x2 max pooling),
            so ``H`` and ``W`` must stay >= 1 after ``len(widths)`` halvings.
        convs_per_stage: convolutions per stage, >= 1: the first one changes the width and is pooled,
            the others (``conv3x3 -> BN -> ReLU`` at the pooled size) keep it.
        residual: an identity shortcut around each extra convolution (``x + f(x)``).
        head: ``"max"`` (global max pool -> linear) or ``"flatten"`` (the last feature map flattened ->
            ``Linear(C * H * W, hidden) -> ReLU`` -> linear; ``hidden=0``: straight to the linear layer).
        hidden: units of the hidden layer of ``head="flatten"``, >= 0 (must be 0 with ``head="max"``).
        head_scale: the logits are multiplied by this (ResNet-9's head uses 0.125); 1 is a plain linear head.
        channels_last: store the weights and compute in the channels-last memory format.
        init: the convolution and linear weights' initialization (:func:`lightning_tricks.init.init_weights`,
            ReLU's gain, 0.1 for the last linear layer; ``"default"``: PyTorch's).
        zero_init_residual: the BatchNorm scale of each residual branch starts at 0 (needs ``residual`` and
            ``convs_per_stage > 1``).
        whiten: a frozen :class:`~lightning_tricks.nn.PatchWhitening` layer (``whiten_kernel``,
            ``whiten_eps``) and a ReLU before the first stage, fitted on training images with
            :func:`~lightning_tricks.nn.fit_patch_whitening`; the first stage sees ``2 C k^2`` channels of
            ``(H - k + 1) x (W - k + 1)`` (airbench's first layer).

    ``self.backbone`` (images -> features) and ``self.head`` (features -> logits) are named for fine-tuning
    tools, as in :class:`~lightning_tricks.models.ResNet`.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (24, 48, 96),
        convs_per_stage: int = 1,
        residual: bool = False,
        head: str = "max",
        hidden: int = 0,
        head_scale: float = 1.0,
        channels_last: bool = True,
        init: str = "default",
        zero_init_residual: bool = False,
        whiten: bool = False,
        whiten_kernel: int = 2,
        whiten_eps: float = 5e-4,
    ) -> None:
        super().__init__()
        shape, _ = check_common(input_shape, num_classes, "batch", 0.0)
        check_init(init, zero_init_residual, whiten)
        if len(shape) != 3:
            raise ValueError(f"SpeedNet needs input_shape (C, H, W), got {shape!r}")
        if zero_init_residual and not (residual and convs_per_stage > 1):
            raise ValueError(
                "zero_init_residual=true needs residual blocks: set residual: true and convs_per_stage >= 2, "
                f"got residual={residual!r}, convs_per_stage={convs_per_stage!r}"
            )
        whitening, shape = whitening_layer(shape, whiten, whiten_kernel, whiten_eps, "SpeedNet")
        widths = [int(w) for w in widths] if not isinstance(widths, (str, bytes)) else []
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths!r}")
        if isinstance(convs_per_stage, bool) or not isinstance(convs_per_stage, int) or convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be an int >= 1, got {convs_per_stage!r}")
        for name, flag in (("residual", residual), ("channels_last", channels_last)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"hidden must be an int >= 0, got {hidden!r}")
        if head == "max" and hidden:
            raise ValueError(f"hidden={hidden} needs head='flatten' (head='max' is one linear layer); set hidden: 0")
        if isinstance(head_scale, bool) or not isinstance(head_scale, (int, float)) or not head_scale > 0:
            raise ValueError(f"head_scale must be a number > 0, got {head_scale!r}")
        sizes = [(shape[1], shape[2])]
        for _ in widths:
            sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
        if min(min(s) for s in sizes) < 1:
            path = " -> ".join(f"{h}x{w}" for h, w in sizes)
            raise ValueError(
                f"SpeedNet: input {shape[1]}x{shape[2]} cannot be halved {len(widths)} times ({path}); use fewer widths"
            )
        self.feature_sizes = sizes[1:]
        self.channels_last = channels_last
        self.head_scale = float(head_scale)
        stages: list[nn.Module] = []
        cin = shape[0]
        for w in widths:
            layers: list[nn.Module] = [_conv(cin, w), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            for _ in range(convs_per_stage - 1):
                block = _ConvBNReLU(w, w)
                layers.append(_Residual(block) if residual else block)
            stages.append(nn.Sequential(*layers))
            cin = w
        if whitening is not None:
            stages[:0] = [whitening, nn.ReLU(inplace=True)]
        h, w = self.feature_sizes[-1]
        if head == "max":
            self.backbone = nn.Sequential(*stages, nn.AdaptiveMaxPool2d(1), nn.Flatten())
            features = cin
        else:
            self.backbone = nn.Sequential(*stages, nn.Flatten())
            features = cin * h * w
        layers = [nn.Linear(features, hidden), nn.ReLU(inplace=True)] if hidden else []
        self.head = nn.Sequential(*layers, nn.Linear(hidden or features, num_classes))
        init_weights(self, init)
        if zero_init_residual:
            zero_last_norm_scale(m.f for m in self.modules() if isinstance(m, _Residual))
        if channels_last:
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.head(self.backbone(x))
        return logits * self.head_scale if self.head_scale != 1.0 else logits
