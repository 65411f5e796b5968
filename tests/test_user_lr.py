"""LRSchedule in a user's own project: their LightningModule and DataLoaders, Lightning's ModelCheckpoint."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning_namespace import Callback, LightningModule, ModelCheckpoint, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_tricks.callbacks import LinearScaling, LRSchedule, RandomState
from lightning_tricks.schedules import Cosine, Warmup

pytestmark = pytest.mark.filterwarnings(
    "ignore:Be aware that when using `ckpt_path`", "ignore:.*does not have many workers"
)

X = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
Y = (X[:, 0] > 0).long()


class UserModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Crash(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


LR_TRICKS = {
    "schedule": lambda: LRSchedule(Warmup(steps=0.1, then=Cosine())),
    # the batch size is found on the loader: reading it must not set up the data before the RNG is restored
    "scaling": lambda: LinearScaling(reference_batch_size=4),
}


def _fit(dirpath, crash=False, ckpt_path=None, trick="schedule") -> UserModule:
    seed_everything(0)  # a new process would start here
    module = UserModule()
    callbacks = [
        LR_TRICKS[trick](),
        ModelCheckpoint(dirpath=dirpath, save_top_k=-1, save_last=True),
        RandomState(),
    ]
    trainer = Trainer(
        max_epochs=4,
        callbacks=[*callbacks, *([Crash()] if crash else [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(X, Y), batch_size=16)
    if crash:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.fit(module, train, val)
    else:
        trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("trick", sorted(LR_TRICKS))
def test_resume_after_a_crash_gives_bit_identical_weights(tmp_path, trick):
    full = _fit(tmp_path / "full", trick=trick)
    _fit(tmp_path / "run", crash=True, trick=trick)
    resumed = _fit(tmp_path / "run", ckpt_path=str(tmp_path / "run" / "last.ckpt"), trick=trick)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"


class GAN(LightningModule):
    """Two optimizers stepped once each per batch, manual optimization; records the LR of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g, self.d = nn.Linear(2, 2), nn.Linear(2, 1)
        self.seen: dict[int, list[float]] = {0: [], 1: []}

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt_g, opt_d = self.optimizers()
        for index, opt in ((1, opt_d), (0, opt_g)):  # optimizers: 0 = generator, 1 = discriminator
            loss = self.d(x).mean() if index == 1 else self.d(self.g(x)).mean()
            opt.zero_grad()
            self.manual_backward(loss)
            self.seen[index].append(opt.optimizer.param_groups[0]["lr"])
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.g.parameters(), lr=0.2), torch.optim.SGD(self.d.parameters(), lr=0.05)


def test_manual_optimization_schedules_each_optimizer_over_its_own_steps():
    module = GAN()
    schedule = Warmup(steps=3, then=Cosine())
    trainer = Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.callbacks.append(LRSchedule(schedule))
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(20, 2)), batch_size=2))
    total = 20  # 2 epochs x 10 batches: each optimizer steps once per batch
    assert trainer.global_step == 2 * total
    for index, base in ((0, 0.2), (1, 0.05)):
        warm = [base * t / 3 for t in range(3)]
        cosine = [base * 0.5 * (1 + math.cos(math.pi * (t - 3) / (total - 3))) for t in range(3, total)]
        assert module.seen[index] == pytest.approx(warm + cosine, abs=1e-12)


class Endless(IterableDataset):
    def __iter__(self):
        for i in range(6):
            yield X[i], Y[i]


def test_unknown_loader_length_names_the_real_cause():
    trainer = Trainer(max_epochs=3, callbacks=[LRSchedule(Cosine())], logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError) as info:
        trainer.fit(UserModule(), DataLoader(Endless(), batch_size=2))
    message = str(info.value)
    assert "max_epochs=-1" not in message
    assert "train loader has no length" in message and "max_epochs=3" in message and "total_steps" in message


def test_running_past_total_steps_warns_once():
    trainer = Trainer(
        max_epochs=2, callbacks=[LRSchedule(Cosine(), total_steps=4)], logger=False, enable_progress_bar=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(UserModule(), DataLoader(TensorDataset(X, Y), batch_size=8))
    past = [w for w in caught if "past the end of the schedule" in str(w.message)]
    assert trainer.global_step == 12 and len(past) == 1
    assert "step 4" in str(past[0].message) and "total_steps=4" in str(past[0].message)
