"""Optimizers and parameter groups from a config: the pure part of the training recipe (no Lightning).

- :func:`param_groups_weight_decay` puts weight decay on weights only (no decay on biases and on
  normalization parameters), the rule of Goyal et al. 2017 / He et al. 2019 ("no bias decay");
  :func:`no_decay_parameter_names` says which parameters those are (used by L1 and fine-tuning too).
- :func:`build_optimizer` makes SGD (momentum, Nesterov), AdaGrad, RMSProp, Adam or AdamW from an
  :class:`OptimizerConfig` (``conf/optimizer/*.yaml``).

Example:
    >>> opt = build_optimizer(nn.Linear(2, 2), {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4})
    >>> [(g["name"], g["weight_decay"]) for g in opt.param_groups]
    [('decay', 0.0005), ('no_decay', 0.0)]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "NORM_TYPES",
    "WEIGHT_NORM_SCALE",
    "no_decay_parameter_names",
    "param_groups_weight_decay",
    "OptimizerConfig",
    "OPTIMIZERS",
    "build_optimizer",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = NORM_TYPES + (nn.RMSNorm,)


WEIGHT_NORM_SCALE = "parametrizations.weight.original0"  # the length g of torch's weight_norm


def no_decay_parameter_names(module: nn.Module) -> set[str]:
    """Names of the parameters that should get no weight decay: biases and normalization parameters.

    Normalization parameters are those of norm layers (BatchNorm, LayerNorm, GroupNorm, ...) and the
    length ``g`` of weight-normalized layers (``torch.nn.utils.parametrizations.weight_norm``), which
    is a scale like a norm layer's weight.
    """
    names = set()
    for mod_name, mod in module.named_modules():
        is_norm = isinstance(mod, NORM_TYPES)
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name == "bias" or full.endswith(WEIGHT_NORM_SCALE):
                names.add(full)
    return names


def param_groups_weight_decay(
    module: nn.Module, weight_decay: float, no_decay_bias_norm: bool = True
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group (biases, norm layers).

    With ``no_decay_bias_norm=False`` all parameters are one group decayed by ``weight_decay``.
    Frozen parameters (``requires_grad=False``) are left out. Empty groups are dropped. Each group
    carries a ``"name"`` (``"decay"`` / ``"no_decay"``) so callbacks and loggers can tell them apart.

    Example:
        >>> groups = param_groups_weight_decay(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), 1e-4)
        >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in groups]
        [('decay', 1, 0.0001), ('no_decay', 3, 0.0)]
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    skip = no_decay_parameter_names(module) if no_decay_bias_norm else set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@dataclasses.dataclass
class OptimizerConfig:
    """Everything that picks and sets up an optimizer; mirrors ``conf/optimizer/*.yaml``.

    ``momentum`` is used by SGD and RMSProp, ``nesterov`` by SGD, ``betas`` by Adam/AdamW,
    ``alpha`` by RMSProp; the rest are shared.
    """

    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 0.0
    no_decay_bias_norm: bool = True
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.99

    def __post_init__(self) -> None:
        self.name = str(self.name).lower()
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer name {self.name!r}; choose one of {sorted(OPTIMIZERS)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optimizer lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optimizer momentum must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError(
                f"nesterov=True needs name='sgd' and momentum > 0, got name={self.name!r}, momentum={self.momentum!r}"
            )
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer betas must be two numbers in [0, 1), got {self.betas!r}")

    @classmethod
    def from_any(cls, cfg: OptimizerConfig | Mapping[str, Any] | None) -> OptimizerConfig:
        if isinstance(cfg, OptimizerConfig):
            return cfg
        cfg = cfg or {}
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(cfg) - known)
        if extra:
            raise ValueError(f"unknown optimizer option(s) {extra}; allowed: {sorted(known)}")
        return cls(**dict(cfg))


def _sgd(groups: list, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov)


def _adagrad(groups: list, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(groups, lr=c.lr, eps=c.eps)


def _rmsprop(groups: list, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=c.lr, alpha=c.alpha, eps=c.eps, momentum=c.momentum)


def _adam(groups: list, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=c.lr, betas=c.betas, eps=c.eps)


def _adamw(groups: list, c: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, eps=c.eps)


OPTIMIZERS = {"sgd": _sgd, "adagrad": _adagrad, "rmsprop": _rmsprop, "adam": _adam, "adamw": _adamw}


def build_optimizer(module: nn.Module, cfg: OptimizerConfig | Mapping[str, Any] | None) -> torch.optim.Optimizer:
    """The optimizer named in ``cfg`` over ``module``'s parameters, weight decay on weights only.

    Weight decay is set per group (see :func:`param_groups_weight_decay`); for AdamW it is the
    decoupled decay, for the others the L2 term added to the gradient.
    """
    c = OptimizerConfig.from_any(cfg)
    groups = param_groups_weight_decay(module, c.weight_decay, c.no_decay_bias_norm)
    if not groups:
        raise ValueError("the module has no trainable parameters to optimize")
    return OPTIMIZERS[c.name](groups, c)
