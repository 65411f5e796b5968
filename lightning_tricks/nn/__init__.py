"""Layers: IC blocks, DropConnect, drop path (stochastic depth), fractional max pooling, weight norm.

- :class:`ICBlock` (BatchNorm -> Dropout before a weight layer) and the block builders
  :func:`linear_block`, :func:`conv_block`, :func:`mlp_stack`, :func:`conv_stack` with the
  ``norm="batch" | "layer" | "weight" | "ic" | "none"`` switch (:mod:`lightning_tricks.nn.norm`:
  :func:`check_norm`, :func:`norm_layer`; ``"classic"`` is an alias of ``"batch"``).
- :class:`DropConnectLinear`, :class:`DropConnectConv2d`, :func:`dropconnect_weight`: drop weights.
- :class:`DropPath`, :func:`drop_path`, :func:`drop_path_rates`: stochastic depth on residual branches.
- :class:`FractionalMaxPool2d`: random pooling regions in training, fixed ones in eval.
- :func:`apply_weight_norm`, :func:`remove_weight_norm`: weight normalization on chosen layers.
- :class:`PatchWhitening`, :func:`fit_patch_whitening`: a frozen first layer whitening image patches.
"""

from lightning_tricks.nn.builders import conv_block, conv_stack, linear_block, mlp_stack
from lightning_tricks.nn.drop import DropPath, drop_path, drop_path_rates
from lightning_tricks.nn.dropconnect import (
    DropConnectConv2d,
    DropConnectLinear,
    dropconnect_weight,
)
from lightning_tricks.nn.ic import ICBlock
from lightning_tricks.nn.norm import NORMS, check_norm, norm_layer
from lightning_tricks.nn.pool import FractionalMaxPool2d
from lightning_tricks.nn.weight_norm import (
    apply_weight_norm,
    remove_weight_norm,
    weight_normed_layers,
)
from lightning_tricks.nn.whitening import PatchWhitening, fit_patch_whitening

__all__ = [
    "ICBlock",
    "NORMS",
    "check_norm",
    "norm_layer",
    "linear_block",
    "conv_block",
    "mlp_stack",
    "conv_stack",
    "DropPath",
    "drop_path",
    "drop_path_rates",
    "DropConnectLinear",
    "DropConnectConv2d",
    "dropconnect_weight",
    "FractionalMaxPool2d",
    "apply_weight_norm",
    "remove_weight_norm",
    "weight_normed_layers",
    "PatchWhitening",
    "fit_patch_whitening",
]
