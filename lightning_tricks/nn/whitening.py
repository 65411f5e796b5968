"""A frozen patch-whitening first layer (airbench's), fitted on training images.

:class:`PatchWhitening` is a ``k x k`` convolution (stride 1, no padding) from ``C`` to ``2 C k^2`` channels
whose weight and bias are buffers: they are saved in checkpoints and moved with the model, but they are
not parameters, so no optimizer, weight decay or averaging touches them. :func:`fit_patch_whitening` sets
them from the eigenvectors of training patches (:func:`lightning_tricks.whitening.patch_whitening_filters`);
a layer that was never fitted refuses to run, so a model cannot train on an unfitted, meaningless filter
bank by mistake.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tricks.checks import check_float, check_int
from lightning_tricks.whitening import patch_whitening_filters

__all__ = ["PatchWhitening", "fit_patch_whitening"]


class PatchWhitening(nn.Module):
    """Frozen ``kernel x kernel`` whitening convolution, ``in_channels -> 2 * in_channels * kernel**2``.

    Example:
        >>> layer = PatchWhitening(1, kernel_size=2)
        >>> x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        >>> layer.fit(x).out_channels, layer(x).shape
        (8, torch.Size([64, 8, 7, 7]))
    """

    weight: Tensor
    bias: Tensor
    fitted: Tensor

    def __init__(self, in_channels: int, kernel_size: int = 2, eps: float = 5e-4) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("whiten_kernel", kernel_size, 1)
        check_float("whiten_eps", eps, 0.0, low_open=True)
        self.in_channels, self.kernel_size, self.eps = int(in_channels), int(kernel_size), float(eps)
        self.out_channels = 2 * in_channels * kernel_size**2
        self.register_buffer("weight", torch.zeros(self.out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("bias", torch.zeros(self.out_channels))
        self.register_buffer("fitted", torch.tensor(False))
        self._fitted = False  # the buffer's value, read without a device sync in forward

    def fit(self, x: Tensor) -> PatchWhitening:
        """Set the filters from the training images ``x`` ``(N, C, H, W)`` (as the model sees them)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchWhitening({self.in_channels}) needs images (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        weight, bias = patch_whitening_filters(x.detach().float().cpu(), self.kernel_size, self.eps)
        with torch.no_grad():
            self.weight.copy_(weight.reshape(self.weight.shape))
            self.bias.copy_(bias)
            self.fitted.fill_(True)
        self._fitted = True
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fitted = bool(self.fitted)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fitted:
            raise RuntimeError(
                "PatchWhitening is not fitted: call lightning_tricks.nn.fit_patch_whitening(model, train_images) "
                "before training (the training entry point does it for model.whiten=true)"
            )
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, eps={self.eps:g}"


def fit_patch_whitening(model: nn.Module, train_images: Tensor, max_images: int = 5000) -> list[PatchWhitening]:
    """Fit every :class:`PatchWhitening` layer of ``model`` on the first ``max_images`` training images
    (the layer's input must be the images: it is a first layer); returns the layers fitted (none: no-op)."""
    check_int("max_images", max_images, 1)
    layers = [m for m in model.modules() if isinstance(m, PatchWhitening)]
    for layer in layers:
        layer.fit(train_images[:max_images])
    return layers
