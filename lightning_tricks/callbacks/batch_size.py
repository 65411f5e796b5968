"""Batch-size search at fit start (Lightning's ``BatchSizeFinder``) that resumes, keeps the RNG and the LR right.

The LR follows through :class:`~lightning_tricks.callbacks.LinearScaling`; details in ``docs/method_cards.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_tricks._lightning import BatchSizeFinder as _LightningBatchSizeFinder
from lightning_tricks._lightning import (
    LightningModule,
    MisconfigurationException,
    Trainer,
    isolate_rng,
    lightning_setattr,
    rank_zero_info,
    reset_dataloaders,
    resume_path_kept,
)
from lightning_tricks.schedules import FINDER_STAGES as STAGES
from lightning_tricks.schedules import bounded_search, check_finder_args, fewest_samples

__all__ = ["BatchSizeFinder", "STAGES", "train_samples"]


def train_samples(trainer: Trainer) -> int | None:
    """How many samples one pass over the training data has (the smallest over several loaders), or ``None``.

    Read from each train loader's ``dataset`` (when it has a length) or its ``num_samples`` (this rank's
    share, e.g. :class:`~lightning_tricks.data.loader.TensorBatchLoader`).
    """
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # what Lightning's finder does first too
    return fewest_samples(trainer.train_dataloader)


class BatchSizeFinder(_LightningBatchSizeFinder):
    """Lightning's ``BatchSizeFinder``, plus exact resume, an untouched RNG and a cap at the training-set size.

    Lightning's arguments, defaults, hooks and exceptions are kept. Added: the found size is checkpoint
    state (a resumed fit applies it and does not search); no size above the training set
    (:func:`train_samples`) is tried; trials draw from an isolated RNG; the first trial runs ``init_val``;
    ``trainer.ckpt_path`` is put back; ``stages`` limits where it searches. Why each: ``docs/method_cards.md``.

    Args:
        mode, steps_per_trial, init_val, max_trials, batch_arg_name, margin, max_val: Lightning's, with its
            defaults (``steps_per_trial``, ``init_val``, ``max_trials`` and ``max_val`` must be ints >= 1).

    Keyword-only args (ours):
        stages: the stages whose start runs a search.

    Example:
        >>> finder = BatchSizeFinder(init_val=64, max_trials=3, stages=("fit",))  # tries 64, 128, 256
    """

    def __init__(
        self,
        mode: str = "power",
        steps_per_trial: int = 3,
        init_val: int = 2,
        max_trials: int = 25,
        batch_arg_name: str = "batch_size",
        margin: float = 0.05,
        max_val: int = 8192,
        *,
        stages: Sequence[str] = STAGES,
    ) -> None:
        modes = self.SUPPORTED_MODES
        chosen = check_finder_args(mode, modes, steps_per_trial, init_val, max_trials, max_val, batch_arg_name, stages)
        super().__init__(mode, steps_per_trial, init_val, max_trials, batch_arg_name, margin, max_val)
        self.stages = chosen
        self.found: int | None = None  # the batch size of the fit (checkpoint state)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.found}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.found = state_dict.get("batch_size", self.found)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str | None = None) -> None:
        if stage in self.stages:
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "fit" not in self.stages:
            return
        if trainer.ckpt_path:  # resuming: Lightning loaded this callback's state before on_fit_start
            if self.found is None:
                raise MisconfigurationException(
                    f"BatchSizeFinder: resuming from {trainer.ckpt_path}, which holds no batch size found by "
                    "BatchSizeFinder; a search now would restart the run's optimizer state and progress. "
                    "Resume without the finder (set the batch size the run used), or start a new run."
                )
            lightning_setattr(pl_module, self._batch_arg_name, self.found)
            self.optimal_batch_size = self.found
            rank_zero_info(
                f"BatchSizeFinder: resuming from {trainer.ckpt_path} with the batch size the run found, "
                f"{self._batch_arg_name}={self.found} (no new search)"
            )
            return
        self.scale_batch_size(trainer, pl_module)

    def scale_batch_size(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stage = trainer.state.fn.value if trainer.state.fn is not None else None
        if stage not in self.stages:
            return
        cap = train_samples(trainer) if stage == "fit" else None
        saved = (self._init_val, self._max_trials, self._max_val)
        self._init_val, self._max_trials, self._max_val = bounded_search(*saved, cap, self._mode)
        bounded = (self._init_val, self._max_trials, self._max_val) != saved
        # Lightning sets init_val but runs its first trial on the loader already built with the configured
        # batch size; set it and rebuild the loaders first, so that the first size tried is init_val
        lightning_setattr(pl_module, self._batch_arg_name, self._init_val)
        reset_dataloaders(trainer)
        try:
            with isolate_rng(), resume_path_kept(trainer):
                super().scale_batch_size(trainer, pl_module)
        finally:
            self._init_val, self._max_trials, self._max_val = saved
        if stage == "fit":
            self.found = self.optimal_batch_size
        if self.optimal_batch_size is not None:
            note = f"; the {cap} training samples bounded the search" if bounded else ""
            rank_zero_info(
                f"BatchSizeFinder ({self._mode}, up to {self._max_trials} trial(s) from {self._init_val}{note}): "
                f"{stage} runs with {self._batch_arg_name}={self.optimal_batch_size}"
            )
