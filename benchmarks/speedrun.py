"""Time to a target test accuracy: a fast ResNet through a normal Lightning Trainer with our callbacks.

The fast path, all in one screen (airbench / hlb-CIFAR10 in spirit, but through ``Trainer.fit``):

- **data resident on the device**: the whole training and test sets are tensors on the GPU; a batch is
  an index lookup (:class:`lightning_tricks.data.TensorBatchLoader`), no DataLoader, no workers;
- **on-device augmentation**: random translation by up to ``padding`` pixels + horizontal flip, per
  sample, in one gather (:class:`lightning_tricks.augment.RandomCropFlip`), after the batch lookup;
- **bf16 autocast** (``precision="bf16-mixed"``) and **channels_last** on a GPU (fp32, NCHW on a CPU);
  optional ``torch.compile`` of the network (``--compile``);
- **our callbacks**: :class:`~lightning_tricks.callbacks.LinearScaling` (LR given at batch 512),
  :class:`~lightning_tricks.callbacks.LRSchedule` with ``Warmup(then=Linear())`` (the piecewise-linear
  one-cycle of Page 2018), optional :class:`~lightning_tricks.callbacks.EMA`; label smoothing and no
  weight decay on biases/norms from :class:`~lightning_tricks.mixins.Classifier`;
- **evaluation that does not stall the loop**: no metric, no logging and no host sync in the training
  step; after each epoch one pass over the test set in large batches, accuracy accumulated on the
  device, one host read per epoch (the stop decision), optional flip test-time augmentation;
- **stop at the target**: a callback reads the epoch's test accuracy, stops the Trainer once it is
  ``>= target`` and records the seconds and epochs since the first training step. Seconds are counted
  with the clock paused during evaluation (``train s``, airbench's convention) and with it running
  (``wall s``); the device is synchronized at every clock read.

The network is ResNet-9 of Page (2018, "How to train your ResNet", myrtle.ai): prep conv, three
stages (conv-BN-ReLU + max-pool, the first and last with a residual pair of convs), global max-pool,
a linear head scaled by 1/8. A warm-up run (a few steps + one evaluation: cuDNN autotuning, compile)
precedes the timed runs; the table is the mean ± std over ``runs`` seeds.

    python benchmarks/speedrun.py                                          # CPU setting (Fashion-MNIST subset)
    python benchmarks/speedrun.py --full --device cuda --data-dir DIR      # GPU: CIFAR-10, target 94%
    python benchmarks/speedrun.py --full --device cuda --compile --runs 10

``--data-dir`` for CIFAR-10 is a folder holding ``cifar-10-batches-py/`` (or that folder itself), the
original python batches; ``python ../shared/data/cifar10_dev_batches.py DIR`` writes the development
split in that layout (40k train / 10k held-out "test_batch"). Fashion-MNIST: the four idx ``.gz`` files.
Writes ``benchmarks/results/speedrun_<dataset>_<device>.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SETTINGS: dict[str, Any] = {
    "name": "cpu",
    "device": "cpu",
    "threads": 1,
    "dataset": "fashion_mnist",  # fashion_mnist | cifar10
    "data_dir": None,  # None: ../shared/data/<dataset>
    "limit_train": 5000,  # a fixed random subset of N images (None: all)
    "limit_test": 2000,
    "target": 0.80,  # stop at this test accuracy
    "widths": (8, 16, 32, 64),  # ResNet-9: prep, stage 1, stage 2, stage 3
    "batch_size": 128,
    "eval_batch_size": 1000,
    "epochs": 4,  # the LR schedule's length; the run stops there if the target is missed
    "warmup": 0.2,  # fraction of the run with the LR rising linearly from 0
    "lr": 0.4,  # peak LR at batch 512 (LinearScaling scales it to the batch)
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "label_smoothing": 0.2,
    "padding": 2,  # random translation by up to this many pixels
    "flip": True,
    "tta": False,  # evaluate on x and its mirror image (logits summed)
    "ema": None,  # EMA decay, or None for no EMA
    "precision": "32-true",
    "channels_last": False,
    "compile": False,
    "runs": 3,
    "warmup_steps": 5,  # steps of the untimed warm-up run
    "seed": 0,
}

FULL: dict[str, Any] = {
    **SETTINGS,
    "name": "full",
    "device": "cuda",
    "threads": None,
    "dataset": "cifar10",
    "limit_train": None,
    "limit_test": None,
    "target": 0.94,
    "widths": (64, 128, 256, 512),  # ResNet-9 as published: 6.6M parameters
    "batch_size": 512,
    "eval_batch_size": 2000,
    "epochs": 24,  # Page (2018): 24 epochs, warmup over the first 5
    "tta": True,
    "precision": "bf16-mixed",
    "channels_last": True,
    "runs": 5,
    "warmup_steps": 30,
}

DEFAULT_TARGETS = {"cifar10": 0.94, "fashion_mnist": 0.93}


# -- the network -----------------------------------------------------------------------------------
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
def default_data_dir(dataset: str) -> Path:
    return C.SHARED_DATA / dataset


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


def make_recorder(target: float, device: torch.device):
    """Clock from the first training step; paused during evaluation; stops the Trainer at ``target``."""
    from lightning_tricks._lightning import Callback

    class TimeToAccuracy(Callback):
        def __init__(self) -> None:
            self.first: float | None = None
            self.train_s = 0.0
            self._resume = 0.0
            self.history: list[dict] = []
            self.reached: dict | None = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.first is None:
                C.sync(device)
                self.first = self._resume = time.perf_counter()

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or self.first is None:
                return
            C.sync(device)
            self.train_s += time.perf_counter() - self._resume

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking or self.first is None:
                return
            acc = float(trainer.callback_metrics["val/acc"])  # the one host sync of the epoch
            now = time.perf_counter()
            record = {
                "epoch": trainer.current_epoch + 1,
                "train_s": self.train_s,
                "wall_s": now - self.first,
                "acc": acc,
            }
            self.history.append(record)
            if acc >= target and self.reached is None:
                self.reached = record
                trainer.should_stop = True
            self._resume = time.perf_counter()

    return TimeToAccuracy()


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
    recorder = make_recorder(s["target"], device)
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
    last = (
        recorder.history[-1]
        if recorder.history
        else {"epoch": 0, "train_s": math.nan, "wall_s": math.nan, "acc": math.nan}
    )
    hit = recorder.reached
    return {
        "seed": seed,
        "reached": hit is not None,
        "epochs": (hit or last)["epoch"],
        "train_s": (hit or last)["train_s"],
        "wall_s": (hit or last)["wall_s"],
        "acc": (hit or last)["acc"],
        "final_acc": last["acc"],
        "history": " ".join(f"{h['epoch']}:{h['acc']:.4f}" for h in recorder.history),
    }


# -- table -----------------------------------------------------------------------------------------
def summarize(rows: list[dict], s: dict, device: torch.device, n_train: int, n_test: int, params: int) -> str:
    hits = [r for r in rows if r["reached"]]
    header = [
        "dataset",
        "target",
        "runs reaching it",
        "train s to target (mean ± std)",
        "wall s (with eval)",
        "epochs",
        "test acc at stop",
    ]
    body = [
        [
            s["dataset"],
            f"{100 * s['target']:.1f}%",
            f"{len(hits)}/{len(rows)}",
            C.pm([r["train_s"] for r in hits], 2) if hits else "not reached",
            C.pm([r["wall_s"] for r in hits], 2) if hits else "",
            C.pm([r["epochs"] for r in hits], 1) if hits else "",
            C.pm([100 * r["acc"] for r in rows], 2) + "%",
        ]
    ]
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


def main(argv: list[str] | None = None) -> tuple[list[dict], str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the GPU setting (FULL): CIFAR-10 to 94%%")
    parser.add_argument("--device", help="cpu | cuda | auto")
    parser.add_argument("--dataset", choices=["cifar10", "fashion_mnist"])
    parser.add_argument("--data-dir", help="CIFAR-10: folder with cifar-10-batches-py/; Fashion-MNIST: the idx files")
    parser.add_argument("--target", type=float, help="test accuracy to reach, in (0, 1]")
    parser.add_argument("--epochs", type=int, help="LR schedule length = the most epochs a run takes")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak LR at batch 512")
    parser.add_argument("--widths", help="ResNet-9 widths, 4 ints, e.g. 64,128,256,512")
    parser.add_argument("--limit-train", type=int)
    parser.add_argument("--limit-test", type=int)
    parser.add_argument("--ema", type=float, help="EMA decay (off by default)")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the network")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--precision")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--name", help="results file suffix")
    parser.add_argument("--out-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    s = C.pick_settings(
        SETTINGS,
        FULL,
        args.full,
        {
            "device": args.device,
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "target": args.target,
            "epochs": args.epochs,
            "runs": args.runs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "widths": tuple(int(w) for w in args.widths.split(",")) if args.widths else None,
            "limit_train": args.limit_train,
            "limit_test": args.limit_test,
            "ema": args.ema,
            "compile": args.compile,
            "tta": args.tta,
            "precision": args.precision,
            "threads": args.threads,
            "name": args.name,
        },
    )
    if args.dataset and args.target is None and args.dataset != (FULL if args.full else SETTINGS)["dataset"]:
        s["target"] = DEFAULT_TARGETS[args.dataset]
    if not 0.0 < s["target"] <= 1.0:
        parser.error(f"--target must be in (0, 1], got {s['target']}")
    device = C.resolve_device(s["device"])
    C.setup_torch(device, s["threads"])
    with C.quiet():
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
            print(
                f"run {i}: {'reached' if r['reached'] else 'missed'} {100 * r['acc']:.2f}% after {r['epochs']} "
                f"epoch(s), {r['train_s']:.2f} s training ({r['wall_s']:.2f} s with evaluation)",
                file=sys.stderr,
                flush=True,
            )
        md = summarize(rows, s, device, len(train[1]), len(test[1]), params)
        print(md)
        md_path, _ = C.write_results(f"speedrun_{s['dataset']}_{s['name']}", rows, md, args.out_dir)
        print(f"wrote {md_path} and .csv", file=sys.stderr)
        return rows, md


if __name__ == "__main__":
    main()
