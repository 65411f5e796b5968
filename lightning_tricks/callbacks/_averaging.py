"""What :class:`~lightning_tricks.callbacks.EMA` and :class:`~lightning_tricks.callbacks.SWA` share.

Both evaluate on their average, save it in checkpoints and offer it at the end of fit, through the
module's weights service (:mod:`lightning_tricks.callbacks._weights`); the rules (which weights a
checkpoint's ``state_dict`` holds, ``evaluate="both"``) are in ``docs/method_cards.md`` (EMA).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    Trainer,
    rank_zero_warn,
)
from lightning_tricks.averaging import AVERAGE_STATE_KEY, WeightAverage, as_list, untouched
from lightning_tricks.callbacks._weights import AVERAGE, RAW, weights_of
from lightning_tricks.checks import check_choice

__all__ = ["evaluate_raw_pass"]

_STATE_VERSION = 1


def evaluate_raw_pass(trainer: Trainer, pl_module: LightningModule, suffix: str) -> dict[str, Tensor]:
    """The module's metrics over the current evaluation batches with what the module holds now.

    Calls the module's public hook ``evaluation_outputs(batch, stage) -> {metric name: per-sample
    values (N,)}`` (see :meth:`lightning_tricks.mixins.ClassificationMixin.evaluation_outputs`) on each
    batch; the epoch value of a name is the mean over all samples, logged as ``name + suffix``
    (``/dataloader_idx_i`` appended with several loaders, like Lightning). Nothing the main loop
    accumulated is touched; RNG state and loader epoch counters are left as they were. Returns the
    logged values.
    """
    testing = trainer.testing
    stage = "test" if testing else "val"
    loaders = as_list(trainer.test_dataloaders if testing else trainer.val_dataloaders)
    if trainer.sanity_checking:
        limits = trainer.num_sanity_val_batches
    else:
        limits = trainer.num_test_batches if testing else trainer.num_val_batches
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    with untouched(pl_module, loaders), torch.no_grad():
        for i, loader in enumerate(loaders):
            limit = limits[i] if i < len(limits) else float("inf")
            tail = f"/dataloader_idx_{i}" if len(loaders) > 1 else ""
            for b, batch in enumerate(loader):
                if b >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=i)
                outputs = pl_module.evaluation_outputs(batch, stage)  # type: ignore[operator]  # checked at setup
                for name, values in outputs.items():
                    values = torch.as_tensor(values).detach().float().reshape(-1)
                    key = name + tail
                    sums[key] = sums[key] + values.sum() if key in sums else values.sum()
                    counts[key] = counts.get(key, 0) + values.numel()
    logged = {}
    for key, total in sums.items():
        value = total / max(counts[key], 1)
        pl_module.log(key + suffix, value, on_step=False, on_epoch=True, sync_dist=True, add_dataloader_idx=False)
        logged[key + suffix] = value
    return logged


# ------------------------------------------------------------------------------------------------
# the shared wiring
# ------------------------------------------------------------------------------------------------
class _Averaging(Callback):
    """Evaluation swaps, the end-of-fit offer and checkpointing shared by :class:`EMA` and :class:`SWA`.

    Owns: the average (:class:`~lightning_tricks.averaging.WeightAverage`) and its state. Shares: the
    module's weights, through :func:`~lightning_tricks.callbacks._weights.weights_of` (never written
    directly). What an evaluation runs on:

    - the module holds the raw weights or this callback's average: the average (``evaluate`` = the
      average or ``"both"``, once it started) or the raw weights (``evaluate="raw"``);
    - the module holds weights someone else handed over (``"best"`` after fit with
      ``EarlyStopping(restore_best=True)``): those, left in place.
    """

    _AVERAGE = "average"  # the name of the averaged weights in ``evaluate`` and the label in the module

    def __init__(self, evaluate: str, average_at_end: bool, on_cpu: bool, raw_suffix: str) -> None:
        self.evaluate = check_choice("evaluate", evaluate, (self._AVERAGE, "raw", "both"))
        if not isinstance(raw_suffix, str) or not raw_suffix:
            raise ValueError(f"raw_suffix must be a non-empty string, got {raw_suffix!r}")
        self.average_at_end = bool(average_at_end)
        self.on_cpu = bool(on_cpu)
        self.raw_suffix = raw_suffix
        self._average: WeightAverage | None = None
        self._started = False
        self._module: weakref.ref[LightningModule] | None = None
        self._pending: dict[str, Any] | None = None
        self._eval_return_to: str | None = None
        self._warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_module"] = None  # a weak reference (for holds_average) does not pickle
        return state

    @property
    def label(self) -> str:
        """The label of this callback's average in :class:`~lightning_tricks.callbacks._weights.ModuleWeights`."""
        return self._AVERAGE if self._AVERAGE != "average" else type(self).__name__.lower()

    # -- to specialise -----------------------------------------------------------------------------
    def _include_buffers(self) -> bool:
        return False

    def _extra_targets(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """Module tensors besides the averaged ones that holding the average overwrites."""
        return {}

    def _after_average_loaded(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called right after the average was copied into the module."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # -- public views ------------------------------------------------------------------------------
    @property
    def holds_average(self) -> bool:
        """Whether the module currently holds this callback's averaged weights."""
        module = self._module() if self._module is not None else None
        return module is not None and weights_of(module).held == self.label

    @property
    def started(self) -> bool:
        """Whether the average exists (EMA: ``start_step`` reached; SWA: at least one update)."""
        return self._started

    def average_tensors(self) -> dict[str, Tensor]:
        """``{state_dict name: averaged tensor}`` (float32; the live averages, not copies)."""
        if self._average is None:
            return {}
        return self._average.tensors()

    def raw_tensors(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """The raw (training) weights, wherever they are now (copies)."""
        return {n: t.clone() for n, t in weights_of(pl_module).raw_tensors().items()}

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # -- average lifecycle -------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.evaluate == "both" and not callable(getattr(pl_module, "evaluation_outputs", None)):
            raise TypeError(
                f"{type(self).__name__}(evaluate='both') evaluates the raw weights a second time through the "
                f"module's evaluation_outputs(batch, stage) -> {{metric name: per-sample values}}, which "
                f"{type(pl_module).__name__} does not define. Implement it (as "
                f"lightning_tricks.mixins.ClassificationMixin does) or use evaluate={self._AVERAGE!r} / 'raw'"
            )

    def _bind(self, pl_module: LightningModule) -> None:
        """Create (or rebind after a device move) the average and apply a loaded state."""
        self._module = weakref.ref(pl_module)
        # validate() or test() run in inference mode: an average made there would be an inference tensor,
        # which a later fit cannot update in place
        with torch.inference_mode(False):
            if self._average is None:
                device = torch.device("cpu") if self.on_cpu else None
                self._average = WeightAverage(pl_module, buffers=self._include_buffers(), device=device)
            else:
                self._average.bind(pl_module)
            self._apply_pending()

    def _apply_pending(self) -> None:
        """Load a state read from a checkpoint into the (bound) average."""
        if self._pending is None or self._average is None:
            return
        state, self._pending = self._pending, None
        self._started = bool(state.get("started", False))
        if self._started:
            self._average.load_state_dict(state.get(AVERAGE_STATE_KEY) or {})
        self._load_extra_state(state)

    def _hold_average(self, trainer: Trainer, pl_module: LightningModule, rank: int | None = None) -> None:
        """Ask the module's weights service to hold the average (``rank``: as the end-of-fit offer)."""
        if self._average is None or not self._started:
            return
        weights = weights_of(pl_module)
        if rank is None and weights.held == self.label:
            return
        extra = list(self._extra_targets(pl_module))

        def after() -> None:
            self._after_average_loaded(trainer, pl_module)

        if rank is None:
            weights.hold(self.label, self._average.tensors(), after_load=after, also=extra, rank=AVERAGE)
        else:
            weights.hand_over(rank, self.label, self._average.tensors(), after_load=after, also=extra)

    # -- evaluation --------------------------------------------------------------------------------
    def _eval_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bind(pl_module)
        weights = weights_of(pl_module)
        weights.evaluation_start()
        self._eval_return_to = None
        held = weights.held
        if held != self.label and not weights.outranks(AVERAGE, self.label):
            # weights handed over by restore-best, or another average that outranks this one: evaluate
            # what the module holds (the same whatever the callback order)
            return
        if held not in (RAW, self.label):
            held = RAW  # an average this one outranks: evaluate this one instead (it puts the raw weights back)
        if self.evaluate == "raw":
            if held == self.label:  # e.g. after a fit that ended on the average
                self._eval_return_to = "average"
                weights.hold_raw()
            return
        if not self._started:
            if trainer.state.fn != "fit":  # in fit, evaluating the raw weights before the start is the rule
                self._warn_once(
                    "no-average",
                    f"{type(self).__name__}: there is no average yet (no fit ran "
                    "and no checkpoint with its state was loaded); evaluating the raw weights",
                )
            return
        if held == RAW:
            self._eval_return_to = "raw"
            weights.hold_raw()
            self._hold_average(trainer, pl_module)

    def _eval_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate != "both":
            return
        with weights_of(pl_module).raw():
            evaluate_raw_pass(trainer, pl_module, self.raw_suffix)

    def _eval_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights = weights_of(pl_module)
        weights.evaluation_end()  # before swapping back: records what this evaluation ran on
        back, self._eval_return_to = self._eval_return_to, None
        if back == "raw":
            weights.hold_raw()
        elif back == "average":
            self._hold_average(trainer, pl_module)

    on_validation_start = on_test_start = on_predict_start = _eval_start
    on_validation_epoch_end = on_test_epoch_end = _eval_epoch_end
    on_validation_end = on_test_end = on_predict_end = _eval_end

    # -- fit ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).fit_start()  # a second fit after one that ended on the average trains the raw weights
        self._bind(pl_module)
        if self.evaluate != "raw":
            weights_only = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "save_weights_only", False)]
            if weights_only:
                self._warn_once(
                    "weights-only",
                    f"{type(weights_only[0]).__name__}(save_weights_only=True) beside {type(self).__name__}: "
                    "Lightning calls no callback when it writes a weights-only checkpoint, so those files hold "
                    f"the raw weights, not the {self.label.upper()} average that validation scored; use "
                    "save_weights_only=False to save the average (and an exact resume)",
                )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.average_at_end:
            if self._started:
                self._hold_average(trainer, pl_module, rank=AVERAGE)  # restore-best, if offered, wins
            else:
                self._warn_once(
                    "end-no-average",
                    f"{type(self).__name__}: training ended before the "
                    "average started; the module keeps its raw weights",
                )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        weights_of(pl_module).hold_raw()

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # the state dict gets what an evaluation runs on now: this average (as saved in this callback's
        # state, with SWA's BatchNorm statistics when they were recomputed for it) unless another outranks it
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        offer = state.get(AVERAGE_STATE_KEY) if self._started and self.evaluate != "raw" else None
        weights_of(pl_module).save_into(checkpoint, self.state_key, self.label, offer, AVERAGE)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning has just loaded the checkpoint's state dict (the evaluated weights) into the module
        weights_of(pl_module).load_raw(checkpoint)
        self._eval_return_to = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": _STATE_VERSION, "started": self._started}
        state[AVERAGE_STATE_KEY] = self._average.state_dict() if (self._average is not None and self._started) else {}
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._eval_return_to = None
        self._pending = dict(state_dict)
        # already bound (e.g. test(ckpt_path=...) after fit): the module's tensors are the same ones
        self._apply_pending()
