"""Time to a target test accuracy through a normal Lightning Trainer with our callbacks, vs a raw PyTorch loop.

Two settings, one script:

**Fashion-MNIST on one CPU thread (the default, issue 16).** The run is the library's normal path: the
config ``experiment=speedrun_fashion_mnist`` is composed with Hydra's compose API exactly as
``python -m lightning_tricks.train experiment=speedrun_fashion_mnist data.data_dir=DIR`` composes it, and
built with ``lightning_tricks.train``'s ``build_data_and_module`` and ``build_callbacks``: the data module
``FashionMNISTDataModule`` (all 60k training images resident, ``loader: resident``, flips on the batch),
the network ``lightning_tricks.models.SpeedNet`` (channels_last), the ``Classifier`` module (label
smoothing, no decay on biases/norms, flip test-time augmentation) and the configured callbacks
(``LinearScaling``, ``LRSchedule`` with warmup + linear decay, ``EMA``). The benchmark adds only its clock,
:class:`TimeToAccuracy`, and the Trainer flags that keep logging and checkpoints out of the timed loop.
After every epoch the official 10k test set is evaluated (as airbench does: the speedrun's clock is test
accuracy; the validation loop runs over the test split, on the EMA weights, and the module's TTA path
scores it) and the run stops at the target.

In the same process, thread count and data tensors, the script times the **reference raw loop** of
issue 16: inputs standardized with the training mean/std; ``Conv2d(1,32,3,p=1)-BN-ReLU-MaxPool2 ->
Conv2d(32,64,3,p=1)-BN-ReLU-MaxPool2 -> Linear(3136,128)-ReLU -> Linear(128,10)``; ``SGD(lr 0.1,
momentum 0.9, nesterov, weight decay 5e-4)`` with ``OneCycleLR(max_lr=0.1)`` over 8 epochs of batch 128,
``randperm`` shuffling, no augmentation; test accuracy after each epoch. The runs alternate (reference,
ours, reference, ours, ...) so a busy phase of a shared machine hits both, and each of our runs is
divided by the reference run next to it: the **ratio** column. A reference run that misses the target
counts with its full 8-epoch time (a lower bound of its time to the target, so the ratio is then an
upper bound).

**CIFAR-10 on a GPU (``--full``).** ResNet-9 of Page (2018, "How to train your ResNet", myrtle.ai) built
in this script (prep conv, three stages, the first and last with a residual pair of convs, global
max-pool, a linear head scaled by 1/8), the data resident on the device, random translate + flip on the
device (``RandomCropFlip``), bf16 autocast and channels_last, optional ``torch.compile``, our
``LinearScaling`` and ``LRSchedule(Warmup(0.2, then=Linear()))``, label smoothing 0.2, flip TTA, target
94%. (``--dataset cifar10`` without ``--full`` is the same network, small, on the CPU.)

Both: no metric, logging or host sync beyond what the module logs per step; clock from the first
training step, paused during each evaluation (``train s``, airbench's convention) and running
(``wall s``), the device synchronized at every clock read; a warm-up run (a few steps + one evaluation)
before the timed runs; mean ± std over ``runs`` seeds and the fraction of runs reaching the target.

    python benchmarks/speedrun.py                                     # Fashion-MNIST, CPU, 1 thread, 93%
    python benchmarks/speedrun.py --runs 5 --override model.widths=[32,64,128]
    python benchmarks/speedrun.py --full --device cuda --data-dir DIR # GPU: CIFAR-10, target 94%

``--data-dir`` for Fashion-MNIST is the folder of the four idx ``.gz`` files (default
``../shared/data/fashion_mnist``); for CIFAR-10 a folder holding ``cifar-10-batches-py/`` (or that folder
itself), e.g. the development split written by ``python ../shared/data/cifar10_dev_batches.py DIR``.
Writes ``benchmarks/results/speedrun_<dataset>_<name>.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from lightning_tricks._lightning import Callback  # noqa: E402

#: the CPU setting: Fashion-MNIST through the library's normal path (experiment config), vs the reference loop
SETTINGS: dict[str, Any] = {
    "name": "cpu",
    "device": "cpu",
    "threads": 1,
    "dataset": "fashion_mnist",
    "data_dir": None,  # None: ../shared/data/fashion_mnist
    "target": 0.93,  # stop at this test accuracy (the official 10k test set)
    "experiment": "speedrun_fashion_mnist",  # conf/experiment/<name>.yaml: every choice of our recipe
    "overrides": (),  # more Hydra overrides of the experiment, e.g. ("model.widths=[32,64,128]",)
    "epochs": None,  # None: the experiment's trainer.max_epochs (the LR schedule's length)
    "limit_train": None,  # the first N training / test images (smoke tests); None: all
    "limit_test": None,
    "reference": True,  # time the reference raw loop in the same run
    "reference_epochs": 8,
    "reference_batch_size": 128,
    "reference_lr": 0.1,  # OneCycleLR's max_lr
    "eval_batch_size": 1000,  # the reference loop's evaluation batches
    "runs": 3,
    "warmup_steps": 5,  # steps of the untimed warm-up runs
    "seed": 0,
}

#: the GPU setting: CIFAR-10 to 94% with ResNet-9 built in this script
FULL: dict[str, Any] = {
    "name": "full",
    "device": "cuda",
    "threads": None,
    "dataset": "cifar10",
    "data_dir": None,  # None: ../shared/data/cifar10
    "limit_train": None,  # a fixed random subset of N images (None: all)
    "limit_test": None,
    "target": 0.94,
    "widths": (64, 128, 256, 512),  # ResNet-9 as published: 6.6M parameters
    "batch_size": 512,
    "eval_batch_size": 2000,
    "epochs": 24,  # Page (2018): 24 epochs; the LR schedule's length, the run stops there if the target is missed
    "warmup": 0.2,  # fraction of the run with the LR rising linearly from 0
    "lr": 0.4,  # peak LR at batch 512 (LinearScaling scales it to the batch)
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "label_smoothing": 0.2,
    "padding": 2,  # random translation by up to this many pixels
    "flip": True,
    "tta": True,  # evaluate on x and its mirror image (logits summed)
    "ema": None,  # EMA decay, or None for no EMA
    "precision": "bf16-mixed",
    "channels_last": True,
    "compile": False,
    "runs": 5,
    "warmup_steps": 30,
    "seed": 0,
}

#: ``--dataset cifar10`` without ``--full``: the same ResNet-9 path, small, on the CPU
RESNET9_CPU: dict[str, Any] = {
    **FULL,
    "name": "cpu",
    "device": "cpu",
    "threads": 1,
    "limit_train": 5000,
    "limit_test": 2000,
    "target": 0.5,
    "widths": (8, 16, 32, 64),
    "batch_size": 128,
    "eval_batch_size": 1000,
    "epochs": 4,
    "tta": False,
    "precision": "32-true",
    "channels_last": False,
    "runs": 3,
    "warmup_steps": 5,
}

DEFAULT_TARGETS = {"cifar10": 0.94, "fashion_mnist": 0.93}


def default_data_dir(dataset: str) -> Path:
    return C.SHARED_DATA / dataset


# -- the clock: shared by both paths ---------------------------------------------------------------
class TimeToAccuracy(Callback):
    """Clock from the first training step, paused during evaluation; each epoch's test accuracy; stops at ``target``.

    The accuracy of an epoch is the module's test-time-augmented accuracy when its ``tta`` is not
    ``"none"`` (:meth:`~lightning_tricks.mixins.ClassificationMixin.tta_probs` over the validation batches,
    in ``on_validation_epoch_end``, when the module holds the weights the validation runs on: the EMA
    average with an ``EMA`` callback, whatever the order of the callback list), else the logged
    ``val/acc``; the plain ``val/acc`` is recorded too. The device is synchronized at every clock read.
    """

    def __init__(self, target: float, device: torch.device) -> None:
        self.target = target
        self.device = device
        self.first: float | None = None
        self.train_s = 0.0
        self._resume = 0.0
        self._tta_acc: float | None = None
        self.history: list[dict] = []
        self.reached: dict | None = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.first is None:
            C.sync(self.device)
            self.first = self._resume = time.perf_counter()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.first is None:
            return
        C.sync(self.device)
        self.train_s += time.perf_counter() - self._resume

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._tta_acc = None
        if trainer.sanity_checking or self.first is None or getattr(pl_module, "tta", "none") == "none":
            return
        correct = torch.zeros((), dtype=torch.long, device=pl_module.device)
        seen = 0
        for loader in _as_list(trainer.val_dataloaders):
            for x, y in loader:
                x, y = x.to(pl_module.device), y.to(pl_module.device)
                correct += (pl_module.tta_probs(x).argmax(-1) == y).sum()
                seen += len(y)
        self._tta_acc = float(correct) / max(seen, 1)  # the one host read of this pass

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.first is None:
            return
        plain = float(trainer.callback_metrics["val/acc"])
        acc = plain if self._tta_acc is None else self._tta_acc
        record = {
            "epoch": trainer.current_epoch + 1,
            "train_s": self.train_s,
            "wall_s": time.perf_counter() - self.first,
            "acc": acc,
            "plain_acc": plain,
        }
        self.history.append(record)
        if acc >= self.target and self.reached is None:
            self.reached = record
            trainer.should_stop = True
        self._resume = time.perf_counter()


def _as_list(loaders: Any) -> list:
    if loaders is None:
        return []
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def outcome(recorder: Any, seed: int) -> dict:
    """One run's row: time, epochs and accuracy at the target (or at the end when it was missed)."""
    nan = {"epoch": 0, "train_s": math.nan, "wall_s": math.nan, "acc": math.nan, "plain_acc": math.nan}
    last = recorder.history[-1] if recorder.history else nan
    hit = recorder.reached
    return {
        "seed": seed,
        "reached": hit is not None,
        "epochs": (hit or last)["epoch"],
        "train_s": (hit or last)["train_s"],
        "wall_s": (hit or last)["wall_s"],
        "acc": (hit or last)["acc"],
        "plain_acc": (hit or last).get("plain_acc", math.nan),
        "final_acc": last["acc"],
        "history": " ".join(f"{h['epoch']}:{h['acc']:.4f}" for h in recorder.history),
    }


# -- Fashion-MNIST: the library's normal path ------------------------------------------------------
def compose_recipe(s: dict, seed: int, device: torch.device) -> Any:
    """The config of ``python -m lightning_tricks.train experiment=<s['experiment']> data.data_dir=...`` plus
    the benchmark's overrides (seed, device, epochs, limits, then ``s['overrides']``), via Hydra's compose API."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from lightning_tricks.train import config_dir

    data_dir = s["data_dir"] or str(default_data_dir(s["dataset"]))
    overrides = [
        f"experiment={s['experiment']}",
        f"data.data_dir={data_dir}",
        f"seed={seed}",
        f"trainer.accelerator={C.accelerator(device)}",
    ]
    if s["epochs"] is not None:
        overrides.append(f"trainer.max_epochs={int(s['epochs'])}")
    for key in ("limit_train", "limit_test"):
        if s[key] is not None:
            overrides.append(f"data.{key}={int(s[key])}")
    overrides += list(s["overrides"])
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        # the Trainer runs without logger and checkpoints: nothing is written there
        cfg.paths.output_dir = str(Path(tempfile.gettempdir()) / "lightning_tricks_speedrun")
    return cfg


def build_recipe(cfg: Any) -> tuple[Any, Any, list]:
    """Data module, Classifier and callbacks of ``cfg``, built by ``lightning_tricks.train`` as the CLI builds them.

    The validation loop runs over the test split (the speedrun measures test accuracy after every epoch;
    the recipe holds out no validation images: ``data.val_fraction=0``), and the module's test-time
    augmentation is ``module.tta`` of the config.
    """
    from lightning_tricks.train import build_callbacks, build_data_and_module

    datamodule, module = build_data_and_module(cfg)
    tta = str(cfg.module.get("tta", "none"))
    if getattr(module, "tta", "none") != tta:  # older train.py: module.tta not passed to the Classifier yet
        from lightning_tricks.augment import check_tta

        module.tta = check_tta(tta)
        module.hparams["tta"] = tta
    datamodule.splits["val"] = datamodule.splits["test"]
    return datamodule, module, build_callbacks(cfg)


def fit_recipe(
    cfg: Any, s: dict, device: torch.device, limit_train_batches: int | float = 1.0
) -> tuple[dict, Any, Any]:
    """One timed run of the recipe: ``Trainer(**cfg.trainer)`` with the recipe's callbacks and the clock."""
    from omegaconf import OmegaConf

    from lightning_tricks._lightning import Trainer, seed_everything

    seed_everything(int(cfg.seed), verbose=False)
    datamodule, module, callbacks = build_recipe(cfg)
    recorder = TimeToAccuracy(s["target"], device)
    kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    kwargs.update(
        devices=1,
        limit_train_batches=limit_train_batches,
        limit_val_batches=1.0,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer = Trainer(**kwargs, callbacks=[recorder, *callbacks])
    trainer.fit(module, datamodule=datamodule)
    return outcome(recorder, int(cfg.seed)), datamodule, module


def recipe_line(cfg: Any, params: int) -> str:
    """The recipe in one sentence, read from the composed config."""
    from omegaconf import OmegaConf

    m, d, o = cfg.model, cfg.data, cfg.optimizer
    cb = cfg.get("callbacks") or {}
    parts = [
        f"{m._target_.rsplit('.', 1)[-1]} widths {list(m.widths)}"
        + (f" x{m.convs_per_stage} convs" if m.get("convs_per_stage", 1) != 1 else "")
        + (" residual" if m.get("residual") else "")
        + (f", {m.head} head" if m.get("head") else "")
        + (f" with a hidden layer of {m.hidden}" if m.get("hidden") else "")
        + (", channels_last" if m.get("channels_last") else "")
        + f" ({params:,} params)",
        f"batch {d.batch_size}, {cfg.trainer.max_epochs} epochs",
        f"{o.name.upper()} lr {o.lr}"
        + (f" at batch {cb.linear_scaling.reference_batch_size} (linear scaling)" if cb.get("linear_scaling") else "")
        + f", momentum {o.get('momentum')}{' nesterov' if o.get('nesterov') else ''}, wd {o.get('weight_decay')}",
        _schedule_words(OmegaConf.to_container(cfg.schedule, resolve=True) if cfg.get("schedule") else None),
        f"label smoothing {cfg.module.label_smoothing}",
        f"EMA {cb.ema.decay}" if cb.get("ema") else "",
        f"train augment {OmegaConf.to_container(d.augment) if not isinstance(d.augment, str) else d.augment}"
        + (f" (padding {d.augment_options.padding})" if "crop" in str(d.augment) else ""),
        f"TTA {cfg.module.get('tta', 'none')}",
        f"data loader {d.loader}",
    ]
    return ", ".join(p for p in parts if p)


def _schedule_words(schedule: Any) -> str:
    if not schedule:
        return "constant LR"
    inner = schedule.get("schedule", {})
    name = str(inner.get("_target_", "?")).rsplit(".", 1)[-1]
    if name == "Warmup":
        then = str(inner.get("then", {}).get("_target_", "Constant")).rsplit(".", 1)[-1]
        return f"warmup {inner.get('steps')} then {then.lower()} decay"
    return name


# -- the reference raw loop (issue 16) -------------------------------------------------------------
def reference_net() -> nn.Sequential:
    """``Conv2d(1,32,3,p=1)-BN-ReLU-MaxPool2 -> Conv2d(32,64,3,p=1)-BN-ReLU-MaxPool2 -> Linear(3136,128)-ReLU ->
    Linear(128,10)`` (28x28 inputs)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3136, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for i in range(0, len(y), batch_size):
        correct += (net(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum()
    return float(correct) / max(len(y), 1)


def reference_run(train: tuple, test: tuple, s: dict, device: torch.device, seed: int, max_steps: int | None = None):
    """The reference loop on standardized resident tensors; the clock pauses for the per-epoch test accuracy."""
    torch.manual_seed(seed)
    x_train, y_train = train
    net = reference_net().to(device)
    epochs, batch = int(s["reference_epochs"]), int(s["reference_batch_size"])
    steps_per_epoch = math.ceil(len(y_train) / batch)
    opt = torch.optim.SGD(net.parameters(), lr=s["reference_lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=s["reference_lr"], epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    history: list[dict] = []
    reached = None
    train_s = 0.0
    steps = 0
    first = None
    for epoch in range(epochs):
        net.train()
        C.sync(device)
        t0 = time.perf_counter()
        first = t0 if first is None else first
        perm = torch.randperm(len(y_train), device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        C.sync(device)
        train_s += time.perf_counter() - t0
        acc = accuracy(net, *test, batch_size=int(s["eval_batch_size"]))
        record = {"epoch": epoch + 1, "train_s": train_s, "wall_s": time.perf_counter() - first, "acc": acc}
        history.append(record)
        if max_steps is not None and steps >= max_steps:
            break
        if acc >= s["target"]:
            reached = record
            break
    return _RefRecorder(history, reached)


class _RefRecorder:
    def __init__(self, history: list[dict], reached: dict | None) -> None:
        self.history, self.reached = history, reached


# -- CIFAR-10: ResNet-9 built here -----------------------------------------------------------------------------------
def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """``x + f(x)`` with ``f`` two conv-BN-ReLU layers of the same width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class ResNet9(nn.Module):
    """ResNet-9 (Page 2018): prep, [conv, pool, residual], [conv, pool], [conv, pool, residual], max-pool, linear.

    Example:
        >>> ResNet9(3, 10, widths=(8, 8, 8, 8))(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (64, 128, 256, 512), scale: float = 0.125
    ) -> None:
        super().__init__()
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive ints (prep, stage 1, 2, 3), got {widths!r}")
        w0, w1, w2, w3 = (int(w) for w in widths)
        self.backbone = nn.Sequential(
            conv_bn(in_channels, w0),
            conv_bn(w0, w1),
            nn.MaxPool2d(2),
            Residual(w1),
            conv_bn(w1, w2),
            nn.MaxPool2d(2),
            conv_bn(w2, w3),
            nn.MaxPool2d(2),
            Residual(w3),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)) * self.scale


# -- data ------------------------------------------------------------------------------------------
def load_splits(s: dict) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], int]:
    """``(x_train, y_train), (x_test, y_test), num_classes`` as standardized CPU tensors."""
    from lightning_tricks.data import CIFAR10DataModule, FashionMNISTDataModule

    data_dir = s["data_dir"] or str(default_data_dir(s["dataset"]))
    kwargs = {"val_fraction": 0.0}
    if s["dataset"] == "cifar10":
        dm: Any = CIFAR10DataModule(data_dir, **kwargs)
        hint = (
            "write the development split with `python ../shared/data/cifar10_dev_batches.py DIR` and pass "
            "--data-dir DIR"
        )
    elif s["dataset"] == "fashion_mnist":
        dm = FashionMNISTDataModule(data_dir, **kwargs)
        hint = "pass --data-dir pointing at the four Fashion-MNIST idx .gz files"
    else:
        raise SystemExit(f"--dataset must be cifar10 or fashion_mnist, got {s['dataset']!r}")
    try:
        dm.setup()
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\n{hint}") from None
    return subset(dm.splits["train"], s["limit_train"]), subset(dm.splits["test"], s["limit_test"]), dm.num_classes


def subset(split: tuple[torch.Tensor, torch.Tensor], n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` samples (not the first ``n``: a file may be sorted by class, as the
    CIFAR-10 development split's ``test_batch`` is)."""
    x, y = split
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    return x[idx], y[idx]


def make_datamodule(train: tuple, test: tuple, s: dict, seed: int):
    """Resident batches (the tensors already live on the device) with the augmentation applied after lookup."""
    from lightning_tricks._lightning import LightningDataModule
    from lightning_tricks.data import TensorBatchLoader

    augment = make_augment(s)
    channels_last = bool(s["channels_last"])

    class ResidentData(LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = s["batch_size"]  # read by LinearScaling

        def train_dataloader(self) -> TensorBatchLoader:
            return TensorBatchLoader(*train, batch_size=s["batch_size"], shuffle=True, drop_last=True, seed=seed)

        def val_dataloader(self) -> TensorBatchLoader:
            return TensorBatchLoader(*test, batch_size=s["eval_batch_size"])

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            x, y = batch[0], batch[1]
            if self.trainer.training and augment is not None:
                x = augment(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return [x, y]

    return ResidentData()


def make_augment(s: dict):
    """``RandomCropFlip`` from the library (issue 7); ``None`` when both translation and flip are off."""
    if not s["padding"] and not s["flip"]:
        return None
    from lightning_tricks.augment import RandomCropFlip

    return RandomCropFlip(padding=int(s["padding"]), flip=bool(s["flip"]))


# -- module and callbacks --------------------------------------------------------------------------
def make_module(net: nn.Module, num_classes: int, s: dict):
    from lightning_tricks.mixins import Classifier

    tta = bool(s["tta"])

    class SpeedrunModule(Classifier):
        """Training step without metrics or logging (no host sync); evaluation accumulates on the device."""

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.loss(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch[0], batch[1]
            logits = self(x)
            if tta:
                logits = logits + self(x.flip(-1))
            self.val_acc.update(logits.detach(), y)

        def on_validation_epoch_end(self) -> None:
            self.log("val/acc", self.val_acc.compute())  # the one host read of the epoch comes after this
            self.val_acc.reset()

    optimizer = {
        "name": "sgd",
        "lr": s["lr"],
        "momentum": s["momentum"],
        "nesterov": True,
        "weight_decay": s["weight_decay"],
        "no_decay_bias_norm": True,
    }
    return SpeedrunModule(net, num_classes, optimizer=optimizer, label_smoothing=s["label_smoothing"])


def make_callbacks(s: dict, recorder: Any) -> list:
    from lightning_tricks.callbacks import EMA, LinearScaling, LRSchedule
    from lightning_tricks.schedules import Linear, Warmup

    callbacks = [
        recorder,
        LinearScaling(reference_batch_size=512),
        LRSchedule(Warmup(steps=s["warmup"], start_factor=0.0, then=Linear()), log=False),
    ]
    if s["ema"]:
        callbacks.append(EMA(decay=float(s["ema"]), evaluate="ema"))
    return callbacks


def build_net(in_channels: int, num_classes: int, s: dict, device: torch.device) -> nn.Module:
    net = ResNet9(in_channels, num_classes, widths=tuple(s["widths"])).to(device)
    if s["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    if s["compile"]:
        net.compile()
    return net


def fit_once(
    train: tuple,
    test: tuple,
    num_classes: int,
    s: dict,
    device: torch.device,
    seed: int,
    limit_train_batches: int | float = 1.0,
) -> dict:
    from lightning_tricks._lightning import Trainer, seed_everything

    seed_everything(seed, verbose=False)
    net = build_net(train[0].shape[1], num_classes, s, device)
    module = make_module(net, num_classes, s)
    recorder = TimeToAccuracy(s["target"], device)
    trainer = Trainer(
        accelerator=C.accelerator(device),
        devices=1,
        precision=s["precision"],
        max_epochs=s["epochs"],
        limit_train_batches=limit_train_batches,
        callbacks=make_callbacks(s, recorder),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        limit_val_batches=1.0,
    )
    trainer.fit(module, datamodule=make_datamodule(train, test, s, seed))
    return outcome(recorder, seed)


# -- tables ----------------------------------------------------------------------------------------
def _at_target(rows: list[dict], digits: int = 2) -> list[str]:
    hits = [r for r in rows if r["reached"]]
    return [
        f"{len(hits)}/{len(rows)}",
        C.pm([r["train_s"] for r in hits], digits) if hits else "not reached",
        C.pm([r["wall_s"] for r in hits], digits) if hits else "",
        C.pm([r["epochs"] for r in hits], 1) if hits else "",
        C.pm([100 * r["acc"] for r in rows], 2) + "%",
    ]


def summarize_recipe(
    ours: list[dict], refs: list[dict], s: dict, recipe: str, device: torch.device, n_train: int, n_test: int
) -> str:
    """The Fashion-MNIST table: ours and the reference, the paired ratio, per-run rows, accuracy curves."""
    target = f"{100 * s['target']:.1f}%"
    ratios = [r["ratio"] for r in ours if r["reached"] and math.isfinite(r["ratio"])]
    ratio = C.pm(ratios, 3) if ratios else "n/a"
    header = [
        "run",
        f"runs reaching {target}",
        "train s to target (mean ± std)",
        "wall s (with eval)",
        "epochs",
        "test acc at stop",
        "ours / reference (paired)",
    ]
    body = [["ours: `experiment=" + s["experiment"] + "`", *_at_target(ours), ratio]]
    if refs:
        body.append(["reference raw loop", *_at_target(refs), "1"])
    per_run_header = ["seed", "ours: train s", "epochs", "acc (plain)", "reference: train s", "epochs", "acc", "ratio"]
    per_run = []
    for i, r in enumerate(ours):
        ref = refs[i] if i < len(refs) else None
        per_run.append(
            [
                r["seed"],
                f"{r['train_s']:.1f}" + ("" if r["reached"] else " (missed)"),
                r["epochs"],
                f"{100 * r['acc']:.2f}% ({100 * r['plain_acc']:.2f}%)",
                (f"{ref['train_s']:.1f}" + ("" if ref["reached"] else f" (missed: {ref['epochs']}-epoch time)"))
                if ref
                else "",
                ref["epochs"] if ref else "",
                f"{100 * ref['acc']:.2f}%" if ref else "",
                f"{r['ratio']:.3f}" if math.isfinite(r["ratio"]) else "",
            ]
        )
    reached = sum(r["reached"] for r in ours) / max(len(ours), 1)
    lines = [
        f"Time to {target} test accuracy on {s['dataset']} ({n_train:,} train / {n_test:,} test images), "
        f"{len(ours)} timed run(s) of each, alternating (reference, ours) after an untimed warm-up of each; "
        f"{device.type.upper()}, {torch.get_num_threads()} torch thread(s). Seconds from the first training "
        "step, the clock paused during each epoch's test evaluation (`train s`) and running (`wall s`).",
        "",
        f"Ours: {recipe}; through `Trainer.fit` with the config's callbacks.",
        "",
        "Reference: the raw loop of issue 16 (Conv32-BN-ReLU-Pool, Conv64-BN-ReLU-Pool, Linear 3136-128-10; "
        f"SGD nesterov, OneCycleLR max_lr {s['reference_lr']}, {s['reference_epochs']} epochs of batch "
        f"{s['reference_batch_size']}, no augmentation), stopped at the target.",
        "",
        C.markdown_table(header, body, right=(1, 2, 3, 4, 5, 6)),
        "",
    ]
    if refs:
        verdict = "met" if ratios and C.mean_std(ratios)[0] <= 0.5 and reached >= 0.9 else "missed"
        lines += [
            f"Goal (issue 16): ours / reference ≤ 0.5 with ≥ 90% of runs reaching {target}: **{verdict}** "
            f"(ratio {ratio}, {100 * reached:.0f}% of runs reached it).",
            "",
        ]
    lines += [
        C.markdown_table(per_run_header, per_run, right=(1, 2, 3, 4, 5, 6, 7)),
        "",
        "Test accuracy after each epoch (ours: with the recipe's TTA, on the EMA weights when EMA is on):",
        "",
    ]
    lines += [f"- ours, seed {r['seed']}: {r['history']}" for r in ours]
    lines += [f"- reference, seed {r['seed']}: {r['history']}" for r in refs]
    lines += ["", f"Machine: {C.machine(device)}; {C.stamp()}."]
    return "\n".join(lines)


def summarize(rows: list[dict], s: dict, device: torch.device, n_train: int, n_test: int, params: int) -> str:
    """The ResNet-9 (CIFAR-10) table."""
    header = [
        "dataset",
        "target",
        "runs reaching it",
        "train s to target (mean ± std)",
        "wall s (with eval)",
        "epochs",
        "test acc at stop",
    ]
    body = [[s["dataset"], f"{100 * s['target']:.1f}%", *_at_target(rows)]]
    per_run = [
        [
            r["seed"],
            "yes" if r["reached"] else "no",
            r["epochs"],
            f"{r['train_s']:.2f}",
            f"{r['wall_s']:.2f}",
            f"{100 * r['acc']:.2f}%",
        ]
        for r in rows
    ]
    extras = [
        x
        for x, on in (
            ("flip TTA", s["tta"]),
            (f"EMA {s['ema']}", s["ema"]),
            ("channels_last", s["channels_last"]),
            ("torch.compile", s["compile"]),
        )
        if on
    ]
    return "\n".join(
        [
            f"Time to {100 * s['target']:.1f}% test accuracy on {s['dataset']} ({n_train:,} train / {n_test:,} test "
            f"images), ResNet-9 widths {list(s['widths'])} ({params:,} params), batch {s['batch_size']}, at most "
            f"{s['epochs']} epochs (LR {s['lr']} at batch 512, linearly scaled; {int(100 * s['warmup'])}% warmup then "
            f"linear decay), label smoothing {s['label_smoothing']}, translate ±{s['padding']} px"
            f"{' + flip' if s['flip'] else ''} on the device, precision {s['precision']}"
            + (", " + ", ".join(extras) if extras else "")
            + f"; {len(rows)} timed run(s) after a warm-up run. "
            "Seconds from the first training step; `train s` pauses the clock during the per-epoch evaluation.",
            "",
            C.markdown_table(header, body, right=(2, 3, 4, 5, 6)),
            "",
            C.markdown_table(
                ["seed", "reached", "epochs", "train s", "wall s", "test acc at stop"], per_run, right=(2, 3, 4, 5)
            ),
            "",
            f"Machine: {C.machine(device)}; {C.stamp()}.",
        ]
    )


# -- main ------------------------------------------------------------------------------------------
RESNET9_ONLY = ("batch_size", "lr", "widths", "ema", "compile", "tta", "precision")
RECIPE_ONLY = ("overrides", "experiment", "reference", "reference_epochs")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_recipe(s: dict, device: torch.device, out_dir: str) -> tuple[list[dict], str]:
    """Fashion-MNIST: warm-up, then ``runs`` x (reference run, our run), the table."""
    from lightning_tricks.data import FashionMNISTDataModule

    data_dir = s["data_dir"] or str(default_data_dir(s["dataset"]))
    limits = {"limit_train": s["limit_train"], "limit_test": s["limit_test"]}
    ref_data = FashionMNISTDataModule(data_dir, val_fraction=0.0, normalize="zscore", **limits)
    try:
        ref_data.setup()  # the reference's inputs: standardized with the training mean/std
    except FileNotFoundError as e:
        raise SystemExit(f"{e}\npass --data-dir pointing at the four Fashion-MNIST idx .gz files") from None
    train = tuple(t.to(device) for t in ref_data.splits["train"])
    test = tuple(t.to(device) for t in ref_data.splits["test"])
    # warm-up: a few steps and one evaluation of each (allocator, oneDNN primitives, lazy imports), not timed
    warm = compose_recipe({**s, "epochs": 1}, s["seed"], device)
    _, _, module = fit_recipe(warm, s, device, limit_train_batches=s["warmup_steps"])
    params = C.param_count(module.net)
    recipe = recipe_line(compose_recipe(s, s["seed"], device), params)
    if s["reference"]:
        reference_run(train, test, s, device, s["seed"], max_steps=s["warmup_steps"])
    ours: list[dict] = []
    refs: list[dict] = []
    for i in range(s["runs"]):
        seed = s["seed"] + i
        if s["reference"]:
            ref = outcome(reference_run(train, test, s, device, seed), seed)
            refs.append(ref)
            _say(
                f"reference run {i}: {'reached' if ref['reached'] else 'missed'} {100 * ref['acc']:.2f}% after "
                f"{ref['epochs']} epoch(s), {ref['train_s']:.1f} s training"
            )
        r, _, _ = fit_recipe(compose_recipe(s, seed, device), s, device)
        r["ratio"] = r["train_s"] / refs[-1]["train_s"] if refs else math.nan
        ours.append(r)
        _say(
            f"our run {i}: {'reached' if r['reached'] else 'missed'} {100 * r['acc']:.2f}% after {r['epochs']} "
            f"epoch(s), {r['train_s']:.1f} s training ({r['wall_s']:.1f} s with evaluation)"
            + (f", {r['ratio']:.3f} of the reference" if refs else "")
        )
    md = summarize_recipe(ours, refs, s, recipe, device, len(train[1]), len(test[1]))
    rows = [{"side": "ours", **r} for r in ours] + [{"side": "reference", **r, "ratio": 1.0} for r in refs]
    md_path, _ = C.write_results(f"speedrun_{s['dataset']}_{s['name']}", rows, md, out_dir)
    print(md)
    _say(f"wrote {md_path} and .csv")
    return rows, md


def run_resnet9(s: dict, device: torch.device, out_dir: str) -> tuple[list[dict], str]:
    """CIFAR-10 (or any dataset) with the in-script ResNet-9: warm-up, ``runs`` timed runs, the table."""
    train_cpu, test_cpu, num_classes = load_splits(s)
    train = tuple(t.to(device) for t in train_cpu)
    test = tuple(t.to(device) for t in test_cpu)
    params = C.param_count(ResNet9(train[0].shape[1], num_classes, widths=tuple(s["widths"])))
    # warm-up: a few steps and one evaluation (cuDNN autotuning, torch.compile, allocator), not timed
    fit_once(train, test, num_classes, {**s, "epochs": 1}, device, s["seed"], limit_train_batches=s["warmup_steps"])
    rows = []
    for i in range(s["runs"]):
        r = fit_once(train, test, num_classes, s, device, s["seed"] + i)
        rows.append(r)
        _say(
            f"run {i}: {'reached' if r['reached'] else 'missed'} {100 * r['acc']:.2f}% after {r['epochs']} "
            f"epoch(s), {r['train_s']:.2f} s training ({r['wall_s']:.2f} s with evaluation)"
        )
    md = summarize(rows, s, device, len(train[1]), len(test[1]), params)
    print(md)
    md_path, _ = C.write_results(f"speedrun_{s['dataset']}_{s['name']}", rows, md, out_dir)
    _say(f"wrote {md_path} and .csv")
    return rows, md


def main(argv: list[str] | None = None) -> tuple[list[dict], str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the GPU setting (FULL): CIFAR-10 to 94%%")
    parser.add_argument("--device", help="cpu | cuda | auto")
    parser.add_argument("--dataset", choices=["cifar10", "fashion_mnist"])
    parser.add_argument("--data-dir", help="Fashion-MNIST: the idx files; CIFAR-10: folder with cifar-10-batches-py/")
    parser.add_argument("--target", type=float, help="test accuracy to reach, in (0, 1]")
    parser.add_argument("--epochs", type=int, help="LR schedule length = the most epochs a run takes")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--seed", type=int, help="seed of the first run (run i uses seed + i)")
    parser.add_argument("--limit-train", type=int)
    parser.add_argument("--limit-test", type=int)
    parser.add_argument("--warmup-steps", type=int, help="steps of the untimed warm-up run(s)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--name", help="results file suffix")
    parser.add_argument("--out-dir", default=str(C.RESULTS))
    recipe = parser.add_argument_group("Fashion-MNIST (the library's path)")
    recipe.add_argument("--experiment", help="conf/experiment/<name>.yaml (default speedrun_fashion_mnist)")
    recipe.add_argument(
        "--override", action="append", dest="overrides", help="a Hydra override of the experiment (repeatable)"
    )
    recipe.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None, help="time the raw loop")
    recipe.add_argument("--reference-epochs", type=int)
    resnet = parser.add_argument_group("CIFAR-10 (ResNet-9 built in the script)")
    resnet.add_argument("--batch-size", type=int)
    resnet.add_argument("--lr", type=float, help="peak LR at batch 512")
    resnet.add_argument("--widths", help="ResNet-9 widths, 4 ints, e.g. 64,128,256,512")
    resnet.add_argument("--ema", type=float, help="EMA decay (off by default)")
    resnet.add_argument("--compile", action="store_true", default=None, help="torch.compile the network")
    resnet.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    resnet.add_argument("--precision")
    args = parser.parse_args(argv)
    dataset = args.dataset or ("cifar10" if args.full else "fashion_mnist")
    if args.full and dataset != "cifar10":
        parser.error(
            "--full is the CIFAR-10 GPU setting; the Fashion-MNIST run is the default (--device cuda for a GPU)"
        )
    given = {
        "device": args.device,
        "dataset": dataset,
        "data_dir": args.data_dir,
        "target": args.target,
        "epochs": args.epochs,
        "runs": args.runs,
        "seed": args.seed,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads,
        "name": args.name,
        "experiment": args.experiment,
        "overrides": tuple(args.overrides) if args.overrides else None,
        "reference": args.reference,
        "reference_epochs": args.reference_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "widths": tuple(int(w) for w in args.widths.split(",")) if args.widths else None,
        "ema": args.ema,
        "compile": args.compile,
        "tta": args.tta,
        "precision": args.precision,
    }
    on_recipe = dataset == "fashion_mnist"
    wrong = RESNET9_ONLY if on_recipe else RECIPE_ONLY
    bad = [f"--{k.replace('_', '-')}" for k in wrong if given[k] is not None]
    if bad:
        other = "the CIFAR-10 ResNet-9 path" if on_recipe else "the Fashion-MNIST recipe"
        hint = " (use --override model.widths=[...], data.batch_size=..., ...)" if on_recipe else ""
        parser.error(f"{', '.join(bad)} only apply to {other}, not to --dataset {dataset}{hint}")
    given = {k: v for k, v in given.items() if k not in wrong}
    s = C.pick_settings(SETTINGS if on_recipe else RESNET9_CPU, FULL, args.full, given)
    if args.target is None:
        s["target"] = DEFAULT_TARGETS[dataset] if (on_recipe or args.full) else s["target"]
    if not 0.0 < s["target"] <= 1.0:
        parser.error(f"--target must be in (0, 1], got {s['target']}")
    device = C.resolve_device(s["device"])
    C.setup_torch(device, s["threads"])
    with C.quiet():
        if on_recipe:
            return run_recipe(s, device, args.out_dir)
        return run_resnet9(s, device, args.out_dir)


if __name__ == "__main__":
    main()
