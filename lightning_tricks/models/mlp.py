"""A multilayer perceptron with the classic or the IC placement of BatchNorm and Dropout."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_tricks.models._common import check_common, numel
from lightning_tricks.nn import ICBlock


class MLP(nn.Module):
    """Flatten -> hidden layers -> linear head.

    ``norm`` picks the placement in each hidden layer:

    - ``"classic"``: ``Linear -> BatchNorm -> ReLU -> Dropout``
    - ``"ic"``: ``IC(BatchNorm -> Dropout) -> Linear -> ReLU`` (Chen et al. 2019, arXiv:1905.05928);
      the IC layer stands before every weight layer but the first (its input is the normalized data),
      the head included.
    - ``"none"``: ``Linear -> ReLU -> Dropout``

    ``self.backbone`` holds the hidden layers and ``self.head`` the classifier, so fine-tuning tools
    can address them by name.

    Example:
        >>> import torch
        >>> MLP((1, 8, 8), 10, hidden=(32,))(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        norm: str = "classic",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = check_common(input_shape, num_classes, norm, dropout)
        hidden = [int(h) for h in hidden]
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {hidden}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = numel(shape)
        for i, h in enumerate(hidden):
            if norm == "ic":
                if i > 0:
                    layers.append(ICBlock(width, p=dropout, dims=1))
                layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            else:
                layers.append(nn.Linear(width, h, bias=norm != "classic"))
                if norm == "classic":
                    layers.append(nn.BatchNorm1d(h))
                layers.append(nn.ReLU(inplace=True))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            width = h
        self.backbone = nn.Sequential(*layers)
        head: list[nn.Module] = []
        if norm == "ic" and hidden:
            head.append(ICBlock(width, p=dropout, dims=1))
        head.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
