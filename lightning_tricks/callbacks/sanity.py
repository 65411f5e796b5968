"""The CS231n recipe's checks as callbacks over :mod:`lightning_tricks.sanity`.

Monitors log straight to the Trainer's loggers at the step they measured (as ``LearningRateMonitor``
does), whatever ``log_every_n_steps`` is; their last values are on ``.last``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks._lightning import Callback, LightningModule, Trainer, rank_zero_info, rank_zero_warn
from lightning_tricks.callbacks._common import log_to_loggers
from lightning_tricks.checks import check_choice, check_float, check_int
from lightning_tricks.sanity import (
    InitialLossReport,
    LossFn,
    OverfitResult,
    SanityCheckError,
    UpdateRatio,
    check_band,
    check_expected_loss,
    check_overfit_args,
    grad_norms,
    initial_loss,
    judge_ratio,
    median,
    overfit_check,
    param_layout,
    relu_metrics,
    relu_stats,
    tracked_params,
)

__all__ = [
    "ACTIONS",
    "DeadUnitMonitor",
    "GradNormMonitor",
    "InitialLossCheck",
    "OverfitCheck",
    "UpdateRatioMonitor",
    "log_to_loggers",
]

ACTIONS = ("warn", "raise")


def _report(trainer: Trainer, name: str, passed: bool, reason: str, action: str) -> None:
    """All ranks agree on ``passed``; then inform, warn or raise (on every rank, so none hangs)."""
    passed = bool(trainer.strategy.reduce_boolean_decision(bool(passed), all=True))
    if passed:
        rank_zero_info(f"{name}: passed: {reason}")
    elif action == "raise":
        raise SanityCheckError(f"{name} failed: {reason}")
    else:
        rank_zero_warn(f"{name} failed: {reason}")


class InitialLossCheck(Callback):
    """On the first training batch, the loss with regularization off must be within ``rtol`` of ``log(C)``.

    :func:`lightning_tricks.sanity.initial_loss`; not on resume. Logged: ``sanity/initial_loss(_expected)``.

    Args:
        expected: ``"log_num_classes"`` or the expected loss as a number (> 0).
        rtol: relative tolerance, > 0.
        action: ``"warn"`` or ``"raise"`` (:class:`SanityCheckError`).
        loss_fn: ``(logits, y) -> loss``; default softmax cross-entropy (hard or soft targets).

    Example:
        >>> InitialLossCheck(rtol=0.1, action="raise").expected
        'log_num_classes'
    """

    def __init__(
        self,
        expected: str | float = "log_num_classes",
        rtol: float = 0.1,
        action: str = "warn",
        loss_fn: LossFn | None = None,
    ) -> None:
        super().__init__()
        self.expected = check_expected_loss(expected)
        check_float("rtol", rtol, 0, low_open=True)
        self.rtol = float(rtol)
        self.action = check_choice("action", action, ACTIONS)
        self.loss_fn = loss_fn
        self.report: InitialLossReport | None = None
        self._pending = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pending = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._pending:
            return
        self._pending = False
        if trainer.global_step > 0:
            rank_zero_info(f"InitialLossCheck: skipped, the run resumed at step {trainer.global_step}")
            return
        num_classes = getattr(pl_module, "num_classes", None)
        num_classes = num_classes if isinstance(num_classes, int) else None
        self.report = initial_loss(pl_module, batch, self.expected, self.rtol, num_classes, loss_fn=self.loss_fn)
        metrics = {"sanity/initial_loss": self.report.loss, "sanity/initial_loss_expected": self.report.expected}
        log_to_loggers(trainer, metrics)
        _report(trainer, "InitialLossCheck", self.report.passed, self.report.reason, self.action)


class OverfitCheck(Callback):
    """Before training, a copy of the module must overfit a tiny training subset.

    :func:`lightning_tricks.sanity.overfit_check` at ``on_train_start`` (not on resume); the real module,
    optimizer and RNG are untouched. Logged: ``sanity/overfit_loss``, ``_passed``, ``_steps``.

    Args:
        num_samples: subset size, >= 1.
        steps: at most this many optimizer steps (stops early at ``target_loss``), >= 1.
        target_loss: the loss that counts as near zero, > 0.
        lr: ``None`` (the configured LRs) or an LR >= 0 for every group.
        action: ``"warn"`` or ``"raise"`` (:class:`SanityCheckError`).
        loss_fn: ``(logits, y) -> loss``; default softmax cross-entropy.
        seed: seed of the copy's training (on a forked RNG).
    """

    def __init__(
        self,
        num_samples: int = 20,
        steps: int = 200,
        target_loss: float = 0.05,
        lr: float | None = None,
        action: str = "warn",
        loss_fn: LossFn | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_overfit_args(num_samples, steps, target_loss, lr)
        self.num_samples, self.steps, self.target_loss = num_samples, steps, float(target_loss)
        self.lr = None if lr is None else float(lr)
        self.action = check_choice("action", action, ACTIONS)
        self.loss_fn = loss_fn
        self.seed = int(seed)
        self.result: OverfitResult | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0:
            rank_zero_info(f"OverfitCheck: skipped, the run resumed at step {trainer.global_step}")
            return
        data = trainer.train_dataloader
        if data is None:
            raise ValueError("OverfitCheck: the Trainer has no training dataloader")
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.result = overfit_check(
            pl_module, data, num_samples=self.num_samples, steps=self.steps, target_loss=self.target_loss,
            lr=self.lr, optimizer=optimizer, loss_fn=self.loss_fn, seed=self.seed,
        )  # fmt: skip
        r = self.result
        metrics = {"sanity/overfit_loss": r.final_loss, "sanity/overfit_passed": float(r.passed)}
        log_to_loggers(trainer, {**metrics, "sanity/overfit_steps": float(r.steps)})
        _report(trainer, "OverfitCheck", r.passed, r.reason, self.action)


class UpdateRatioMonitor(Callback):
    """Every ``every_n_steps`` optimizer steps, log ``||w_after - w_before|| / ||w_before||`` per tensor.

    Weights only by default (a zero bias has no ratio). Logged: ``update_ratio/<param name>``,
    ``update_ratio/median``; a tensor outside ``band`` is warned about once (checkpointed).

    Args:
        every_n_steps: measure every this many optimizer steps, >= 1.
        band: ``(low, high)`` with ``0 < low < high``; healthy ratios are inside.
        params: ``"weights"`` (tensors with ``ndim >= 2``) or ``"all"``.
        log_per_tensor: log each tensor's ratio (else only the median).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        band: Sequence[float] = (1e-4, 1e-2),
        params: str = "weights",
        log_per_tensor: bool = True,
    ) -> None:
        super().__init__()
        check_int("every_n_steps", every_n_steps, 1)
        self.every_n_steps = every_n_steps
        self.band = check_band(band)
        self.params = check_choice("params", params, ("weights", "all"))
        self.log_per_tensor = bool(log_per_tensor)
        self.warned: set[str] = set()
        self.last: dict[str, float] = {}
        self._tracker: UpdateRatio | None = None
        self._names: list[str] = []
        self._layout: tuple[int, ...] = ()
        self._pending = False
        self._step = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, band=self.band, params=self.params)

    def state_dict(self) -> dict[str, Any]:
        return {"warned": sorted(self.warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = set(state_dict.get("warned", []))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            rank_zero_warn("UpdateRatioMonitor: no optimizer, nothing to monitor")
        self._tracker, self._pending = None, False

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._pending or trainer.global_step % self.every_n_steps:
            return
        layout = param_layout(trainer.optimizers)
        if self._tracker is None or layout != self._layout:
            self._names, params = tracked_params(pl_module.named_parameters(), trainer.optimizers, self.params)
            self._tracker, self._layout = UpdateRatio(params), layout
            if not params:
                rank_zero_warn(f"UpdateRatioMonitor: no trainable tensors to monitor (params={self.params!r})")
        self._tracker.snapshot()
        self._pending, self._step = True, trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending:
            return
        self._pending = False
        assert self._tracker is not None
        ratios = self._tracker.ratios().tolist()  # the one host sync, on measured steps only
        step = self._step
        metrics = {f"update_ratio/{n}": r for n, r in zip(self._names, ratios)} if self.log_per_tensor else {}
        metrics["update_ratio/median"] = median(ratios)
        self.last = metrics
        log_to_loggers(trainer, metrics, step=step)
        for name, ratio in zip(self._names, ratios):
            if name in self.warned:
                continue
            ok, reason = judge_ratio(name, ratio, self.band)
            if not ok:
                self.warned.add(name)
                rank_zero_warn(f"UpdateRatioMonitor (step {step}): {reason}")


class GradNormMonitor(Callback):
    """Log per-tensor gradient norms and the total norm every ``every_n_steps`` optimizer steps.

    Measured after AMP unscaling and before clipping. Logged: ``grad_norm/<param name>`` (if
    ``log_per_tensor``) and ``grad_norm/total``.

    Args:
        every_n_steps: measure every this many optimizer steps, >= 1.
        norm_type: the p of the p-norm, > 0 (``inf`` allowed).
        log_per_tensor: log each tensor's norm (else only the total).
    """

    def __init__(self, every_n_steps: int = 50, norm_type: float = 2.0, log_per_tensor: bool = True) -> None:
        super().__init__()
        check_int("every_n_steps", every_n_steps, 1)
        check_float("norm_type", norm_type, 0, low_open=True)
        self.every_n_steps = every_n_steps
        self.norm_type = float(norm_type)
        self.log_per_tensor = bool(log_per_tensor)
        self.last: dict[str, float] = {}
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._layout: tuple[int, ...] = ()
        self._step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, norm_type=self.norm_type)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._step:
            return
        self._step = step
        layout = param_layout(trainer.optimizers)
        if layout != self._layout:
            self._names, self._params = tracked_params(pl_module.named_parameters(), trainer.optimizers, "all")
            self._layout = layout
        if not self._params:
            return
        norms, total = grad_norms(self._params, self.norm_type)
        values = torch.cat([norms, total.reshape(1)]).tolist()  # one host sync, measured steps only
        metrics = dict(zip((f"grad_norm/{n}" for n in self._names), values[:-1])) if self.log_per_tensor else {}
        metrics["grad_norm/total"] = values[-1]
        self.last = metrics
        log_to_loggers(trainer, metrics, step=step)


class DeadUnitMonitor(Callback):
    """Log the fraction of dead ReLU units every ``every_n_steps`` optimizer steps.

    Hooks on every ``nn.ReLU`` module (not ``F.relu``) for the measured batch only; logged per module and
    as means: ``dead_units/<name>``, ``relu_zeros/<name>`` (:func:`lightning_tricks.sanity.relu_metrics`).

    Args:
        every_n_steps: measure every this many optimizer steps, >= 1.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        check_int("every_n_steps", every_n_steps, 1)
        self.every_n_steps = every_n_steps
        self.last: dict[str, float] = {}
        self._modules: list[tuple[str, nn.Module]] = []
        self._handles: list[Any] = []
        self._stats: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._modules = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, nn.ReLU)]
        if not self._modules:
            rank_zero_warn("DeadUnitMonitor: the module has no nn.ReLU modules, nothing to monitor")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._step or not self._modules:
            return
        self._step = step
        self._stats = {n: [] for n, _ in self._modules}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            with torch.no_grad():
                self._stats[name].append(relu_stats(out))

        return hook

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._handles:
            return
        self.on_train_end(trainer, pl_module)  # removes the hooks
        metrics, self._stats = relu_metrics(self._stats), {}
        if not metrics:
            return
        self.last = metrics
        log_to_loggers(trainer, metrics, step=self._step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
