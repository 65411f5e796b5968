"""Bad inputs end in one clear line naming the value, before any training (issue 14's table)."""

from __future__ import annotations

import os
import subprocess
import sys

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
