"""LinearScaling: the factor, where the batch size comes from, composition with LRSchedule, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    LightningDataModule,
    LightningModule,
    ModelCheckpoint,
    Trainer,
)
from lightning_tricks.callbacks import LinearScaling, LRSchedule
from lightning_tricks.callbacks.lr_scaling import global_batch_size, scaling_factor
from lightning_tricks.schedules import Cosine, Warmup


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


class Data(LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=self.batch_size)


class Tiny(LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.lr = lr
        self.lrs: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def fit(
    tmp_path: Path,
    callbacks: list,
    data: Any,
    module: Tiny | None = None,
    ckpt_path: Any = None,
    trainer_cls: type[Trainer] = Trainer,
    **kwargs: Any,
) -> Tiny:
    module = module or Tiny()
    kwargs = {"max_epochs": 1, "enable_checkpointing": False, **kwargs}
    trainer = trainer_cls(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )
    if isinstance(data, LightningDataModule):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
    return module


def test_factor_formulas() -> None:
    assert global_batch_size(32, 4, 8) == 1024
    assert scaling_factor(1024, 256) == 4.0
    assert scaling_factor(64, 256, "sqrt") == 0.5
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        global_batch_size(32, 1, 0)


@pytest.mark.parametrize("order", ["scaling-first", "schedule-first"])
def test_composes_with_lr_schedule_in_either_order(tmp_path: Path, order: str) -> None:
    scaling = LinearScaling(reference_batch_size=128)
    schedule = LRSchedule(Cosine(min_factor=0.1))
    callbacks = [scaling, schedule] if order == "scaling-first" else [schedule, scaling]
    module = fit(tmp_path, callbacks, Data(batch_size=16), accumulate_grad_batches=2)
    # 64 samples / 16 = 4 batches -> 2 optimizer steps; global batch 16 x 2 = 32 -> factor 32 / 128
    assert scaling.factor == 0.25 and scaling.global_batch_size == 32
    assert module.lrs == pytest.approx([0.1 * 0.25 * Cosine(min_factor=0.1)(t, 2) for t in range(2)], abs=1e-12)


def test_sqrt_rule_and_batch_size_from_the_dataloader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    scaling = LinearScaling(reference_batch_size=256, rule="sqrt")
    with caplog.at_level("INFO"):
        module = fit(tmp_path, [scaling], DataLoader(_data(), batch_size=64), max_steps=1)
    assert scaling.factor == 0.5
    assert module.lrs == [pytest.approx(0.05)]
    assert "global batch 64 = 64 per device (from the train dataloader (DataLoader.batch_size))" in caplog.text
    # an explicit batch size wins
    scaling = LinearScaling(reference_batch_size=256, batch_size=512)
    module = fit(tmp_path, [scaling, LRSchedule(Warmup(steps=1))], DataLoader(_data(), batch_size=64), max_epochs=2)
    assert module.lrs == pytest.approx([0.0, 0.2])


def test_counts_every_device(tmp_path: Path) -> None:
    class FourDevices(Trainer):  # stands in for DDP over 4 processes: only the world size matters here
        @property
        def world_size(self) -> int:
            return 4

    scaling = LinearScaling(reference_batch_size=256)
    fit(tmp_path, [scaling], Data(batch_size=16), trainer_cls=FourDevices, max_steps=1)
    assert scaling.global_batch_size == 64 and scaling.factor == 0.25


def test_errors_when_the_batch_size_cannot_be_found(tmp_path: Path) -> None:
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]  # an iterable without batch_size
    with pytest.raises(ValueError, match=r"could not find the per-device batch size.*LinearScaling\(batch_size=...\)"):
        fit(tmp_path, [LinearScaling()], batches, max_steps=1)
    with pytest.raises(ValueError, match="rule must be one of .* got 'cubic'"):
        LinearScaling(rule="cubic")
    with pytest.raises(ValueError, match="reference_batch_size must be an int >= 1, got 0"):
        LinearScaling(reference_batch_size=0)


def test_warns_without_warmup_for_large_factors(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="without a warmup"):
        fit(tmp_path, [LinearScaling(reference_batch_size=8)], Data(batch_size=32), max_steps=1)


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.filterwarnings("ignore:.*ended before the epoch ended.*")
def test_resume_does_not_scale_twice(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = fit(
        tmp_path,
        [LinearScaling(reference_batch_size=32), LRSchedule(Cosine()), ckpt],
        Data(batch_size=8),
        max_epochs=2,
        enable_checkpointing=True,
    )
    assert len(full.lrs) == 16 and full.lrs[0] == pytest.approx(0.025)
    resumed = fit(
        tmp_path,
        [LRSchedule(Cosine()), LinearScaling(reference_batch_size=32)],
        Data(batch_size=8),
        max_epochs=2,
        ckpt_path=tmp_path / "ckpt" / "step=3.ckpt",
    )
    assert resumed.lrs == full.lrs[3:]


def test_linear_scaling_config_instantiates() -> None:
    from conftest import compose_train

    cfg = compose_train(["+callbacks=linear_scaling"])
    callback = instantiate(cfg.callbacks.linear_scaling)
    assert isinstance(callback, LinearScaling)
    assert (callback.reference_batch_size, callback.rule, callback.batch_size) == (256, "linear", None)
    assert math.isclose(scaling_factor(512, callback.reference_batch_size, callback.rule), 2.0)
