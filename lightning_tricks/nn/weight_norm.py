"""Weight normalization on chosen layers through torch parametrizations.

Salimans and Kingma, "Weight Normalization: A Simple Reparameterization to Accelerate Training of
Deep Neural Networks", 2016, arXiv:1602.07868: ``w = g * v / ||v||`` with the norm taken per output
unit (``dim=0``), so the length ``g`` and the direction ``v`` are learned separately. Applied with
``torch.nn.utils.parametrizations.weight_norm``; the parameters become
``<layer>.parametrizations.weight.original0`` (``g``) and ``...original1`` (``v``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from lightning_tricks.nn.naming import compile_patterns, matches

__all__ = ["WEIGHT_LAYERS", "apply_weight_norm", "remove_weight_norm", "weight_normed_layers"]

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _is_weight_normed(module: nn.Module, name: str = "weight") -> bool:
    if not parametrize.is_parametrized(module, name):
        return False
    return any(type(p).__name__ == "_WeightNorm" for p in module.parametrizations[name])  # type: ignore[index]


def weight_normed_layers(module: nn.Module) -> list[str]:
    """Names of the submodules whose ``weight`` is weight-normalized."""
    return [n for n, m in module.named_modules() if _is_weight_normed(m)]


def apply_weight_norm(
    module: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = WEIGHT_LAYERS,
    dim: int = 0,
) -> list[str]:
    """Weight-normalize the ``weight`` of every chosen layer of ``module`` in place; return their names.

    Args:
        module: the model.
        include: regex(es) on submodule names (``re.search``); ``None`` takes every layer of ``types``.
        exclude: regex(es) of names to leave out (e.g. ``"head"``).
        types: layer classes to consider (Linear, Conv and ConvTranspose by default).
        dim: the dimension kept by the norm (0 = one norm per output unit).

    Raises:
        ValueError: if no layer matches (never a silent no-op).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> apply_weight_norm(net, exclude=r"^2$")
        ['0']
    """
    inc = compile_patterns(include, "include")
    exc = compile_patterns(exclude, "exclude")
    chosen = []
    for name, m in module.named_modules():
        if not isinstance(m, types) or getattr(m, "weight", None) is None or _is_weight_normed(m):
            continue
        if not matches(name, inc) or matches(name, exc, default=False):
            continue
        chosen.append((name, m))
    if not chosen:
        raise ValueError(
            f"apply_weight_norm matched no layer (include={include!r}, exclude={exclude!r}, "
            f"types={[t.__name__ for t in types]})"
        )
    for _, m in chosen:
        weight_norm(m, name="weight", dim=dim)
    return [n for n, _ in chosen]


def remove_weight_norm(module: nn.Module) -> list[str]:
    """Fold every weight normalization back into a plain ``weight`` (same values); return the layer names."""
    names = weight_normed_layers(module)
    modules = dict(module.named_modules())
    for n in names:
        parametrize.remove_parametrizations(modules[n], "weight", leave_parametrized=True)
    return names
