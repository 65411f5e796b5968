"""LightningModule building blocks: optimizers and parameter groups from config, soft-target loss.

- :func:`param_groups_weight_decay` puts weight decay on weights only (no decay on biases and on
  normalization parameters), the rule of Goyal et al. 2017 / He et al. 2019 ("no bias decay").
- :func:`build_optimizer` makes SGD (momentum, Nesterov), AdaGrad, RMSProp, Adam or AdamW from a name.
- :func:`classification_loss` is cross-entropy for hard labels or soft (mixup-style) targets, with
  label smoothing.
- :class:`ClassificationMixin` gives any LightningModule with a ``forward`` the training, validation,
  test and predict steps, torchmetrics accuracy and ``configure_optimizers`` from an
  :class:`OptimizerConfig`; :class:`Classifier` is the ready-made module used by ``train.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks._lightning import LightningModule

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
    decay, no_decay = [], []
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
            raise ValueError("nesterov=True needs name='sgd' and momentum > 0, "
                             f"got name={self.name!r}, momentum={self.momentum!r}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer betas must be two numbers in [0, 1), got {self.betas!r}")

    @classmethod
    def from_any(cls, cfg: OptimizerConfig | Mapping[str, Any] | None) -> OptimizerConfig:
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
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


def classification_loss(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy for hard labels ``(N,)`` or soft targets ``(N, C)`` (rows summing to 1).

    Label smoothing ``eps`` replaces the target distribution ``q`` by ``(1 - eps) q + eps / C``
    (Szegedy et al. 2016, arXiv:1512.00567), for hard and soft targets alike.
    """
    if target.dtype.is_floating_point:
        target = target.to(logits.dtype)
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


class ClassificationMixin:
    """Steps, metrics and optimizer for a classifier; mix into a ``LightningModule`` with a ``forward``.

    The host calls :meth:`init_classification` in ``__init__``. Batches are ``(x, y)`` where ``y`` is
    class indices or soft targets ``(N, C)``. Logged: ``train/loss``, ``train/acc``, ``val/loss``,
    ``val/acc``, ``test/loss``, ``test/acc``.
    """

    num_classes: int
    label_smoothing: float
    optimizer_config: OptimizerConfig

    def init_classification(
        self, num_classes: int, optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.optimizer_config = OptimizerConfig.from_any(optimizer)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The training loss; label smoothing applies in training only."""
        smoothing = self.label_smoothing if self.training else 0.0
        return classification_loss(logits, target, smoothing)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss(logits, y)
        hard = y.argmax(dim=1) if y.dtype.is_floating_point else y
        acc = getattr(self, f"{stage}_acc")
        acc(logits.detach(), hard)
        train = stage == "train"
        # eval losses are averaged over ranks (once per epoch) so every rank decides on the same value;
        # the training loss is not synced (that would cost a collective per step)
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=True, prog_bar=True, batch_size=x.shape[0],
                 sync_dist=not train)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=not train)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self, self.optimizer_config)  # type: ignore[arg-type]


class Classifier(ClassificationMixin, LightningModule):
    """A LightningModule around any ``nn.Module`` classifier ``net``.

    Example:
        >>> from lightning_tricks.models import MLP
        >>> module = Classifier(MLP((1, 8, 8), 10), num_classes=10, optimizer={"name": "adamw", "lr": 1e-3})
        >>> type(module.configure_optimizers()).__name__
        'AdamW'
    """

    def __init__(
        self, net: nn.Module, num_classes: int,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None, label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.init_classification(num_classes, optimizer, label_smoothing)
        opt = dataclasses.asdict(self.optimizer_config)
        self.save_hyperparameters({"num_classes": num_classes, "optimizer": opt, "label_smoothing": label_smoothing})

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

