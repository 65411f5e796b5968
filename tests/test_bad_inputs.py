"""Bad inputs end in one clear line naming the value, before any training (issue 14's table)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_tricks.data import TensorDataModule
from lightning_tricks.train import ConfigError, train

# overrides -> a fragment of the one-line message (checked before training starts)
CASES = [
    (["trainer.max_epochs=abc"], "trainer.max_epochs must be an int, got 'abc'"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be >= 1, got 0"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be >= 1 (or -1 for a run bounded by trainer.max_steps), got 0"),
    (["test_weights=bestt"], "test_weights must be one of ('final', 'best'), got 'bestt'"),
    (["test_weights=best", "~callbacks.model_checkpoint"], "test_weights=best needs a ModelCheckpoint monitoring"),
    (["data.batch_size=5000"], "the training split has 1294 sample(s), fewer than batch_size=5000"),
    (["data.val_fraction=0.999"], "the training split has 1 sample(s), fewer than batch_size=64"),
    (
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=true"],
        "trainer.sync_batchnorm=true needs GPUs",
    ),
    (
        ["trainer=ddp", "trainer.sync_batchnorm=maybe"],
        "trainer.sync_batchnorm must be true, false or auto, got 'maybe'",
    ),
    (["ckpt_path=/no/such/last.ckpt"], "ckpt_path=/no/such/last.ckpt: no such file"),
]


@pytest.mark.parametrize(("overrides", "fragment"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_value_is_named_before_training(make_cfg, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        train(make_cfg(*overrides))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_checkpoints(make_cfg, tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    for path, fragment in (
        (empty, "is not a readable Lightning checkpoint"),
        (other, "is not a Lightning training checkpoint"),
    ):
        with pytest.raises(ConfigError, match=fragment):
            train(make_cfg(f"ckpt_path={path}"))


def test_finished_run_and_other_optimizer(make_cfg, tmp_path):
    train(make_cfg("logger=none", "test=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"is from a finished run \(2 epoch\(s\), 6 steps.*raise trainer.max_epochs"):
        train(make_cfg("logger=none", f"ckpt_path={last}"))
    with pytest.raises(ConfigError, match="was trained with optimizer 'sgd', this run uses 'adam'"):
        train(make_cfg("logger=none", "optimizer=adam", f"ckpt_path={last}", "trainer.max_epochs=3"))


class _BadLabels(TensorDataModule):
    num_classes = 10
    input_shape = (4,)

    def load(self):
        y = torch.arange(100) % 13  # labels up to 12 with 10 classes
        return {"train": (torch.zeros(100, 4), y), "test": (torch.zeros(10, 4), y[:10])}


def test_labels_out_of_range_are_named_at_setup():
    with pytest.raises(ValueError, match=r"_BadLabels: the train split has label 12, outside 0..9 \(num_classes=10\)"):
        _BadLabels(batch_size=8, val_fraction=0.0).setup("fit")


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "lightning_tricks.train", "trainer=debug", "trainer.max_epochs=abc"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "lightning-tricks:" in line]
    assert errors == ["lightning-tricks: configuration error: trainer.max_epochs must be an int, got 'abc'"]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_group_null_removes_the_group(tmp_path):
    """``schedule=null`` (the habit the docs once taught) runs with no LRSchedule instead of a Hydra error."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_tricks.train",
            "trainer=debug",
            "logger=none",
            "test=false",
            "schedule=null",
            "--cfg",
            "job",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\nschedule:" not in r.stdout and "LRSchedule" not in r.stdout


# -- refusals that Lightning or a callback would make only once the fit runs: one line, before any step ------
RUNTIME_CASES = [
    (["schedule.schedule.steps=1000"], "warmup steps=1000 (1000 steps) must be shorter than the run (total_steps=6)"),
    (["+callbacks=cutout", "callbacks.cutout.size=40"], "cutout size 40 is larger than the image (8x8)"),
    (
        ["+callbacks=snapshot_ensemble", "callbacks.snapshot_ensemble.cycles=5"],
        "SnapshotEnsemble cycles=5 is larger than the number of epochs (max_epochs=2)",
    ),
    (
        ["+callbacks=freeze_unfreeze", "callbacks.freeze_unfreeze.backbone=nope"],
        "the module has no submodule 'nope'",
    ),
    (
        ["+callbacks.stop._target_=lightning_tricks._lightning.PLEarlyStopping", "+callbacks.stop.monitor=val/nope"],
        "EarlyStopping(monitor='val/nope') was never logged",
    ),
    (
        ["+callbacks=early_stopping_pq", "callbacks.early_stopping_pq.criterion.train_monitor=train/nope"],
        "EarlyStopping: the criterion's train_monitor='train/nope' is never logged",
    ),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches=0 runs no training step"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 makes a run without an end unless trainer.max_steps is set"),
    (
        ["data.val_fraction=0"],
        "the validation split is empty (data.val_fraction=0), but monitor='val/acc' is a validation metric",
    ),
]


@pytest.mark.parametrize(("overrides", "fragment"), RUNTIME_CASES, ids=[" ".join(o) for o, _ in RUNTIME_CASES])
def test_runtime_refusals_are_one_line_before_training(make_cfg, tmp_path, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        train(make_cfg("logger=none", *overrides))
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.rglob("*.ckpt"))  # no step ran, so nothing was saved


# -- bad data files: one line naming the file and what is wrong, before training ----------------------------
def _write_idx(path, array):
    """An idx file of ``array``'s dtype (uint8, or big-endian float32 as the format allows)."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}[array.dtype]
    data = array.astype(">f4") if code == 0x0D else array
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + data.tobytes())


def _fashion(tmp_path, n_train=300, n_test=60, train_x=None, test_x=None, test_y=None, train_y=None):
    rng = np.random.default_rng(0)
    d = tmp_path / "fashion"
    d.mkdir()
    parts = {
        "train": (train_x, train_y, n_train),
        "t10k": (test_x, test_y, n_test),
    }
    for split, (x, y, n) in parts.items():
        x = rng.integers(0, 255, (n, 28, 28)).astype(np.uint8) if x is None else x
        y = rng.integers(0, 10, len(x)).astype(np.uint8) if y is None else y
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d


def _nan_images(n, at):
    x = np.random.default_rng(1).uniform(0, 255, (n, 28, 28)).astype(np.float32)
    x[at, 3, 4] = np.nan
    return x


DATA_CASES = [
    (
        {"train_x": _nan_images(300, 7)},
        "train-images-idx3-ubyte.gz: 1 image(s) with NaN or Inf pixels, the first is image 7",
    ),
    (
        {"test_x": _nan_images(60, 2)},
        "t10k-images-idx3-ubyte.gz: 1 image(s) with NaN or Inf pixels, the first is image 2",
    ),
    ({"n_test": 0}, "t10k-images-idx3-ubyte.gz holds no images: the split is empty"),
    (
        {"test_x": np.zeros((60, 27, 27), np.uint8)},
        "t10k-images-idx3-ubyte.gz: images are 27x27, but the training images",
    ),
    (
        {"train_y": np.array([3.5] + [1.0] * 299, np.float32)},
        "train-labels-idx1-ubyte.gz: label 3.5 at index 0 is not a class index",
    ),
]


@pytest.mark.parametrize(("files", "fragment"), DATA_CASES, ids=["nan-train", "nan-test", "empty-test", "27x27", "3.5"])
def test_bad_data_files_are_named_before_training(make_cfg, tmp_path, files, fragment):
    d = _fashion(tmp_path, **files)
    with pytest.raises(ConfigError) as info:
        train(make_cfg("logger=none", "data=fashion_mnist", f"data.data_dir={d}", "model=mlp"))
    assert fragment in str(info.value) and str(d) in str(info.value)
    assert "\n" not in str(info.value)


class _Inputs(TensorDataModule):
    num_classes = 3
    input_shape = (4,)

    def __init__(self, splits, **kwargs):
        super().__init__(**kwargs)
        self._splits = splits

    def load(self):
        return dict(self._splits)


def _xy(n, shape=(4,)):
    return torch.randn(n, *shape), torch.arange(n) % 3


@pytest.mark.parametrize(
    ("splits", "fragment"),
    [
        (
            {"train": (torch.full((16, 4), float("inf")), torch.zeros(16, dtype=torch.long)), "test": _xy(4)},
            "the train split has 16 sample(s) with NaN or Inf inputs, the first is sample 0",
        ),
        ({"train": _xy(16), "test": (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))}, "the test split is empty"),
        ({"train": _xy(16), "test": _xy(4, (5,))}, "the test split's inputs are (5,), the training split's (4,)"),
        (
            {"train": (torch.randn(16, 4), torch.full((16,), 1.5)), "test": _xy(4)},
            "the train split has label 1.5 at index 0, not a class index",
        ),
    ],
    ids=["inf", "empty-test", "shape", "float-label"],
)
def test_tensor_data_checks(splits, fragment):
    with pytest.raises(ValueError) as info:
        _Inputs(splits, batch_size=4, val_fraction=0.0).setup("fit")
    assert fragment in str(info.value)
