"""LightningModule building blocks: a classification mixin and a ready-made classifier.

The pure parts live in cores that import no Lightning and are re-exported here for convenience:
:mod:`lightning_tricks.optim` (:func:`param_groups_weight_decay`, no weight decay on biases and norm
parameters; :func:`build_optimizer` from an :class:`OptimizerConfig`) and :mod:`lightning_tricks.losses`
(:func:`classification_loss`, cross-entropy for hard labels or soft targets, with label smoothing).

- :class:`ClassificationMixin` gives any LightningModule with a ``forward`` the training, validation,
  test and predict steps, torchmetrics accuracy and ``configure_optimizers`` from an
  :class:`OptimizerConfig`; :class:`Classifier` is the ready-made module used by ``train.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks._lightning import LightningModule
from lightning_tricks.losses import classification_loss
from lightning_tricks.optim import (
    NORM_TYPES,
    OPTIMIZERS,
    WEIGHT_NORM_SCALE,
    OptimizerConfig,
    build_optimizer,
    no_decay_parameter_names,
    param_groups_weight_decay,
)

__all__ = [
    "ClassificationMixin",
    "Classifier",
    # re-exported from the cores
    "NORM_TYPES",
    "OPTIMIZERS",
    "WEIGHT_NORM_SCALE",
    "OptimizerConfig",
    "build_optimizer",
    "classification_loss",
    "no_decay_parameter_names",
    "param_groups_weight_decay",
]


class ClassificationMixin:
    """Steps, metrics and optimizer for a classifier; mix into a ``LightningModule`` with a ``forward``.

    The host calls :meth:`init_classification` in ``__init__``. Batches are ``(x, y)`` where ``y`` is
    class indices or soft targets ``(N, C)``. Logged: ``train/loss``, ``train/acc``, ``val/loss``,
    ``val/acc``, ``test/loss``, ``test/acc``.
    """

    num_classes: int
    label_smoothing: float
    optimizer_config: OptimizerConfig
    # provided by the LightningModule this class is mixed into
    training: bool
    log: Any

    if TYPE_CHECKING:  # for type checkers only: at run time the host module's __call__ must win the MRO

        def __call__(self, x: Tensor) -> Tensor: ...

    def init_classification(
        self,
        num_classes: int,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
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
        self.log(
            f"{stage}/loss",
            loss,
            on_step=train,
            on_epoch=True,
            prog_bar=True,
            batch_size=x.shape[0],
            sync_dist=not train,
        )
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=not train)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    @torch.no_grad()
    def evaluation_outputs(self, batch: Any, stage: str) -> dict[str, Tensor]:
        """Per-sample values of the metrics ``<stage>_step`` logs, without logging or touching any state.

        Returns ``{"<stage>/loss": (N,), "<stage>/acc": (N,)}``; the mean over all samples of an epoch
        is the epoch value logged by ``<stage>_step``. Used by ``EMA``/``SWA(evaluate="both")`` to
        evaluate the raw weights a second time; any module can implement it with its own names.
        """
        x, y = batch[0], batch[1]
        logits = self(x)
        hard = y.argmax(dim=1) if y.dtype.is_floating_point else y
        smoothing = self.label_smoothing if self.training else 0.0  # as self.loss: smoothing in training only
        loss = classification_loss(logits, y, smoothing, reduction="none")
        return {f"{stage}/loss": loss, f"{stage}/acc": (logits.argmax(dim=-1) == hard).float()}

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
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = net
        self.init_classification(num_classes, optimizer, label_smoothing)
        opt = dataclasses.asdict(self.optimizer_config)
        self.save_hyperparameters({"num_classes": num_classes, "optimizer": opt, "label_smoothing": label_smoothing})

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
