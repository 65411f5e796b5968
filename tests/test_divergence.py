"""A diverging run stops at the first non-finite loss, leaves finite weights, and says so everywhere."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_tricks._lightning import Trainer, seed_everything
from lightning_tricks.callbacks import EMA, DivergenceGuard
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.sanity import Diverged, divergence_message
from lightning_tricks.sweep import summarize
from lightning_tricks.train import train, worst_value


def _fit(module, tmp_path, callbacks=(), **trainer_args):
    """A quiet, tiny fit on digits; the trainer is also kept in ``_fit.trainer`` for when fit raises."""
    args = {"max_epochs": 3, "limit_train_batches": 5, "limit_val_batches": 1, **trainer_args}
    trainer = Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        **args,
    )
    _fit.trainer = trainer
    trainer.fit(module, DigitsDataModule(batch_size=32, loader="resident"))
    return trainer


def test_message_names_step_epoch_and_lr():
    msg = divergence_message("loss", math.inf, 7, 2, [0.5, 0.5, 0.05])
    assert msg.startswith("diverged: the loss is inf at optimizer step 7 (epoch 2), lr 0.05, 0.5;")


def test_guard_raises_before_the_update_and_weights_stay_finite(tmp_path):
    seed_everything(0)
    module = Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 1e6})
    ema = EMA(decay=0.9)
    with pytest.raises(Diverged, match=r"at optimizer step \d+ \(epoch \d\), lr 1e\+06") as info:
        _fit(module, tmp_path, [ema, DivergenceGuard()])
    assert info.value.step == _fit.trainer.global_step  # the step whose loss was not finite never ran
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert all(torch.isfinite(t).all() for t in ema.average_tensors().values())


def test_without_the_guard_the_same_run_ends_non_finite(tmp_path):
    seed_everything(0)
    module = Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 1e6})
    _fit(module, tmp_path)
    assert not all(torch.isfinite(p).all() for p in module.parameters())  # what the guard prevents


def test_weights_check_catches_an_overflow_from_a_finite_gradient(tmp_path):
    class Overflow(Classifier):
        def on_after_backward(self) -> None:
            next(self.parameters()).grad.fill_(3e38)  # finite; lr * grad overflows float32

    module = Overflow(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 10.0, "momentum": 0.0})
    ema = EMA(decay=0.9)
    with pytest.raises(Diverged, match="weight norm after the update is inf at optimizer step 0"):
        _fit(module, tmp_path, [DivergenceGuard(), ema], max_steps=3, limit_train_batches=None, limit_val_batches=None)
    assert all(torch.isfinite(t).all() for t in ema.average_tensors().values())  # the average never saw it
    off = Overflow(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 10.0, "momentum": 0.0})
    _fit(
        off,
        tmp_path,
        [DivergenceGuard(check_weights=False)],
        max_steps=1,
        limit_train_batches=None,
        limit_val_batches=0,
    )  # the switch turns the check off
    assert not torch.isfinite(next(off.parameters())).all()


def test_bad_argument():
    with pytest.raises(ValueError, match="check_weights must be a bool, got 'yes'"):
        DivergenceGuard(check_weights="yes")  # type: ignore[arg-type]


def test_cli_run_records_status_and_ranks_last(make_cfg, tmp_path):
    metrics, objects = train(make_cfg("experiment=bag_of_tricks", "optimizer.lr=1e6", "trainer.max_epochs=2"))
    assert metrics["status"] == "diverged"
    assert metrics["best/val/acc"] == worst_value("max") == -math.inf
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["metrics"]["status"] == "diverged"
    ema = next(c for c in objects["callbacks"] if isinstance(c, EMA))
    assert all(torch.isfinite(t).all() for t in ema.average_tensors().values())
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), ckpt
    # a sweep with one healthy and one diverged job ranks the diverged one last and shows its status
    sweep = tmp_path / "sweep"
    for job, m in (("0", record["metrics"]), ("1", {"best/val/acc": 0.5, "status": "ok"})):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "metrics.json").write_text(json.dumps({"overrides": [], "metrics": m}))
    _, table = summarize(sweep, "val/acc", "max")
    lines = table.splitlines()
    assert "status" in lines[0].split()
    assert lines[2].split()[0] == "1" and "diverged" in lines[3]


def test_healthy_run_has_status_ok(make_cfg):
    metrics, _ = train(make_cfg())
    assert metrics["status"] == "ok"


class _NanFrom(Classifier):
    """A classifier whose training loss is NaN from optimizer step ``start`` on."""

    def __init__(self, start: int) -> None:
        super().__init__(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 0.01})
        self.start = start

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * math.nan if self.global_step >= self.start else loss


def test_every_n_steps_reads_the_summed_losses_once_per_window(tmp_path):
    """The accelerator path (forced here on the CPU): the losses are summed on the device and read every
    n steps, so a NaN at step 5 is reported at the read of step 8, naming the window 5-8."""
    guard = DivergenceGuard(every_n_steps=4)
    guard._read_cpu = False
    reads = []
    real = guard._read_losses

    def counting(trainer, step):
        reads.append(step)
        return real(trainer, step)

    guard._read_losses = counting
    seed_everything(0)
    with pytest.raises(Diverged, match=r"the sum of the losses is nan over optimizer steps 5-8 \(epoch 0\)") as info:
        _fit(_NanFrom(5), tmp_path, [guard], max_steps=20, limit_train_batches=None, limit_val_batches=0)
    assert info.value.step == 8 and reads == [0, 4, 8]
    # every step (n = 1) the same run stops at the first NaN, before its update
    seed_everything(0)
    with pytest.raises(Diverged, match=r"the loss is nan at optimizer step 5 \(epoch 0\).*no update was applied"):
        _fit(_NanFrom(5), tmp_path, [DivergenceGuard()], max_steps=20, limit_train_batches=None, limit_val_batches=0)


def test_every_n_steps_checks_before_a_checkpoint_is_saved(tmp_path):
    from lightning_tricks._lightning import ModelCheckpoint

    guard = DivergenceGuard(every_n_steps=100)
    guard._read_cpu = False
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=20,
        limit_val_batches=0,
        callbacks=[guard, ckpt],
        default_root_dir=tmp_path,
    )
    seed_everything(0)
    with pytest.raises(Diverged, match=r"the sum of the losses is nan over optimizer steps 1-2"):
        trainer.fit(_NanFrom(2), DigitsDataModule(batch_size=32, loader="resident"))
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # the save at step 3 was refused


def test_weight_check_every_n_steps(tmp_path):
    class OverflowFrom(Classifier):
        def __init__(self, start: int) -> None:
            super().__init__(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 10.0, "momentum": 0.0})
            self.start = start

        def on_after_backward(self) -> None:
            if self.global_step >= self.start:
                next(self.parameters()).grad.fill_(3e38)  # finite; lr * grad overflows float32

    # an overflow at a checked step (2) is caught right after its update
    with pytest.raises(Diverged, match="weight norm after the update is inf at optimizer step 2.*update was applied"):
        _fit(OverflowFrom(2), tmp_path, [DivergenceGuard(every_n_steps=2)], max_steps=5, limit_train_batches=None)
    # one at an unchecked step (1) is caught by the next step's loss, before that step's update
    with pytest.raises(Diverged, match="the loss is nan at optimizer step 2"):
        _fit(OverflowFrom(1), tmp_path, [DivergenceGuard(every_n_steps=2)], max_steps=5, limit_train_batches=None)
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1, got 0"):
        DivergenceGuard(every_n_steps=0)
