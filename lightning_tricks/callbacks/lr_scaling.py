"""The linear (or square-root) scaling rule: base LR proportional to the global batch size."""

from __future__ import annotations

from typing import Any

from lightning_tricks._lightning import (
    BATCH_SIZE_FINDER_TYPES,
    Callback,
    LightningModule,
    MisconfigurationException,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
    trainer_callbacks,
)
from lightning_tricks.callbacks.lr_schedule import LRSchedule, change_base_lrs
from lightning_tricks.checks import check_choice, check_int
from lightning_tricks.schedules import SCALING_RULES as RULES
from lightning_tricks.schedules import (
    batch_size_attribute,
    global_batch_size,
    loader_batch_size,
    scaling_factor,
    scaling_message,
)

__all__ = ["LinearScaling", "find_batch_size", "global_batch_size", "scaling_factor"]


def find_batch_size(trainer: Trainer, pl_module: LightningModule) -> tuple[int, str] | None:
    """The per-device batch size and where it was found, or ``None``.

    Looks at ``datamodule.batch_size``, ``module.batch_size`` / ``module.hparams.batch_size``, then the
    train dataloader's ``batch_size`` (or its ``batch_sampler.batch_size``).
    """
    found = batch_size_attribute(getattr(trainer, "datamodule", None), pl_module)
    if found is not None:
        return found
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()  # what trainer.estimated_stepping_batches does too
        loader = trainer.train_dataloader
    return loader_batch_size(loader)


class LinearScaling(Callback):
    """Scale every parameter group's base LR by the global batch size over a reference batch size.

    ``lr = lr * (B / reference_batch_size)`` (``rule="sqrt"``: ``lr * sqrt(B / reference)``) with ``B =
    per-device batch x accumulate_grad_batches x world size`` (Goyal et al. 2017, arXiv:1706.02677), once
    at fit start through :func:`~lightning_tricks.callbacks.lr_schedule.change_base_lrs`. A batch-size
    finder runs first and the LR follows the size it finds. Details: ``docs/method_cards.md``.

    Args:
        reference_batch_size: the global batch size the configured LR was tuned for.
        rule: ``"linear"`` or ``"sqrt"``.
        batch_size: per-device batch size; default: ``datamodule.batch_size``, ``module.batch_size`` or
            the train dataloader's ``batch_size`` (an error says so when none is found).

    Example:
        >>> scaling = LinearScaling(reference_batch_size=256)  # SGD lr=0.1 for 256 -> 0.4 at 4 x 256
    """

    def __init__(self, reference_batch_size: int = 256, rule: str = "linear", batch_size: int | None = None) -> None:
        check_int("reference_batch_size", reference_batch_size, 1)
        check_choice("rule", rule, RULES)
        check_int("batch_size", batch_size, 1, allow_none=True)
        self.reference_batch_size = reference_batch_size
        self.rule = rule
        self.batch_size = batch_size
        self.factor: float | None = None
        self.global_batch_size: int | None = None
        self._resuming_from: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(reference_batch_size=self.reference_batch_size, rule=self.rule)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            # the user's checkpoint: a batch-size finder's temporary one shows in trainer.ckpt_path later
            self._resuming_from = trainer.ckpt_path

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        finder = self._check_finders(trainer)
        if trainer.ckpt_path and self.factor is not None:  # restored from the checkpoint: a resumed run
            # the checkpoint's optimizer state holds the scaled LRs; finding the batch size here could set up the
            # train data before the checkpoint's RNG state is back, and shuffle the resumed epoch differently
            rank_zero_info(
                f"LinearScaling: resuming from {self._resuming_from}, whose LRs are already x {self.factor:.4g}"
            )
            return
        if self.batch_size is not None:
            per_device, where = self.batch_size, "LinearScaling(batch_size=...)"
        else:
            found = find_batch_size(trainer, pl_module)
            if found is None:
                raise ValueError(
                    "LinearScaling could not find the per-device batch size: no int `batch_size` on the "
                    "datamodule, the module or its hparams, and the train dataloader has none; "
                    "pass LinearScaling(batch_size=...)"
                )
            per_device, where = found
            if finder is not None and finder.optimal_batch_size == per_device:
                where += f", found by {type(finder).__name__}"
        accumulate = int(trainer.accumulate_grad_batches)
        world = int(trainer.world_size)
        self.global_batch_size = global_batch_size(per_device, accumulate, world)
        self.factor = scaling_factor(self.global_batch_size, self.reference_batch_size, self.rule)
        if not trainer.optimizers:
            rank_zero_warn("LinearScaling found no optimizer to scale")
            return
        factor = self.factor
        changes = [f"{old:.4g} -> {new:.4g}" for _, _, old, new in change_base_lrs(trainer, lambda i, j, x: x * factor)]
        for config in trainer.lr_scheduler_configs:
            rank_zero_warn(
                f"LinearScaling scaled the base LRs of the module's {type(config.scheduler).__name__}; "
                "bounds it keeps elsewhere (max_lr, eta_min, ...) are not scaled. "
                "lightning_tricks.callbacks.LRSchedule has none of these."
            )
        batch = (per_device, where, accumulate, world)
        rank_zero_info(scaling_message(self.rule, batch, self.reference_batch_size, changes, self._resuming_from))
        if self.factor >= 2 and not self._has_warmup(trainer):
            rank_zero_warn(
                f"LinearScaling multiplies the LR by {self.factor:.3g} without a warmup; Goyal et al. "
                "ramp the LR up over the first epochs: add LRSchedule(Warmup(...)) "
                "(schedule=warmup_cosine)"
            )

    def _check_finders(self, trainer: Trainer) -> Any:
        """The batch-size finder of this fit (``None``: none); refuse one this callback cannot follow."""
        callbacks = trainer_callbacks(trainer)
        finders = [i for i, cb in enumerate(callbacks) if isinstance(cb, BATCH_SIZE_FINDER_TYPES)]
        if not finders:
            return None
        finder = callbacks[finders[0]]
        name = type(finder).__name__
        if self.batch_size is not None:
            raise MisconfigurationException(
                f"LinearScaling(batch_size={self.batch_size}) fixes the batch size, but {name} searches for one: "
                f"the LR would not follow the batch {name} finds. Drop LinearScaling's batch_size (it then reads "
                "the found one from the datamodule or the module), or drop the finder."
            )
        me = next((i for i, cb in enumerate(callbacks) if cb is self), -1)
        if any(i > me for i in finders):
            raise MisconfigurationException(
                f"{name} comes after LinearScaling in trainer.callbacks, so it would change the batch size after "
                f"LinearScaling scaled the LR for the old one; put {name} first (Lightning's Trainer does so itself)"
            )
        return finder

    @staticmethod
    def _has_warmup(trainer: Trainer) -> bool:
        from lightning_tricks.schedules import Warmup

        return any(isinstance(cb, LRSchedule) and isinstance(cb.schedule, Warmup) for cb in trainer_callbacks(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the scaled LRs live in the optimizer state; this is a record of what was done
        self.factor = state_dict.get("factor", self.factor)
        self.global_batch_size = state_dict.get("global_batch_size", self.global_batch_size)
