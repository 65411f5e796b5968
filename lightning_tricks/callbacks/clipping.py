"""AGC: adaptive, unit-wise gradient clipping (NFNets) before every optimizer step.

The formula and the multi-tensor kernel are :mod:`lightning_tricks.clipping`. The clip runs in a step
pre-hook of each optimizer, after the step's closure, so it sees the final gradient of the step: every
backward pass (accumulation), every ``on_before_optimizer_step`` and ``gradient_clip_val``, unscaled under
AMP (see ``docs/method_cards.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    Trainer,
    rank_zero_info,
    should_log_step,
)
from lightning_tricks.callbacks._common import check_bool
from lightning_tricks.callbacks.sanity import log_to_loggers
from lightning_tricks.clipping import (
    AGC_EPS,
    AdaptiveClipper,
    check_clipping,
    check_exclude,
    clip_after_closure,
    clipped_parameters,
)

__all__ = ["AGC"]


class AGC(Callback):
    r"""Adaptive gradient clipping, unit-wise (Brock et al. 2021, arXiv:2102.06171), before every optimizer step.

    For each unit ``i`` (an output row or filter; a 1-D tensor is one unit) of a clipped ``W`` with gradient
    ``G``: if ``||G_i|| / max(||W_i||, eps) > clipping`` then ``G_i <- clipping * max(||W_i||, eps) / ||G_i|| * G_i``.
    The last ``nn.Linear`` is left unclipped by default, as in the paper. Sharded strategies are refused.

    Args:
        clipping: ``lambda`` > 0; NFNets use 0.01 at batch size 4096, and the paper finds that smaller
            batches tolerate larger values.
        eps: the floor on ``||W_i||`` (> 0; the paper's 1e-3).
        exclude: module names (``pl_module.named_modules()``) whose parameters are not clipped; ``None``:
            the last ``nn.Linear`` of the module (the classifier), ``[]``: none.
        log_clipped_fraction: log ``agc/clipped_fraction``, the fraction of units clipped, on the steps
            the loggers write.

    Example:
        >>> agc = AGC(clipping=0.02)   # Trainer(callbacks=[agc]); `+callbacks=agc` from the command line
        >>> agc.state_key
        "AGC{'clipping': 0.02, 'eps': 0.001, 'exclude': None}"
    """

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = AGC_EPS,
        exclude: str | Sequence[str] | None = None,
        log_clipped_fraction: bool = True,
    ) -> None:
        self.clipping, self.eps = check_clipping(clipping, eps)
        self.exclude = check_exclude(exclude)
        self.log_clipped_fraction = check_bool("log_clipped_fraction", log_clipped_fraction)
        self.excluded: list[str] = []  # the excluded module names, resolved at setup
        self.names: list[str] = []  # the clipped parameter names
        self.last_clipped_fraction: float | None = None
        self._params: list[nn.Parameter] = []
        self._per_optimizer: dict[int, tuple[int, AdaptiveClipper]] = {}
        self._hooks: list[Any] = []  # the optimizers' step pre-hook handles, during training

    @property
    def state_key(self) -> str:
        return self._generate_state_key(clipping=self.clipping, eps=self.eps, exclude=self.exclude)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_params"], state["_per_optimizer"], state["_hooks"] = [], {}, []  # rebuilt at setup / train start
        return state

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ValueError(f"AGC needs whole parameter tensors; the {strategy} shards them (use DDP or one device)")
        self.excluded, chosen = clipped_parameters(pl_module, self.exclude)
        if self.exclude is None and not self.excluded:
            rank_zero_info(f"AGC: {type(pl_module).__name__} has no nn.Linear; every parameter is clipped")
        self.names, self._params = list(chosen), list(chosen.values())
        self._per_optimizer.clear()

    def _clipper_for(self, optimizer: torch.optim.Optimizer) -> AdaptiveClipper:
        size = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._per_optimizer.get(id(optimizer))
        if cached is None or cached[0] != size:  # new optimizer, or groups added (e.g. by FreezeUnfreeze)
            in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
            cached = (size, AdaptiveClipper([p for p in self._params if id(p) in in_opt]))
            self._per_optimizer[id(optimizer)] = cached
        return cached[1]

    @staticmethod
    def _grad_scale(trainer: Trainer, optimizer: torch.optim.Optimizer) -> Tensor | None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return None  # true gradients: no AMP, bf16, or already unscaled by MixedPrecision.optimizer_step
        return scaler._scale  # type: ignore[no-any-return]  # still scaled: the optimizer unscales in step()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        hook = clip_after_closure(lambda optimizer: self._clip(trainer, optimizer))
        self._hooks = [opt.register_step_pre_hook(hook) for opt in trainer.optimizers]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _clip(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        clipper = self._clipper_for(optimizer)
        clipped = clipper.clip_(self.clipping, self.eps, self._grad_scale(trainer, optimizer))
        if self.log_clipped_fraction and clipper.num_units and trainer.loggers and should_log_step(trainer):
            self.last_clipped_fraction = float(clipped) / clipper.num_units  # the one host read, logged steps only
            log_to_loggers(trainer, {"agc/clipped_fraction": self.last_clipped_fraction})
