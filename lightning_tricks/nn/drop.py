"""Stochastic depth / drop path for residual branches.

Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth", 2016, arXiv:1603.09382.
Each sample's residual branch is dropped with probability ``p`` in training and the kept ones are
scaled by ``1 / (1 - p)``; at eval the branch is always kept (identity scaling).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def drop_path(x: Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> Tensor:
    """Zero whole samples of ``x`` with probability ``p`` and scale the rest by ``1/(1-p)``.

    ``out[i] = x[i] * m_i / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)`` per sample (drawn from
    ``generator``, which must live on ``x``'s device); identity in eval or at ``p = 0``.

    Example:
        >>> x = torch.ones(4, 3)
        >>> bool(torch.equal(drop_path(x, 0.5, training=False), x))
        True
        >>> sorted(set(drop_path(x, 0.5, True, torch.Generator().manual_seed(0)).flatten().tolist()))
        [0.0, 2.0]
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep, generator=generator)
    return x * mask.div_(keep)


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Linearly increasing rates over ``depth`` residual blocks, from ``max_rate/depth`` to ``max_rate``.

    The linear decay rule of Huang et al. (2016): block ``l`` of ``L`` drops with ``l / L * p_L``.
    """
    if not 0.0 <= max_rate < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1), got {max_rate!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth!r}")
    return [max_rate * (i + 1) / depth for i in range(depth)]


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; put it on the residual branch, before the addition.

    ``out = shortcut(x) + DropPath(p)(branch(x))``. Set ``module.generator`` to a ``torch.Generator``
    (on the activations' device) for reproducible draws; ``None`` uses the global RNG.

    Example:
        >>> DropPath(0.1)
        DropPath(p=0.1)
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training, self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"
