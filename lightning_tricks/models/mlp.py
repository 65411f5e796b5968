"""A multilayer perceptron with a choice of normalization (batch, layer, weight, IC, none) and of head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_tricks.init import init_weights
from lightning_tricks.models._common import check_common, check_head, check_init, classifier, numel
from lightning_tricks.nn import ICBlock, apply_weight_norm, norm_layer
from lightning_tricks.nn.norm import norm_has_shift


class MLP(nn.Module):
    """Flatten -> hidden layers -> classifier head.

    ``norm`` picks the normalization of each hidden layer (:mod:`lightning_tricks.nn.norm`):

    - ``"batch"`` (alias ``"classic"``): ``Linear -> BatchNorm -> ReLU -> Dropout``
    - ``"layer"``: ``Linear -> LayerNorm -> ReLU -> Dropout``
    - ``"weight"``: ``Linear -> ReLU -> Dropout`` with every ``Linear`` (the head's too) weight-normalized,
      ``w = g * v / ||v||`` (Salimans and Kingma 2016, arXiv:1602.07868)
    - ``"ic"``: ``IC(BatchNorm -> Dropout) -> Linear -> ReLU`` (Chen et al. 2019, arXiv:1905.05928);
      the IC layer stands before every weight layer but the first (its input is the normalized data),
      the head included.
    - ``"none"``: ``Linear -> ReLU -> Dropout``

    A ``Linear`` followed by BatchNorm or LayerNorm has no bias (the norm's shift replaces it).
    ``head`` picks the classifier: ``"linear"`` or ``"dropconnect"`` (a
    :class:`~lightning_tricks.nn.DropConnectLinear` whose weights are dropped with probability
    ``dropconnect_p`` in training, the plain layer in eval; Wan et al. 2013).

    ``init`` picks the linear weights' initialization (:func:`lightning_tricks.init.init_weights`: ReLU's gain
    for the hidden layers, 0.1 for the classifier, biases 0; ``"default"``: PyTorch's own).

    ``self.backbone`` holds the hidden layers and ``self.head`` the classifier, so fine-tuning tools
    can address them by name.

    Example:
        >>> import torch
        >>> MLP((1, 8, 8), 10, hidden=(32,))(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> [type(m).__name__ for m in MLP((1, 8, 8), 10, hidden=(32,), norm="layer").backbone]
        ['Flatten', 'Linear', 'LayerNorm', 'ReLU']
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        norm: str = "batch",
        dropout: float = 0.0,
        head: str = "linear",
        dropconnect_p: float = 0.5,
        init: str = "default",
    ) -> None:
        super().__init__()
        shape, norm = check_common(input_shape, num_classes, norm, dropout)
        check_head(head, dropconnect_p)
        check_init(init, False)
        hidden = [int(h) for h in hidden]
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {hidden}")
        self.norm = norm
        layers: list[nn.Module] = [nn.Flatten()]
        width = numel(shape)
        for i, h in enumerate(hidden):
            if norm == "ic":
                if i > 0:
                    layers.append(ICBlock(width, p=dropout, dims=1))
                layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            else:
                layers.append(nn.Linear(width, h, bias=not norm_has_shift(norm)))
                layers += norm_layer(norm, h, dims=1)
                layers.append(nn.ReLU(inplace=True))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            width = h
        self.backbone = nn.Sequential(*layers)
        heads: list[nn.Module] = []
        if norm == "ic" and hidden:
            heads.append(ICBlock(width, p=dropout, dims=1))
        heads.append(classifier(width, num_classes, head, dropconnect_p))
        self.head = nn.Sequential(*heads)
        init_weights(self, init)
        if norm == "weight":
            apply_weight_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
