"""A small ResNet-style CNN with classic or IC placement, dropout and drop path switches."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_tricks.models._common import check_common
from lightning_tricks.nn import DropPath, ICBlock, drop_path_rates


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut.

    classic: ``conv -> BN -> ReLU -> conv -> BN`` (+ shortcut) ``-> ReLU``
    ic:      ``IC -> conv -> ReLU -> IC -> conv`` (+ shortcut) ``-> ReLU``
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
            bn = (lambda c: nn.BatchNorm2d(c)) if norm == "classic" else (lambda c: nn.Identity())
            drop = [nn.Dropout2d(dropout)] if dropout > 0 else []
            self.branch = nn.Sequential(
                _conv(cin, cout, stride),
                bn(cout),
                nn.ReLU(inplace=True),
                *drop,
                _conv(cout, cout),
                bn(cout),
            )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride, bias=False)]
            if norm == "classic":
                layers.append(nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential(*layers)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.shortcut(x) + self.drop_path(self.branch(x)))


class ResNet(nn.Module):
    """Stem conv, ``len(widths)`` stages of ``blocks_per_stage`` basic blocks, global pool, linear head.

    ``widths=(64, 128, 256, 512), blocks_per_stage=2`` is ResNet-18 sized (11M parameters);
    the default is a small net that trains on CPU. Drop path rates rise linearly over the blocks to
    ``drop_path_rate`` (stochastic depth's linear rule). ``self.backbone``/``self.head`` are named
    for fine-tuning tools.

    Example:
        >>> import torch
        >>> ResNet((1, 28, 28), 10, widths=(8, 16))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
        norm: str = "classic",
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        shape = check_common(input_shape, num_classes, norm, dropout)
        if len(shape) != 3:
            raise ValueError(f"ResNet needs input_shape (C, H, W), got {shape!r}")
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be positive, got {widths}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage!r}")
        rates = iter(drop_path_rates(drop_path_rate, len(widths) * blocks_per_stage))
        stem: list[nn.Module] = [nn.Conv2d(shape[0], widths[0], 3, padding=1, bias=norm != "classic")]
        if norm == "classic":
            stem.append(nn.BatchNorm2d(widths[0]))
        stem.append(nn.ReLU(inplace=True))
        layers: list[nn.Module] = [nn.Sequential(*stem)]
        cin = widths[0]
        for s, w in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                layers.append(BasicBlock(cin, w, stride, norm, dropout, next(rates)))
                cin = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.backbone = nn.Sequential(*layers)
        head: list[nn.Module] = [ICBlock(cin, dropout, dims=1)] if norm == "ic" else []
        head.append(nn.Linear(cin, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
