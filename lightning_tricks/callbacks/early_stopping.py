"""Early stopping with Prechelt's criteria (GL, PQ, UP) and patience, restore-best, DDP-consistent.

:class:`EarlyStopping` is a drop-in for Lightning's ``EarlyStopping``: with Lightning's arguments only
it takes the same arguments (same positional order), accepts the same values, raises the same
exceptions, logs the same messages, decides through the same method and reads and writes the same
checkpoint entry. What it adds is opt-in (keyword-only arguments):

- ``criterion="patience"`` (default): Lightning's rule (``n`` checks without an improvement by more
  than ``min_delta``), decided by Lightning's ``_evaluate_stopping_criteria``; with
  ``patience_rule="increase"``, ``n`` increases in a row (the seed's rule) decided by the pure rule;
- ``"gl"``: ``GL(t) = 100 * (E_va(t) / E_opt(t) - 1) > alpha``;
- ``"pq"``: ``GL(t) / P_k(t) > alpha`` at strip ends, ``P_k(t) = 1000 * (sum E_tr(last k) / (k * min
  E_tr(last k)) - 1)`` with ``E_tr`` the logged ``train_monitor`` (default ``train/loss_epoch``);
- ``"up"``: the monitored metric got worse at the end of ``s`` successive strips of ``k = strip`` checks.

The decision. Every check first calls Lightning's ``_evaluate_stopping_criteria(current)`` (on this
rank's value, as Lightning does), which decides the non-finite value, ``stopping_threshold``,
``divergence_threshold`` and patience and keeps ``best_score`` / ``wait_count`` / ``stopping_reason``;
a subclass or a mock that overrides it is obeyed. With one of our criteria (GL / PQ / UP /
``patience_rule="increase"``) Lightning's patience stop is ignored (the criterion replaces it; the
thresholds and the non-finite check still apply) and the pure rule
:class:`lightning_tricks.stopping.StopRule`, where the formulas live, decides the criterion on the whole
curve. The callback keeps that curve (one value per check: the monitored metric, the training metric,
the epoch) because Prechelt's criteria need it; it is in the checkpoint (a few floats per epoch), so a
resumed run decides exactly like an uninterrupted one, mid-strip included. ``min_epochs`` (ours) holds
back every stop but a non-finite one before that check.

Rank consistency. The decision is reduced across ranks as in Lightning (any rank stops all of them,
``reduce_boolean_decision(all=False)``). The curve is rank zero's (one ``broadcast`` of two floats per
check), so Prechelt's criteria, the best check (hence the restored weights) and :attr:`stop_reason`
are the same on all ranks even for metrics logged without ``sync_dist``. Log the monitored metric with
``sync_dist=True`` to decide on the global value rather than rank zero's.

Checkpoints. ``state_key`` is Lightning's (``EarlyStopping{'monitor': ..., 'mode': ...}``) with
Lightning's rule; with one of our criteria it adds ``'rule': 'GL_5'`` so two instances on one metric
stay apart. Our state (the curve, the reason, the best weights) sits under extra keys Lightning's
``load_state_dict`` ignores, and is loaded with defaults when absent, so a checkpoint moves both ways
between Lightning's class and ours; if the checkpoint has no entry under this instance's key, the
entry under the other form of the key (with/without ``'rule'``) is loaded. ``state_dict()`` returns
copies.

Restore-best (``restore_best=True``; off by default as in Lightning, on in our Hydra configs): at the
end of fit (``on_train_end``) the module gets the weights of the best check back (the first minimum of
the monitored metric, ``min_delta`` ignored). These are the weights the best value was *measured* on:
with ``EMA``/``SWA`` evaluating their average, the average at that check (SWA: with its recomputed
BatchNorm statistics), else the raw weights. What the module holds is owned by
:mod:`lightning_tricks.callbacks._weights` (this callback owns its curve and its copy of the best
weights): the best weights are handed over with rank ``BEST``, which outranks the averages'
``average_at_end`` whatever the callback order, the raw weights stay backed up there (checkpoints keep
them; a second ``fit`` trains them) and a later ``validate``/``test`` evaluates the best weights, so it
gives the best logged value.

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

Logged every check when ``log_values`` is on (default: on with our criteria, off with Lightning's rule,
so a swapped import logs nothing new), under ``log_prefix`` (default ``early_stopping/``): ``gl``,
``pk``, ``pq`` (once ``strip`` training values exist), ``up_count`` and ``wait_count`` (the patience
counter: Lightning's, or the ``increase`` counter), whatever the criterion, so their curves can be
plotted. When the check runs in ``on_train_epoch_end`` (Lightning's default when validating once per
epoch) they go through ``pl_module.log``; when it runs in ``on_validation_end`` (where Lightning
forbids ``self.log``) they go straight to the trainer's loggers. Messages: Lightning's (``verbose``
logs them); a stop by one of our criteria is also printed on rank zero (:attr:`stop_reason`).

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
    >>> EarlyStopping("val_loss").state_key   # Lightning's key: its checkpoints resume into ours
    "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import (
    EarlyStoppingReason,
    LightningModule,
    MisconfigurationException,
    ModelCheckpoint,
    PLEarlyStopping,
    Trainer,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_tricks.averaging import averaged_state_dict
from lightning_tricks.callbacks._common import MemoStateKey
from lightning_tricks.callbacks._weights import BEST, RAW, weights_of
from lightning_tricks.stopping import StopRule, best_index, to_score

__all__ = ["EarlyStopping", "EarlyStoppingConfigError", "RESTORE_FROM"]

RESTORE_FROM = ("memory", "checkpoint")
_STATE_VERSION = 2  # 2: non-finite curve values are stored as None (plain, comparable types)
_REASON = {
    "non_finite": EarlyStoppingReason.NON_FINITE_METRIC,
    "stopping_threshold": EarlyStoppingReason.STOPPING_THRESHOLD,
    "divergence_threshold": EarlyStoppingReason.DIVERGENCE_THRESHOLD,
}


class EarlyStoppingConfigError(MisconfigurationException, ValueError):
    """A bad argument of Lightning's (``mode``): Lightning's ``MisconfigurationException`` and a ``ValueError``."""


def _finite_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _plain(values: list[float]) -> list[float | None]:
    """Floats for the checkpoint, ``nan`` as ``None`` (``nan != nan`` would break state comparisons)."""
    return [None if math.isnan(v) else v for v in values]


def _floats(values: Any) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


class EarlyStopping(MemoStateKey, PLEarlyStopping):
    """Lightning's ``EarlyStopping``, plus Prechelt's GL / PQ / UP criteria and restore-best, opt-in.

    Owns: the curve, the decision and its copy of the best measured weights. Shares: which weights
    are in the module (:func:`lightning_tricks.callbacks._weights.weights_of`): it reads what each
    validation was measured on and hands the best over at the end of fit with rank ``BEST``, which
    wins over any average whatever the callback order.

    Args:
        monitor, min_delta, patience, verbose, mode, strict, check_finite, stopping_threshold,
            divergence_threshold, check_on_train_epoch_end, log_rank_zero_only: Lightning's, in
            Lightning's order, with Lightning's defaults, accepted values and exceptions (a bad
            ``mode`` raises :class:`EarlyStoppingConfigError`, a ``MisconfigurationException`` that
            is also a ``ValueError``). ``monitor`` defaults to ``"val/loss"`` (our modules' name) and
            must be a non-empty name. ``patience`` is ``n`` of ``criterion="patience"`` (``0`` acts as
            ``1``, as in Lightning). ``strict=False`` also warns once when the metric is missing.

    Keyword-only args (ours):
        criterion: ``"patience"``, ``"gl"``, ``"pq"`` or ``"up"`` (formulas in :mod:`lightning_tricks.stopping`).
        patience_rule: ``"no_improvement"`` (Lightning's) or ``"increase"`` (``n`` rises in a row).
        alpha: GL / PQ threshold (> 0); ``None``: 5 for GL, 0.5 for PQ.
        strip: strip length ``k`` of PQ and UP (int >= 1), in validation checks.
        s: successive rising strips for UP (int >= 1).
        optimum: the best value the monitored metric can take. For GL/PQ the metric becomes an error
            ``E = metric - optimum`` (min) or ``optimum - metric`` (max); default 0 (min) / 1 (max:
            ``E = 1 - acc``). With our criteria ``min_delta`` must be ``>= 0``.
        train_monitor: the training metric for ``P_k`` (PQ), logged once per epoch.
        train_mode: ``"min"`` or ``"max"`` for ``train_monitor``.
        train_optimum: its best possible value (default 0 for min, 1 for max).
        min_epochs: no stop before the ``min_epochs``-th check (a non-finite metric still stops).
        restore_best: put the best check's weights back in the module at the end of fit. Default
            ``False`` (Lightning never touches the weights); our Hydra configs turn it on.
        restore_from: ``"memory"`` (a copy on each improvement) or ``"checkpoint"`` (a ModelCheckpoint's best).
        save_best_weights: with ``restore_from="memory"``, keep the in-memory copy in checkpoints.
        best_on_cpu: keep the in-memory copy on the CPU (saves device memory, costs a transfer per improvement).
        log_values: log every criterion's value each check; ``None`` (default): on with our
            criteria, off with Lightning's rule.
        log_prefix: prefix of the logged names.

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
        criterion: str = "patience",
        patience_rule: str = "no_improvement",
        alpha: float | None = None,
        strip: int = 5,
        s: int = 3,
        optimum: float | None = None,
        train_monitor: str = "train/loss_epoch",
        train_mode: str = "min",
        train_optimum: float | None = None,
        min_epochs: int = 0,
        restore_best: bool = False,
        restore_from: str = "memory",
        save_best_weights: bool = True,
        best_on_cpu: bool = False,
        log_values: bool | None = None,
        log_prefix: str = "early_stopping/",
    ) -> None:
        if mode not in self.mode_dict:  # Lightning's exception and message, also a ValueError
            raise EarlyStoppingConfigError(f"`mode` can be {', '.join(self.mode_dict.keys())}, got {mode}")
        for metric_arg, metric in (("monitor", monitor), ("train_monitor", train_monitor)):
            if not isinstance(metric, str) or not metric:
                raise ValueError(f"{metric_arg} must be a non-empty metric name, got {metric!r}")
        if not isinstance(log_prefix, str):
            raise ValueError(f"log_prefix must be a str, got {log_prefix!r}")
        for name, value in (
            ("restore_best", restore_best),
            ("save_best_weights", save_best_weights),
            ("best_on_cpu", best_on_cpu),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if log_values is not None and not isinstance(log_values, bool):
            raise ValueError(f"log_values must be a bool or None, got {log_values!r}")
        if restore_from not in RESTORE_FROM:
            raise ValueError(f"restore_from must be one of {RESTORE_FROM}, got {restore_from!r}")
        lightning_rule = criterion == "patience" and patience_rule == "no_improvement"
        # Lightning's values that Lightning accepts but the pure rule does not (patience 0, a negative
        # min_delta, a tensor threshold) only matter to Lightning's own decision: the rule gets a valid form
        rule_patience = max(patience, 1) if isinstance(patience, int) and not isinstance(patience, bool) else patience
        rule_delta = min_delta
        if lightning_rule and _finite_real(min_delta) and min_delta < 0:
            rule_delta = 0.0
        # every rule argument is validated here, with the allowed values in the message
        self.rule = StopRule(
            criterion=criterion,
            mode=mode,
            patience=rule_patience,
            patience_rule=patience_rule,
            min_delta=rule_delta,
            alpha=alpha,
            strip=strip,
            s=s,
            optimum=optimum,
            train_mode=train_mode,
            train_optimum=train_optimum,
            min_epochs=min_epochs,
            check_finite=bool(check_finite),
            stopping_threshold=stopping_threshold if _finite_real(stopping_threshold) else None,
            divergence_threshold=divergence_threshold if _finite_real(divergence_threshold) else None,
        )
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.criterion = criterion
        self.train_monitor = train_monitor
        self.min_epochs = min_epochs
        self.restore_best = restore_best
        self.restore_from = restore_from
        self.save_best_weights = save_best_weights
        self.best_on_cpu = best_on_cpu
        self.log_values = (not lightning_rule) if log_values is None else log_values
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
    def lightning_rule(self) -> bool:
        """Whether the stop rule is Lightning's (``criterion="patience"``, ``patience_rule="no_improvement"``)."""
        return self.criterion == "patience" and self.rule.patience_rule == "no_improvement"

    @property
    def state_key(self) -> str:
        if self.lightning_rule:
            return self._generate_state_key(monitor=self.monitor, mode=self.mode)
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, rule=self.rule.describe())

    def _other_state_keys(self) -> list[str]:
        """Where a checkpoint without this key may hold this callback's state: Lightning's key / ours with the rule."""
        keys = [
            self._generate_state_key(monitor=self.monitor, mode=self.mode, rule=self.rule.describe()),
            self._generate_state_key(monitor=self.monitor, mode=self.mode),
        ]
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
        """The in-memory copy of the best weights (``state_dict`` names; the buffers, not copies), or ``None``."""
        return dict(self._best) if self._best else None

    def state_dict(self) -> dict[str, Any]:
        """Lightning's fields, then ours under keys Lightning's ``load_state_dict`` ignores; all copies."""
        state = super().state_dict()  # wait_count, stopped_epoch, best_score, patience, stopping_reason...
        state.update(
            version=_STATE_VERSION,
            history=_plain(self.history),
            train_history=_plain(self.train_history),
            epochs=list(self.epochs),
            stop_reason=self.stop_reason,
            measured=list(self.measured),
        )
        if self.restore_best and self.restore_from == "memory" and self.save_best_weights and self._best:
            state["best_weights"] = {n: t.detach().clone() for n, t in self._best.items()}
            state["best_weights_check"] = self._held_check
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Reads Lightning's fields like Lightning (a missing one keeps its value) and ours with defaults."""
        self.wait_count = state_dict.get("wait_count", self.wait_count)
        self.stopped_epoch = state_dict.get("stopped_epoch", self.stopped_epoch)
        self.best_score = state_dict.get("best_score", self.best_score)
        if "patience" in state_dict:  # Lightning restores it too
            self.patience = state_dict["patience"]
            if self.lightning_rule and isinstance(self.patience, int) and not isinstance(self.patience, bool):
                self.rule = replace(self.rule, patience=max(self.patience, 1))
        self.stopping_reason = EarlyStoppingReason(
            state_dict.get("stopping_reason", EarlyStoppingReason.NOT_STOPPED.value)
        )
        self.stopping_reason_message = state_dict.get("stopping_reason_message")
        self.history = _floats(state_dict.get("history", []))
        self.train_history = _floats(state_dict.get("train_history", [None] * len(self.history)))
        self.epochs = [int(e) for e in state_dict.get("epochs", range(len(self.history)))]
        self.stop_reason = state_dict.get("stop_reason")
        self.measured = [str(m) for m in state_dict.get("measured", [RAW] * len(self.history))]
        weights = state_dict.get("best_weights")
        if weights:
            self._best = {n: t.detach().clone() for n, t in weights.items()}
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
            found = [
                (type(cb).__name__, getattr(cb, "monitor", None), getattr(cb, "mode", None))
                for cb in trainer.checkpoint_callbacks
            ]
            raise ValueError(
                f"restore_from='checkpoint' needs a ModelCheckpoint(monitor={self.monitor!r}, mode={self.mode!r}, "
                f"save_top_k != 0) among the trainer's callbacks; found {found or 'none'}. Add one, or use "
                "restore_from='memory'"
            )
        if self.criterion == "pq" and not self._check_on_train_epoch_end:
            rank_zero_warn(
                f"EarlyStopping(criterion='pq') checks after validation (check_on_train_epoch_end=False): "
                f"{self.train_monitor!r} is then the last finished training epoch's value, one epoch "
                "behind the validation metric"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).fit_start()  # a second fit trains the raw weights, not the restored best

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).evaluation_start()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights_of(pl_module).evaluation_end()  # what this validation ran on, whoever swaps back first
        super().on_validation_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if pl_module is not None:  # after fit the module may hold the best weights: the raw ones are kept for resume
            weights_of(pl_module).save_into(checkpoint, self.state_key)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if pl_module is not None:
            weights_of(pl_module).load_raw(checkpoint)  # the module trains on from the checkpoint's raw weights
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:  # written by Lightning's class, or by ours under the other key form
            for key in self._other_state_keys():
                if key in states:
                    self.load_state_dict(states[key])
                    break

    def _validate_condition_metric(self, logs: dict[str, Tensor]) -> bool:
        if logs.get(self.monitor) is not None:
            return True
        msg = (
            f"Early stopping conditioned on metric `{self.monitor}` which is not available."
            " Pass in or modify your `EarlyStopping` callback to use any of the following:"
            f" `{'`, `'.join(list(logs.keys()))}` (EarlyStopping monitor={self.monitor!r} was not logged; the "
            f"logged metrics are {sorted(logs) or 'none'}. Log it, e.g. self.log({self.monitor!r}, ...) in "
            "validation_step, or set monitor to one of these)"
        )
        if self.strict:
            raise RuntimeError(msg)
        if "monitor" not in self._warned:  # Lightning warns only when verbose: we say it once (never silent)
            self._warned.add("monitor")
            rank_zero_warn(msg + " (strict=False: these checks are skipped)", category=RuntimeWarning)
        return False

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        logs = trainer.callback_metrics
        if getattr(trainer, "fast_dev_run", False) or not self._validate_condition_metric(logs):
            return
        current = logs[self.monitor].squeeze()
        module = trainer.lightning_module
        value = float(current)  # one host sync per check
        train = logs.get(self.train_monitor)
        if train is None and self.criterion == "pq":
            self._missing_train_metric(logs, trainer.current_epoch)
        train_value = math.nan if train is None else float(torch.as_tensor(train).squeeze())
        if trainer.world_size > 1:  # one curve on all ranks: rank zero's
            value, train_value = trainer.strategy.broadcast((value, train_value), src=0)
        self.history.append(value)
        self.train_history.append(train_value)
        self.epochs.append(trainer.current_epoch)
        self.measured.append((weights_of(module).measured or RAW) if module is not None else RAW)
        checks = len(self.history)

        d = self.rule.decide(self.history, self.train_history, self.epochs, name=self.monitor)
        if d.best == checks - 1 and self.restore_best and self.restore_from == "memory" and module is not None:
            self._snapshot(module, d.best)

        # Lightning's decision (non-finite, thresholds, patience) on this rank's value, by Lightning's method
        before = self.stopping_reason
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        should_stop, reason = self._evaluate_stopping_criteria(current)
        kind = self.stopping_reason  # set by this call (NOT_STOPPED if an override did not set one)
        if should_stop and not self.lightning_rule and kind == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            should_stop, reason = False, None  # our criterion replaces Lightning's patience
        if should_stop and checks < self.min_epochs and kind != EarlyStoppingReason.NON_FINITE_METRIC:
            should_stop, reason = False, None  # our warm-up
        ours = (
            not self.lightning_rule and d.stop and not should_stop and d.kind not in _REASON
        )  # the thresholds and non-finite are Lightning's to decide
        if ours:
            should_stop, reason = True, d.reason
            kind = EarlyStoppingReason.PATIENCE_EXHAUSTED
        self.stopping_reason = kind if should_stop and kind != EarlyStoppingReason.NOT_STOPPED else before
        if self.rule.patience_rule == "increase":
            self.wait_count = int(d.values.get("wait_count", self.wait_count))

        self._log_values(trainer, {**d.values, "wait_count": float(self.wait_count)})
        if self.verbose:
            vals = ", ".join(f"{k}={v:.4g}" for k, v in d.values.items())
            rank_zero_info(f"EarlyStopping epoch {trainer.current_epoch}: {self.monitor}={value:.4g}; {vals}")

        # stop every process if any process decides to stop (Lightning's vote)
        stop_all = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or stop_all
        if stop_all:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
            why = d.reason if d.stop else reason or "a stop was signalled on another rank"
            self.stop_reason = f"stopped at epoch {trainer.current_epoch}: {why}"
            if ours:
                rank_zero_info(self.stop_reason)
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _missing_train_metric(self, logs: dict[str, Tensor], epoch: int) -> None:
        """PQ without its training metric: an error if it was never logged, else a warning (no PQ on that strip)."""
        msg = (
            f"EarlyStopping(criterion='pq') needs the training metric train_monitor={self.train_monitor!r} at "
            f"every check, but it was not logged; the logged metrics are {sorted(logs)}. Log it once per epoch "
            "(self.log(..., on_epoch=True)) or set train_monitor to one of these"
        )
        never = all(math.isnan(v) for v in self.train_history)
        if never and len(self.history) >= self.rule.strip:  # one missing check is allowed: checks after validation
            raise RuntimeError(msg)
        if not never:
            self._warn_once("train", msg + f" (missing at epoch {epoch}; PQ is not evaluated on strips without it)")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.restore_best or pl_module is None:
            return
        best = self.best_check
        if best < 0:
            self._warn_once(
                "restore",
                f"EarlyStopping: no finite value of {self.monitor!r} was recorded, no best weights to restore",
            )
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
                "keeps its final weights",
            )
            return
        weights_of(pl_module).hand_over(BEST, "best", self._best)
        rank_zero_info(
            f"EarlyStopping: restored the weights of epoch {epoch} ({self.monitor}={value:.4g}, "
            f"measured on {self._measured_at(best)!r})"
        )

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
            b.shape == live[n].shape and b.dtype == live[n].dtype and b.device == (target or live[n].device)
            for n, b in self._best.items()
        )
        if not same:
            self._best = {n: torch.empty_like(t, device=target or t.device) for n, t in live.items()}
        names = list(live)
        torch._foreach_copy_([self._best[n] for n in names], [live[n] for n in names])
        self._held_check = check

    def _checkpoint_callback(self, trainer: Trainer) -> ModelCheckpoint | None:
        for cb in trainer.checkpoint_callbacks:
            if (
                isinstance(cb, ModelCheckpoint)
                and cb.monitor == self.monitor
                and cb.mode == self.mode
                and cb.save_top_k != 0
            ):
                return cb
        return None

    def _restore_from_checkpoint(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        cb = self._checkpoint_callback(trainer)
        path = cb.best_model_path if cb is not None else ""
        if not path:
            self._warn_once(
                "restore",
                "EarlyStopping(restore_from='checkpoint'): the ModelCheckpoint saved no best "
                "checkpoint; the module keeps its final weights",
            )
            return
        checkpoint = trainer.strategy.load_checkpoint(path)
        label = self._measured_at(self.best_check)
        state = checkpoint["state_dict"]
        if label != RAW:  # the best value was measured on an average: the one stored in that checkpoint
            try:
                state = averaged_state_dict(checkpoint, which=label.upper())
            except KeyError:
                rank_zero_warn(
                    f"EarlyStopping: the best check measured {label!r} weights, but {path} holds no "
                    "such average; restoring its raw weights"
                )
        weights_of(pl_module).hand_over(BEST, "best", state)
        saved = checkpoint.get("epoch")
        if saved is not None and saved != epoch:
            rank_zero_warn(
                f"EarlyStopping: the best checkpoint {path} is from epoch {saved}, the best check from "
                f"epoch {epoch} (the ModelCheckpoint saves on another schedule)"
            )
        rank_zero_info(f"EarlyStopping: restored the weights of {path}")

    def _log_values(self, trainer: Trainer, values: dict[str, float]) -> None:
        if not self.log_values or not values or trainer.lightning_module is None:
            return
        metrics = {self.log_prefix + k: float(v) for k, v in values.items()}
        if self._check_on_train_epoch_end:  # called from on_train_epoch_end: self.log is allowed
            trainer.lightning_module.log_dict(
                metrics, on_step=False, on_epoch=True, prog_bar=False, logger=bool(trainer.loggers)
            )
        elif trainer.is_global_zero:  # on_validation_end: Lightning forbids self.log there
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
