"""Checkpoints on a cluster: ``last.ckpt`` is the latest state, and a kill or a full disk during a write leaves
the previous checkpoint loadable. The faults are real: a SIGKILL to a writing process, a tiny tmpfs, a
read-only mount, a file-size limit."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks import ModelCheckpoint
from lightning_tricks.checkpoint_io import CheckpointWriteError, atomic_torch_save, partial_path


class FadingModule(pl.LightningModule):
    """A user's own module whose validation score is best at epoch 0 and worse every epoch after."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.net = nn.Linear(width, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 1.0 - 0.1 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(width: int = 4, n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, width, generator=g), torch.randint(0, 2, (n,), generator=g)), 8)


def fit(tmp_path: Path, epochs: int, **trainer_kwargs) -> tuple[pl.Trainer, ModelCheckpoint]:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=1, save_last=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(FadingModule(), loader(), loader())
    return trainer, checkpoint


@pytest.mark.parametrize("val_every", [1, 2])
def test_last_ckpt_is_the_last_epoch_when_the_best_is_older(tmp_path: Path, val_every: int) -> None:
    trainer, checkpoint = fit(tmp_path, epochs=5, check_val_every_n_epoch=val_every)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (4, trainer.global_step) == (4, 10)
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    first_validated = val_every - 1
    assert best["epoch"] == first_validated
    assert checkpoint.best_model_score == pytest.approx(1.0 - 0.1 * first_validated)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", Path(checkpoint.best_model_path).name])


def test_resuming_from_last_ckpt_continues_after_the_last_epoch(tmp_path: Path) -> None:
    fit(tmp_path, epochs=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_top_k=1, save_last=True)
    trainer = pl.Trainer(max_epochs=4, callbacks=[checkpoint], logger=False, enable_progress_bar=False)
    trainer.fit(FadingModule(), loader(), loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 8  # one more epoch of 2 steps, not a redo of epochs 1 and 2
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 3


def test_the_trainer_writes_no_file_outside_the_checkpoint_directory(tmp_path: Path, monkeypatch) -> None:
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # the stdlib caches TMPDIR on first use
    fit(tmp_path / "ckpt", epochs=2)
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import pytorch_lightning as pl
    from lightning_tricks.callbacks import ModelCheckpoint

    class Big(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2000, 2000)  # 16 MB of weights, 32 MB with SGD momentum
        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-6, momentum=0.9)

    data = DataLoader(TensorDataset(torch.randn(4000, 2000)), batch_size=2)
    checkpoint = ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=1, save_top_k=1, save_last=True)
    trainer = pl.Trainer(max_steps=100000, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Big(), data)
    """
)


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_last_ckpt(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    # The cluster layout where it matters: checkpoints on another file system than $TMPDIR (a tmpfs where
    # this machine lets us mount one), so a move from $TMPDIR would be a copy into the final path.
    ckpt_dir = tmp_path / "shared"
    other_fs = mounted_tmpfs(ckpt_dir, "400m")
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    steps_seen = []
    try:
        for _ in range(6):
            proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir)], env=env, start_new_session=True)
            try:
                deadline = time.monotonic() + 120
                while not (ckpt_dir / "last.ckpt").exists():
                    assert proc.poll() is None, "the writer exited before its first checkpoint"
                    assert time.monotonic() < deadline, "no checkpoint within 120 s"
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.3, 1.5))  # writes of 32 MB back to back: the kill lands in one
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            last = torch.load(ckpt_dir / "last.ckpt", weights_only=True, map_location="cpu")
            assert last["state_dict"]["net.weight"].shape == (2000, 2000)
            steps_seen.append(last["global_step"])
            assert list(scratch.iterdir()) == []  # nothing staged in $TMPDIR
    finally:
        if other_fs:
            subprocess.run(["umount", "-l", str(ckpt_dir)], check=False)
    assert max(steps_seen) >= 2


def test_a_killed_writer_leaves_only_a_hidden_partial_file_that_the_next_run_removes(tmp_path: Path) -> None:
    partial_path(tmp_path / "last.ckpt").write_bytes(b"half a checkpoint")  # what SIGKILL mid-write leaves
    fit(tmp_path, epochs=1)
    assert not partial_path(tmp_path / "last.ckpt").exists()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 0


def mounted_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path):
    disk = tmp_path / "disk"
    if not mounted_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the file-size-limit test covers the same path")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_fails_in_one_line_and_keeps_the_previous_checkpoint(tiny_disk: Path) -> None:
    # 600 kB checkpoints on a 1 MB disk: the first fits, the second does not fit beside it
    class Wide(FadingModule):
        def __init__(self) -> None:
            super().__init__(width=75_000)

    checkpoint = ModelCheckpoint(dirpath=tiny_disk, save_top_k=0, save_last=True)
    trainer = pl.Trainer(max_epochs=2, callbacks=[checkpoint], logger=False, enable_progress_bar=False)
    with pytest.raises(CheckpointWriteError) as caught:
        trainer.fit(Wide(), loader(width=75_000), loader(width=75_000))
    message = str(caught.value)
    assert "\n" not in message and str(tiny_disk / "last.ckpt") in message and "No space left" in message
    assert torch.load(tiny_disk / "last.ckpt", weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["last.ckpt"]


def test_read_only_disk_fails_in_one_line(tiny_disk: Path) -> None:
    atomic_torch_save({"step": 1}, tiny_disk / "last.ckpt")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt: Read-only file system"):
        atomic_torch_save({"step": 2}, tiny_disk / "last.ckpt")
    assert torch.load(tiny_disk / "last.ckpt", weights_only=True) == {"step": 1}


def limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_file_size_limit_fails_in_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import torch
        from lightning_tricks.checkpoint_io import atomic_torch_save, CheckpointWriteError
        path = {str(tmp_path / "last.ckpt")!r}
        atomic_torch_save({{"w": torch.zeros(10)}}, path)
        try:
            atomic_torch_save({{"w": torch.zeros(100_000)}}, path)
        except CheckpointWriteError as e:
            print(e)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=limit_file_size, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"could not write checkpoint {tmp_path / 'last.ckpt'}: File too large")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["w"].shape == (10,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
