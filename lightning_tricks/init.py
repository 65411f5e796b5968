"""Weight initialization of convolution and linear layers, and zero-initialized residual branches.

``init_weights(model, scheme)`` draws every convolution and linear weight of ``model`` from the scheme and
sets their biases to zero. With ``fan_in`` (inputs of one output unit: ``in_channels * kernel area`` for a
convolution), ``fan_out`` (``out_channels * kernel area``) and the gain of the nonlinearity that follows the
layer (``sqrt(2)`` for ReLU):

- ``"kaiming_normal"``: ``N(0, std^2)``, ``std = gain / sqrt(fan_in)`` (He et al. 2015, arXiv:1502.01852);
- ``"kaiming_uniform"``: ``U(-b, b)``, ``b = gain * sqrt(3 / fan_in)`` (the same standard deviation);
- ``"xavier_normal"``: ``std = gain * sqrt(2 / (fan_in + fan_out))`` (Glorot and Bengio 2010);
- ``"xavier_uniform"``: ``b = gain * sqrt(6 / (fan_in + fan_out))``;
- ``"orthogonal"``: the weight reshaped to ``(out, fan_in)`` is ``gain`` times a random matrix with
  orthonormal rows (or columns, when it is taller than wide) (Saxe, McClelland, Ganguli 2013,
  arXiv:1312.6120); its entries have standard deviation ``gain / sqrt(max(out, fan_in))``;
- ``"trunc_normal"``: a normal truncated at two standard deviations, scaled so that the truncated
  distribution's standard deviation is Kaiming's ``gain / sqrt(fan_in)`` (the "variance scaling, truncated
  normal" initializer of TensorFlow and JAX);
- ``"default"``: nothing changes (PyTorch's layer defaults: ``kaiming_uniform`` with ``a = sqrt(5)``, i.e.
  ``std = 1 / sqrt(3 * fan_in)``, and uniform biases).

The output layer (the last convolution or linear layer in module order unless given) is drawn from the same
scheme with ``gain = output_gain``, 0.1 by default: no nonlinearity follows it (the formula's gain would
be 1), and a tenth of that keeps the initial logits near 0, so the initial loss is close to ``log(C)`` as
the CS231n sanity check expects (with gain 1 the logits' variance is that of the features, about 1, and
the initial loss of our ResNet on digits is 10-60% above ``log(10)``). Normalization layers keep their
scale 1 and shift 0. :func:`zero_last_norm_scale` then zeroes the scale of the last
normalization layer of each residual branch, so every residual block starts as the identity (Goyal et al.
2017, arXiv:1706.02677, section 5.1; He et al. 2019 "Bag of Tricks", arXiv:1812.01187).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
    >>> _ = init_weights(net, "kaiming_normal", generator=torch.Generator().manual_seed(0))
    >>> round(float(net[0].weight.std()), 3), round(2**0.5 / 400**0.5, 3), float(net[0].bias.abs().max())
    (0.071, 0.071, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_tricks.checks import check_choice, check_float

__all__ = ["INITS", "TRUNCATED_STD", "fans", "init_weights", "zero_last_norm_scale", "weight_layers"]

INITS = (
    "default",
    "kaiming_normal",
    "kaiming_uniform",
    "xavier_normal",
    "xavier_uniform",
    "orthogonal",
    "trunc_normal",
)

#: the standard deviation of a standard normal truncated to [-2, 2]
TRUNCATED_STD = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def fans(weight: Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a linear ``(out, in)`` or convolution ``(out, in, *kernel)`` weight."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """The convolution and linear layers of ``model`` (subclasses included), in module order."""
    return [m for m in model.modules() if isinstance(m, _WEIGHT_LAYERS)]


def init_weights(
    model: nn.Module,
    scheme: str,
    *,
    nonlinearity: str = "relu",
    output: nn.Module | None = None,
    output_gain: float = 0.1,
    generator: torch.Generator | None = None,
) -> list[nn.Module]:
    """Draw the weights of every convolution and linear layer of ``model`` from ``scheme``, zero their biases.

    Args:
        model: any module; its layers are found by type (:func:`weight_layers`).
        scheme: one of :data:`INITS` (see the module docstring for the formulas).
        nonlinearity: the activation after the hidden layers, for its gain (``torch.nn.init.calculate_gain``).
        output: the output layer; ``None``: the last weight layer in module order.
        output_gain: the output layer's gain (1: the formula's linear gain).
        generator: the draws' generator; ``None``: the global one.

    Returns:
        the layers initialized (empty for ``"default"``).
    """
    check_choice("init", scheme, INITS)
    check_float("output_gain", output_gain, 0.0, low_open=True)
    layers = weight_layers(model)
    if scheme == "default" or not layers:
        return []
    output = layers[-1] if output is None else output
    hidden_gain = nn.init.calculate_gain(nonlinearity)  # type: ignore[arg-type]  # torch's stub lists names
    for layer in layers:
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(
                f"init={scheme!r}: {type(layer).__name__} has a parametrized weight (weight norm?); "
                "initialize the weights before adding the parametrization"
            )
        weight = layer.weight
        assert isinstance(weight, Tensor)
        with torch.no_grad():
            _draw(weight, scheme, output_gain if layer is output else hidden_gain, generator)
            bias = getattr(layer, "bias", None)
            if isinstance(bias, Tensor):
                bias.zero_()
    return layers


def _draw(weight: Tensor, scheme: str, gain: float, generator: torch.Generator | None) -> None:
    fan_in, fan_out = fans(weight)
    if scheme == "kaiming_normal":
        weight.normal_(0.0, gain / math.sqrt(fan_in), generator=generator)
    elif scheme == "kaiming_uniform":
        bound = gain * math.sqrt(3.0 / fan_in)
        weight.uniform_(-bound, bound, generator=generator)
    elif scheme == "xavier_normal":
        weight.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
    elif scheme == "xavier_uniform":
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        weight.uniform_(-bound, bound, generator=generator)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight, gain=gain, generator=generator)
    else:  # trunc_normal
        std = gain / math.sqrt(fan_in) / TRUNCATED_STD
        nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)


def zero_last_norm_scale(branches: Iterable[nn.Module]) -> list[nn.Module]:
    """Set the scale of the last normalization layer (BatchNorm, GroupNorm, LayerNorm) of each residual
    branch to 0, so that ``x + branch(x)`` starts as ``x``; returns those layers.

    Raises ``ValueError`` for a branch without an affine normalization layer (nothing to zero there).
    """
    zeroed: list[nn.Module] = []
    for branch in branches:
        norms = [m for m in branch.modules() if isinstance(m, _NORMS) and isinstance(m.weight, Tensor)]
        if not norms:
            raise ValueError(
                f"zero_init_residual: the residual branch {type(branch).__name__} has no normalization layer "
                "with a scale to zero (use norm=batch or norm=layer)"
            )
        with torch.no_grad():
            norms[-1].weight.zero_()
        zeroed.append(norms[-1])
    return zeroed
