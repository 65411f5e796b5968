"""Both Lightning namespaces: ``pytorch_lightning`` and ``lightning.pytorch`` (the ``lightning`` package).

Our callbacks, ``Classifier`` and DataModules must be accepted by either namespace's ``Trainer`` and
``LightningCLI``, installed alone or together. The ``lightning.pytorch`` cases skip where ``lightning`` is not
installed; the cases with one namespace hidden run in a fresh interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_tricks.callbacks as cbs
import lightning_tricks.data as lt_data
from lightning_tricks import _lightning
from lightning_tricks.callbacks import EMA, EarlyStopping, LRSchedule, Mixup, ModelCheckpoint, RandomState
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.schedules import Cosine, Warmup

HERE = Path(__file__).parent
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
NAMESPACES = [
    "pytorch_lightning",
    pytest.param(
        "lightning.pytorch",
        marks=pytest.mark.skipif(not HAS_LIGHTNING, reason="the lightning package is not installed"),
    ),
]
pytestmark = pytest.mark.filterwarnings(
    "ignore:Be aware that when using `ckpt_path`",
    "ignore:.*does not have many workers",
    "ignore:.*LightningCLI.*",
    "ignore:Checkpoint directory .* exists and is not empty",
)


def _public(module, base_name: str) -> list[type]:
    """The public classes of ``module`` derived from Lightning's ``base_name`` (in the first namespace)."""
    base = getattr(_lightning.pl, base_name)
    found = [getattr(module, name) for name in module.__all__]
    return [c for c in found if isinstance(c, type) and base in c.__mro__]


PUBLIC = _public(cbs, "Callback") + _public(lt_data, "LightningDataModule") + [Classifier]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_public_class_derives_from_the_namespace_class(namespace):
    pl = importlib.import_module(namespace)
    assert len(PUBLIC) > 20  # the registry of public callbacks and data modules was found
    for cls in PUBLIC:
        base = next(b for b in ("Callback", "LightningDataModule", "LightningModule") if b in _base_names(cls))
        assert getattr(pl, base) in cls.__mro__, f"{cls.__name__} is not a {namespace}.{base}"
    assert isinstance(EMA(), pl.Callback)
    assert issubclass(ModelCheckpoint, pl.callbacks.ModelCheckpoint)
    assert issubclass(EarlyStopping, pl.callbacks.EarlyStopping)


def _base_names(cls: type) -> set[str]:
    return {c.__name__ for c in cls.__mro__ if c.__module__.startswith(_lightning.NAMESPACES)}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_isinstance_against_our_names_accepts_the_namespace_classes(namespace):
    pl = importlib.import_module(namespace)
    their_checkpoint = pl.callbacks.ModelCheckpoint()
    assert isinstance(their_checkpoint, _lightning.ModelCheckpoint)
    assert isinstance(their_checkpoint, _lightning.MODEL_CHECKPOINT_TYPES)
    assert isinstance(their_checkpoint, _lightning.Callback)
    assert isinstance(pl.callbacks.EarlyStopping(monitor="x"), _lightning.EarlyStopping)
    assert isinstance(pl.LightningDataModule(), _lightning.LightningDataModule)
    assert issubclass(pl.callbacks.LearningRateMonitor, _lightning.Callback)
    # a subclass of ours is itself: another class is not one of ours because it is Lightning's
    assert not isinstance(their_checkpoint, ModelCheckpoint)
    assert not isinstance(pl.Callback(), EMA)
    with pytest.raises(pl.utilities.exceptions.MisconfigurationException):
        raise _lightning.MisconfigurationException("caught by either namespace's except clause")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_the_trainer_finds_our_early_stopping_and_checkpoint(namespace, tmp_path):
    pl = importlib.import_module(namespace)
    stopper, checkpoint = EarlyStopping(monitor="val_loss"), ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    trainer = pl.Trainer(callbacks=[stopper, checkpoint], logger=False, enable_progress_bar=False)
    assert trainer.early_stopping_callback is stopper
    assert trainer.checkpoint_callback is checkpoint
    assert trainer.checkpoint_callbacks == [checkpoint]  # ours replaces Lightning's default one


X = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()


def _user_module_class(pl):
    """A user's own module, written against ``pl`` as Lightning's docs show; takes Mixup's soft targets."""

    class UserModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    return UserModule


class _Crash(_lightning.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def _user_fit(pl, dirpath: Path, crash: bool = False, ckpt_path: str | None = None, ema: bool = True):
    pl.seed_everything(0)  # a new process would start here
    module = _user_module_class(pl)()
    callbacks = [
        *([EMA(decay=0.9)] if ema else []),
        LRSchedule(Warmup(steps=0.1, then=Cosine())),
        Mixup(alpha=0.4, num_classes=2),
        EarlyStopping(monitor="val_loss", patience=10),
        ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_last=True),
        RandomState(),
    ]
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[*callbacks, *([_Crash()] if crash else [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(X, Y), batch_size=32)
    if crash:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit(module, train, val, ckpt_path=ckpt_path)
    else:
        trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, module


def _crash_and_resume(pl, dirpath: Path, ema: bool = True):
    """A run that crashes at the second epoch's end, then a fresh Trainer resuming from its ``last.ckpt``."""
    _user_fit(pl, dirpath, crash=True, ema=ema)
    last = dirpath / "last.ckpt"
    # Lightning runs checkpoint callbacks last: the crash at the second epoch's end comes before its save
    assert torch.load(last, weights_only=False)["global_step"] == 4
    return _user_fit(pl, dirpath, ckpt_path=str(last), ema=ema)


def _assert_same_weights(a: nn.Module, b: nn.Module, what: str) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs: {what}"


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_user_module_trains_with_our_callbacks_and_resumes(namespace, tmp_path):
    pl = importlib.import_module(namespace)
    trainer, straight = _user_fit(pl, tmp_path / "straight")
    assert trainer.global_step == 12 and trainer.current_epoch == 3
    checkpoint = trainer.checkpoint_callback
    assert isinstance(checkpoint, ModelCheckpoint) and Path(checkpoint.best_model_path).is_file()
    assert float(trainer.callback_metrics["val_loss"]) < 0.6  # log(2) = 0.69 at chance

    resumed_trainer, resumed = _crash_and_resume(pl, tmp_path / "resumed")
    assert resumed_trainer.global_step == 12
    ema = next(cb for cb in resumed_trainer.callbacks if isinstance(cb, EMA))
    assert ema.state_dict()["num_updates"] == 12  # 4 restored from the checkpoint, 8 after resuming
    if namespace != "pytorch_lightning":  # the same run, step for step, under the standalone package
        reference = _crash_and_resume(importlib.import_module("pytorch_lightning"), tmp_path / "reference")[1]
        _assert_same_weights(reference, resumed, f"the resumed run under {namespace} and under pytorch_lightning")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_user_module_resumes_exactly(namespace, tmp_path):
    # EMA, LRSchedule, Mixup, EarlyStopping, a monitored ModelCheckpoint and RandomState: a crash at an
    # epoch end, a fresh Trainer resuming from last.ckpt, and the final weights of both runs are equal
    pl = importlib.import_module(namespace)
    straight = _user_fit(pl, tmp_path / "straight")[1]
    resumed = _crash_and_resume(pl, tmp_path / "resumed")[1]
    _assert_same_weights(straight, resumed, f"resumed vs uninterrupted under {namespace}")


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_classifier_and_datamodule_with_the_namespace_trainer(namespace, tmp_path):
    pl = importlib.import_module(namespace)
    torch.manual_seed(0)
    module = Classifier(MLP((1, 8, 8), 10), 10, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    data = DigitsDataModule(loader="resident")
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    before = pl.Trainer(**quiet).validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=10,
        **quiet,
        default_root_dir=tmp_path,
        callbacks=[EMA(), ModelCheckpoint(dirpath=tmp_path, monitor="val/loss")],
    )
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert trainer.global_step == 20
    assert after < 0.7 * before, (before, after)
    assert trainer.datamodule is data and module.trainer is trainer
    best = trainer.checkpoint_callback.best_model_path
    loaded = Classifier.load_from_checkpoint(best, net=MLP((1, 8, 8), 10), weights_only=False)
    assert set(loaded.state_dict()) == set(module.state_dict())


CLI_CONFIG = HERE / "namespace_cli.yaml"


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_lightning_cli_yaml_with_our_callbacks_and_datamodule(namespace, tmp_path):
    pytest.importorskip("jsonargparse")
    cli_module = importlib.import_module(f"{namespace}.cli")
    from namespace_cli_model import user_model_class

    cli = cli_module.LightningCLI(
        user_model_class(namespace),
        save_config_callback=None,
        args=["fit", "--config", str(CLI_CONFIG), "--trainer.default_root_dir", str(tmp_path)],
    )
    kinds = {type(cb).__name__: cb for cb in cli.trainer.callbacks}
    assert type(kinds["EMA"]) is EMA and type(kinds["LRSchedule"]) is LRSchedule
    assert type(cli.trainer.early_stopping_callback) is EarlyStopping
    assert cli.trainer.early_stopping_callback.patience == 5  # the YAML's init_args reached our class
    assert type(cli.datamodule) is DigitsDataModule
    assert cli.trainer.global_step == 2
    assert kinds["EMA"].decay == 0.5


_ONE_NAMESPACE = """
import importlib.abc, sys

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {hidden!r} or name.startswith({hidden!r} + "."):
            raise ImportError("hidden: " + name)

sys.meta_path.insert(0, Hide())
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import {visible} as pl
from lightning_tricks import _lightning
from lightning_tricks.callbacks import EMA, EarlyStopping, LRSchedule, ModelCheckpoint
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.schedules import Cosine

assert _lightning.NAMESPACES == ({visible!r},), _lightning.NAMESPACES
assert _lightning.Callback is pl.Callback and _lightning.ModelCheckpoint is pl.callbacks.ModelCheckpoint
callbacks = [EMA(), LRSchedule(Cosine()), EarlyStopping(monitor="val/loss"), ModelCheckpoint(dirpath=sys.argv[1])]
quiet = dict(logger=False, enable_progress_bar=False)
trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=callbacks, **quiet)
assert trainer.early_stopping_callback is callbacks[2] and trainer.checkpoint_callback is callbacks[3]
trainer.fit(Classifier(MLP((1, 8, 8), 10), 10, {{"name": "sgd", "lr": 0.1}}), datamodule=DigitsDataModule())
assert trainer.global_step == 3
hidden = [m for m in sys.modules if m == {hidden!r} or m.startswith({hidden!r} + ".")]
assert not hidden, hidden
print("OK")
"""


@pytest.mark.parametrize(
    ("visible", "hidden"),
    [
        pytest.param(
            "lightning.pytorch",
            "pytorch_lightning",
            marks=pytest.mark.skipif(not HAS_LIGHTNING, reason="the lightning package is not installed"),
        ),
        ("pytorch_lightning", "lightning"),
    ],
)
def test_one_namespace_installed_alone(visible, hidden, tmp_path):
    code = textwrap.dedent(_ONE_NAMESPACE.format(visible=visible, hidden=hidden))
    env = {k: v for k, v in os.environ.items() if k != "LT_LIGHTNING_NAMESPACE"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


@pytest.mark.skipif(not HAS_LIGHTNING, reason="the lightning package is not installed")
def test_environment_variable_puts_lightning_pytorch_first():
    code = (
        "from lightning_tricks import _lightning as L; import lightning.pytorch as pl; "
        "assert L.Trainer is pl.Trainer and L.NAMESPACES[0] == 'lightning.pytorch', L.NAMESPACES; "
        "assert L.ModelCheckpoint.__mro__[1] is pl.callbacks.ModelCheckpoint; print('OK')"
    )
    env = {**os.environ, "LT_LIGHTNING_NAMESPACE": "lightning"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]
    env["LT_LIGHTNING_NAMESPACE"] = "lightning.fabric"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and "LT_LIGHTNING_NAMESPACE must be one of" in proc.stderr


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_restore_best_from_the_namespace_model_checkpoint(namespace, tmp_path):
    """``RestoreBest(source="checkpoint")`` takes the weights of Lightning's own ``ModelCheckpoint``."""
    pl = importlib.import_module(namespace)
    try:
        restore_best = cbs.RestoreBest
    except (AttributeError, ImportError):
        pytest.skip("RestoreBest is not in lightning_tricks.callbacks")

    class Scripted(_user_module_class(pl)):
        def validation_step(self, batch, batch_idx):  # the best validation is the second epoch's
            self.log("val_loss", [0.5, 0.2, 0.4, 0.6][self.current_epoch])

    pl.seed_everything(0)
    module = Scripted()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min")
    trainer = pl.Trainer(
        max_epochs=4,
        callbacks=[restore_best(monitor="val_loss", mode="min", source="checkpoint"), checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=16), DataLoader(TensorDataset(X, Y), batch_size=32))
    assert Path(checkpoint.best_model_path).name == "epoch=1-step=8.ckpt"
    best = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    for name, value in module.state_dict().items():
        assert torch.equal(value, best[name]), f"{name}: the module does not hold the best checkpoint's weights"
