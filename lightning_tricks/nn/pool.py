"""Fractional max pooling (Graham 2014, arXiv:1412.6071), wired from torch's functional op.

Pooling by a non-integer factor ``alpha`` (e.g. ``sqrt(2)``) with pseudo-random, overlapping pooling
regions. The regions are random in training (a regularizer, like dropout). torch's own
``nn.FractionalMaxPool2d`` stays random in eval too; this wrapper fixes the regions at eval
(``eval_sample``), so evaluation is deterministic, or keeps them random (``eval_sample=None``) for the
paper's test-time averaging over several passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FractionalMaxPool2d"]


class FractionalMaxPool2d(nn.Module):
    """Fractional max pooling over ``(N, C, H, W)`` with random regions in training, fixed ones in eval.

    Output size ``floor(output_ratio * (H, W))``. The region offsets are driven by samples
    ``u ~ U[0, 1)`` per (sample, channel) and per axis (torch's ``_random_samples``).

    Args:
        output_ratio: output/input size ratio in (0, 1), a float or an ``(h, w)`` pair;
            ``2 ** -0.5`` halves the area every layer (the paper's ``alpha = sqrt(2)``).
        kernel_size: pooling window (2 in the paper's "overlapping" variant).
        eval_sample: the fixed ``u`` used in eval mode, in ``[0, 1)``; ``None`` keeps eval random.
        generator: optional ``torch.Generator`` (on the input's device) for the training draws.

    Example:
        >>> pool = FractionalMaxPool2d(2 ** -0.5)
        >>> pool(torch.randn(2, 3, 10, 10)).shape
        torch.Size([2, 3, 7, 7])
        >>> _ = pool.eval(); x = torch.randn(1, 1, 10, 10)
        >>> bool(torch.equal(pool(x), pool(x)))
        True
    """

    def __init__(
        self,
        output_ratio: float | tuple[float, float] = 2**-0.5,
        kernel_size: int | tuple[int, int] = 2,
        eval_sample: float | None = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        ratio = (output_ratio, output_ratio) if isinstance(output_ratio, (int, float)) else tuple(output_ratio)
        if len(ratio) != 2 or not all(isinstance(r, (int, float)) and 0.0 < r < 1.0 for r in ratio):
            raise ValueError(f"output_ratio must be in (0, 1) (or a pair of such), got {output_ratio!r}")
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(kernel) != 2 or not all(isinstance(k, int) and k >= 1 for k in kernel):
            raise ValueError(f"kernel_size must be an int >= 1 (or a pair of such), got {kernel_size!r}")
        if eval_sample is not None and not 0.0 <= eval_sample < 1.0:
            raise ValueError(f"eval_sample must be in [0, 1) or None, got {eval_sample!r}")
        self.output_ratio = tuple(float(r) for r in ratio)
        self.kernel_size = kernel
        self.eval_sample = eval_sample
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"FractionalMaxPool2d needs (N, C, H, W) input, got shape {tuple(x.shape)}")
        n, c = x.shape[:2]
        if self.training or self.eval_sample is None:
            samples = torch.rand(n, c, 2, dtype=x.dtype, device=x.device, generator=self.generator)
        else:
            samples = torch.full((n, c, 2), self.eval_sample, dtype=x.dtype, device=x.device)
        return F.fractional_max_pool2d(x, self.kernel_size, output_ratio=self.output_ratio, _random_samples=samples)

    def extra_repr(self) -> str:
        return f"output_ratio={self.output_ratio}, kernel_size={self.kernel_size}, eval_sample={self.eval_sample}"
