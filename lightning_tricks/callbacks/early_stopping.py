"""Lightning's ``EarlyStopping`` with Prechelt's GL / PQ / UP and restore-best, opt-in; one rule decides.

With Lightning's arguments only it behaves and checkpoints as Lightning's (same ``state_key``); every
check asks the pure :class:`lightning_tricks.stopping.StopRule`. How and why: ``docs/method_cards.md``.

Example:
    >>> from lightning_tricks.callbacks import EarlyStopping
    >>> from lightning_tricks.stopping import GL, UP
    >>> EarlyStopping(monitor="val/loss", criterion=GL(alpha=5.0), restore_best=True).rule.describe()
    'GL_5'
    >>> EarlyStopping(monitor="val/acc", mode="max", criterion=UP(strips=2, strip=3)).rule.describe()
    'UP_2 (strip 3)'
    >>> EarlyStopping("val_loss").state_key   # Lightning's key: its checkpoints resume into ours
    "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_tricks import stopping
from lightning_tricks._lightning import (
    EarlyStoppingReason,
    LightningModule,
    MisconfigurationException,
    PLEarlyStopping,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_tricks.callbacks._common import check_bool, check_int, log_to_loggers
from lightning_tricks.callbacks._weights import RAW, weights_of
from lightning_tricks.callbacks.restore_best import RestoreBest
from lightning_tricks.stopping import PQ, Criterion, Decision, Patience, StopRule, as_criterion, best_index, to_score

__all__ = ["EarlyStopping", "EarlyStoppingConfigError"]

_STATE_VERSION = 3  # 3: restore-best state as RestoreBest's (best_value, best_epoch, measured_on, best_weights)
_REASON = {
    "non_finite": EarlyStoppingReason.NON_FINITE_METRIC,
    "stopping_threshold": EarlyStoppingReason.STOPPING_THRESHOLD,
    "divergence_threshold": EarlyStoppingReason.DIVERGENCE_THRESHOLD,
}


class EarlyStoppingConfigError(MisconfigurationException, ValueError):
    """A bad argument of Lightning's (``mode``): Lightning's ``MisconfigurationException`` and a ``ValueError``."""


def _number(x: Any) -> Any:
    """A threshold or a patience as Lightning compares it (a tensor becomes its float)."""
    return float(x) if isinstance(x, Tensor) else x


class EarlyStopping(PLEarlyStopping):
    """Lightning's ``EarlyStopping``, plus a criterion of Prechelt's, a warm-up and restore-best.

    Args:
        monitor, min_delta, patience, verbose, mode, strict, check_finite, stopping_threshold,
            divergence_threshold, check_on_train_epoch_end, log_rank_zero_only: Lightning's (a bad
            ``mode`` raises :class:`EarlyStoppingConfigError`); ``monitor`` defaults to ``"val/loss"``.

    Keyword-only args (ours):
        criterion: ``"patience"`` (Lightning's), ``"increase"`` (``patience`` rises in a row), or
            Prechelt's ``GL(alpha)``, ``PQ(alpha, strip, ...)``, ``UP(strips, strip)`` from
            :mod:`lightning_tricks.stopping` (or their names, with Prechelt's defaults).
        min_checks: nothing but a non-finite value stops before the ``min_checks``-th check.
        restore_best: ``True`` or a :class:`~lightning_tricks.callbacks.RestoreBest`: the best
            validation's weights go back into the module at the end of fit.
        log_values: log the criterion's values under ``"early_stopping/"`` (or this prefix); ``None``:
            on with our criteria.

    Attributes:
        rule, stop_reason (``"stopped at epoch 23: GL=5.4 > alpha=5 (best 0.081 at 17)"`` or ``None``).
        history, train_history (``nan`` when not logged), epochs, measured (``"raw"``, ``"ema"``...): per check.
        best_check, best_epoch, best_value: the best check so far (-1 / ``None`` before the first).
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        *,
        criterion: Criterion | str = "patience",
        min_checks: int = 0,
        restore_best: bool | RestoreBest = False,
        log_values: bool | str | None = None,
    ) -> None:
        if mode not in self.mode_dict:  # Lightning's exception and message, also a ValueError
            raise EarlyStoppingConfigError(f"`mode` can be {', '.join(self.mode_dict.keys())}, got {mode}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty metric name, got {monitor!r}")
        if log_values is not None and not isinstance(log_values, str):
            check_bool("log_values", log_values)
        if not isinstance(restore_best, RestoreBest):
            check_bool("restore_best", restore_best)
        super().__init__(
            monitor, min_delta, patience, verbose, mode, strict, check_finite, stopping_threshold,
            divergence_threshold, check_on_train_epoch_end, log_rank_zero_only,
        )  # fmt: skip
        self.criterion = as_criterion(criterion)
        check_int("min_checks", min_checks, 0)
        self.min_checks = min_checks
        self.restorer: RestoreBest | None = None
        if restore_best is True or isinstance(restore_best, RestoreBest):
            self.restorer = restore_best if isinstance(restore_best, RestoreBest) else RestoreBest()
            self.restorer.monitor = self.restorer.monitor or monitor
            self.restorer.mode = self.restorer.mode or mode
        if log_values is None:
            log_values = not isinstance(self.criterion, Patience)
        self.log_prefix = log_values if isinstance(log_values, str) else "early_stopping/"
        self.log_values = bool(log_values)
        self.history: list[float] = []
        self.train_history: list[float] = []
        self.epochs: list[int] = []
        self.measured: list[str] = []
        self.stop_reason: str | None = None
        self._warned: set[str] = set()
        self._at_train_epoch_end = False
        self.rule  # noqa: B018  # every argument of the rule validated now, with the allowed values in the message

    @property
    def restore_best(self) -> bool:
        return self.restorer is not None

    @property
    def rule(self) -> StopRule:
        """The rule of the current arguments (``patience`` may come back from a checkpoint, as in Lightning)."""
        patience = _number(self.patience)
        if isinstance(patience, (int, float)) and not isinstance(patience, bool):  # Lightning compares wait >= patience
            patience = max(math.ceil(patience), 0)
        return StopRule(
            self.criterion,
            self.mode,
            patience=patience,
            min_delta=self.min_delta if self.mode == "max" else -self.min_delta,  # Lightning stores it signed
            min_checks=self.min_checks,
            check_finite=bool(self.check_finite),
            stopping_threshold=_number(self.stopping_threshold),
            divergence_threshold=_number(self.divergence_threshold),
        )

    # -- identity, state ---------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        if isinstance(self.criterion, Patience):
            return self._generate_state_key(monitor=self.monitor, mode=self.mode)
        # Lightning reads state_key at every hook call: named from the criterion, no rule built
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, rule=self.criterion.describe(self.patience)
        )

    def _other_state_keys(self) -> list[str]:
        """Where a checkpoint without this key may hold this callback's state: Lightning's key, ours with a rule."""
        rules = [self.rule.describe(), f"patience {self.patience} (no_improvement)"]
        keys = [self._generate_state_key(monitor=self.monitor, mode=self.mode, rule=r) for r in rules]
        keys.append(self._generate_state_key(monitor=self.monitor, mode=self.mode))
        return [k for k in keys if k != self.state_key]

    @property
    def best_check(self) -> int:
        """Index of the best check in :attr:`history` (-1 before the first)."""
        return best_index([to_score(v, self.mode) for v in self.history])

    @property
    def best_epoch(self) -> int | None:
        i = self.best_check
        return self.epochs[i] if i >= 0 else None

    @property
    def best_value(self) -> float | None:
        i = self.best_check
        return self.history[i] if i >= 0 else None

    @property
    def best_weights(self) -> dict[str, Tensor] | None:
        """The restore-best copy of the best weights, or ``None``."""
        return self.restorer.best_weights if self.restorer is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Lightning's fields, then ours under keys Lightning's ``load_state_dict`` ignores; all copies."""
        state = super().state_dict()  # wait_count, stopped_epoch, best_score, patience, stopping_reason...
        state.update(
            version=_STATE_VERSION,
            history=stopping.nan_as_none(self.history),
            train_history=stopping.nan_as_none(self.train_history),
            epochs=list(self.epochs),
            stop_reason=self.stop_reason,
            measured=list(self.measured),
        )
        if self.restorer is not None:
            state.update(self.restorer.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Reads Lightning's fields like Lightning (a missing one keeps its value) and ours with defaults."""
        self.wait_count = state_dict.get("wait_count", self.wait_count)
        self.stopped_epoch = state_dict.get("stopped_epoch", self.stopped_epoch)
        self.best_score = state_dict.get("best_score", self.best_score)
        self.patience = state_dict.get("patience", self.patience)
        self.stopping_reason = EarlyStoppingReason(
            state_dict.get("stopping_reason", EarlyStoppingReason.NOT_STOPPED.value)
        )
        self.stopping_reason_message = state_dict.get("stopping_reason_message")
        self.history = stopping.none_as_nan(state_dict.get("history", []))
        self.train_history = stopping.none_as_nan(state_dict.get("train_history", [None] * len(self.history)))
        self.epochs = [int(e) for e in state_dict.get("epochs", range(len(self.history)))]
        self.measured = [str(m) for m in state_dict.get("measured", [RAW] * len(self.history))]
        self.stop_reason = state_dict.get("stop_reason")
        if self.restorer is not None:
            best = self.best_check
            # state version 2 holds the best check's index instead of RestoreBest's fields
            if "best_weights_check" in state_dict and best >= 0:
                state_dict = {**state_dict, "best_value": self.history[best], "best_epoch": self.epochs[best]}
                state_dict["measured_on"] = self.measured[best] if best < len(self.measured) else RAW
            self.restorer.load_state_dict(state_dict)

    # -- hooks: Lightning's, and restore-best's forwarded to it --------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # picks check_on_train_epoch_end like Lightning
        if self.restorer is not None:
            self.restorer.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.restorer is not None:
            self.restorer.on_fit_start(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.restorer is not None:
            self.restorer.on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.restorer is not None:
            self.restorer.on_validation_end(trainer, pl_module)
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._at_train_epoch_end = True  # Lightning checks here or at validation end (check_on_train_epoch_end)
        try:
            super().on_train_epoch_end(trainer, pl_module)
        finally:
            self._at_train_epoch_end = False

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.restorer is not None:
            self.restorer.on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.restorer is not None:
            self.restorer.save_weights_into(pl_module, checkpoint, self.state_key)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.restorer is not None:
            self.restorer.on_load_checkpoint(trainer, pl_module, checkpoint)
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:  # written by Lightning's class, or by ours under another key form
            for key in self._other_state_keys():
                if key in states:
                    self.load_state_dict(states[key])
                    break

    # -- the check -----------------------------------------------------------------------------------
    def _validate_condition_metric(self, logs: dict[str, Tensor]) -> bool:
        if logs.get(self.monitor) is not None:
            return True
        msg = stopping.missing_monitor_message(self.monitor, list(logs))
        if self.strict:
            raise RuntimeError(msg)
        self._warn_once("monitor", msg + " (strict=False: these checks are skipped)")  # Lightning: only if verbose
        return False

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        logs = trainer.callback_metrics
        if getattr(trainer, "fast_dev_run", False) or not self._validate_condition_metric(logs):
            return
        current = logs[self.monitor].squeeze()
        if isinstance(self.criterion, PQ) and not self._at_train_epoch_end:
            self._warn_once(
                "pq-after-validation",
                f"EarlyStopping(criterion=PQ) checks after validation (check_on_train_epoch_end=False): "
                f"{self.criterion.train_monitor!r} is then the last finished training epoch's value, one epoch "
                "behind the validation metric",
            )
        train = self._train_value(logs, trainer.current_epoch)
        if trainer.world_size > 1:  # one curve on all ranks: rank zero's (one broadcast of two floats)
            value, train = trainer.strategy.broadcast((float(current), train), src=0)
            current = torch.as_tensor(value, dtype=current.dtype, device=current.device)
        module = trainer.lightning_module
        # the check's other values travel beside `current`: _evaluate_stopping_criteria(current) keeps Lightning's
        # signature, which Lightning's tests (and users) mock or override
        self._pending = (train, trainer.current_epoch, (weights_of(module).measured or RAW) if module else RAW)
        self._decision: Decision | None = None
        should_stop, reason = self._evaluate_stopping_criteria(current)

        stop_all = trainer.strategy.reduce_boolean_decision(should_stop, all=False)  # any rank stops all
        trainer.should_stop = trainer.should_stop or stop_all
        if stop_all:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
            self.stop_reason = (
                f"stopped at epoch {trainer.current_epoch}: {reason or 'a stop was signalled on another rank'}"
            )
            if not isinstance(self.criterion, Patience):
                rank_zero_info(self.stop_reason)
        if self._decision is not None:
            self._log_values(trainer, self._decision.values)
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        """Record the check and ask the rule; Lightning's ``best_score``, ``wait_count`` and reason follow it."""
        train, epoch, measured = self.__dict__.pop("_pending", (math.nan, len(self.epochs), RAW))
        counters = (float(self.best_score), int(self.wait_count))
        self.history.append(float(current))
        self.train_history.append(train)
        self.epochs.append(epoch)
        self.measured.append(measured)
        d = self.rule.decide(self.history, self.train_history, self.epochs, name=self.monitor, counters=counters)
        if d.improved:
            self.best_score = current
        self.wait_count = int(d.values.get("wait_count", d.wait_count))
        if d.stop:
            self.stopping_reason = _REASON.get(d.kind, EarlyStoppingReason.PATIENCE_EXHAUSTED)
        self._decision = d
        return d.stop, d.reason or None

    def _train_value(self, logs: dict[str, Tensor], epoch: int) -> float:
        """The training metric PQ needs (``nan`` if not logged: an error if it never was, else a warning)."""
        name = getattr(self.criterion, "train_monitor", "train/loss_epoch")
        value = logs.get(name)
        if value is not None:
            return float(torch.as_tensor(value).squeeze())
        if isinstance(self.criterion, PQ):
            msg = stopping.missing_train_message(name, list(logs))
            never = all(math.isnan(v) for v in self.train_history)
            if never and len(self.history) + 1 >= self.criterion.strip:  # checks after validation miss one
                raise RuntimeError(msg)
            if not never:
                self._warn_once("train", msg + f" (missing at epoch {epoch}; PQ is not evaluated on strips without it)")
        return math.nan

    def _log_values(self, trainer: Trainer, values: dict[str, float]) -> None:
        if not self.log_values or not values or trainer.lightning_module is None:
            return
        metrics = {self.log_prefix + k: float(v) for k, v in values.items()}
        if self._at_train_epoch_end:  # self.log is allowed there, not at on_validation_end
            trainer.lightning_module.log_dict(
                metrics, on_step=False, on_epoch=True, prog_bar=False, logger=bool(trainer.loggers)
            )
        else:  # on_validation_end: Lightning forbids self.log there
            log_to_loggers(trainer, metrics)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning if key == "monitor" else UserWarning)
