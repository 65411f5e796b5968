"""Cluster faults on ``python -m lightning_tricks.train``: SIGTERM (pre-emption), failing sweep jobs, divergence.

Each fault is a real one where CI can make it: a SIGTERM sent by this test to a real training subprocess,
jobs of a real ``--multirun`` that raise or are refused, a real non-finite loss.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from lightning_tricks._lightning import Callback, Trainer, pl
from lightning_tricks.callbacks.divergence_guard import DivergenceGuard
from lightning_tricks.sanity import Diverged
from lightning_tricks.train import ConfigError, train

TESTS = Path(__file__).resolve().parent


class WaitForSigterm(Callback):
    """At the end of optimizer step ``step``: write ``ready`` and wait (at most a minute) for a SIGTERM."""

    def __init__(self, step: int, ready: str) -> None:
        self.step, self.ready = step, Path(ready)

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        self.ready.write_text(str(batch_idx))
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


class FinalWeights(Callback):
    """Save the module's ``state_dict`` at the end of fit (what the two runs are compared on)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        torch.save(pl_module.state_dict(), self.path)


class RaiseAtStep(Callback):
    """Raise ``RuntimeError`` at optimizer step ``step`` (a job that crashes mid-training)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}\nsecond line of the message")


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }


def _train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "lightning_tricks.train", "logger=none", *overrides]


def _metrics(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())["metrics"]


def _sigterm_when_ready(cmd: list[str], ready: Path, cwd: Path) -> tuple[int, str]:
    """Start ``cmd``, SIGTERM it once it wrote ``ready`` (see :class:`WaitForSigterm`); its exit code and stderr."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


# -- SIGTERM: save at the signal, status preempted, non-zero exit, exact resume -------------------------------
RUN = ("trainer.max_epochs=3", "trainer.enable_progress_bar=false", "test=false")
STOP_STEP = 27  # epoch 1 (20 batches per epoch on digits), mid-epoch


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    env = _env()
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = subprocess.run(
        _train_cmd(*RUN, f"hydra.run.dir={full}", f"+callbacks.final._target_={__name__}.FinalWeights",
                   f"+callbacks.final.path={full}/final.pt"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    ready = tmp_path / "ready"
    code, err = _sigterm_when_ready(
        _train_cmd(*RUN, f"hydra.run.dir={cut}", f"+callbacks.wait._target_={__name__}.WaitForSigterm",
                   f"+callbacks.wait.step={STOP_STEP}", f"+callbacks.wait.ready={ready}"),
        ready, tmp_path,
    )  # fmt: skip
    assert code == 143, err[-3000:]
    last = cut / "checkpoints" / "last.ckpt"
    assert f"pre-empted by SIGTERM at step {STOP_STEP}; resume with ckpt_path={last}" in err
    metrics = _metrics(cut)
    assert metrics["status"] == "preempted" and metrics["preempted/step"] == STOP_STEP
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == STOP_STEP and state["epoch"] == 1  # inside epoch 1: a mid-epoch checkpoint

    resumed = subprocess.run(
        _train_cmd(*RUN, f"hydra.run.dir={cut}", f"ckpt_path={last}",
                   f"+callbacks.final._target_={__name__}.FinalWeights", f"+callbacks.final.path={cut}/final.pt"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = torch.load(full / "final.pt"), torch.load(cut / "final.pt")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert _metrics(cut)["status"] == "ok"
    assert _metrics(cut)["val/loss"] == _metrics(full)["val/loss"]


# -- sweeps: every job runs, summary.csv lists each with its status, the exit code says a job failed ----------
def test_sweep_runs_every_job_whatever_the_others_did(tmp_path):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        _train_cmd("trainer=debug", "test=false", f"+callbacks.probe._target_={__name__}.RaiseAtStep",
                   "+callbacks.probe.step=2,1000", "data.batch_size=64,5000", f"hydra.sweep.dir={sweep}", "--multirun"),
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    status = {(row["callbacks.probe.step"], row["data.batch_size"]): row["status"] for row in rows}
    refused = "refused: data: DigitsDataModule: the training split has 1294 sample(s), fewer than batch_size=5000"
    assert status == {
        ("1000", "64"): "ok",
        ("2", "64"): "failed: RuntimeError: injected failure at step 2",
        ("2", "5000"): refused + status[("2", "5000")][len(refused) :],
        ("1000", "5000"): refused + status[("1000", "5000")][len(refused) :],
    }
    assert rows[0]["status"] == "ok" and float(rows[0]["best/val/acc"]) > 0.1
    assert all("\n" not in row["status"] for row in rows)


# -- divergence: non-zero exit; a non-finite validation loss is a divergence, never a best checkpoint --------
def test_a_diverged_run_exits_non_zero(tmp_path):
    r = subprocess.run(
        _train_cmd("trainer=debug", "optimizer.lr=1e30", f"hydra.run.dir={tmp_path / 'run'}"),
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]
    assert _metrics(tmp_path / "run")["status"] == "diverged"


class _NanValidation(pl.LightningModule):
    """Finite training losses; the validation loss is nan from epoch ``bad_epoch`` on."""

    def __init__(self, bad_epoch: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_epoch = bad_epoch

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if self.current_epoch >= self.bad_epoch:
            loss = loss * float("nan")
        self.log("val/loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader():
    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    return torch.utils.data.DataLoader(data, batch_size=8)


@pytest.mark.parametrize("bad_epoch", [0, 2])
def test_a_nan_validation_loss_stops_before_checkpoint_and_early_stopping(tmp_path, bad_epoch):
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, monitor="val/loss", mode="min", filename="e{epoch}", auto_insert_metric_name=False
    )
    stopping = pl.callbacks.EarlyStopping(monitor="val/loss", mode="min", patience=10)
    trainer = pl.Trainer(
        max_epochs=5,
        callbacks=[stopping, DivergenceGuard(), checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with pytest.raises(Diverged, match=rf"validation loss val/loss is nan .* \(epoch {bad_epoch}\)"):
        trainer.fit(_NanValidation(bad_epoch), _loader(), _loader())
    saved = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert saved == [f"e{e}.ckpt" for e in range(bad_epoch)][-1:]  # the best finite one, never a nan one
    if saved:
        assert math.isfinite(float(checkpoint.best_model_score))


# -- a checkpoint that cannot be written: one line naming the path and the cause, exit 1 ----------------------
def _limit_file_size() -> None:
    """In the child: files larger than 64 kB cannot be written (EFBIG, even for root; SIGXFSZ ignored)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_checkpoint_write_failure_ends_the_run_in_one_line(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(
        _train_cmd("trainer=debug", f"hydra.run.dir={run}"),
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    last_line = r.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"lightning-tricks: could not write checkpoint {run / 'checkpoints'}/"), last_line
    assert "File too large" in last_line and "Traceback" not in r.stderr
    assert not list((run / "checkpoints").glob(".*partial"))


# -- resume: a checkpoint of another model, a changed config ------------------------------------------------
class SaveAtStep(Callback):
    """``trainer.save_checkpoint(path)`` at the end of optimizer step ``step`` (a mid-epoch checkpoint)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_of_another_model_is_named_before_training(make_cfg, tmp_path):
    train(make_cfg("logger=none", "test=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as info:
        train(make_cfg("logger=none", "model.hidden=[128,128]", f"ckpt_path={last}", "trainer.max_epochs=3"))
    message = str(info.value)
    assert re.fullmatch(
        rf"ckpt_path={re.escape(str(last))} is of another model: net\.\S+\.weight is \(256, 64\) in the "
        r"checkpoint, \(128, 64\) in this model",
        message,
    ), message


def _saved_like_hydra(cfg, run_dir: Path) -> None:
    """The run directory's ``.hydra/config.yaml``, as Hydra writes it (what a checkpoint without a recorded
    config is compared with)."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")


def test_resume_with_a_changed_config_says_what_is_kept_and_what_is_taken(make_cfg, tmp_path, caplog):
    train(make_cfg("logger=none", "test=false", "+callbacks=ema"))  # the checkpoint records the run's config
    last = tmp_path / "checkpoints" / "last.ckpt"
    resumed = make_cfg(
        "logger=none", "test=false", "optimizer.lr=0.5", "seed=1", "trainer.max_epochs=3", "+callbacks=swa",
        "~callbacks.random_state", f"ckpt_path={last}",
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        _, objects = train(resumed)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume: ")]
    assert notes == [
        "resume: callbacks.ema removed: the checkpoint's EMA state (its average) is discarded",
        "resume: callbacks.random_state removed: the checkpoint's RNG states are not restored, so the resumed run "
        "draws other random numbers than the uninterrupted one would",
        "resume: callbacks.swa added: SWA starts at the resumed step with no state of its own (as if the run had "
        "started there)",
        "resume: optimizer.lr=0.5 (checkpoint: 0.05): kept from the checkpoint (0.05): the optimizer state is "
        "resumed with its own values; start a new run to train with 0.5",
        "resume: seed=1 (checkpoint: 0): the weights, optimizer state and (with callbacks.random_state) the RNG "
        "states come from the checkpoint; seed 1 only seeds what the checkpoint does not hold",
        "resume: trainer.max_epochs=3 (checkpoint: 2): taken from the new config: the run now ends at max_epochs=3",
    ]
    # "kept" is what happens: the resumed optimizer's base learning rate is the checkpoint's
    assert objects["trainer"].optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.05)


def test_resume_refuses_a_batch_size_change_inside_an_epoch(make_cfg, tmp_path):
    mid = tmp_path / "mid.ckpt"
    first = make_cfg("logger=none", "test=false", f"+callbacks.save._target_={__name__}.SaveAtStep",
                     "+callbacks.save.step=4", f"+callbacks.save.path={mid}")  # fmt: skip
    _saved_like_hydra(first, tmp_path)
    train(first)
    state = torch.load(mid, weights_only=True)
    del state["callbacks"]["RunConfigRecord"]  # a checkpoint without its config: compared with .hydra/config.yaml
    torch.save(state, mid)
    with pytest.raises(ConfigError, match=r"data.batch_size=32 \(checkpoint: 64\): the checkpoint stopped mid-epoch"):
        train(make_cfg("logger=none", "test=false", "data.batch_size=32", f"ckpt_path={mid}", "trainer.max_epochs=3",
                       f"+callbacks.save._target_={__name__}.SaveAtStep", "+callbacks.save.step=4",
                       f"+callbacks.save.path={mid}"))  # fmt: skip
    # at an epoch end the same change is taken, and said
    last = tmp_path / "checkpoints" / "last.ckpt"
    _, objects = train(make_cfg("logger=none", "test=false", "data.batch_size=32", f"ckpt_path={last}",
                                "trainer.max_epochs=3", f"+callbacks.save._target_={__name__}.SaveAtStep",
                                "+callbacks.save.step=4", f"+callbacks.save.path={mid}"))  # fmt: skip
    assert objects["datamodule"].batch_size == 32


def test_a_sigterm_during_a_sweep_saves_the_job_and_starts_no_other(tmp_path):
    sweep, ready = tmp_path / "sweep", tmp_path / "ready"
    code, err = _sigterm_when_ready(
        _train_cmd("trainer=debug", "test=false", f"+callbacks.wait._target_={__name__}.WaitForSigterm",
                   "+callbacks.wait.step=2", f"+callbacks.wait.ready={ready}", "optimizer.lr=0.01,0.02,0.03",
                   f"hydra.sweep.dir={sweep}", "--multirun"),
        ready, tmp_path,
    )  # fmt: skip
    assert code == 143, err[-3000:]
    rows = {row["optimizer.lr"]: row for row in csv.DictReader(open(sweep / "summary.csv"))}
    assert {lr: row["status"] for lr, row in rows.items()} == {
        "0.01": "preempted",
        "0.02": "preempted",
        "0.03": "preempted",
    }
    assert rows["0.01"]["preempted/step"] == "2" and rows["0.02"]["preempted/step"] == "0"
    assert torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (sweep / "1" / "checkpoints").exists()  # the next jobs were not started
