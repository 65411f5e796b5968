"""SWA callback: the average against torch's AveragedModel, the SWA LR, BatchNorm update, resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as torch_update_bn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import ModelCheckpoint, Trainer, seed_everything
from lightning_tricks.averaging import bn_buffers, raw_state_dict, swa_lr
from lightning_tricks.callbacks import SWA, LRSchedule
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP, ResNet

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _loader(batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class SwaRef(Classifier):
    """A BatchNorm MLP that keeps a reference ``AveragedModel`` (equal average) and the LR of each step."""

    def __init__(self, start_epoch: int = 0, per: str = "epoch") -> None:
        super().__init__(MLP((8,), 3, hidden=(16,)), 3, {"name": "sgd", "lr": 0.2, "momentum": 0.9})
        self.start_epoch, self.per = start_epoch, per
        self.__dict__["ref"] = None  # kept out of the module tree
        self.lrs: list[float] = []

    def _ref_update(self) -> None:
        if self.ref is None:
            self.__dict__["ref"] = AveragedModel(self.net)
        self.ref.update_parameters(self.net)  # the first update copies, then lerp 1 / (n + 1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        super().optimizer_step(*args, **kwargs)
        if self.per == "step" and self.current_epoch >= self.start_epoch:
            self._ref_update()

    def on_train_epoch_end(self) -> None:
        if self.per == "epoch" and self.current_epoch >= self.start_epoch:
            self._ref_update()


def _trainer(callbacks: list, **kwargs: Any) -> Trainer:
    opts = dict(
        max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
    )
    opts.update(kwargs)
    return Trainer(callbacks=callbacks, **opts)


def _assert_equals_ref(swa: SWA, module: SwaRef) -> None:
    got = swa.average_tensors()
    ref = dict(module.ref.module.named_parameters())
    assert set(got) == {f"net.{n}" for n in ref}
    for name, p in ref.items():
        torch.testing.assert_close(got[f"net.{name}"], p, rtol=0, atol=1e-6)


# -- the average -----------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 4])
def test_swa_epoch_average_equals_averaged_model(accumulate: int) -> None:
    seed_everything(0)
    module = SwaRef(start_epoch=2)
    swa = SWA(start=0.5, average_at_end=False, evaluate="both")  # 0.5 * 4 epochs: epochs 2 and 3
    trainer = _trainer([swa], accumulate_grad_batches=accumulate)
    trainer.fit(module, _loader(), _loader(32))
    assert swa.start_epoch == 2 and swa.num_averaged == 2
    _assert_equals_ref(swa, module)  # validating the average (and the raw weights) never disturbed training
    assert trainer.callback_metrics["val/loss"] != pytest.approx(float(trainer.callback_metrics["val/loss_raw"]))


def test_swa_step_average_equals_averaged_model() -> None:
    seed_everything(0)
    module = SwaRef(start_epoch=1, per="step")
    swa = SWA(start=1, update_every="step", average_at_end=False)
    _trainer([swa], max_epochs=3).fit(module, _loader(), _loader(32))
    assert swa.num_averaged == 12
    _assert_equals_ref(swa, module)


@pytest.mark.parametrize("anneal, kwargs", [("cos", {"anneal_epochs": 2}), ("linear", {"anneal_steps": 5})])
def test_swa_lr_is_annealed_from_the_current_lr(anneal: str, kwargs: dict) -> None:
    seed_everything(0)
    module = SwaRef(start_epoch=1)
    swa = SWA(start=1, swa_lr=0.05, anneal=anneal, **kwargs)
    _trainer([swa, LRSchedule()], limit_val_batches=0).fit(module, _loader())
    per_epoch = 6
    want = [0.2] * per_epoch
    for j in range(1, 3 * per_epoch + 1):  # SWA steps 1..18 in epochs 1..3
        if "anneal_epochs" in kwargs:
            want.append(swa_lr((j - 1) // per_epoch + 1, 0.2, 0.05, 2, anneal))
        else:
            want.append(swa_lr(j, 0.2, 0.05, 5, anneal))
    assert module.lrs == pytest.approx(want, rel=1e-12)
    assert module.lrs[-1] == pytest.approx(0.05)


def test_swa_bn_statistics_are_recomputed_like_torch_update_bn() -> None:
    seed_everything(0)
    module = SwaRef(start_epoch=2)
    swa = SWA(start=2)
    _trainer([swa, LRSchedule()], limit_val_batches=0).fit(module, _loader())
    assert swa.holds_average
    ref = copy.deepcopy(module.ref.module)
    torch_update_bn(_loader(), ref)
    ours = bn_buffers(module.net)
    assert ours
    for name, b in bn_buffers(ref).items():
        torch.testing.assert_close(ours[name], b, rtol=0, atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(module.net.get_parameter(name), p, rtol=0, atol=1e-6)


def test_swa_checkpoint_without_validation_holds_the_average_with_its_batchnorm_statistics(tmp_path: Path) -> None:
    seed_everything(0)
    module = SwaRef(start_epoch=2)
    swa = SWA(start=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)  # saved at training epoch ends
    _trainer([swa, LRSchedule(), ckpt], limit_val_batches=0, enable_checkpointing=True).fit(module, _loader())
    assert swa.holds_average  # after fit: the average, BatchNorm statistics recomputed as torch's update_bn
    saved = torch.load(tmp_path / "epoch=3-step=24.ckpt", weights_only=True)
    assert {n for n in saved["state_dict"] if "running" in n}
    for name, t in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], t), name
    for name, t in swa.raw_tensors(module).items():  # the raw weights, kept for resume
        assert torch.equal(raw_state_dict(saved)[name], t), name


def test_swa_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    def run(ckpt_path: str | None, dirpath: Path) -> tuple[SWA, SwaRef]:
        seed_everything(0 if ckpt_path is None else 1)
        module = SwaRef(start_epoch=1)
        swa = SWA(start=1, swa_lr=0.05, anneal_steps=8)
        ckpt = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1)
        trainer = _trainer([swa, LRSchedule(), ckpt], enable_checkpointing=True)
        trainer.fit(module, _loader(), _loader(32), ckpt_path=ckpt_path)
        return swa, module

    full_swa, full = run(None, tmp_path / "a")
    resumed_swa, resumed = run(str(tmp_path / "a" / "epoch=1-step=12.ckpt"), tmp_path / "b")
    assert resumed_swa.num_averaged == full_swa.num_averaged == 3
    assert resumed.lrs == full.lrs[12:]
    for name, t in full_swa.average_tensors().items():
        assert torch.equal(t, resumed_swa.average_tensors()[name]), name
    for name, t in full.state_dict().items():  # the average with recomputed BatchNorm statistics
        assert torch.equal(t, resumed.state_dict()[name]), name
    full_raw, resumed_raw = full_swa.raw_tensors(full), resumed_swa.raw_tensors(resumed)
    for name, t in full_raw.items():
        assert torch.equal(t, resumed_raw[name]), name


# -- the BatchNorm update matters ------------------------------------------------------------------
def test_swa_on_digits_without_bn_update_is_measurably_worse() -> None:
    seed_everything(0)
    module = Classifier(ResNet((1, 8, 8), 10, widths=(16, 32)), 10, {"name": "sgd", "lr": 0.05})
    data = DigitsDataModule(batch_size=64, loader="resident")
    swa = SWA(start=0.5, swa_lr=0.2)
    _trainer([swa, LRSchedule()], max_epochs=6, limit_val_batches=0).fit(module, data)

    x, y = data.splits["test"]

    def evaluate(state: dict) -> tuple[float, float]:
        module.load_state_dict(state)
        module.eval()
        with torch.no_grad():
            logits = module(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()

    with_update = {k: v.clone() for k, v in module.state_dict().items()}  # the module holds the SWA weights
    raw = swa.raw_tensors(module)
    without_update = {**with_update, **{n: raw[n] for n in bn_buffers(module)}}  # training-time statistics
    loss_with, acc_with = evaluate(with_update)
    loss_without, acc_without = evaluate(without_update)
    # measured: loss 0.057 vs 0.236, accuracy 98.3% vs 91.9%
    assert loss_without > 2 * loss_with
    assert acc_with > acc_without + 0.02


# -- arguments and config --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start": 1.5}, "start must be a fraction in \\(0, 1\\) or an int epoch >= 0, got 1.5"),
        ({"start": 0.0}, "start must be"),
        ({"start": -1}, "start must be"),
        ({"start": True}, "start must be"),
        ({"swa_lr": 0.0}, "swa_lr must be"),
        ({"swa_lr": 0.1, "anneal_epochs": 1, "anneal_steps": 1}, "not both"),
        ({"swa_lr": 0.1, "anneal_epochs": -1}, "anneal_epochs"),
        ({"anneal_steps": 3}, "need swa_lr"),
        ({"anneal": "exp"}, "anneal must be"),
        ({"update_every": "batch"}, "update_every"),
        ({"bn_update_batches": 0}, "bn_update_batches"),
        ({"evaluate": "ema"}, "evaluate must be one of"),
    ],
)
def test_swa_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SWA(**kwargs)


def test_swa_start_beyond_the_run_fails_at_setup() -> None:
    with pytest.raises(ValueError, match="resolves to epoch 5, beyond the run \\(max_epochs=3"):
        _trainer([SWA(start=5)], max_epochs=3).fit(SwaRef(), _loader())
    with pytest.raises(ValueError, match="fraction of max_epochs"):
        _trainer([SWA(start=0.5)], max_epochs=None, max_steps=10).fit(SwaRef(), _loader())
    with pytest.raises(ValueError, match="SWA start epoch 3 is beyond the run"):
        _trainer([SWA(start=3)], max_epochs=None, max_steps=12, limit_val_batches=0).fit(SwaRef(), _loader())


def test_swa_config_composes_and_instantiates() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="callbacks/swa")
    swa = instantiate(cfg.callbacks.swa)
    assert isinstance(swa, SWA) and swa.start == 0.75 and swa.bn_update


def test_swa_phase_starts_at_the_first_step_of_the_start_epoch() -> None:
    from lightning_tricks.averaging import check_start_in_run, swa_phase, swa_start_epoch

    assert swa_start_epoch(0.75, 8) == 6 and swa_start_epoch(2, None) == 2
    # 10 batches with 3 accumulated: ceil(10 / 3) = 4 optimizer steps per epoch
    assert swa_phase(0.05, 6, 10, 3).start_step == 24
    with pytest.raises(ValueError, match="needs the number of batches per epoch"):
        swa_phase(0.05, 1, float("inf"), 1)
    check_start_in_run(3, 16.0, 10, 3)  # 16 steps of 4 per epoch: epochs 0..3
    with pytest.raises(ValueError, match="about 4 epochs of 16 optimizer steps"):
        check_start_in_run(4, 16.0, 10, 3)
