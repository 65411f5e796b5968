"""A user's own project: the best checkpoint holds the weights that scored best, and resume stays exact.

Written as a Lightning user writes it: a plain ``LightningModule`` of the test's own, plain
``DataLoader`` s, Lightning's own ``ModelCheckpoint``, and our averaging callbacks added to the list.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning_namespace import Callback, ModelCheckpoint, pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.averaging import raw_state_dict
from lightning_tricks.callbacks import EMA, SWA


class UserModel(pl.LightningModule):
    def __init__(self, hidden: int = 32, batch_norm: bool = False, lr: float = 0.3) -> None:
        super().__init__()
        self.save_hyperparameters()
        norm: list[nn.Module] = [nn.BatchNorm1d(hidden)] if batch_norm else []
        self.net = nn.Sequential(nn.Linear(10, hidden), *norm, nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 10, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    y[::7] = torch.randint(0, 3, (y[::7].numel(),), generator=g)  # label noise: the val loss goes up again
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32)
    val = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=32)
    return train, val


def trainer(callbacks: list[Callback], root: Path, **kwargs: object) -> pl.Trainer:
    options: dict = dict(
        max_epochs=6, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def averaging(kind: str) -> Callback:
    if kind == "ema":
        return EMA(decay=0.9)
    return SWA(start=1, update_every="step")


def val_loss(model: pl.LightningModule, root: Path, **kwargs: object) -> float:
    _, val = loaders()
    return trainer([], root).validate(model, val, verbose=False, **kwargs)[0]["val/loss"]


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_the_best_checkpoint_validates_to_the_best_score(kind: str, tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = UserModel(batch_norm=kind == "swa")
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_top_k=1)
    fit = trainer([averaging(kind), best], tmp_path)
    train, val = loaders()
    fit.fit(model, train, val)
    score = float(best.best_model_score)

    # the model that won, loaded by the user's own class
    loaded = UserModel.load_from_checkpoint(best.best_model_path)
    assert val_loss(loaded, tmp_path) == pytest.approx(score, rel=0, abs=1e-7)
    # the same trainer, validating its best checkpoint
    assert fit.validate(model, val, ckpt_path="best", verbose=False)[0]["val/loss"] == pytest.approx(
        score, rel=0, abs=1e-7
    )
    # a fresh Trainer without our callbacks, given the path
    assert val_loss(UserModel(batch_norm=kind == "swa"), tmp_path, ckpt_path=best.best_model_path) == pytest.approx(
        score, rel=0, abs=1e-7
    )
    # a fresh Trainer with the same callbacks (their states are loaded with the checkpoint)
    again = trainer([averaging(kind)], tmp_path)
    fresh = UserModel(batch_norm=kind == "swa")
    assert again.validate(fresh, val, ckpt_path=best.best_model_path, verbose=False)[0]["val/loss"] == pytest.approx(
        score, rel=0, abs=1e-7
    )
    # the raw (training) weights of that checkpoint score differently: the checkpoint holds the average
    raw = UserModel(batch_norm=kind == "swa")
    raw.load_state_dict(raw_state_dict(torch.load(best.best_model_path, weights_only=True)))
    assert val_loss(raw, tmp_path) != pytest.approx(score, abs=1e-4)


class Crash(Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("kind", ["ema", "swa", "ema+swa"])
def test_crash_then_resume_gives_bit_identical_final_weights(kind: str, tmp_path: Path) -> None:
    def run(root: Path, crash: bool, resume: str | None = None) -> tuple[UserModel, list[Callback]]:
        pl.seed_everything(0)
        model = UserModel(batch_norm=True)
        tricks = [averaging(k) for k in kind.split("+")]
        callbacks = [*tricks, ModelCheckpoint(dirpath=root, monitor="val/loss", save_top_k=-1)]
        train, val = loaders()
        trainer(callbacks + ([Crash()] if crash else []), root).fit(model, train, val, ckpt_path=resume)
        return model, tricks

    full, full_tricks = run(tmp_path / "full", crash=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed", crash=True)
    latest = max((tmp_path / "crashed").glob("*.ckpt"), key=lambda p: torch.load(p, weights_only=True)["global_step"])
    resumed, resumed_tricks = run(tmp_path / "resumed", crash=False, resume=str(latest))

    # what the user holds at the end (the average), and the raw weights and averages inside the callbacks
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    for a, b in zip(full_tricks, resumed_tricks):
        for name, tensor in a.raw_tensors(full).items():
            assert torch.equal(tensor, b.raw_tensors(resumed)[name]), name
        for name, tensor in a.average_tensors().items():
            assert torch.equal(tensor, b.average_tensors()[name]), name
