r"""Adaptive gradient clipping (AGC), unit-wise, as pure multi-tensor functions (no Trainer).

Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image Recognition Without
Normalization" (NFNets), arXiv:2102.06171, Sec. 4.1. For each *unit* ``i`` of a parameter ``W`` with
gradient ``G``:

.. math::
    G_i \leftarrow
    \begin{cases}
        \lambda \dfrac{\max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert} G_i
            & \text{if } \dfrac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda \\
        G_i & \text{otherwise}
    \end{cases}

with ``lambda = clipping`` (0.01 by default; the paper uses 0.01-0.16, smaller for larger batches) and
``eps = 1e-3`` (it keeps zero-initialized weights from freezing: their gradients may still grow to
``lambda * eps``). Norms are Frobenius norms over the unit.

What a unit is (the NFNet reference, ``nfnets/optim.py`` ``unitwise_norm``, in PyTorch's layouts):

- a tensor with ``ndim >= 2`` (``Linear`` ``(out, in)``, ``ConvNd`` ``(out, in/groups, *kernel)``,
  ``Embedding`` ``(num, dim)``): each slice along dim 0, i.e. each output unit / output filter (the
  norm runs over all other dims). For ``ConvTransposeNd``, whose weight is ``(in, out/groups, ...)``, dim 0
  is the input channel: the same rule as timm's ``adaptive_clip_grad``.
- a tensor with ``ndim <= 1`` (biases, normalization gains and shifts, scalars): the whole tensor is one
  unit (the reference's "scalars and vectors" case), so a bias is clipped against its own norm.

The paper does not clip the final classifier layer; which parameters are passed here is the caller's
choice (the :class:`~lightning_tricks.callbacks.AGC` callback leaves out the last ``nn.Linear`` by default).

Cost: :class:`AdaptiveClipper` groups the tensors once: ``ndim >= 2`` tensors by (device, dtype, shape),
the rest by (device, dtype). A step is then, per group, one norm over the weights and one over the
gradients (same-shape tensors are stacked so one ``linalg.vector_norm`` computes every row norm of the
group; a group of one is a view, no copy), one ``where`` and one ``torch._foreach_mul_`` into the
gradients; vector groups use ``torch._foreach_norm``. No host sync, and no Python loop over
parameters beyond collecting their ``.grad`` (as ``torch.nn.utils.clip_grad_norm_`` does).

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))   # row norms 5 and 1
    >>> w.grad = torch.tensor([[0.0, 1.0], [0.0, 0.001]])               # row norms 1 and 0.001
    >>> adaptive_clip_([w], [w.grad], clipping=0.01)                    # row 0: 1/5 > 0.01, clipped
    tensor(1)
    >>> w.grad
    tensor([[0.0000, 0.0500],
            [0.0000, 0.0010]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AGC_EPS",
    "AdaptiveClipper",
    "adaptive_clip_",
    "check_clipping",
    "check_exclude",
    "clip_after_closure",
    "clip_factors",
    "clipped_parameters",
    "unit_norms",
]

#: The paper's floor on the weight norm of a unit.
AGC_EPS = 1e-3

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_clipping(clipping: float, eps: float = AGC_EPS) -> tuple[float, float]:
    """``(clipping, eps)`` as floats if both are finite and > 0, else ``ValueError`` naming the bad one.

    Example:
        >>> check_clipping(0.0)
        Traceback (most recent call last):
        ...
        ValueError: clipping must be a finite number > 0 (the paper uses 0.01 to 0.16), got 0.0
    """
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)) or not 0 < clipping < math.inf:
        raise ValueError(f"clipping must be a finite number > 0 (the paper uses 0.01 to 0.16), got {clipping!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0 (the paper uses 1e-3), got {eps!r}")
    return float(clipping), float(eps)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are computed in: float32 for half types, the tensor's own otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def unit_norms(x: Tensor) -> Tensor:
    """The norm of each unit of ``x``: shape ``(x.shape[0], 1, ..., 1)`` for ``ndim >= 2``, a 0-d tensor otherwise.

    Computed in float32 for float16/bfloat16 tensors.

    Example:
        >>> unit_norms(torch.tensor([[3.0, 4.0], [6.0, 8.0]]))
        tensor([[ 5.],
                [10.]])
        >>> unit_norms(torch.tensor([3.0, 4.0]))
        tensor(5.)
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, dtype=_acc(x.dtype))
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True, dtype=_acc(x.dtype))


def clip_factors(
    grad_norms: Tensor, weight_norms: Tensor, clipping: float, eps: float = AGC_EPS, grad_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(factor, clipped)``: the multiplier of each unit's gradient and whether the unit is clipped.

    ``factor = lambda * max(||W_i||, eps) / ||G_i||`` where ``||G_i|| / max(||W_i||, eps) > lambda``, else 1.
    ``grad_scale`` (the AMP loss scale, when the gradients are still scaled) multiplies the bound, so
    the decision and the factor are those of the unscaled gradient. A non-finite ``||G_i||`` gives a
    factor 0 (inf) or 1 (nan): the gradient stays non-finite, so an AMP step is still skipped.

    Example:
        >>> clip_factors(torch.tensor([1.0, 0.001]), torch.tensor([5.0, 1.0]), 0.01)
        (tensor([0.0500, 1.0000]), tensor([ True, False]))
    """
    bound = weight_norms.clamp_min(eps).mul(clipping)
    if grad_scale is not None:
        bound = bound * grad_scale
    clipped = grad_norms > bound  # bound > 0, so clipped units have ||G_i|| > 0
    return torch.where(clipped, bound / grad_norms, 1.0), clipped


def _clip_group_(
    weights: list[Tensor],
    grads: list[Tensor],
    matrix: bool,
    clipping: float,
    eps: float,
    grad_scale: Tensor | None,
) -> Tensor:
    """Clip ``grads`` of one group (same device and dtype; same shape if ``matrix``); the clipped-unit count."""
    acc = _acc(grads[0].dtype)
    if matrix:
        if len(weights) == 1:  # a view: no copy
            w, g = weights[0].unsqueeze(0), grads[0].unsqueeze(0)
        else:
            w, g = torch.stack(weights), torch.stack(grads)
        dims = tuple(range(2, w.ndim))
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True, dtype=acc)
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True, dtype=acc)
    else:
        wn = torch.stack(torch._foreach_norm(weights, 2, dtype=acc))
        gn = torch.stack(torch._foreach_norm(grads, 2, dtype=acc))
    factor, clipped = clip_factors(gn, wn, clipping, eps, grad_scale)
    torch._foreach_mul_(grads, list(factor.to(grads[0].dtype).unbind(0)))
    return clipped.sum()


def _group_key(t: Tensor) -> tuple[torch.device, torch.dtype, tuple[int, ...] | None]:
    return (t.device, t.dtype, tuple(t.shape) if t.ndim >= 2 else None)


def _total(counts: list[Tensor]) -> Tensor:
    if not counts:
        return torch.zeros((), dtype=torch.int64)
    device = counts[0].device
    return torch.stack([c.to(device) for c in counts]).sum()


def adaptive_clip_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    clipping: float = 0.01,
    eps: float = AGC_EPS,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """Clip each ``grads[i]`` unit-wise against ``params[i]``, in place; return how many units were clipped.

    ``None`` gradients are skipped. This one-shot form groups the tensors on every call; a training loop
    should build an :class:`AdaptiveClipper` once. The count is a 0-d int64 tensor on the first
    gradient's device (no host sync).

    Args:
        params: the weights ``W``.
        grads: their gradients ``G`` (modified in place), same shapes.
        clipping: ``lambda`` > 0.
        eps: the floor on ``||W_i||``, > 0.
        grad_scale: the loss scale if the gradients are still scaled (AMP with an optimizer that unscales
            inside ``step``); ``None`` for true gradients.
    """
    clipping, eps = check_clipping(clipping, eps)
    if len(params) != len(grads):
        raise ValueError(f"params and grads need the same length, got {len(params)} and {len(grads)}")
    groups: dict[tuple[torch.device, torch.dtype, tuple[int, ...] | None], tuple[list[Tensor], list[Tensor]]] = {}
    for p, g in zip(params, grads):
        if g is None:
            continue
        if g.shape != p.shape:
            raise ValueError(f"a gradient of shape {tuple(g.shape)} belongs to a parameter of shape {tuple(p.shape)}")
        ws, gs = groups.setdefault(_group_key(g), ([], []))
        ws.append(p)
        gs.append(g)
    with torch.no_grad():
        counts = [
            _clip_group_(ws, gs, key[2] is not None, clipping, eps, grad_scale) for key, (ws, gs) in groups.items()
        ]
    return _total(counts)


class AdaptiveClipper:
    """AGC over a fixed list of parameters, grouped once (see the module doc for the grouping and cost).

    Each :meth:`clip_` clips the current ``.grad`` of every parameter that has one (frozen or unused
    parameters are skipped, as the optimizer skips them).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> clipper = AdaptiveClipper(lin.parameters())
        >>> clipper.num_units   # 2 rows of the weight + the bias as one unit
        3
        >>> lin(torch.ones(4, 3)).sum().backward()
        >>> int(clipper.clip_(clipping=0.01))
        3
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params = list(params)
        keyed: dict[tuple[torch.device, torch.dtype, tuple[int, ...] | None], list[Tensor]] = {}
        for p in self.params:
            keyed.setdefault(_group_key(p), []).append(p)
        self.groups: list[tuple[bool, list[Tensor]]] = [(key[2] is not None, ps) for key, ps in keyed.items()]
        self.num_units = sum(int(p.shape[0]) if p.ndim >= 2 else 1 for p in self.params)

    def clip_(self, clipping: float = 0.01, eps: float = AGC_EPS, grad_scale: Tensor | None = None) -> Tensor:
        """Clip the gradients in place; return how many units were clipped (0-d int64 tensor, no host sync)."""
        clipping, eps = check_clipping(clipping, eps)
        counts = []
        with torch.no_grad():
            for matrix, params in self.groups:
                ws = [p for p in params if p.grad is not None]
                if ws:
                    gs: list[Tensor] = [p.grad for p in ws]  # type: ignore[misc]
                    counts.append(_clip_group_(ws, gs, matrix, clipping, eps, grad_scale))
        return _total(counts)


def check_exclude(exclude: Any) -> list[str] | None:
    """``exclude`` as a list of module names (``None`` stays ``None``: the last ``nn.Linear``)."""
    if exclude is None:
        return None
    if isinstance(exclude, str):
        return [exclude]
    try:
        names = list(exclude)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"exclude must be None (the last nn.Linear), a module name or a list of them, got {exclude!r}")
    return names


def clipped_parameters(module: nn.Module, exclude: list[str] | None) -> tuple[list[str], dict[str, nn.Parameter]]:
    """``(excluded module names, {name: parameter to clip})``; ``exclude=None`` leaves out the last ``nn.Linear``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> excluded, clipped = clipped_parameters(net, None)
        >>> excluded, list(clipped)
        (['2'], ['0.weight', '0.bias'])
    """
    modules = dict(module.named_modules())
    if exclude is None:
        excluded = [n for n, m in modules.items() if isinstance(m, nn.Linear)][-1:]
    else:
        unknown = [n for n in exclude if n not in modules]
        if unknown:
            known = [n for n in modules if n][:8]
            raise ValueError(f"AGC exclude={exclude!r}: no module named {unknown} (modules: {known} ...)")
        excluded = list(exclude)
    skip = {id(p) for n in excluded for p in modules[n].parameters()}
    return excluded, {n: p for n, p in module.named_parameters() if id(p) not in skip}


def clip_after_closure(clip: Callable[[torch.optim.Optimizer], None]) -> Callable[..., Any]:
    """An optimizer step pre-hook that runs ``clip(optimizer)`` once the step's gradients are final.

    With a closure (Lightning's runs the backward and the hooks), the clip runs right after it; without one
    (e.g. ``GradScaler.step`` after the closure ran), at once.
    """

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            clip(optimizer)
            return None

        def closure_then_clip() -> Any:
            loss = closure()
            clip(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_clip}
        return (args[0], closure_then_clip, *args[2:]), kwargs

    return hook
