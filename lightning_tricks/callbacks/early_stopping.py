"""Early stopping with Prechelt's criteria (GL, PQ, UP) and patience, restore-best, DDP-consistent.

:class:`EarlyStopping` is Lightning's ``EarlyStopping`` (same arguments, hooks, monitoring-callback
ordering, ``check_on_train_epoch_end`` choice, ``reduce_boolean_decision`` across ranks, attributes
``stopped_epoch`` / ``wait_count`` / ``best_score`` / ``stopping_reason``) with the decision taken by
the pure rule :class:`lightning_tricks.stopping.StopRule`, where the formulas live:

- ``criterion="patience"``: Lightning's rule (``n`` checks without an improvement by more than
  ``min_delta``), or with ``patience_rule="increase"`` ``n`` increases in a row (the seed's rule);
- ``"gl"``: ``GL(t) = 100 * (E_va(t) / E_opt(t) - 1) > alpha``;
- ``"pq"``: ``GL(t) / P_k(t) > alpha`` at strip ends, ``P_k(t) = 1000 * (sum E_tr(last k) / (k * min
  E_tr(last k)) - 1)`` with ``E_tr`` the logged ``train_monitor`` (default ``train/loss_epoch``);
- ``"up"``: the monitored metric got worse at the end of ``s`` successive strips of ``k = strip`` checks.

Why a new decision path instead of Lightning's ``_evaluate_stopping_criteria``: that method updates
``best_score``/``wait_count`` while it tests the thresholds and sees one value at a time, no training
metric, no epoch; Prechelt's criteria need the whole curve. The callback therefore keeps the curve
(one value per validation check: the monitored metric, the training metric, the epoch) and asks the
rule after every check. The curve *is* the state: it goes in the checkpoint (a few floats per epoch),
so a resumed run decides exactly like an uninterrupted one, mid-strip included.

Rank consistency. Every rank takes rank zero's values of the monitored and training metrics (one
``broadcast`` of two floats per check), so the curves, the best epoch (hence the restored weights) and
the reason are the same on all ranks even for metrics logged without ``sync_dist``; a non-finite value
on any rank stops all of them (``reduce_boolean_decision(all=False)``, as in Lightning). Log the
monitored metric with ``sync_dist=True`` to decide on the global value rather than rank zero's.

Restore-best (``restore_best=True``, the default): at the end of fit (``on_train_end``) the module gets
the weights of the best check back (the first minimum of the monitored metric, ``min_delta`` ignored).
These are the weights the best value was *measured* on: with ``EMA``/``SWA`` evaluating their average,
the average at that check (SWA: with its recomputed BatchNorm statistics), else the raw weights. What
the module holds is owned by :mod:`lightning_tricks.callbacks._weights` (this callback owns its curve
and its copy of the best weights): the best weights are handed over with rank ``BEST``, which
outranks the averages' ``average_at_end`` whatever the callback order, the raw weights stay backed up
there (checkpoints keep them; a second ``fit`` trains them) and a later ``validate``/``test``
evaluates the best weights, so it gives the best logged value.

- ``restore_from="memory"``: on each new best, the measured ``state_dict`` tensors (parameters and
  buffers; ``ModuleWeights.measured_tensors``) are copied with one ``torch._foreach_copy_`` into
  buffers allocated once (on the module's device, or the CPU with ``best_on_cpu=True``). Beside an
  averaging callback the service also keeps a copy of the measured average at each validation end
  (one more model copy in memory, one copy per validation). Cost: one copy of the model in memory, one
  device-side copy per improvement. With ``save_best_weights=True`` the copy also goes in the
  callback's checkpoint state (the checkpoint grows by one model) so a resumed run can still restore
  a best epoch from before the interruption; with ``False`` a resumed run warns and keeps its final
  weights if its best epoch came before the resume.
- ``restore_from="checkpoint"``: no copy in memory; the weights come from ``best_model_path`` of a
  :class:`~lightning_tricks.callbacks.ModelCheckpoint` with the same ``monitor`` and ``mode`` (required
  at ``setup``): its raw weights, or the average stored in it when the best check measured an
  average (:func:`~lightning_tricks.averaging.averaged_state_dict`).

Logged every check (unless ``log_values=False``), under ``log_prefix`` (default ``early_stopping/``):
``gl``, ``pk``, ``pq`` (once ``strip`` training values exist), ``up_count`` and ``wait_count`` (the
patience counter of ``patience_rule``), whatever the criterion, so their curves can be plotted. When
the check runs in ``on_train_epoch_end`` (Lightning's default when validating once per epoch) they
go through ``pl_module.log``; when it runs in ``on_validation_end`` (where Lightning forbids
``self.log``) they go straight to the trainer's loggers.

The training metric for PQ is read at the check: with checks after validation
(``check_on_train_epoch_end=False``, chosen by Lightning when validation is not once per epoch)
it is the value of the last finished training epoch, one epoch behind the validation value.

Reference:
    Prechelt, L. (1998). Early Stopping — But When? In *Neural Networks: Tricks of the Trade*,
    LNCS 1524, pp. 55-69. Springer.

Example:
    >>> from lightning_tricks.callbacks import EarlyStopping
    >>> es = EarlyStopping(monitor="val/loss", criterion="gl", alpha=5.0, restore_best=True)
    >>> es.rule.describe()
    'GL_5'
    >>> EarlyStopping(monitor="val/acc", mode="max", criterion="up", s=2, strip=3).rule.describe()
    'UP_2 (strip 3)'
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import (
    EarlyStoppingReason,
    LightningModule,
    ModelCheckpoint,
    PLEarlyStopping,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_tricks.averaging import averaged_state_dict
from lightning_tricks.callbacks._weights import BEST, RAW, weights_of
from lightning_tricks.stopping import StopRule, best_index, to_score

__all__ = ["EarlyStopping", "RESTORE_FROM"]

RESTORE_FROM = ("memory", "checkpoint")
_STATE_VERSION = 1
_REASON = {
    "non_finite": EarlyStoppingReason.NON_FINITE_METRIC,
    "stopping_threshold": EarlyStoppingReason.STOPPING_THRESHOLD,
    "divergence_threshold": EarlyStoppingReason.DIVERGENCE_THRESHOLD,
}


class EarlyStopping(PLEarlyStopping):
    """Stop training by patience or Prechelt's GL / PQ / UP criteria; put the best weights back.

    Owns: the curve, the decision and its copy of the best measured weights. Shares: which weights
    are in the module (:func:`lightning_tricks.callbacks._weights.weights_of`): it reads what each
    validation was measured on and hands the best over at the end of fit with rank ``BEST``, which
    wins over any average whatever the callback order.

    Args:
        monitor: the validation metric (``E_va``), as logged.
        criterion: ``"patience"``, ``"gl"``, ``"pq"`` or ``"up"`` (formulas in :mod:`lightning_tricks.stopping`).
        mode: ``"min"`` or ``"max"``. For GL/PQ the metric becomes an error ``E = metric - optimum``
            (min) or ``optimum - metric`` (max); ``optimum`` defaults to 0 (min) / 1 (max: ``E = 1 - acc``).
        patience: ``n`` of ``criterion="patience"`` (int >= 1).
        patience_rule: ``"no_improvement"`` (Lightning's) or ``"increase"`` (``n`` rises in a row).
        min_delta: >= 0; a change of at most ``min_delta`` is no improvement / no rise.
        alpha: GL / PQ threshold (> 0); ``None``: 5 for GL, 0.5 for PQ.
        strip: strip length ``k`` of PQ and UP (int >= 1), in validation checks.
        s: successive rising strips for UP (int >= 1).
        optimum: the best value the monitored metric can take (see ``mode``).
        train_monitor: the training metric for ``P_k`` (PQ), logged once per epoch.
        train_mode: ``"min"`` or ``"max"`` for ``train_monitor``.
        train_optimum: its best possible value (default 0 for min, 1 for max).
        min_epochs: no criterion stops before the ``min_epochs``-th check (a non-finite metric still does).
        restore_best: put the best check's weights back in the module at the end of fit.
        restore_from: ``"memory"`` (a copy on each improvement) or ``"checkpoint"`` (a ModelCheckpoint's best).
        save_best_weights: with ``restore_from="memory"``, keep the in-memory copy in checkpoints.
        best_on_cpu: keep the in-memory copy on the CPU (saves device memory, costs a transfer per improvement).
        log_values: log every criterion's value each check.
        log_prefix: prefix of the logged names.
        verbose: print every check's values (rank zero). The stop reason is always printed.
        strict, check_finite, stopping_threshold, divergence_threshold, check_on_train_epoch_end,
            log_rank_zero_only: as in Lightning's ``EarlyStopping`` (``strict=False`` warns once when
            the metric is missing instead of raising).

    Attributes:
        stop_reason: ``"stopped at epoch 23: GL=5.4 > alpha=5 (best 0.081 at 17)"`` or ``None``.
        history, train_history, epochs: the monitored metric, the training metric (``nan`` when not
            logged) and the epoch of each check.
        best_epoch, best_value: the best check so far (``None`` before the first check).
        stopped_epoch, wait_count, best_score, stopping_reason, stopping_reason_message: Lightning's.
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        criterion: str = "patience",
        mode: str = "min",
        patience: int = 3,
        patience_rule: str = "no_improvement",
        min_delta: float = 0.0,
        alpha: float | None = None,
        strip: int = 5,
        s: int = 3,
        optimum: float | None = None,
        train_monitor: str = "train/loss_epoch",
        train_mode: str = "min",
        train_optimum: float | None = None,
        min_epochs: int = 0,
        restore_best: bool = True,
        restore_from: str = "memory",
        save_best_weights: bool = True,
        best_on_cpu: bool = False,
        log_values: bool = True,
        log_prefix: str = "early_stopping/",
        verbose: bool = False,
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
    ) -> None:
        for name, value in (("monitor", monitor), ("train_monitor", train_monitor)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty metric name, got {value!r}")
        if not isinstance(log_prefix, str):
            raise ValueError(f"log_prefix must be a str, got {log_prefix!r}")
        for name, value in (("restore_best", restore_best), ("save_best_weights", save_best_weights),
                            ("best_on_cpu", best_on_cpu), ("log_values", log_values), ("strict", strict)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if restore_from not in RESTORE_FROM:
            raise ValueError(f"restore_from must be one of {RESTORE_FROM}, got {restore_from!r}")
        if check_on_train_epoch_end is not None and not isinstance(check_on_train_epoch_end, bool):
            raise ValueError(f"check_on_train_epoch_end must be a bool or None, got {check_on_train_epoch_end!r}")
        # every rule argument is validated here, with the allowed values in the message
        self.rule = StopRule(
            criterion=criterion, mode=mode, patience=patience, patience_rule=patience_rule,
            min_delta=min_delta, alpha=alpha, strip=strip, s=s, optimum=optimum, train_mode=train_mode,
            train_optimum=train_optimum, min_epochs=min_epochs, check_finite=check_finite,
            stopping_threshold=stopping_threshold, divergence_threshold=divergence_threshold,
        )
        super().__init__(
            monitor=monitor, min_delta=min_delta, patience=patience, verbose=verbose, mode=mode,
            strict=strict, check_finite=check_finite, stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold, check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.criterion = criterion
        self.train_monitor = train_monitor
        self.min_epochs = min_epochs
        self.restore_best = restore_best
        self.restore_from = restore_from
        self.save_best_weights = save_best_weights
        self.best_on_cpu = best_on_cpu
        self.log_values = log_values
        self.log_prefix = log_prefix
        self.history: list[float] = []
        self.train_history: list[float] = []
        self.epochs: list[int] = []
        self.stop_reason: str | None = None
        self._best: dict[str, Tensor] = {}  # state_dict name -> preallocated copy of the best weights
        self._held_check: int | None = None  # index of the check whose weights are in self._best
        self.measured: list[str] = []  # per check: what the metric was measured on ("raw", "ema", "swa", ...)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------
    # identity, state
    # ------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, rule=self.rule.describe())

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
        """The in-memory copy of the best weights (``state_dict`` names), or ``None``."""
        return dict(self._best) if self._best else None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # Lightning's fields: wait_count, stopped_epoch, best_score, ...
        state.update(
            version=_STATE_VERSION,
            history=list(self.history),
            train_history=list(self.train_history),
            epochs=list(self.epochs),
            stop_reason=self.stop_reason,
            measured=list(self.measured),
        )
        if self.restore_best and self.restore_from == "memory" and self.save_best_weights and self._best:
            state["best_weights"] = dict(self._best)
            state["best_weights_check"] = self._held_check
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict.get("wait_count", 0))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))
        if "best_score" in state_dict:
            self.best_score = torch.as_tensor(state_dict["best_score"])
        self.stopping_reason = EarlyStoppingReason(
            state_dict.get("stopping_reason", EarlyStoppingReason.NOT_STOPPED.value))
        self.stopping_reason_message = state_dict.get("stopping_reason_message")
        self.history = [float(v) for v in state_dict.get("history", [])]
        self.train_history = [float(v) for v in state_dict.get("train_history", [math.nan] * len(self.history))]
        self.epochs = [int(e) for e in state_dict.get("epochs", range(len(self.history)))]
        self.stop_reason = state_dict.get("stop_reason")
        self.measured = [str(m) for m in state_dict.get("measured", [RAW] * len(self.history))]
        weights = state_dict.get("best_weights")
        if weights:
            self._best = dict(weights)
            self._held_check = state_dict.get("best_weights_check")

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # picks check_on_train_epoch_end like Lightning
        if stage != "fit":
            return
        if self.restore_best and self.restore_from == "memory":
            weights_of(pl_module).track_measured(True)  # the measured average survives its swap back
        if self.restore_best and self.restore_from == "checkpoint" and self._checkpoint_callback(trainer) is None:
            found = [(type(cb).__name__, getattr(cb, "monitor", None), getattr(cb, "mode", None))
                     for cb in trainer.checkpoint_callbacks]
            raise ValueError(
                f"restore_from='checkpoint' needs a ModelCheckpoint(monitor={self.monitor!r}, mode={self.mode!r}, "
                f"save_top_k != 0) among the trainer's callbacks; found {found or 'none'}. Add one, or use "
                "restore_from='memory'")
        if self.criterion == "pq" and not self._check_on_train_epoch_end:
            rank_zero_warn(
                f"EarlyStopping(criterion='pq') checks after validation (check_on_train_epoch_end=False): "
                f"{self.train_monitor!r} is then the last finished training epoch's value, one epoch "
                "behind the validation metric")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).fit_start()  # a second fit trains the raw weights, not the restored best

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).evaluation_start()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).evaluation_end()  # what this validation ran on, whoever swaps back first
        super().on_validation_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict):  # after fit the module holds the best weights: checkpoints keep the raw ones
            weights_of(pl_module).raw_into(sd)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        weights_of(pl_module).reloaded()  # Lightning has just loaded the checkpoint's raw weights

    def _validate_condition_metric(self, logs: dict[str, Tensor]) -> bool:
        if logs.get(self.monitor) is not None:
            return True
        msg = (f"EarlyStopping monitor={self.monitor!r} was not logged; the logged metrics are "
               f"{sorted(logs) or 'none'}. Log it (e.g. self.log({self.monitor!r}, ...) in validation_step) "
               "or set monitor to one of these")
        if self.strict:
            raise RuntimeError(msg)
        self._warn_once("monitor", msg + " (strict=False: this check is skipped)")
        return False

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        value = float(torch.as_tensor(logs[self.monitor]).squeeze())  # one host sync per check
        train = logs.get(self.train_monitor)
        if train is None and self.criterion == "pq":
            self._missing_train_metric(logs, trainer.current_epoch)
        train_value = math.nan if train is None else float(torch.as_tensor(train).squeeze())
        local_non_finite = self.rule.check_finite and not math.isfinite(value)
        if trainer.world_size > 1:  # one curve on all ranks: rank zero's
            value, train_value = trainer.strategy.broadcast((value, train_value), src=0)
        self.history.append(value)
        self.train_history.append(train_value)
        self.epochs.append(trainer.current_epoch)
        self.measured.append(weights_of(trainer.lightning_module).measured or RAW)

        d = self.rule.decide(self.history, self.train_history, self.epochs, name=self.monitor)
        if d.best == len(self.history) - 1 and self.restore_best and self.restore_from == "memory":
            self._snapshot(trainer.lightning_module, d.best)
        self.wait_count = int(d.values.get("wait_count", self.wait_count))
        if d.best >= 0:
            self.best_score = torch.tensor(self.history[d.best])
        self._log_values(trainer, d.values)
        if self.verbose:
            vals = ", ".join(f"{k}={v:.4g}" for k, v in d.values.items())
            rank_zero_info(f"EarlyStopping epoch {trainer.current_epoch}: {self.monitor}={value:.4g}; {vals}")

        should_stop = trainer.strategy.reduce_boolean_decision(d.stop or local_non_finite, all=False)
        if should_stop:
            reason = d.reason if d.stop else f"{self.monitor} is not finite on some rank"
            kind = d.kind if d.stop else "non_finite"
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stop_reason = f"stopped at epoch {trainer.current_epoch}: {reason}"
            self.stopping_reason = _REASON.get(kind, EarlyStoppingReason.PATIENCE_EXHAUSTED)
            self.stopping_reason_message = self.stop_reason
            rank_zero_info(self.stop_reason)

    def _missing_train_metric(self, logs: dict[str, Tensor], epoch: int) -> None:
        """PQ without its training metric: an error if it was never logged, else a warning (no PQ on that strip)."""
        msg = (f"EarlyStopping(criterion='pq') needs the training metric train_monitor={self.train_monitor!r} at "
               f"every check, but it was not logged; the logged metrics are {sorted(logs)}. Log it once per epoch "
               "(self.log(..., on_epoch=True)) or set train_monitor to one of these")
        never = all(math.isnan(v) for v in self.train_history)
        if never and len(self.history) >= self.rule.strip:  # one missing check is allowed: checks after validation
            raise RuntimeError(msg)
        if not never:
            self._warn_once("train", msg + f" (missing at epoch {epoch}; PQ is not evaluated on "
                                           "strips without it)")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.restore_best:
            return
        best = self.best_check
        if best < 0:
            self._warn_once("restore", f"EarlyStopping: no finite value of {self.monitor!r} was recorded, no best "
                                       "weights to restore")
            return
        epoch, value = self.epochs[best], self.history[best]
        if self.restore_from == "checkpoint":
            self._restore_from_checkpoint(trainer, pl_module, epoch)
            return
        if not self._best or self._held_check != best:
            self._warn_once(
                "restore",
                f"EarlyStopping: the weights of the best epoch {epoch} ({self.monitor}={value:.4g}) are not "
                "available (the run resumed from a checkpoint saved with save_best_weights=False); the module "
                "keeps its final weights")
            return
        weights_of(pl_module).hand_over(BEST, "best", self._best)
        rank_zero_info(f"EarlyStopping: restored the weights of epoch {epoch} ({self.monitor}={value:.4g}, "
                       f"measured on {self._measured_at(best)!r})")

    def _measured_at(self, check: int) -> str:
        return self.measured[check] if 0 <= check < len(self.measured) else RAW

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _snapshot(self, pl_module: LightningModule, check: int) -> None:
        """Copy the measured weights into the preallocated buffers (allocated on first use or shape change)."""
        weights = weights_of(pl_module)
        live = weights.measured_tensors() if weights.measured is not None else weights.raw_tensors()
        target = torch.device("cpu") if self.best_on_cpu else None
        same = live.keys() == self._best.keys() and all(
            b.shape == live[n].shape and b.dtype == live[n].dtype
            and b.device == (target or live[n].device) for n, b in self._best.items())
        if not same:
            self._best = {n: torch.empty_like(t, device=target or t.device) for n, t in live.items()}
        names = list(live)
        torch._foreach_copy_([self._best[n] for n in names], [live[n] for n in names])
        self._held_check = check

    def _checkpoint_callback(self, trainer: Trainer) -> ModelCheckpoint | None:
        for cb in trainer.checkpoint_callbacks:
            if (isinstance(cb, ModelCheckpoint) and cb.monitor == self.monitor and cb.mode == self.mode
                    and cb.save_top_k != 0):
                return cb
        return None

    def _restore_from_checkpoint(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        cb = self._checkpoint_callback(trainer)
        path = cb.best_model_path if cb is not None else ""
        if not path:
            self._warn_once("restore", "EarlyStopping(restore_from='checkpoint'): the ModelCheckpoint saved no best "
                                       "checkpoint; the module keeps its final weights")
            return
        checkpoint = trainer.strategy.load_checkpoint(path)
        label = self._measured_at(self.best_check)
        state = checkpoint["state_dict"]
        if label != RAW:  # the best value was measured on an average: the one stored in that checkpoint
            try:
                state = averaged_state_dict(checkpoint, which=label.upper())
            except KeyError:
                rank_zero_warn(f"EarlyStopping: the best check measured {label!r} weights, but {path} holds no "
                               "such average; restoring its raw weights")
        weights_of(pl_module).hand_over(BEST, "best", state)
        saved = checkpoint.get("epoch")
        if saved is not None and saved != epoch:
            rank_zero_warn(f"EarlyStopping: the best checkpoint {path} is from epoch {saved}, the best check from "
                           f"epoch {epoch} (the ModelCheckpoint saves on another schedule)")
        rank_zero_info(f"EarlyStopping: restored the weights of {path}")

    def _log_values(self, trainer: Trainer, values: dict[str, float]) -> None:
        if not self.log_values or not values:
            return
        metrics = {self.log_prefix + k: float(v) for k, v in values.items()}
        if self._check_on_train_epoch_end:  # called from on_train_epoch_end: self.log is allowed
            trainer.lightning_module.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=False,
                                              logger=bool(trainer.loggers))
        elif trainer.is_global_zero:  # on_validation_end: Lightning forbids self.log there
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
