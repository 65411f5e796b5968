"""Checks that protect the user, driven through the entry point the user calls.

- a loss that is not finite from the very first optimizer step (step 0) stops the run there, before its
  update, both in a plain Trainer with the default ``DivergenceGuard`` and in ``train()``;
- a crafted checkpoint given as ``ckpt_path=`` to ``train()`` is refused before anything in it runs and
  before any training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_tricks._lightning import LightningModule, Trainer, seed_everything
from lightning_tricks.callbacks import DivergenceGuard
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.sanity import Diverged
from lightning_tricks.train import ConfigError, train

# -- a loss that is NaN from step 0 ------------------------------------------------------------------------


class NanLossAtFirstStep(LightningModule):
    """A plain module whose training loss is NaN at optimizer step 0 and finite after.

    The NaN is added as a constant, so its gradient is the finite gradient of the real loss: the weights
    stay finite whatever happens, and only a check of the loss itself can see step 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.global_step == 0:
            loss = loss + torch.tensor(math.nan)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, guard: DivergenceGuard | None, max_steps: int = 6) -> Trainer:
    return Trainer(
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[guard] if guard is not None else [],
        default_root_dir=tmp_path,
    )


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_default_guard_stops_a_nan_loss_at_step_zero_before_its_update(tmp_path):
    seed_everything(0)
    module = NanLossAtFirstStep()
    before = _weights(module)
    trainer = _trainer(tmp_path, DivergenceGuard())
    with pytest.raises(Diverged, match=r"^diverged: the loss is nan at optimizer step 0 \(epoch 0\), lr 0\.1; no upd"):
        trainer.fit(module, DigitsDataModule(batch_size=32, loader="resident"))
    assert len(module.losses) == 1 and math.isnan(module.losses[0])  # it never went past the first batch
    assert trainer.global_step == 0
    after = _weights(module)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the NaN step's update never ran


def test_without_the_guard_the_nan_step_zero_goes_unnoticed(tmp_path):
    """The control: the same module trains to the end without a guard (the NaN leaves no trace in the
    weights), so only the guard's check of step 0 can stop it."""
    seed_everything(0)
    module = NanLossAtFirstStep()
    trainer = _trainer(tmp_path, None)
    trainer.fit(module, DigitsDataModule(batch_size=32, loader="resident"))
    assert trainer.global_step == 6 and math.isnan(module.losses[0])
    assert all(math.isfinite(v) for v in module.losses[1:])
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_deferred_guard_reads_step_zero_too(tmp_path):
    """The accelerator path (losses summed on the device, read every n steps), forced on the CPU: its
    first window starts at step 0 and is read there."""
    seed_everything(0)
    guard = DivergenceGuard(every_n_steps=4)
    guard._read_cpu = False
    module = NanLossAtFirstStep()
    with pytest.raises(Diverged, match=r"^diverged: the loss is nan at optimizer step 0 \(epoch 0\)") as info:
        _trainer(tmp_path, guard).fit(module, DigitsDataModule(batch_size=32, loader="resident"))
    assert info.value.step == 0


class NanTrainingNet(nn.Module):
    """A linear classifier (``model._target_`` of a config) whose logits are NaN whenever it trains: every
    training loss is NaN, from the first step on, while validation stays finite."""

    def __init__(self, input_shape, num_classes, **_ignored) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return logits + math.nan if self.training else logits


def _nan_model_cfg(make_cfg, *overrides):
    return make_cfg(f"model._target_={__name__}.NanTrainingNet", "trainer.max_epochs=2", *overrides)


def test_train_with_nan_from_step_zero_is_diverged_at_step_zero(make_cfg, tmp_path):
    with pytest.warns(UserWarning, match=r"diverged: the loss is nan at optimizer step 0 \(epoch 0\)"):
        metrics, objects = train(_nan_model_cfg(make_cfg))
    assert metrics["status"] == "diverged"
    assert metrics["diverged/step"] == 0 and metrics["diverged/epoch"] == 0
    assert metrics["best/val/acc"] == -math.inf
    assert objects["trainer"].global_step == 0
    assert not any(k.startswith("test/") for k in metrics)  # a diverged run is not tested
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["metrics"]["status"] == "diverged" and record["metrics"]["diverged/step"] == 0
    module = objects["module"]
    assert all(torch.isfinite(p).all() for p in module.parameters())  # stopped before the NaN update
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))  # nothing saved from the diverged run


def test_train_without_the_guard_runs_the_nan_model_to_the_end(make_cfg):
    """The control: the same config without the guard trains on and ends with NaN weights."""
    metrics, objects = train(_nan_model_cfg(make_cfg, "~callbacks.divergence_guard", "test=false"))
    assert metrics["status"] == "ok" and objects["trainer"].global_step == 6
    assert not all(torch.isfinite(p).all() for p in objects["module"].parameters())


# -- train(ckpt_path=...) refuses a crafted checkpoint --------------------------------------------------------


class _Marker:
    """Unpickling this creates ``path``: the trace a crafted file leaves if its code runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A file with every key a resumable Lightning checkpoint has (so only the unpickling can refuse it),
    plus an object whose unpickling writes ``marker``."""
    torch.save(
        {
            "state_dict": {},
            "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 0}}}},
            "optimizer_states": [],
            "global_step": 0,
            "callbacks": {"payload": _Marker(marker)},
        },
        path,
    )
    return path


def test_train_refuses_a_crafted_ckpt_path_and_runs_nothing(make_cfg, tmp_path, monkeypatch):
    (tmp_path / "download").mkdir()
    marker = tmp_path / "download" / "ran"
    ckpt = _crafted_checkpoint(tmp_path / "download" / "evil.ckpt", marker)
    fits: list[object] = []
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append(a))
    cfg = make_cfg(f"ckpt_path={ckpt}")  # the run directory is tmp_path
    with pytest.raises(ConfigError, match=r"ckpt_path=.*evil\.ckpt is not a readable Lightning checkpoint \("):
        train(cfg)
    assert not marker.exists()  # the crafted object was never unpickled
    assert fits == []  # no training started
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints").exists()


def test_the_crafted_checkpoint_runs_its_code_when_fully_unpickled(tmp_path):
    """The control: the file above really carries code (a full unpickling writes the marker)."""
    marker = tmp_path / "ran"
    ckpt = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()
