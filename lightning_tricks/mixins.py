"""LightningModule building blocks: a classification mixin and a ready-made classifier.

The pure parts live in cores that import no Lightning and are re-exported here for convenience:
:mod:`lightning_tricks.optim` (:func:`param_groups_weight_decay`, no weight decay on biases and norm
parameters; :func:`build_optimizer` from an :class:`OptimizerConfig`) and :mod:`lightning_tricks.losses`
(:func:`classification_loss`, cross-entropy for hard labels or soft targets, with label smoothing).

- :class:`ClassificationMixin` gives any LightningModule with a ``forward`` the training, validation,
  test and predict steps, torchmetrics accuracy and ``configure_optimizers`` from an
  :class:`OptimizerConfig`; :class:`Classifier` is the ready-made module used by ``train.py``.
- Test-time augmentation (``tta``, :func:`lightning_tricks.augment.tta_predict`): the test and predict
  steps average the softmax over flipped / shifted views of each batch. Validation does not use it:
  ``val/*`` drives checkpointing and early stopping every epoch, where V times the cost buys nothing,
  and stays comparable between runs with and without TTA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks._lightning import LightningModule, attached_trainer, rank_zero_warn
from lightning_tricks.augment import TTA_MODES, check_tta, tta_predict
from lightning_tricks.checks import check_float, check_int
from lightning_tricks.losses import classification_loss, probability_nll
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
    "TTA_MODES",
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

    With ``tta`` other than ``"none"`` the test step (and ``predict_step``) scores the mean of the
    softmax over the views of :func:`~lightning_tricks.augment.tta_views` (``"flip"``: x and its mirror
    image; ``"crop"``: 5 shifted crops; ``"flip_crop"``: both, 10 views): ``test/acc`` is its argmax's
    accuracy and ``test/loss`` its negative log-likelihood. A flip is refused at ``setup`` when the
    DataModule says ``flip=False`` (mirror images change the class, e.g. digits). ``tta="none"`` runs
    exactly the plain path.
    """

    #: the names the training step's metrics reach ``trainer.callback_metrics`` under (``train/loss`` is
    #: logged per step and per epoch, ``train/acc`` per epoch)
    training_metrics: tuple[str, ...] = ("train/loss", "train/loss_step", "train/loss_epoch", "train/acc")

    num_classes: int
    label_smoothing: float
    tta: str
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
        tta: str = "none",
    ) -> None:
        check_int("num_classes", num_classes, 2)
        check_float("label_smoothing", label_smoothing, 0, 1, high_open=True)
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.tta = check_tta(tta)
        self.optimizer_config = OptimizerConfig.from_any(optimizer)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The training loss; label smoothing applies in training only."""
        smoothing = self.label_smoothing if self.training else 0.0
        return classification_loss(logits, target, smoothing)

    # -- test-time augmentation ----------------------------------------------------------------
    def check_tta(self, warn: bool = False) -> None:
        """Refuse a flip TTA when the Trainer's DataModule says ``flip=False`` (one-line ``ValueError``).

        With ``warn``, also warn when the DataModule trains without any augmentation (``augment`` empty
        and no ``batch_augment``): mirror images are then new to the model, and averaging over them
        hurts (Fashion-MNIST, MLP, 2 epochs: test accuracy 0.841 -> 0.723 with ``tta="flip"``).
        """
        if "flip" not in self.tta:
            return
        trainer = attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        check_tta(self.tta, bool(getattr(datamodule, "flip", True)), f"the DataModule {type(datamodule).__name__}")
        augment = getattr(datamodule, "augment", None)
        trains_plain = isinstance(augment, (tuple, list)) and not augment
        if warn and trains_plain and getattr(datamodule, "batch_augment", "unknown") is None:
            rank_zero_warn(
                f"tta={self.tta!r} with a DataModule that trains without augmentation (augment='none'): the "
                "model never saw mirror images, and averaging over them usually lowers accuracy; train with "
                "flips (e.g. data.augment=crop_flip) or use tta='none'"
            )

    def setup(self, stage: str) -> None:
        self.check_tta(warn=True)  # at fit start too: a run must not train for hours and then fail at test
        parent = getattr(super(), "setup", None)
        if parent is not None:
            parent(stage)

    def tta_probs(self, x: Tensor) -> Tensor:
        """Class probabilities of ``x`` with this module's test-time augmentation (float32)."""
        self.check_tta()
        return tta_predict(self, x, self.tta)

    def _uses_tta(self, stage: str) -> bool:
        return self.tta != "none" and stage in ("test", "predict")

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        hard = y.argmax(dim=1) if y.dtype.is_floating_point else y
        acc = getattr(self, f"{stage}_acc")
        if self._uses_tta(stage):
            probs = self.tta_probs(x)
            loss = probability_nll(probs, y)
            acc(probs, hard)
        else:
            logits = self(x)
            loss = self.loss(logits, y)
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
        hard = y.argmax(dim=1) if y.dtype.is_floating_point else y
        if self._uses_tta(stage):
            probs = self.tta_probs(x)
            return {
                f"{stage}/loss": probability_nll(probs, y, "none"),
                f"{stage}/acc": (probs.argmax(-1) == hard).float(),
            }
        logits = self(x)
        smoothing = self.label_smoothing if self.training else 0.0  # as self.loss: smoothing in training only
        loss = classification_loss(logits, y, smoothing, reduction="none")
        return {f"{stage}/loss": loss, f"{stage}/acc": (logits.argmax(dim=-1) == hard).float()}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self._uses_tta("predict"):
            return self.tta_probs(x)
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self, self.optimizer_config)  # type: ignore[arg-type]


class Classifier(ClassificationMixin, LightningModule):
    """A LightningModule around any ``nn.Module`` classifier ``net``.

    Args:
        net: the classifier, inputs -> logits.
        num_classes: number of classes, >= 2.
        optimizer: an :class:`OptimizerConfig` or its fields as a mapping (default SGD).
        label_smoothing: ``eps`` in [0, 1), in the training loss only.
        tta: test-time augmentation of the test and predict steps: ``"none"``, ``"flip"``, ``"crop"``
            or ``"flip_crop"`` (see :class:`ClassificationMixin`).

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
        tta: str = "none",
    ) -> None:
        super().__init__()
        self.net = net
        self.init_classification(num_classes, optimizer, label_smoothing, tta)
        opt = dataclasses.asdict(self.optimizer_config)
        self.save_hyperparameters(
            {"num_classes": num_classes, "optimizer": opt, "label_smoothing": label_smoothing, "tta": tta}
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
