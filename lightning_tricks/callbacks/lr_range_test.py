"""The LR range test as a callback: sweep at fit start, restore, suggest, plot, apply."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from lightning_tricks._lightning import (
    Callback,
    DummyLogger,
    LightningDataModule,
    LightningModule,
    MisconfigurationException,
    Trainer,
    isolate_rng,
    rank_zero_info,
    rank_zero_only,
    rank_zero_warn,
    reset_dataloaders,
    trainer_callbacks,
    trainer_class_for,
)
from lightning_tricks.callbacks.lr_schedule import LRSchedule, change_base_lrs
from lightning_tricks.checks import check_choice, check_int
from lightning_tricks.lr_range_test import (
    RangeTestResult,
    SweepRecord,
    check_sweep_args,
    default_suggestion,
    no_suggestion_reason,
    normalize_mode,
    set_lr_attr,
    summary,
    sweep_lr,
)

APPLY_TO = ("lr", "one_cycle", None)
SUGGESTIONS = ("steepest", "min_div10", None)


class LRRangeTest(Callback):
    """Smith's LR range test at fit start: sweep, restore everything, then apply the suggestion.

    The sweep runs the real training loop alone and is undone afterwards (weights, optimizer, scaler,
    loops, RNG, metrics). Skipped under ``fast_dev_run`` and on resume. Details: ``docs/method_cards.md``.

    Args:
        min_lr, max_lr: the sweep's bounds, ``0 < min_lr < max_lr``.
        num_steps: optimizer steps of the sweep (>= 2).
        mode: ``"exp"`` (geometric) or ``"linear"``.
        smooth: EMA factor of the loss, in ``[0, 1)``.
        diverge_threshold: stop when the smoothed loss exceeds this times its minimum (``> 1``), or ``None``.
        skip_begin, skip_end: points left out of the steepest-descent search.
        apply_to: ``"lr"``, ``"one_cycle"`` or ``None`` (see above).
        suggestion: ``"steepest"`` or ``"min_div10"``; ``None`` picks ``"min_div10"`` for ``one_cycle``
            and ``"steepest"`` otherwise.
        attr_name: module attribute/hparam to update with the applied LR (default: autodetect).
        plot_path: PNG path (relative paths are under ``trainer.default_root_dir``), or ``None``.
        exit_after: end the fit right after the test (as the function form
            :func:`lr_range_test` does).

    Example:
        >>> finder = LRRangeTest(min_lr=1e-5, max_lr=1.0, num_steps=80, apply_to="lr")  # then finder.result
    """

    def __init__(
        self,
        min_lr: float = 1e-7,
        max_lr: float = 10.0,
        num_steps: int = 100,
        mode: str = "exp",
        smooth: float = 0.98,
        diverge_threshold: float | None = 4.0,
        skip_begin: int = 10,
        skip_end: int = 1,
        apply_to: str | None = "lr",
        suggestion: str | None = None,
        attr_name: str | None = None,
        plot_path: str | os.PathLike | None = "lr_range_test.png",
        exit_after: bool = False,
    ) -> None:
        check_sweep_args(min_lr, max_lr, num_steps, smooth, diverge_threshold)
        mode = normalize_mode(mode)
        check_int("skip_begin", skip_begin)
        check_int("skip_end", skip_end)
        check_choice("apply_to", apply_to, APPLY_TO)
        check_choice("suggestion", suggestion, SUGGESTIONS)
        if skip_begin + skip_end + 2 > num_steps:
            rank_zero_warn(
                f"LRRangeTest: num_steps={num_steps} leaves fewer than 2 points after skip_begin="
                f"{skip_begin} and skip_end={skip_end}; the steepest suggestion will be None"
            )
        self.min_lr, self.max_lr, self.num_steps, self.mode = float(min_lr), float(max_lr), num_steps, mode
        self.smooth, self.diverge_threshold = float(smooth), diverge_threshold
        self.skip_begin, self.skip_end = skip_begin, skip_end
        self.apply_to, self.suggestion, self.attr_name = apply_to, suggestion, attr_name
        self.plot_path, self.exit_after = plot_path, bool(exit_after)
        self.result: RangeTestResult | None = None
        self.applied_lr: float | None = None
        self.plot_file: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            min_lr=self.min_lr, max_lr=self.max_lr, num_steps=self.num_steps, mode=self.mode
        )

    @property
    def method(self) -> str:
        """The suggestion applied: ``suggestion``, or its default for ``apply_to``."""
        return default_suggestion(self.apply_to, self.suggestion)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.apply_to is None:
            return
        from lightning_tricks.callbacks.lr_scaling import LinearScaling

        if any(isinstance(cb, LinearScaling) for cb in trainer_callbacks(trainer)):
            raise MisconfigurationException(
                f"LRRangeTest(apply_to={self.apply_to!r}) and LinearScaling both set the base LR at fit start; "
                "the range test already measures at this batch size. Drop one, or use apply_to=None"
            )
        if self.apply_to == "one_cycle" and _find_one_cycle(trainer) is None:
            raise MisconfigurationException(
                "LRRangeTest(apply_to='one_cycle') needs an LRSchedule callback with a OneCycle schedule "
                "(e.g. schedule=one_cycle); found none. Use apply_to='lr' to set the base LR instead"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = self.run(trainer, pl_module)
        if result is not None and self.apply_to is not None:
            self.apply(trainer, pl_module, result)
        if self.exit_after:
            trainer.should_stop = True  # FitLoop.done: no training after the test (min_epochs defaults to 0)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> RangeTestResult | None:
        """Sweep, restore everything, plot; return the result (also in :attr:`result`)."""
        if getattr(trainer, "fast_dev_run", False):
            rank_zero_warn("LRRangeTest skipped: fast_dev_run is on")
            return None
        if trainer.ckpt_path:
            rank_zero_info(f"LRRangeTest skipped: resuming from {trainer.ckpt_path}, whose optimizer keeps its LR")
            return None
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise MisconfigurationException(
                f"LRRangeTest works with one optimizer; configure_optimizers returned {len(optimizers)}"
            )
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise MisconfigurationException(
                f"LRRangeTest keeps an in-memory copy of the model and cannot run "
                f"under the sharded strategy {strategy}; use DDP or one device"
            )
        optimizer = optimizers[0]
        loop = trainer.fit_loop
        saved: dict[str, Any] = {
            "model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "precision": copy.deepcopy(trainer.precision_plugin.state_dict()),
            "loop": copy.deepcopy(loop.state_dict()),
        }
        groups = optimizer.param_groups
        ratios = [g["lr"] / groups[0]["lr"] if groups[0]["lr"] else 1.0 for g in groups]
        sweep = _Sweep(self, trainer.global_step, ratios, automatic=pl_module.automatic_optimization)
        # the sweep runs alone, without validation, for num_steps steps; these values come back after it
        sweep_settings = [
            (trainer.strategy, "lr_scheduler_configs", []),
            (trainer, "callbacks", [sweep]),
            (trainer, "loggers", [DummyLogger()] if trainer.loggers else []),
            (loop.epoch_loop, "max_steps", trainer.global_step + self.num_steps),
            (loop, "max_epochs", -1),
            (trainer, "limit_val_batches", 0),
            (trainer, "should_stop", False),
        ]
        saved["settings"] = [(obj, name, getattr(obj, name)) for obj, name, _ in sweep_settings]
        with isolate_rng():
            try:
                for obj, name, value in sweep_settings:
                    setattr(obj, name, value)
                loop.load_state_dict(copy.deepcopy(saved["loop"]))
                loop.restarting = False
                loop.run()
            finally:
                self._restore(trainer, pl_module, optimizer, saved)
        rec = sweep.record
        result = RangeTestResult(
            lrs=rec.lrs,
            losses=rec.losses,
            raw_losses=rec.raw,
            mode=self.mode,
            min_lr=self.min_lr,
            max_lr=self.max_lr,
            num_steps=self.num_steps,
            skip_begin=self.skip_begin,
            skip_end=self.skip_end,
            stop_reason=sweep.reason or f"completed {len(rec.lrs)} of {self.num_steps} steps",
        )
        result = trainer.strategy.broadcast(result)  # one curve, one suggestion on every rank
        self.result = result
        self.plot_file = self._plot(trainer, result)
        rank_zero_info(f"LRRangeTest: {summary(result)}" + (f"; plot {self.plot_file}" if self.plot_file else ""))
        return result

    @staticmethod
    def _restore(
        trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
    ) -> None:
        loop = trainer.fit_loop
        for obj, name, value in saved["settings"]:
            setattr(obj, name, value)
        pl_module.load_state_dict(saved["model"])
        pl_module.zero_grad(set_to_none=True)
        optimizer.load_state_dict(saved["optimizer"])
        trainer.precision_plugin.load_state_dict(saved["precision"])
        loop.load_state_dict(copy.deepcopy(saved["loop"]))
        loop.restarting = False
        loop.epoch_loop.restarting = False
        reset_dataloaders(trainer)  # the sweep iterated the dataloaders: the real fit builds fresh iterators
        try:
            from torchmetrics import Metric
        except ImportError:  # pragma: no cover - torchmetrics is a dependency
            return
        for m in pl_module.modules():
            if isinstance(m, Metric):
                m.reset()

    def _plot(self, trainer: Trainer, result: RangeTestResult) -> str | None:
        if self.plot_path is None or not result.lrs:
            return None
        path = os.fspath(self.plot_path)
        if not os.path.isabs(path):
            path = os.path.join(trainer.default_root_dir, path)
        _save_plot(result, path)
        return path

    def apply(self, trainer: Trainer, pl_module: LightningModule, result: RangeTestResult) -> float | None:
        """Set the base LR (and the module's LR attribute) to the suggestion; return the LR set."""
        lr = result.suggest(self.method)
        if lr is None:
            why = no_suggestion_reason(result)
            rank_zero_warn(
                f"LRRangeTest(apply_to={self.apply_to!r}): no {self.method} suggestion ({why}); "
                "the LR stays as configured"
            )
            return None
        groups = trainer.optimizers[0].param_groups
        first = groups[0]["lr"]
        new = [lr * (g["lr"] / first if first else 1.0) for g in groups]
        change_base_lrs(trainer, lambda i, j, x: new[j] if i == 0 else x)
        where = set_lr_attr(pl_module, lr, self.attr_name)
        self.applied_lr = lr
        target = "OneCycle peak LR" if self.apply_to == "one_cycle" else "base LR"
        rank_zero_info(
            f"LRRangeTest: {target} set to {lr:.4g} ({self.method})" + (f"; updated {where}" if where else "")
        )
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "applied_lr": self.applied_lr,
            "suggestion": None if self.result is None else self.result.suggestion,
            "suggestion_min_div10": None if self.result is None else self.result.suggestion_min_div10,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied_lr = state_dict.get("applied_lr", self.applied_lr)


class _Sweep(Callback):
    """Sets the sweep's LR before each optimizer step and records the loss after it (internal)."""

    def __init__(self, test: LRRangeTest, start_step: int, ratios: list[float], automatic: bool) -> None:
        self.test, self.start, self.ratios, self.automatic = test, start_step, ratios, automatic
        self.record = SweepRecord(test.smooth, test.diverge_threshold, test.skip_begin)
        self.reason = ""
        self._window: list[torch.Tensor] = []
        self._last = start_step

    def _lr_at(self, step: int) -> float:
        t = self.test
        return sweep_lr(step - self.start, t.num_steps, t.min_lr, t.max_lr, t.mode)

    def _set(self, trainer: Trainer) -> None:
        # the one LR write outside LRSchedule: the sweep runs before training, alone, and is undone after
        lr = self._lr_at(trainer.global_step)
        for group, ratio in zip(trainer.optimizers[0].param_groups, self.ratios):
            group["lr"] = lr * ratio

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._set(trainer)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self._set(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float()
            if self.automatic:
                loss = loss * trainer.accumulate_grad_batches  # Lightning divides it for accumulation
            self._window.append(loss)
        step = trainer.global_step
        if step == self._last:
            return  # inside an accumulation window
        lr = self._lr_at(self._last)
        self._last = step
        # a step whose training_step returned None is a gap, not a divergence; one host sync per step
        raw = float(torch.stack(self._window).mean()) if self._window else None
        self._window = []
        stop, reason = self.record.add(lr, raw)
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.reason = f"stopped at lr {lr:.3g}: {reason or 'another rank diverged'}"
            trainer.should_stop = True


def _find_one_cycle(trainer: Trainer) -> Any:
    from lightning_tricks.schedules import OneCycle, Warmup

    for cb in trainer_callbacks(trainer):
        if isinstance(cb, LRSchedule):
            s: Any = cb.schedule
            if isinstance(s, Warmup):
                s = s.then
            if isinstance(s, OneCycle):
                return cb
    return None


@rank_zero_only
def _save_plot(result: RangeTestResult, path: str) -> None:
    result.plot(path)


def lr_range_test(
    module: Any,
    data: Any,
    *,
    plot_path: str | os.PathLike | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **sweep: Any,
) -> RangeTestResult:
    """Run the LR range test on ``module`` and return the result; the module is left as it was.

    ``data`` is a ``LightningDataModule`` or a train dataloader; ``sweep`` takes :class:`LRRangeTest`'s
    sweep arguments; nothing is applied. ``trainer_kwargs`` override the defaults (one device, no logger).
    """
    fixed = sorted({"apply_to", "exit_after", "suggestion", "attr_name"} & set(sweep))
    if fixed:
        raise TypeError(f"lr_range_test() only measures: {fixed} cannot be set here (use the LRRangeTest callback)")
    callback = LRRangeTest(**sweep, apply_to=None, plot_path=plot_path, exit_after=True)
    kwargs: dict[str, Any] = dict(devices=1, max_epochs=1, logger=False, enable_checkpointing=False)
    kwargs.update(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    kwargs.update(trainer_kwargs or {})
    extra = list(kwargs.pop("callbacks", None) or [])
    trainer = trainer_class_for(module)(callbacks=[callback, *extra], **kwargs)
    if isinstance(data, LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, train_dataloaders=data)
    if callback.result is None:
        raise RuntimeError("the LR range test did not run (fast_dev_run?)")
    return callback.result
