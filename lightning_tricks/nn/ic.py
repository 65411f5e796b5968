"""The IC layer: BatchNorm followed by Dropout, placed *before* a weight layer.

Chen, Chen, Zhang, Zhang, Hu, Sun, Lu, "Rethinking the Usage of Batch Normalization and Dropout in
the Training of Deep Neural Networks", 2019, arXiv:1905.05928. The "Independent Component" layer
whitens-then-decorrelates the inputs of the next weight layer: ``IC -> Linear/Conv -> ReLU`` instead of
the classic ``Linear/Conv -> BN -> ReLU``.
"""

from __future__ import annotations

from torch import nn


class ICBlock(nn.Sequential):
    """``BatchNorm -> Dropout(p)``, to be put in front of a weight layer.

    Training: ``y = BN_batch(x) * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` per element (batch
    statistics, running statistics updated). Eval: ``y = BN_running(x)``, deterministic (Dropout is
    the identity). Build whole ``IC -> Linear/Conv -> activation`` stacks with
    :func:`lightning_tricks.nn.linear_block` / :func:`~lightning_tricks.nn.conv_block`.

    Args:
        num_features: channels (``dims=2``) or features (``dims=1``) of the input.
        p: dropout probability in ``[0, 1)``.
        dims: 1 for ``(N, C)`` / ``(N, C, L)`` inputs (``BatchNorm1d``), 2 for images (``BatchNorm2d``,
            element-wise dropout as in the paper).

    Example:
        >>> import torch
        >>> block = ICBlock(8, p=0.1).eval()
        >>> block(torch.zeros(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, num_features: int, p: float = 0.05, dims: int = 1) -> None:
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims!r}")
        norm = nn.BatchNorm1d(num_features) if dims == 1 else nn.BatchNorm2d(num_features)
        super().__init__(norm, nn.Dropout(p))
        self.p = p
        self.dims = dims
