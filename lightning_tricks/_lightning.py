"""The one place that imports Lightning.

Lightning ships under two names: ``pytorch_lightning`` (the standalone package, our declared dependency)
and ``lightning.pytorch`` (inside the unified ``lightning`` package, the name Lightning's docs use). They
hold the same code as distinct classes, so an object is a ``lightning.pytorch.Callback`` only if its class
derives from that very class. This module imports whichever of the two are installed; where both are,
each Lightning class that ``lightning_tricks`` derives from is joined (:func:`_join`): one class whose
bases are both namespaces' classes, so our callbacks, ``Classifier`` and DataModules are accepted by either
``Trainer`` and either ``LightningCLI``, and ``trainer.early_stopping_callback`` /
``trainer.checkpoint_callback`` find ours with either Trainer. ``isinstance(x, Callback)`` (or
``ModelCheckpoint``, ``EarlyStopping``, ``LightningDataModule``, ...) against these names is true for an
instance of either namespace's class, so a user's own Lightning objects are recognised whichever name they
imported Lightning under; the ``*_TYPES`` tuples say the same for plain ``isinstance`` calls. With one
namespace installed, every name here is that namespace's own class. ``LT_LIGHTNING_NAMESPACE=lightning``
puts ``lightning.pytorch`` first (see :func:`_namespaces_in_order`).

Everything in ``lightning_tricks`` imports Lightning names from here, and Lightning's private attributes
(``trainer._x``, ``loop._x``) are read only here, each with a fallback to a public route.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _namespaces_in_order() -> tuple[ModuleType, ...]:
    """The installed namespaces, ``pytorch_lightning`` first; ``lightning.pytorch`` first where the environment
    variable ``LT_LIGHTNING_NAMESPACE`` is ``lightning`` (CI runs the callback tests so: the first namespace
    gives the ``Trainer`` our own code builds and the methods our joined classes run)."""
    asked = os.environ.get("LT_LIGHTNING_NAMESPACE", "") or "pytorch_lightning"
    if asked not in _ORDER:
        raise ValueError(f"LT_LIGHTNING_NAMESPACE must be one of {sorted(_ORDER)}, got {asked!r}")
    modules = [(name, _import(name)) for name in _ORDER[asked]]
    if modules[0][1] is None and os.environ.get("LT_LIGHTNING_NAMESPACE"):
        raise ImportError(f"LT_LIGHTNING_NAMESPACE={asked} but {modules[0][0]} cannot be imported")
    found = tuple(m for _, m in modules if m is not None)
    if not found:
        raise ImportError("lightning-tricks needs PyTorch Lightning: pip install pytorch-lightning (or lightning)")
    return found


_ORDER = {
    "pytorch_lightning": ("pytorch_lightning", "lightning.pytorch"),
    "lightning": ("lightning.pytorch", "pytorch_lightning"),
    "lightning.pytorch": ("lightning.pytorch", "pytorch_lightning"),
}
#: the installed Lightning namespaces, the first one first (:func:`_namespaces_in_order`)
_MODULES: tuple[ModuleType, ...] = _namespaces_in_order()
#: their import names, e.g. ``("pytorch_lightning", "lightning.pytorch")``
NAMESPACES: tuple[str, ...] = tuple(m.__name__ for m in _MODULES)


def _each(path: str) -> tuple[Any, ...]:
    """The object at ``path`` (``"callbacks.ModelCheckpoint"``) in each installed namespace, in order."""
    module, _, name = path.rpartition(".")
    return tuple(getattr(importlib.import_module(f"{m.__name__}.{module}") if module else m, name) for m in _MODULES)


class _EitherNamespace(type):
    """The metaclass of a joined class (:func:`_join`): ``isinstance``/``issubclass`` against the joined class
    itself accept either namespace's class; against a subclass of it (``EMA``) they are the usual tests."""

    def __instancecheck__(cls, obj: Any) -> bool:
        either = cls.__dict__.get("_lightning_classes")
        return isinstance(obj, either) if either is not None else type.__instancecheck__(cls, obj)

    def __subclasscheck__(cls, sub: type) -> bool:
        either = cls.__dict__.get("_lightning_classes")
        return issubclass(sub, either) if either is not None else type.__subclasscheck__(cls, sub)


class _SecondInitSkipped:
    """Between the two namespaces' classes in a joined callback's MRO. The first namespace's ``__init__`` ends
    its ``super().__init__()`` chain here: the second's ``__init__`` is the same code, already run in effect,
    and would be called with no arguments (``EarlyStopping`` requires ``monitor``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


class _ByTrainer:
    """A method of a joined ``LightningModule``/``LightningDataModule`` whose code differs between the two
    namespaces (their docstrings name their own package), looked up in the namespace of the Trainer the object
    is attached to (the first namespace before it is attached).

    Lightning decides whether a hook is the user's own by comparing the code of the object's method with that
    of its own namespace's base class (``is_overridden``): ``configure_model``, ``val_dataloader``,
    ``optimizer_step``, ... The first namespace's definition would look overridden to the other's Trainer,
    which would then call a ``val_dataloader`` that raises, or refuse ``configure_model`` beside
    ``configure_sharded_model``.
    """

    __slots__ = ("attrs",)

    def __init__(self, name: str, classes: tuple[type, ...]) -> None:
        self.attrs = tuple(inspect.getattr_static(c, name) for c in classes)

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        attr = self.attrs[0]
        if obj is not None:
            state = obj.__dict__
            trainer = state.get("_trainer") or state.get("trainer")  # LightningModule / LightningDataModule
            if trainer is not None and not isinstance(trainer, _TRAINERS[0]):
                attr = self.attrs[1]
        return attr.__get__(obj, owner)


def _code(attr: Any) -> Any:
    func = getattr(attr, "__func__", attr)  # classmethod, staticmethod, Lightning's restricted classmethod
    return getattr(func, "__code__", None)


def _differing(first: type, second: type) -> list[str]:
    """Names of the methods (dunders aside) whose code differs between ``first`` and ``second``."""
    names = []
    for name in dir(first):
        if name.startswith("__"):
            continue
        a, b = _code(inspect.getattr_static(first, name, None)), _code(inspect.getattr_static(second, name, None))
        if a is not None and b is not None and a != b:
            names.append(name)
    return names


def _join(classes: tuple[type, ...], *, by_trainer: bool = False) -> Any:
    """One class deriving from each namespace's class in ``classes`` (the class itself with one namespace).

    Its methods are the first namespace's (the same code as the second's, but for the package names in
    docstrings and in imports made inside functions, which hold the same objects under either name), except,
    with ``by_trainer`` (modules, which know their Trainer), those whose code differs, which are looked up by the
    namespace of the object's Trainer (:class:`_ByTrainer`). A callback's own ``__init__`` runs once
    (:class:`_SecondInitSkipped`); a module's runs through both namespaces' chains to ``torch.nn.Module``'s.
    """
    if len(classes) == 1:
        return classes[0]
    first, second = classes
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": first.__name__,
        "__doc__": first.__doc__,
        "_lightning_classes": classes,
    }
    if by_trainer:
        namespace.update({name: _ByTrainer(name, classes) for name in _differing(first, second)})
        bases: tuple[type, ...] = (first, second)
    elif "__init__" in vars(second):
        bases = (first, _SecondInitSkipped, second)
    else:
        bases = (first, second)
    return _EitherNamespace(first.__name__, bases, namespace)


_TRAINERS: tuple[type, ...] = _each("Trainer")

if TYPE_CHECKING:  # a type checker sees the standalone package's classes
    import pytorch_lightning as pl
    from pytorch_lightning import Callback, LightningDataModule, LightningModule
    from pytorch_lightning.callbacks import BatchSizeFinder, EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
else:
    #: the first namespace (``pytorch_lightning`` where it is installed, see ``_namespaces_in_order``)
    pl = _MODULES[0]
    Callback = _join(_each("Callback"))
    LightningModule = _join(_each("LightningModule"), by_trainer=True)
    LightningDataModule = _join(_each("LightningDataModule"), by_trainer=True)
    ModelCheckpoint = _join(_each("callbacks.ModelCheckpoint"))
    EarlyStopping = _join(_each("callbacks.EarlyStopping"))
    LearningRateMonitor = _join(_each("callbacks.LearningRateMonitor"))
    BatchSizeFinder = _join(_each("callbacks.BatchSizeFinder"))
    # raised by our code: caught by ``except MisconfigurationException`` of either namespace
    MisconfigurationException = _join(_each("utilities.exceptions.MisconfigurationException"))

#: Lightning's ``EarlyStopping`` (joined), the base of ours
PLEarlyStopping = EarlyStopping

# ``isinstance(x, T)`` with T one of these tuples: an instance of either namespace's class
CALLBACK_TYPES: tuple[type[Callback], ...] = _each("Callback")
LIGHTNING_MODULE_TYPES: tuple[type[LightningModule], ...] = _each("LightningModule")
DATA_MODULE_TYPES: tuple[type[LightningDataModule], ...] = _each("LightningDataModule")
TRAINER_TYPES: tuple[type[Trainer], ...] = _TRAINERS
MODEL_CHECKPOINT_TYPES: tuple[type[ModelCheckpoint], ...] = _each("callbacks.ModelCheckpoint")
EARLY_STOPPING_TYPES: tuple[type[EarlyStopping], ...] = _each("callbacks.EarlyStopping")
BATCH_SIZE_FINDER_TYPES: tuple[type[BatchSizeFinder], ...] = _each("callbacks.BatchSizeFinder")
TENSORBOARD_LOGGER_TYPES: tuple[type[TensorBoardLogger], ...] = _each("loggers.TensorBoardLogger")


def _each_private(path: str) -> tuple[type, ...]:
    """:func:`_each` for a private Lightning name: from the namespaces that still have it (none: an empty tuple,
    so ``isinstance`` against it is false and the caller takes its fallback)."""
    found = []
    for m in _MODULES:
        module, _, name = path.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(f"{m.__name__}.{module}"), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


#: Lightning's DDP launcher that starts the other ranks by re-running the script (private class)
SUBPROCESS_SCRIPT_LAUNCHER_TYPES: tuple[type, ...] = _each_private(
    "strategies.launchers.subprocess_script._SubprocessScriptLauncher"
)

# Not joined: the first namespace's. Instances made by our own code (``train.py``'s Trainer and loggers), or
# functions and values that act the same whichever namespace's Trainer is running (``rank_zero_*`` are
# ``lightning_utilities``' own, shared by both).
Trainer = pl.Trainer
seed_everything = pl.seed_everything
StochasticWeightAveraging = pl.callbacks.StochasticWeightAveraging  # benchmarks compare with Lightning's SWA
EarlyStoppingReason = importlib.import_module(f"{pl.__name__}.callbacks.early_stopping").EarlyStoppingReason
CSVLogger = pl.loggers.CSVLogger
Logger = pl.loggers.Logger
TensorBoardLogger = pl.loggers.TensorBoardLogger
DummyLogger = importlib.import_module(f"{pl.__name__}.loggers.logger").DummyLogger  # LRRangeTest mutes loggers
rank_zero_info = pl.utilities.rank_zero_info
rank_zero_only = pl.utilities.rank_zero_only
rank_zero_warn = pl.utilities.rank_zero_warn
isolate_rng = importlib.import_module(f"{pl.__name__}.utilities.seed").isolate_rng
lightning_setattr = importlib.import_module(f"{pl.__name__}.utilities.parsing").lightning_setattr
#: the names of the loggers Lightning's rank-zero messages go to, one per namespace
RANK_ZERO_LOGGER_NAMES: tuple[str, ...] = tuple(f"{name}.utilities.rank_zero" for name in NAMESPACES)
#: Lightning's EMA callback (Lightning >= 2.5; benchmarks compare our EMA with it), else None
EMAWeightAveraging: Any = getattr(pl.callbacks, "EMAWeightAveraging", None)


def namespace_of(obj: Any) -> str:
    """The Lightning namespace (``"pytorch_lightning"`` or ``"lightning.pytorch"``) of a Trainer or a Lightning
    object, by its class; the first installed one for a joined class (ours) or anything else."""
    for name in NAMESPACES:
        if type(obj).__module__.startswith(name + "."):
            return name
    return NAMESPACES[0]


def trainer_class_for(module: Any) -> type:
    """The ``Trainer`` that accepts ``module``: of the namespace of its ``LightningModule`` (a user's own
    ``lightning.pytorch`` module needs ``lightning.pytorch.Trainer``); the first namespace's for ours."""
    for trainer_cls, module_cls in zip(_TRAINERS, LIGHTNING_MODULE_TYPES):
        if isinstance(module, module_cls):
            return trainer_cls
    return Trainer


def batches_that_stepped(trainer: Trainer) -> int:
    """The training batches of this fit that ended in an optimizer step: the step Lightning's loggers write
    training metrics at (``fit_loop.epoch_loop._batches_that_stepped``, private); where Lightning has no such
    counter, ``trainer.global_step`` (the same count under automatic optimization)."""
    count = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    return count if isinstance(count, int) else int(trainer.global_step)


def reset_dataloaders(trainer: Trainer) -> None:
    """Rebuild the running loop's dataloaders (and the validation loop's, in fitting), e.g. after the batch size
    changed: the tuner's ``_reset_dataloaders`` of the Trainer's namespace (private); where it is gone, the same
    steps by hand (drop the combined loader, ``setup_data()``)."""
    module = importlib.import_module(f"{namespace_of(trainer)}.tuner.batch_size_scaling")
    reset = getattr(module, "_reset_dataloaders", None)
    if reset is not None:
        reset(trainer)
        return
    loops = [getattr(trainer, "_active_loop", None) or trainer.fit_loop]
    if loops[0] is trainer.fit_loop:
        loops.append(trainer.fit_loop.epoch_loop.val_loop)
    for loop in loops:
        loop._combined_loader = None
        loop.setup_data()


@contextlib.contextmanager
def resume_path_kept(trainer: Trainer) -> Iterator[None]:
    """Give back the fit's ``ckpt_path`` after a tuner trial: Lightning's batch-size scaling restores its own
    temporary checkpoint through the checkpoint connector and leaves that path there (private), which would
    make the fit "resume" from the trial's checkpoint instead of the user's. Where the connector has no such
    fields, nothing to keep."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    fields = ("_ckpt_path", "_user_managed")
    before = {f: getattr(connector, f) for f in fields if hasattr(connector, f)}
    try:
        yield
    finally:
        for field, value in before.items():
            setattr(connector, field, value)


def pending_grad_scale(trainer: Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The AMP scale the gradients still carry in ``on_before_optimizer_step``, or ``None`` for true gradients.

    Lightning unscales before that hook, except for optimizers that unscale inside their own ``step``
    (``_step_supports_amp_scaling``, e.g. fused Adam): a term added to their gradients must be scaled too.
    The scale is the precision plugin's GradScaler's (``_scale``, private to torch): read here, in one place.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    return scaler._scale  # type: ignore[no-any-return]


def attached_trainer(module: Any) -> Trainer | None:
    """The Trainer ``module`` is attached to, or ``None`` (``LightningModule.trainer`` raises when there is
    none; the field behind it is private)."""
    return getattr(module, "_trainer", None)


def trainer_callbacks(trainer: Trainer) -> list[Callback]:
    """``trainer.callbacks``: set by Lightning's callback connector at ``Trainer.__init__``, so a type
    checker does not see it on the class; read here, typed, in one place."""
    return trainer.callbacks  # type: ignore[attr-defined,no-any-return]


def trainer_datamodule(trainer: Trainer) -> LightningDataModule | None:
    """``trainer.datamodule`` (the fit's DataModule, or ``None``), typed for the same reason."""
    return getattr(trainer, "datamodule", None)


def should_log_step(trainer: Trainer) -> bool:
    """Whether the loggers write step metrics at this training step (``trainer.log_every_n_steps``).

    The same test Lightning's ``LearningRateMonitor`` uses (its logger connector's ``should_update_logs``);
    a step-level ``self.log`` on other steps costs host time and is never written. Lightning keeps it
    private, so it is read here, in one place. In training the test is made here, on the same counter
    (``fit_loop.epoch_loop._batches_that_stepped``), at a fraction of the host time of the property chain
    behind ``should_update_logs`` (~20 µs right after a training step on a CPU). Not ``global_step``: the
    counter Lightning logs by is the batches that stepped, which differs from the optimizer steps under
    manual optimization with several optimizers.
    """
    every = getattr(trainer, "log_every_n_steps", 0)
    if not every:
        return False
    if trainer.state.stage == "train":
        return (batches_that_stepped(trainer) + 1) % every == 0 or trainer.should_stop
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def publish_step_metrics(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Write step ``metrics`` to every logger (rank zero) at the step Lightning logs this batch under, and put
    them in ``trainer.callback_metrics`` (as float64 CPU tensors, as ``LightningModule.log`` would) for other
    callbacks and the run's final metrics.

    What ``LightningModule.log(..., on_step=True, on_epoch=False)`` does for a value that is already a
    number, at a fraction of its host time: ``log`` walks the whole result collection and costs about
    1 ms per call on a CPU right after a training step; this is a dict update and the loggers' own
    ``log_metrics`` (what Lightning's ``LearningRateMonitor`` calls).
    """
    if not metrics:
        return
    if trainer.is_global_zero:
        step = batches_that_stepped(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})


__all__ = [
    "NAMESPACES",
    "namespace_of",
    "trainer_class_for",
    "batches_that_stepped",
    "reset_dataloaders",
    "resume_path_kept",
    "pending_grad_scale",
    "attached_trainer",
    "publish_step_metrics",
    "trainer_callbacks",
    "trainer_datamodule",
    "should_log_step",
    "pl",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Trainer",
    "seed_everything",
    "EarlyStopping",
    "PLEarlyStopping",
    "EarlyStoppingReason",
    "BatchSizeFinder",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "StochasticWeightAveraging",
    "EMAWeightAveraging",
    "CSVLogger",
    "Logger",
    "TensorBoardLogger",
    "DummyLogger",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
    "lightning_setattr",
    "MisconfigurationException",
    "isolate_rng",
    "CALLBACK_TYPES",
    "LIGHTNING_MODULE_TYPES",
    "DATA_MODULE_TYPES",
    "TRAINER_TYPES",
    "MODEL_CHECKPOINT_TYPES",
    "EARLY_STOPPING_TYPES",
    "BATCH_SIZE_FINDER_TYPES",
    "TENSORBOARD_LOGGER_TYPES",
    "SUBPROCESS_SCRIPT_LAUNCHER_TYPES",
    "RANK_ZERO_LOGGER_NAMES",
]
