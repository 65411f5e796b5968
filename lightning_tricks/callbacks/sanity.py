"""The CS231n recipe's checks as callbacks: initial loss, overfit a tiny subset, update/weight ratios.

Thin wiring over :mod:`lightning_tricks.sanity`:

- :class:`InitialLossCheck`: on the first training batch, the loss with regularization off vs ``log(C)``.
- :class:`OverfitCheck`: before training, a copy of the module must fit ~20 samples to near-zero loss.
- :class:`UpdateRatioMonitor`: ``||w_after - w_before|| / ||w_before||`` per tensor every N steps.
- :class:`GradNormMonitor`, :class:`DeadUnitMonitor`: gradient norms and dead-ReLU fractions every N steps.

The monitors log straight to the Trainer's loggers at ``trainer.global_step`` (as Lightning's
``LearningRateMonitor`` does), so a value measured on step ``t`` is logged on step ``t`` whatever
``log_every_n_steps`` is; the last values are also on the callback (``.last``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks._lightning import (
    Callback,
    FitClock,
    LightningModule,
    MisconfigurationException,
    Trainer,
    global_step_of,
    rank_zero_info,
    rank_zero_warn,
)
from lightning_tricks.callbacks._common import MemoStateKey
from lightning_tricks.sanity import (
    InitialLossReport,
    LossFn,
    OverfitResult,
    SanityCheckError,
    UpdateRatio,
    grad_norms,
    initial_loss,
    judge_ratio,
    median,
    overfit_check,
    relu_stats,
)

ACTIONS = ("warn", "raise")


def _check_action(action: str) -> str:
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    return action


def _check_every(every_n_steps: int) -> int:
    if not (isinstance(every_n_steps, int) and not isinstance(every_n_steps, bool) and every_n_steps >= 1):
        raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
    return every_n_steps


def log_to_loggers(trainer: Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at ``step`` (default ``global_step``), rank zero only."""
    if not metrics or not trainer.is_global_zero:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


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
    """Check the loss on the first training batch against ``log(num_classes)``.

    CS231n recipe step 1: before training, with regularization off, a softmax classifier over ``C``
    classes should score ``log(C)`` (2.303 for 10 classes). On the first training batch (step 0) the
    module's forward runs under ``no_grad`` in eval mode (no dropout, BatchNorm on its initial
    running statistics; modes restored, no buffer changes), the loss is cross-entropy without label
    smoothing (or ``loss_fn``), and ``|loss - expected| <= rtol * expected`` must hold; otherwise it
    warns or raises (``action``) with the measured and expected values and the likely causes (see
    :func:`lightning_tricks.sanity.judge_initial_loss`). ``C`` is the module's ``num_classes`` if it has
    one, else the logits' last dimension (a mismatch between the two fails the check). A run resumed
    past step 0 is not checked (said once). Logged: ``sanity/initial_loss``,
    ``sanity/initial_loss_expected``.

    Args:
        expected: ``"log_num_classes"`` or the expected loss as a number (> 0).
        rtol: relative tolerance, > 0.
        action: ``"warn"`` or ``"raise"`` (:class:`SanityCheckError`).
        loss_fn: ``(logits, y) -> loss``; default softmax cross-entropy (hard or soft targets).

    Example:
        >>> from lightning_tricks._lightning import Trainer
        >>> trainer = Trainer(callbacks=[InitialLossCheck(rtol=0.1, action="raise")])  # doctest: +SKIP
    """

    def __init__(
        self,
        expected: str | float = "log_num_classes",
        rtol: float = 0.1,
        action: str = "warn",
        loss_fn: LossFn | None = None,
    ) -> None:
        super().__init__()
        if isinstance(expected, str):
            if expected != "log_num_classes":
                raise ValueError(f"expected must be 'log_num_classes' or a number > 0, got {expected!r}")
        elif not (isinstance(expected, (int, float)) and math.isfinite(expected) and expected > 0):
            raise ValueError(f"expected must be 'log_num_classes' or a number > 0, got {expected!r}")
        if not (isinstance(rtol, (int, float)) and rtol > 0):
            raise ValueError(f"rtol must be > 0, got {rtol!r}")
        self.expected = expected
        self.rtol = float(rtol)
        self.action = _check_action(action)
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
        self.report = initial_loss(
            pl_module,
            batch,
            self.expected,
            self.rtol,
            num_classes=num_classes if isinstance(num_classes, int) else None,
            loss_fn=self.loss_fn,
        )
        log_to_loggers(
            trainer, {"sanity/initial_loss": self.report.loss, "sanity/initial_loss_expected": self.report.expected}
        )
        _report(trainer, "InitialLossCheck", self.report.passed, self.report.reason, self.action)


class OverfitCheck(Callback):
    """Before training, check that a copy of the module can overfit a tiny training subset.

    CS231n recipe step 2: with regularization off, the loss on ~20 examples must reach near zero;
    if it does not, something is broken (LR, loss/labels, frozen or detached parameters, a model
    too small). At ``on_train_start`` (before the first step, not on resume) this runs
    :func:`lightning_tricks.sanity.overfit_check` on a deep copy of the module: the first
    ``num_samples`` training samples (no augmentation), full-batch steps with an optimizer of the
    same type and groups as the real one but fresh state, weight decay 0, dropout off, no label
    smoothing, constant LR (``lr`` overrides every group's LR). The real module, its optimizer and
    the RNG state are untouched, so the real run is bit-identical with or without this check.
    Logged: ``sanity/overfit_loss``, ``sanity/overfit_passed``, ``sanity/overfit_steps``.

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
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if not (isinstance(target_loss, (int, float)) and target_loss > 0):
            raise ValueError(f"target_loss must be > 0, got {target_loss!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be None or a number >= 0, got {lr!r}")
        self.num_samples, self.steps, self.target_loss = num_samples, steps, float(target_loss)
        self.lr = None if lr is None else float(lr)
        self.action = _check_action(action)
        self.loss_fn = loss_fn
        self.seed = int(seed)
        self.result: OverfitResult | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0:
            rank_zero_info(f"OverfitCheck: skipped, the run resumed at step {trainer.global_step}")
            return
        data = trainer.train_dataloader
        if data is None:
            raise MisconfigurationException("OverfitCheck: the Trainer has no training dataloader")
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.result = overfit_check(
            pl_module,
            data,
            num_samples=self.num_samples,
            steps=self.steps,
            target_loss=self.target_loss,
            lr=self.lr,
            optimizer=optimizer,
            loss_fn=self.loss_fn,
            seed=self.seed,
        )
        r = self.result
        log_to_loggers(
            trainer,
            {
                "sanity/overfit_loss": r.final_loss,
                "sanity/overfit_passed": float(r.passed),
                "sanity/overfit_steps": float(r.steps),
            },
        )
        _report(trainer, "OverfitCheck", r.passed, r.reason, self.action)


def _tracked_params(trainer: Trainer, pl_module: LightningModule, which: str) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the trainable parameters in the Trainer's optimizers (``which``: weights|all)."""
    names = {id(p): n for n, p in pl_module.named_parameters()}
    out_n: list[str] = []
    out_p: list[Tensor] = []
    seen: set[int] = set()
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in seen or not p.requires_grad or (which == "weights" and p.ndim < 2):
                    continue
                seen.add(id(p))
                out_n.append(names.get(id(p), f"param{len(out_n)}"))
                out_p.append(p)
    return out_n, out_p


def _layout(trainer: Trainer) -> tuple[int, ...]:
    return tuple(len(g["params"]) for opt in trainer.optimizers for g in opt.param_groups)


class UpdateRatioMonitor(MemoStateKey, Callback):
    """Log the update/weight ratio ``||w_after - w_before|| / ||w_before||`` of each parameter tensor.

    CS231n: "the ratio of the update magnitudes to the value magnitudes ... should be somewhere
    around 1e-3"; much larger, the LR is probably too high; much smaller, too low. Every
    ``every_n_steps`` optimizer steps (steps ``0, n, 2n, ...``), ``on_before_optimizer_step`` copies
    the tracked tensors into buffers allocated once (one ``torch._foreach_copy_``) and
    ``on_train_batch_end`` computes all ratios with ``torch._foreach_sub_`` / ``torch._foreach_norm``
    and brings them to the host in one transfer. Other steps cost one integer test: no copy, no
    sync. Tensors tracked: those in the optimizers with ``requires_grad``, weights only (``ndim >= 2``)
    by default (biases often start at zero, where the ratio is undefined); the list is rebuilt when
    the optimizer's groups change (e.g. after :class:`~lightning_tricks.callbacks.FreezeUnfreeze`).

    Logged at the measured step: ``update_ratio/<param name>`` and ``update_ratio/median``. A tensor
    outside ``band`` is warned about once (the set of warned names is in the checkpoint).

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
        self.every_n_steps = _check_every(every_n_steps)
        band = tuple(float(b) for b in band)
        if len(band) != 2 or not 0 < band[0] < band[1]:
            raise ValueError(f"band must be (low, high) with 0 < low < high, got {band!r}")
        if params not in ("weights", "all"):
            raise ValueError(f"params must be 'weights' or 'all', got {params!r}")
        self.band: tuple[float, float] = band  # type: ignore[assignment]
        self.params = params
        self.log_per_tensor = bool(log_per_tensor)
        self.warned: set[str] = set()
        self.last: dict[str, float] = {}
        self._tracker: UpdateRatio | None = None
        self._names: list[str] = []
        self._layout: tuple[int, ...] = ()
        self._pending = False
        self._step = 0
        self._clock: FitClock | None = None

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
        self._tracker, self._pending, self._clock = None, False, None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock = FitClock(trainer)  # global_step in one attribute read (the loop state is restored now)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._pending or global_step_of(trainer, self._clock) % self.every_n_steps:
            return
        layout = _layout(trainer)
        if self._tracker is None or layout != self._layout:
            self._names, params = _tracked_params(trainer, pl_module, self.params)
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


class GradNormMonitor(MemoStateKey, Callback):
    """Log per-tensor gradient norms and the total norm every ``every_n_steps`` optimizer steps.

    Measured in ``on_before_optimizer_step``: after the backward pass and AMP unscaling, before
    gradient clipping. One multi-tensor norm (``torch._foreach_norm``) and one host transfer on
    measured steps, nothing on the others. Logged: ``grad_norm/<param name>`` (if
    ``log_per_tensor``) and ``grad_norm/total``.

    Args:
        every_n_steps: measure every this many optimizer steps, >= 1.
        norm_type: the p of the p-norm, > 0 (``inf`` allowed).
        log_per_tensor: log each tensor's norm (else only the total).
    """

    def __init__(self, every_n_steps: int = 50, norm_type: float = 2.0, log_per_tensor: bool = True) -> None:
        super().__init__()
        self.every_n_steps = _check_every(every_n_steps)
        if not (isinstance(norm_type, (int, float)) and norm_type > 0):
            raise ValueError(f"norm_type must be > 0, got {norm_type!r}")
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
        layout = _layout(trainer)
        if layout != self._layout:
            self._names, self._params = _tracked_params(trainer, pl_module, "all")
            self._layout = layout
        if not self._params:
            return
        norms, total = grad_norms(self._params, self.norm_type)
        values = torch.cat([norms, total.reshape(1)]).tolist()  # one host sync, measured steps only
        metrics = dict(zip((f"grad_norm/{n}" for n in self._names), values[:-1])) if self.log_per_tensor else {}
        metrics["grad_norm/total"] = values[-1]
        self.last = metrics
        log_to_loggers(trainer, metrics, step=step)


class DeadUnitMonitor(MemoStateKey, Callback):
    """Log the fraction of dead ReLU units every ``every_n_steps`` optimizer steps.

    On measured steps only, forward hooks are put on every ``nn.ReLU`` module for one training batch
    and removed after it (other steps run without hooks). Per module: ``dead_units/<name>`` is the
    fraction of units (features / channels, dim 1) that output zero for every sample and position of
    the batch, ``relu_zeros/<name>`` the fraction of all outputs that are zero; plus their means over
    modules (``dead_units/mean``, ``relu_zeros/mean``). A module called several times in a forward
    pass is averaged over the calls. ReLUs applied as functions (``F.relu``) are not seen; a model
    without ``nn.ReLU`` modules gets a warning.

    Args:
        every_n_steps: measure every this many optimizer steps, >= 1.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = _check_every(every_n_steps)
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
        for h in self._handles:
            h.remove()
        self._handles = []
        names = [n for n, calls in self._stats.items() if calls]
        if not names:
            return
        per = torch.stack([torch.stack([torch.stack(c) for c in self._stats[n]]).mean(0) for n in names])
        values = per.tolist()  # [[zero_frac, dead_frac], ...]: one host sync
        metrics: dict[str, float] = {}
        for n, (zero, dead) in zip(names, values):
            metrics[f"dead_units/{n}"] = dead
            metrics[f"relu_zeros/{n}"] = zero
        metrics["dead_units/mean"] = sum(v[1] for v in values) / len(values)
        metrics["relu_zeros/mean"] = sum(v[0] for v in values) / len(values)
        self._stats = {}
        self.last = metrics
        log_to_loggers(trainer, metrics, step=self._step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
