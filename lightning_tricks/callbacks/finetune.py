"""Transfer learning: train the head on a frozen backbone, then fine-tune the backbone at lower LRs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    MisconfigurationException,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_tricks.finetune import (
    backbone_param_groups,
    check_finetune_args,
    freeze,
    frozen_part_check,
    params_by_name,
    resolve_module,
    set_bn_eval,
    unfreeze,
    weight_decay_rule,
)


class FreezeUnfreeze(Callback):
    """Freeze the backbone, train the head, then unfreeze the backbone at discriminative LRs.

    While frozen the backbone has ``requires_grad=False`` and its BatchNorm layers are in eval mode (unless
    ``train_bn``). At the start of epoch ``unfreeze_at_epoch`` it joins the *existing* optimizer as new
    groups at ``head_lr * lr_factor * layer_decay ** depth``, so the head's optimizer state carries on;
    :class:`~lightning_tricks.callbacks.LRSchedule` schedules them from their ``initial_lr``. The module's
    ``configure_optimizers`` must only take parameters with ``requires_grad``. Which part is the head, the
    weight-decay rule, resume and the comparison with Lightning's ``BackboneFinetuning``:
    ``docs/method_cards.md``.

    Args:
        backbone: attribute path of the backbone in the LightningModule (or the unique submodule whose
            path ends with it).
        unfreeze_at_epoch: the epoch (0-based) at whose start the backbone is unfrozen; ``None`` keeps
            it frozen for the whole fit (a pure feature extractor).
        lr_factor: backbone LR / head LR, > 0.
        layer_decay: ``None`` (one LR for the backbone) or a factor in ``(0, 1]`` per layer of depth.
        train_bn: keep the backbone's BatchNorm layers trainable (and in training mode) while frozen.

    Example:
        >>> cb = FreezeUnfreeze(backbone="backbone", unfreeze_at_epoch=5, lr_factor=0.1, layer_decay=0.7)
        >>> cb.state_key
        "FreezeUnfreeze{'backbone': 'backbone', 'unfreeze_at_epoch': 5}"
    """

    def __init__(
        self,
        backbone: str = "backbone",
        unfreeze_at_epoch: int | None = 1,
        lr_factor: float = 0.1,
        layer_decay: float | None = None,
        train_bn: bool = False,
    ) -> None:
        super().__init__()
        check_finetune_args(backbone, unfreeze_at_epoch, lr_factor, layer_decay)
        self.backbone = backbone
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.lr_factor = float(lr_factor)
        self.layer_decay = None if layer_decay is None else float(layer_decay)
        self.train_bn = bool(train_bn)
        self.unfrozen = False
        self.unfrozen_at: int | None = None
        self.groups: list[dict[str, Any]] = []  # the added groups without their params (names instead)
        self._module: nn.Module | None = None
        self._name = backbone
        self._frozen_bns: list[Any] = []  # the BatchNorm layers kept in eval mode
        self._inner_head: list[nn.Parameter] = []  # a classifier inside the backbone (timm's get_classifier())

    @property
    def state_key(self) -> str:
        return self._generate_state_key(backbone=self.backbone, unfreeze_at_epoch=self.unfreeze_at_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": self.unfrozen, "unfrozen_at": self.unfrozen_at, "groups": [dict(g) for g in self.groups]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = bool(state_dict.get("unfrozen", False))
        self.unfrozen_at = state_dict.get("unfrozen_at")
        self.groups = [dict(g) for g in state_dict.get("groups", [])]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._name, self._module = resolve_module(pl_module, self.backbone)
        self._inner_head = frozen_part_check(self._name, self._module)
        self._frozen_bns = freeze(self._module, train_bn=self.train_bn, keep=self._inner_head)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizer = self._optimizer(trainer)
        assert self._module is not None
        frozen = {id(p) for p in self._module.parameters() if not p.requires_grad}
        held = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) in frozen)
        if held:
            raise MisconfigurationException(
                f"FreezeUnfreeze: the optimizer already holds {held} frozen parameters of {self._name!r}; "
                "build the optimizer from parameters with requires_grad only (e.g. "
                "lightning_tricks.mixins.param_groups_weight_decay), or they would train at the head's LR "
                "after unfreezing"
            )
        if len(trainer.optimizers) > 1:
            rank_zero_warn("FreezeUnfreeze: several optimizers; the backbone groups go to the first one")
        if self.unfrozen:  # resumed after the unfreeze: rebuild the groups before the optimizer state loads
            unfreeze(self._module)
            self._frozen_bns = []
            for meta in self.groups:
                group = {k: v for k, v in meta.items() if k != "param_names"}
                group["params"] = params_by_name(pl_module, meta["param_names"])
                if "param_names" in optimizer.param_groups[0]:
                    group["param_names"] = list(meta["param_names"])
                optimizer.add_param_group(group)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.unfrozen:
            set_bn_eval(self._frozen_bns)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._follow_epoch(trainer, pl_module, always_eval=True)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # a resume that skips on_train_epoch_start must still unfreeze on time (O(1) check per step)
        self._follow_epoch(trainer, pl_module, always_eval=False)

    def _follow_epoch(self, trainer: Trainer, pl_module: LightningModule, always_eval: bool) -> None:
        if self.unfrozen:
            return
        if self.unfreeze_at_epoch is not None and trainer.current_epoch >= self.unfreeze_at_epoch:
            self._unfreeze(trainer, pl_module)
        # something (a user's on_validation_model_train, model.train()) may have switched the frozen
        # BatchNorm layers back to training mode
        elif always_eval or (self._frozen_bns and self._frozen_bns[0].training):
            set_bn_eval(self._frozen_bns)

    def _optimizer(self, trainer: Trainer) -> torch.optim.Optimizer:
        if not trainer.optimizers:
            raise MisconfigurationException("FreezeUnfreeze needs an optimizer (configure_optimizers returned none)")
        return trainer.optimizers[0]

    def _unfreeze(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._module is not None
        optimizer = self._optimizer(trainer)
        head = optimizer.param_groups[0]
        weight_decay, split = weight_decay_rule(getattr(pl_module, "optimizer_config", None), optimizer.param_groups)
        in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
        unfreeze(self._module)
        self._frozen_bns = []
        groups = backbone_param_groups(
            self._module,
            self._name,
            head_lr=float(head["lr"]),
            lr_factor=self.lr_factor,
            layer_decay=self.layer_decay,
            weight_decay=weight_decay,
            split_no_decay=split,
            exclude=in_optimizer,
            base_lr=head.get("initial_lr"),
            head=self._inner_head,
        )
        named_groups = "param_names" in head
        self.groups = []
        for group in groups:
            names = group["param_names"] if named_groups else group.pop("param_names")
            group.setdefault("initial_lr", group["lr"])  # the base LR the LR owner (LRSchedule) schedules
            optimizer.add_param_group(group)
            self.groups.append(
                {**{k: v for k, v in optimizer.param_groups[-1].items() if k != "params"}, "param_names": list(names)}
            )
        self.unfrozen, self.unfrozen_at = True, trainer.current_epoch
        lrs = ", ".join(f"{g['name']}={g['lr']:.3g}" for g in self.groups)
        rank_zero_info(
            f"FreezeUnfreeze: unfroze {self._name!r} at epoch {trainer.current_epoch}; "
            f"head LR {float(head['lr']):.3g}, new groups: {lrs}"
        )
        if trainer.lr_scheduler_configs:
            rank_zero_warn(
                "FreezeUnfreeze: torch LR schedulers fix their base LRs when built, so they do not "
                "schedule the backbone groups added now (they keep the LRs above); use "
                "lightning_tricks.callbacks.LRSchedule, or a scheduler that reads each group's LR"
            )
