"""What :class:`~lightning_tricks.callbacks.EMA` and :class:`~lightning_tricks.callbacks.SWA` share.

Both keep a float32 average of the weights (:class:`lightning_tricks.averaging.WeightAverage`,
updated with ``torch._foreach_*`` ops), evaluate on it, save it in checkpoints and put it in the
module at the end of fit. The formulas live in :mod:`lightning_tricks.averaging`.

How the weights move (the same for both callbacks):

- ``checkpoint["state_dict"]`` always holds the *raw* (training) weights and the callback state holds
  the average (``state["average"] = {state_dict name: tensor}``), so a resumed run continues exactly.
  :func:`lightning_tricks.averaging.averaged_state_dict` merges them for inference, and
  :class:`lightning_tricks.ensemble.CheckpointEnsemble` does it by default.
- Evaluation (validation, test, predict) copies the average into the module at the start and the raw
  weights back at the end (``torch._foreach_copy_``; no ``state_dict`` round trip).
- ``evaluate="both"`` logs the metrics of the averaged weights under the module's own names
  (``val/acc``) and those of the raw weights with a suffix (``val/acc_raw``). The loop runs on the
  average; at epoch end the callback runs the module's own ``validation_step`` (``test_step``) again
  over the same batches with the raw weights, with ``self.log`` captured and the module's torchmetrics
  replaced by fresh clones (so the average's metrics are not touched), and logs the captured values
  with the suffix. It costs a second evaluation pass; only what ``*_step`` logs is captured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tricks._lightning import Callback, LightningModule, Trainer, rank_zero_warn
from lightning_tricks.averaging import (
    AVERAGE_STATE_KEY,
    WeightAverage,
    restore_,
    snapshot,
)

__all__ = ["evaluate_again"]

_STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# helpers: loaders, RNG, a second evaluation pass with captured logs
# ------------------------------------------------------------------------------------------------
def _as_list(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, dict):
        return list(loaders.values())
    return [loaders]


@contextlib.contextmanager
def _untouched(pl_module: nn.Module, loaders: list[Any]) -> Iterator[None]:
    """Keep the global RNG (CPU and the module's CUDA device) and loaders' epoch counters unchanged.

    An extra pass over a DataLoader draws its base seed from the global RNG and
    :class:`~lightning_tricks.data.TensorBatchLoader` counts epochs; without this, evaluating twice
    or recomputing BatchNorm statistics would change the rest of the training run.
    """
    device = next((t.device for t in pl_module.parameters()), torch.device("cpu"))
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    epochs = [(ld, ld.epoch) for ld in loaders if isinstance(getattr(ld, "epoch", None), int)]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for ld, e in epochs:
                ld.epoch = e


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 1


class _LogCapture:
    """Stands in for ``LightningModule.log`` / ``log_dict`` during a second evaluation pass."""

    def __init__(self) -> None:
        self.batch_size = 1
        self.scalars: dict[str, list[Any]] = {}  # name -> [reduced tensor, weight, reduce_fx, options]
        self.metrics: dict[str, tuple[Any, dict[str, Any]]] = {}
        self.suffix = ""  # "/dataloader_idx_i" with several loaders, like Lightning

    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool | None = None,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None,
            metric_attribute: str | None = None, rank_zero_only: bool = False) -> None:
        from torchmetrics import Metric

        if on_epoch is False:
            return  # a per-step value of the evaluation: there is no epoch value to compare
        key = name + (self.suffix if add_dataloader_idx else "")
        opts = {"prog_bar": prog_bar, "logger": logger, "sync_dist": sync_dist,
                "rank_zero_only": rank_zero_only}
        if isinstance(value, Metric):
            self.metrics[key] = (value, opts)
            return
        fx = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "mean")
        fx = {"amax": "max", "amin": "min"}.get(fx, fx)
        if fx not in ("mean", "sum", "max", "min"):
            raise ValueError(f"evaluate='both' supports reduce_fx mean/sum/max/min, got {reduce_fx!r} for {name!r}")
        v = torch.as_tensor(value).detach().float().reshape(())
        w = float(batch_size if batch_size is not None else self.batch_size)
        entry = self.scalars.get(key)
        if entry is None:
            self.scalars[key] = [v * w if fx == "mean" else v, w, fx, opts]
        else:
            if fx == "mean":
                entry[0] = entry[0] + v * w
            elif fx == "sum":
                entry[0] = entry[0] + v
            else:
                entry[0] = torch.maximum(entry[0], v) if fx == "max" else torch.minimum(entry[0], v)
            entry[1] += w

    def log_dict(self, dictionary: Any, **kwargs: Any) -> None:
        for k, v in dictionary.items():
            self.log(k, v, **kwargs)

    def results(self) -> dict[str, tuple[Tensor, dict[str, Any]]]:
        out = {}
        for key, (total, weight, fx, opts) in self.scalars.items():
            out[key] = (total / weight if fx == "mean" else total, opts)
        for key, (metric, opts) in self.metrics.items():
            out[key] = (metric.compute(), {**opts, "sync_dist": False})  # torchmetrics syncs itself
        return out


@contextlib.contextmanager
def _fresh_metrics(module: nn.Module) -> Iterator[None]:
    """Replace every torchmetrics ``Metric`` submodule by a reset clone for the duration."""
    from torchmetrics import Metric

    swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if isinstance(child, Metric):
                clone = child.clone()
                clone.reset()
                swapped.append((parent, name, child))
                parent._modules[name] = clone
            elif child is not None:
                visit(child)

    visit(module)
    try:
        yield
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child


def evaluate_again(trainer: Trainer, pl_module: LightningModule, suffix: str) -> dict[str, Tensor]:
    """Run ``validation_step`` / ``test_step`` over the current evaluation batches again, logging with ``suffix``.

    The module's ``log``/``log_dict`` are captured and its torchmetrics replaced by fresh clones during
    the pass, so nothing the main loop accumulated is touched; the captured epoch values are then
    logged as ``name + suffix``. RNG state and loader epoch counters are left as they were.
    Returns the logged values.
    """
    testing = trainer.testing
    loaders = _as_list(trainer.test_dataloaders if testing else trainer.val_dataloaders)
    if trainer.sanity_checking:
        limits = trainer.num_sanity_val_batches
    else:
        limits = trainer.num_test_batches if testing else trainer.num_val_batches
    step = pl_module.test_step if testing else pl_module.validation_step
    capture = _LogCapture()
    with _untouched(pl_module, loaders), _fresh_metrics(pl_module), torch.no_grad():
        pl_module.log = capture.log  # type: ignore[method-assign]
        pl_module.log_dict = capture.log_dict  # type: ignore[method-assign]
        try:
            for i, loader in enumerate(loaders):
                limit = limits[i] if i < len(limits) else float("inf")
                capture.suffix = f"/dataloader_idx_{i}" if len(loaders) > 1 else ""
                for b, batch in enumerate(loader):
                    if b >= limit:
                        break
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=i)
                    capture.batch_size = _batch_size(batch)
                    if len(loaders) > 1:
                        step(batch, b, i)
                    else:
                        step(batch, b)
        finally:
            del pl_module.log
            del pl_module.log_dict
        results = capture.results()
    logged = {}
    for key, (value, opts) in results.items():
        pl_module.log(key + suffix, value, on_step=False, on_epoch=True, **opts)
        logged[key + suffix] = value
    return logged


# ------------------------------------------------------------------------------------------------
# the shared wiring
# ------------------------------------------------------------------------------------------------
class _Averaging(Callback):
    """Swapping, checkpointing and evaluation shared by :class:`EMA` and :class:`SWA`."""

    _AVERAGE = "average"  # the name of the averaged weights in ``evaluate``

    def __init__(self, evaluate: str, average_at_end: bool, on_cpu: bool, raw_suffix: str) -> None:
        allowed = (self._AVERAGE, "raw", "both")
        if evaluate not in allowed:
            raise ValueError(f"evaluate must be one of {allowed}, got {evaluate!r}")
        if not isinstance(raw_suffix, str) or not raw_suffix:
            raise ValueError(f"raw_suffix must be a non-empty string, got {raw_suffix!r}")
        self.evaluate = evaluate
        self.average_at_end = bool(average_at_end)
        self.on_cpu = bool(on_cpu)
        self.raw_suffix = raw_suffix
        self._average: WeightAverage | None = None
        self._started = False
        # while the module holds the average: name -> (live tensor, saved raw value)
        self._backup: dict[str, tuple[Tensor, Tensor]] | None = None
        self._pending: dict[str, Any] | None = None
        self._eval_return_to: str | None = None
        self._warned: set[str] = set()

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
        """Whether the module currently holds the averaged weights (the raw ones are backed up)."""
        return self._backup is not None

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
        out = {n: t.detach().clone() for n, t in pl_module.state_dict(keep_vars=True).items()}
        if self._backup is not None:
            out.update({n: saved.clone() for n, (_, saved) in self._backup.items()})
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # -- average lifecycle -------------------------------------------------------------------------
    def _bind(self, pl_module: LightningModule) -> None:
        """Create (or rebind after a device move) the average and apply a loaded state."""
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

    def _hold_average(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._backup is not None or self._average is None or not self._started:
            return
        targets = self._average.live()
        targets.update(self._extra_targets(pl_module))
        names = list(targets)
        saved = snapshot([targets[n] for n in names])
        self._backup = {n: (targets[n], s) for n, s in zip(names, saved)}
        self._average.copy_to_module_()
        self._after_average_loaded(trainer, pl_module)

    def _hold_raw(self) -> None:
        if self._backup is None:
            return
        live = [t for t, _ in self._backup.values()]
        saved = [s for _, s in self._backup.values()]
        restore_(live, saved)
        self._backup = None

    # -- evaluation --------------------------------------------------------------------------------
    def _eval_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bind(pl_module)
        self._eval_return_to = None
        if self.evaluate == "raw":
            if self.holds_average:  # e.g. after a fit that ended on the average
                self._eval_return_to = "average"
                self._hold_raw()
            return
        if not self._started:
            if trainer.state.fn != "fit":  # in fit, evaluating the raw weights before the start is the rule
                self._warn_once("no-average", f"{type(self).__name__}: there is no average yet (no fit ran "
                                "and no checkpoint with its state was loaded); evaluating the raw weights")
            return
        if not self.holds_average:
            self._eval_return_to = "raw"
            self._hold_average(trainer, pl_module)

    def _eval_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate != "both":
            return
        had_average = self.holds_average
        self._hold_raw()
        evaluate_again(trainer, pl_module, self.raw_suffix)
        if had_average:
            self._hold_average(trainer, pl_module)

    def _eval_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        back, self._eval_return_to = self._eval_return_to, None
        if back == "raw":
            self._hold_raw()
        elif back == "average":
            self._hold_average(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_epoch_end(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_end(trainer, pl_module)

    # -- fit ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hold_raw()  # a second fit after one that ended on the average trains the raw weights
        self._bind(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.average_at_end:
            if self._started:
                self._hold_average(trainer, pl_module)
            else:
                self._warn_once("end-no-average", f"{type(self).__name__}: training ended before the "
                                "average started; the module keeps its raw weights")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._hold_raw()

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._backup is None:
            return
        # the module holds the average now: the checkpoint keeps the raw weights (see the module doc)
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict):
            for name, (_, saved) in self._backup.items():
                if name in sd:
                    sd[name] = saved.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": _STATE_VERSION, "started": self._started}
        state[AVERAGE_STATE_KEY] = self._average.state_dict() if (self._average is not None and self._started) else {}
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the module has just been given the checkpoint's raw weights: drop any backup
        self._backup = None
        self._eval_return_to = None
        self._pending = dict(state_dict)
        # already bound (e.g. test(ckpt_path=...) after fit): the module's tensors are the same ones
        self._apply_pending()
