"""Whitening of the inputs: ZCA of whole images, and whitening of image patches for a model's first layer.

**ZCA** (Bell and Sejnowski 1997; the CS231n notes, "PCA and Whitening"). With ``X`` the training images
flattened to ``(N, D)``, ``mu`` their mean and ``C = (X - mu)^T (X - mu) / N = U diag(lambda) U^T``::

    zca(x) = (x - mu) W,   W = U diag(1 / sqrt(lambda + eps)) U^T

so the whitened training data have covariance ``U diag(lambda / (lambda + eps)) U^T``: the identity in
every direction whose variance is well above ``eps``, while directions of variance below ``eps`` (pixel
noise, constant borders) are damped instead of blown up. Unlike PCA whitening (``(x - mu) U diag(...)``),
ZCA rotates back, so the output is still an image, the one closest to the input among all whitened ones.
``W`` is symmetric and invertible for ``eps > 0``: ``W^-1 = U diag(sqrt(lambda + eps)) U^T`` maps a
whitened image back to pixels (augmentations work in pixel space).

**Patch whitening** (the first layer of airbench, Jordan 2024, arXiv:2404.00498; after hlb-CIFAR10): the
``k x k`` patches of the training images, ``(C k^2)``-vectors with covariance ``V diag(lambda) V^T``, give a
``k x k`` convolution whose ``C k^2`` filters are the eigenvectors ``v_i / sqrt(lambda_i + eps)`` and their
negatives (``2 C k^2`` channels; a ReLU after it keeps both signs). Its outputs on training patches are
decorrelated with unit variance: the network starts from whitened local statistics, and the layer stays
frozen (its weights are buffers, never trained).

Only the training split is ever passed to the fitting functions (the data module fits ZCA on its training
split; the training entry point fits the patch layer on the training split).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(2000, 3, generator=g) @ torch.tensor([[2.0, 0, 0], [1, 1, 0], [0, 0, 0.5]])
    >>> zca = ZCA.fit(x, eps=1e-6)
    >>> torch.allclose(torch.cov(zca(x).T), torch.eye(3), atol=1e-3)
    True
    >>> torch.allclose(zca.inverse(zca(x)), x, atol=1e-4)
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tricks.checks import check_float, check_int

__all__ = ["ZCA", "image_patches", "patch_whitening_filters", "whitening_matrices"]


def whitening_matrices(cov: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W, W^-1, eigenvalues, eigenvectors)`` of a covariance matrix: ``W = U diag((lambda + eps)^-1/2) U^T``;
    eigenvalues in decreasing order (negative round-off clamped to 0), eigenvectors as columns."""
    check_float("eps", eps, 0.0, low_open=True)
    values, vectors = torch.linalg.eigh(cov.double())
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    root = torch.sqrt(values + eps)
    return (vectors / root) @ vectors.T, (vectors * root) @ vectors.T, values, vectors


def _covariance(x: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Mean and (biased, ``/ N``) covariance of the rows of ``x``: each chunk's centred product in ``x``'s
    precision (float32 products are 4x faster than float64 on CPUs), summed in float64."""
    x = x.flatten(1)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    mean = x.double().mean(0)
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(x), chunk):
        part = (x[start : start + chunk].double() - mean).to(dtype)
        cov += (part.T @ part).double()
    return mean, cov / len(x)


@dataclass(frozen=True)
class ZCA:
    """ZCA whitening of images ``(N, *shape)`` fitted on a training set: ``(x - mean) @ matrix`` on the
    flattened images (the module docstring has the formula)."""

    mean: Tensor  # (D,)
    matrix: Tensor  # (D, D), symmetric
    inverse_matrix: Tensor  # (D, D)
    eigenvalues: Tensor  # (D,), decreasing: the training covariance's spectrum
    eps: float
    _on_device: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def fit(cls, x: Tensor, eps: float = 1e-2) -> ZCA:
        """Fit on the training images ``x`` (at least two); ``eps > 0`` is added to every eigenvalue."""
        check_float("zca_eps", eps, 0.0, low_open=True)
        if x.ndim < 2 or len(x) < 2:
            raise ValueError(f"ZCA needs at least 2 training samples of shape (N, ...), got {tuple(x.shape)}")
        mean, cov = _covariance(x)
        matrix, inverse, values, _ = whitening_matrices(cov, eps)
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return cls(mean.to(dtype), matrix.to(dtype), inverse.to(dtype), values, float(eps))

    def _on(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, matrix, inverse_matrix)`` on ``x``'s device and dtype, copied once per pair."""
        key = (x.device, x.dtype)
        if key not in self._on_device:
            self._on_device[key] = tuple(  # type: ignore[assignment]
                t.to(device=x.device, dtype=x.dtype) for t in (self.mean, self.matrix, self.inverse_matrix)
            )
        return self._on_device[key]

    def __call__(self, x: Tensor) -> Tensor:
        """Whitened ``x`` (same shape)."""
        mean, matrix, _ = self._on(x)
        return ((x.flatten(1) - mean) @ matrix).view(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """Pixels of whitened ``x``: ``x @ W^-1 + mean``."""
        mean, _, inverse = self._on(x)
        return torch.addmm(mean, x.flatten(1), inverse).view(x.shape)


def image_patches(x: Tensor, kernel: int) -> Tensor:
    """Every ``kernel x kernel`` patch (stride 1, no padding) of images ``(N, C, H, W)``, as rows
    ``(N * (H - k + 1) * (W - k + 1), C * k * k)`` in the layout of a convolution weight ``(C, k, k)``."""
    check_int("kernel", kernel, 1)
    if x.ndim != 4 or x.shape[2] < kernel or x.shape[3] < kernel:
        raise ValueError(f"image_patches needs images (N, C, H, W) with H, W >= {kernel}, got {tuple(x.shape)}")
    return F.unfold(x, kernel).transpose(1, 2).reshape(-1, x.shape[1] * kernel * kernel)


def patch_whitening_filters(x: Tensor, kernel: int = 2, eps: float = 5e-4) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` of the patch-whitening convolution fitted on training images ``x`` ``(N, C, H, W)``.

    ``weight`` ``(2 C k^2, C, k, k)``: the eigenvectors ``v_i / sqrt(lambda_i + eps)`` of the patches'
    covariance (largest eigenvalue first), then their negatives; ``bias = -weight . mean patch``, so the
    outputs on training patches have mean 0 and covariance ``diag(lambda / (lambda + eps))`` (twice, with
    opposite signs).
    """
    check_float("whiten_eps", eps, 0.0, low_open=True)
    c = x.shape[1] if x.ndim == 4 else 0
    mean, cov = _covariance(image_patches(x, kernel))
    _, _, values, vectors = whitening_matrices(cov, eps)
    filters = (vectors / torch.sqrt(values + eps)).T  # row i: v_i / sqrt(lambda_i + eps)
    weight = torch.cat([filters, -filters])
    bias = -(weight @ mean)
    dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    return weight.reshape(2 * c * kernel * kernel, c, kernel, kernel).to(dtype), bias.to(dtype)
