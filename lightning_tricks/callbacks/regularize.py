"""L1 regularization as a callback over :mod:`lightning_tricks.regularize`: proximal step or subgradient."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_tricks._lightning import Callback, LightningModule, Trainer
from lightning_tricks.callbacks._common import pending_grad_scale
from lightning_tricks.checks import check_bool, check_choice, check_float
from lightning_tricks.nn.naming import compile_patterns
from lightning_tricks.regularize import add_l1_grad_, select_parameters, soft_threshold_

__all__ = ["L1Regularization"]


MODES = ("proximal", "subgradient")


class L1Regularization(Callback):
    """L1 regularization of the chosen weights, ``lam * sum |w|`` (Tibshirani 1996).

    ``mode="proximal"`` (default) soft-thresholds the weights by ``lr * lam`` after each optimizer step
    (ISTA: exact zeros); ``mode="subgradient"`` adds ``lam * sign(w)`` to the gradients before it (the
    penalty in the loss, without its autograd graph). When to pick which: ``docs/method_cards.md``.

    Args:
        lam: L1 strength, >= 0 (0 turns it off; typical 1e-6 .. 1e-4 per weight).
        include: regex or list of regexes on parameter names (``re.search``); ``None`` = all.
        exclude_bias: leave out biases and normalization parameters (as weight decay does).
        mode: ``"proximal"`` or ``"subgradient"`` (above).

    Parameters without a gradient in a step are left alone, as the optimizer leaves them.

    Example:
        >>> cb = L1Regularization(1e-5, include="backbone")   # Trainer(callbacks=[cb])
        >>> cb.state_key
        "L1Regularization{'lam': 1e-05, 'include': 'backbone', 'mode': 'proximal'}"
    """

    def __init__(
        self,
        lam: float,
        include: str | Sequence[str] | None = None,
        exclude_bias: bool = True,
        mode: str = "proximal",
    ) -> None:
        check_float("lam", lam, 0, math.inf, high_open=True)
        compile_patterns(include, "include")  # validates
        check_bool("exclude_bias", exclude_bias)
        self.mode = check_choice("mode", mode, MODES)
        self.lam = float(lam)
        self.include = include if include is None or isinstance(include, str) else list(include)
        self.exclude_bias = exclude_bias
        self.names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._groups: dict[int, list[tuple[dict[str, Any], list[torch.nn.Parameter]]]] = {}
        self._sizes: dict[int, int] = {}
        self._handles: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:  # hook handles do not travel (pickling, ddp_spawn)
        return {**self.__dict__, "_handles": [], "_groups": {}, "_sizes": {}}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(lam=self.lam, include=self.include, mode=self.mode)

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
        self._groups.clear()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.lam == 0 or self.mode != "subgradient":
            return
        params = [p for _, chosen in self._chosen_groups(optimizer) for p in chosen]
        add_l1_grad_(params, self.lam, pending_grad_scale(trainer, optimizer))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_train_end(trainer, pl_module)
        if self.lam == 0 or self.mode != "proximal":
            return
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._shrink))

    def _chosen_groups(self, optimizer: torch.optim.Optimizer) -> list[tuple[dict[str, Any], list[torch.nn.Parameter]]]:
        """Per param group, its chosen parameters (cached; rebuilt when a group or parameter is added)."""
        size = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._groups.get(id(optimizer))
        if cached is None or len(cached) != len(optimizer.param_groups) or self._sizes[id(optimizer)] != size:
            self._sizes[id(optimizer)] = size
            chosen = {id(p) for p in self._params}
            cached = [(g, [p for p in g["params"] if id(p) in chosen]) for g in optimizer.param_groups]
            self._groups[id(optimizer)] = cached
        return cached

    def _shrink(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, params in self._chosen_groups(optimizer):
            if params:
                soft_threshold_([p for p in params if p.grad is not None], float(group["lr"]) * self.lam)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._handles:  # the step post-hooks go with the fit
            handle.remove()
        self._handles = []

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
