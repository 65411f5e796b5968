"""L1 regularization as a callback: ``grad += lam * sign(w)`` just before each optimizer step.

The math is :func:`lightning_tricks.regularize.add_l1_grad_`; this class picks the parameters once
(at ``setup``) and calls it from ``on_before_optimizer_step``.

Where the term goes, from Lightning's source (2.x, ``plugins/precision``): ``on_before_optimizer_step``
runs once per optimizer step, after the closure has run every backward pass of the step, after the AMP
``GradScaler`` has unscaled the gradients (``MixedPrecision.optimizer_step`` calls ``scaler.unscale_``
first) and before gradient clipping. Lightning divides each micro-batch loss by
``accumulate_grad_batches``, so the gradient there is that of the mean loss, and adding
``lam * sign(w)`` once gives exactly the gradient of ``mean loss + lam * ||w||_1`` for any accumulation,
clipped together as if the penalty were in the loss. Optimizers that unscale inside their own
``step`` (``_step_supports_amp_scaling``, e.g. fused Adam) still hold scaled gradients in the hook;
the term is then multiplied by the scaler's current scale (a device tensor, no sync).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tricks._lightning import Callback, LightningModule, Trainer
from lightning_tricks.nn.naming import compile_patterns
from lightning_tricks.regularize import add_l1_grad_, select_parameters

__all__ = ["L1Regularization"]


class L1Regularization(Callback):
    """Adds ``lam * sign(w)`` to the gradients of the chosen weights before every optimizer step.

    Equivalent to adding ``lam * sum |w|`` to the training loss (the L1 penalty, seed note 003;
    Tibshirani 1996 for the lasso), without the extra autograd graph: one ``_foreach_sign`` and one
    ``_foreach_add_`` over a parameter list built once. Semantics: the subgradient is added to the
    gradients (``sign(0) = 0``), not a proximal (soft-thresholding) step, so weights hover around zero
    rather than land exactly on it, and the term goes through the optimizer like the loss gradient
    (momentum, Adam's scaling, clipping). Cost: two passes over the chosen weights, about 2 floors
    (see :func:`~lightning_tricks.regularize.add_l1_grad_`). Weight decay (L2) on weights only is the
    optimizer config's ``weight_decay`` (see :func:`lightning_tricks.mixins.param_groups_weight_decay`).
    For the penalty in the loss instead, use :func:`lightning_tricks.regularize.l1_penalty`.

    Args:
        lam: L1 strength, >= 0 (0 turns it off; typical 1e-6 .. 1e-4 per weight).
        include: regex or list of regexes on parameter names (``re.search``); ``None`` = all.
        exclude_bias: leave out biases and normalization parameters (as weight decay does).

    Parameters without a gradient in a step (frozen, unused) are left alone, as the optimizer leaves
    them. With several optimizers, each step touches only the chosen parameters of that optimizer.

    Example:
        >>> cb = L1Regularization(1e-5, include="backbone")   # Trainer(callbacks=[cb])
        >>> cb.state_key
        "L1Regularization{'lam': 1e-05, 'include': 'backbone'}"
    """

    def __init__(self, lam: float, include: str | Sequence[str] | None = None, exclude_bias: bool = True) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        compile_patterns(include, "include")  # validates
        if not isinstance(exclude_bias, bool):
            raise ValueError(f"exclude_bias must be a bool, got {exclude_bias!r}")
        self.lam = float(lam)
        self.include = include if include is None or isinstance(include, str) else list(include)
        self.exclude_bias = exclude_bias
        self.names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._per_optimizer: dict[int, tuple[int, list[torch.nn.Parameter]]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(lam=self.lam, include=self.include)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        chosen = select_parameters(pl_module, self.include, self.exclude_bias, trainable_only=False)
        if not chosen:
            raise ValueError(
                f"L1Regularization(include={self.include!r}, exclude_bias={self.exclude_bias}) "
                f"matched no parameter of {type(pl_module).__name__}"
            )
        self.names = [n for n, _ in chosen]
        self._params = [p for _, p in chosen]
        self._per_optimizer.clear()

    def _params_for(self, optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
        size = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._per_optimizer.get(id(optimizer))
        if cached is None or cached[0] != size:
            in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
            cached = (size, [p for p in self._params if id(p) in in_opt])
            self._per_optimizer[id(optimizer)] = cached
        return cached[1]

    @staticmethod
    def _grad_scale(trainer: Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return None
        return scaler._scale  # gradients are still scaled: the optimizer unscales inside step()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.lam == 0:
            return
        add_l1_grad_(self._params_for(optimizer), self.lam, self._grad_scale(trainer, optimizer))
