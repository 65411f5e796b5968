"""BatchSizeFinder: the LR follows the batch it finds in either callback order, the cap, resume, RNG, config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from lightning_tricks._lightning import (
    Callback,
    MisconfigurationException,
    ModelCheckpoint,
    Trainer,
    pl,
    seed_everything,
)
from lightning_tricks.callbacks import BatchSizeFinder, LinearScaling, LRSchedule, RandomState
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.schedules import Constant

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*without a warmup"),
    pytest.mark.filterwarnings("ignore:`weights_only` was not set"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]

LR, REFERENCE = 0.1, 64


class Record(Callback):
    """The LR and the batch size of every optimizer step of the real run (not the finder's trials)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []
        self._batch = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch = int(batch[0].shape[0])

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: Any) -> None:
        self.steps.append((optimizer.param_groups[0]["lr"], self._batch))


class Recorded(Classifier):
    """Records the batch size of every training step, the finder's trials included (callbacks are off there)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.batch_sizes.append(int(batch[0].shape[0]))
        return super().training_step(batch, batch_idx)


def _module() -> Recorded:
    seed_everything(0)
    module = Recorded(MLP((1, 8, 8), 10, hidden=(16,), dropout=0.2), 10, {"name": "sgd", "lr": LR})
    module.batch_sizes = []
    return module


def _fit(
    callbacks: list[Callback],
    tmp_path: Path,
    batch_size: int = 64,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> tuple[Trainer, Recorded, DigitsDataModule]:
    module = _module()
    dm = DigitsDataModule(batch_size=batch_size, loader="resident")
    options = {"max_steps": 3, "enable_checkpointing": False, "limit_val_batches": 0, **kwargs}
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **options,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, module, dm


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("order", ["finder-first", "scaling-first"])
def test_lr_follows_the_found_batch_in_either_order(tmp_path: Path, order: str) -> None:
    finder = BatchSizeFinder(init_val=64, max_trials=3, steps_per_trial=1)  # tries 64, 128, 256: no OOM on a CPU
    scaling = LinearScaling(reference_batch_size=REFERENCE)
    record = Record()
    callbacks: list[Callback] = [finder, scaling, LRSchedule(Constant()), record]
    if order == "scaling-first":
        callbacks = callbacks[::-1]
    trainer, module, dm = _fit(callbacks, tmp_path / "found")
    assert finder.optimal_batch_size == finder.found == dm.batch_size == 256
    assert scaling.global_batch_size == 256 and scaling.factor == 256 / REFERENCE
    # the final LR is base_lr * found_batch / reference_batch, and every step of the run used that batch
    assert record.steps == [(pytest.approx(LR * 256 / REFERENCE), 256)] * 3
    assert trainer.global_step == 3 and trainer.ckpt_path is None  # the finder's temporary checkpoint is gone
    assert module.batch_sizes == [64, 128, 256] + [256] * 3  # one step per trial, then the run

    # the search left nothing behind: the same weights as a run configured with batch 256 from the start
    # (the trials' dropout draws came from an isolated RNG, the weights and the optimizer were restored)
    plain = Record()
    _, reference, _ = _fit(
        [LinearScaling(reference_batch_size=REFERENCE), LRSchedule(Constant()), plain], tmp_path / "plain", 256
    )
    assert plain.steps == record.steps
    assert _same_weights(module, reference)


def test_the_first_trial_runs_init_val(tmp_path: Path) -> None:
    finder = BatchSizeFinder(init_val=16, max_trials=3, steps_per_trial=1)
    _, module, dm = _fit([finder], tmp_path, batch_size=64, max_steps=1)
    # Lightning alone runs its first trial on the loader built with the configured 64: [64, 32, 64]
    assert module.batch_sizes == [16, 32, 64, 64] and dm.batch_size == 64


def test_the_training_set_caps_the_search(tmp_path: Path) -> None:
    dm = DigitsDataModule(batch_size=64, loader="resident")
    dm.setup("fit")
    n_train = len(dm.splits["train"][1])
    assert n_train == 1294
    finder = BatchSizeFinder(init_val=512, max_trials=6, steps_per_trial=1)  # 512, 1024, then above the data
    record = Record()
    trainer, _, dm = _fit([finder, record], tmp_path, max_steps=1)
    # the resident loader has no sized `dataset`, so Lightning alone would keep doubling past the data
    # (and the fit, dropping the incomplete batch, would run no step); the cap keeps the sizes <= 1294
    assert finder.optimal_batch_size == dm.batch_size == 1024
    assert record.steps == [(LR, 1024)] and trainer.global_step == 1
    # a first size above the data starts at the data's size (and is tried)
    finder = BatchSizeFinder(init_val=4096, max_trials=3, steps_per_trial=1)
    _, module, dm = _fit([finder], tmp_path, max_steps=1)
    assert finder.optimal_batch_size == dm.batch_size == n_train and module.batch_sizes == [n_train, n_train]


def test_resume_applies_the_found_batch_without_a_new_search(tmp_path: Path, monkeypatch) -> None:
    def make() -> list[Callback]:  # RandomState: the RNG owner, so that dropout resumes exactly too
        finder = BatchSizeFinder(init_val=64, max_trials=2, steps_per_trial=1)
        return [finder, LinearScaling(reference_batch_size=64), RandomState()]

    kwargs = {"max_steps": -1, "max_epochs": 3, "limit_train_batches": 2}
    save = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="e{epoch}", save_top_k=-1, auto_insert_metric_name=False)
    full_callbacks = [*make(), save]
    full_trainer, full, _ = _fit(full_callbacks, tmp_path / "full", enable_checkpointing=True, **kwargs)
    assert full_callbacks[0].found == 128 and full_trainer.global_step == 6

    def no_search(*args: Any, **kw: Any) -> None:
        raise AssertionError("a resumed fit must not search again")

    monkeypatch.setattr(pl.callbacks.BatchSizeFinder, "scale_batch_size", no_search)
    resumed_callbacks = make()
    ckpt = str(tmp_path / "ckpt" / "e0.ckpt")
    resumed_trainer, resumed, dm = _fit(resumed_callbacks, tmp_path / "resumed", ckpt_path=ckpt, **kwargs)
    assert dm.batch_size == 128 and resumed_callbacks[0].state_dict() == {"batch_size": 128}
    assert resumed_callbacks[1].factor == 2.0
    assert resumed_trainer.global_step == 6 and _same_weights(full, resumed)

    # a checkpoint from a run without the finder holds no batch size: refused, before any step
    _fit([], tmp_path / "plain", max_steps=2, enable_checkpointing=True)
    (plain_ckpt,) = (tmp_path / "plain").rglob("*.ckpt")
    with pytest.raises(MisconfigurationException, match="holds no batch size found by BatchSizeFinder"):
        _fit(make(), tmp_path / "refused", ckpt_path=str(plain_ckpt), max_steps=4)


def test_stages_limit_the_search(tmp_path: Path) -> None:
    finder = BatchSizeFinder(init_val=64, max_trials=2, steps_per_trial=1, stages=["fit"])
    trainer, module, dm = _fit([finder], tmp_path)
    assert dm.batch_size == 128
    trainer.test(module, datamodule=dm, verbose=False)
    assert dm.batch_size == 128 and finder.optimal_batch_size == 128  # no search at test start


def test_linear_scaling_refuses_what_it_cannot_follow(tmp_path: Path) -> None:
    finder = BatchSizeFinder(init_val=64, max_trials=2, steps_per_trial=1)
    with pytest.raises(MisconfigurationException, match=r"LinearScaling\(batch_size=64\).*BatchSizeFinder searches"):
        _fit([finder, LinearScaling(batch_size=64)], tmp_path / "fixed")

    class Late(Trainer):  # a Trainer whose callbacks were changed after Lightning ordered them
        pass

    trainer = Late(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        callbacks=[LinearScaling(reference_batch_size=64)], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.callbacks.append(BatchSizeFinder(init_val=64, max_trials=2, steps_per_trial=1))  # type: ignore[attr-defined]
    with pytest.raises(MisconfigurationException, match="BatchSizeFinder comes after LinearScaling"):
        trainer.fit(_module(), datamodule=DigitsDataModule(batch_size=64, loader="resident"))
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mode": "linear"}, ValueError, r"`mode` should be either of \('power', 'binsearch'\), got 'linear'"),
        ({"max_trials": 0}, ValueError, "max_trials must be an int >= 1, got 0"),
        ({"init_val": 2.5}, ValueError, "init_val must be an int >= 1, got 2.5"),
        ({"stages": ["train"]}, ValueError, "stages must be a non-empty list of"),
        ({"batch_arg_name": ""}, ValueError, "batch_arg_name must be a non-empty attribute name"),
        ({"margin": 1.5}, AssertionError, "`margin` should be between 0 and 1"),  # Lightning's own check
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        BatchSizeFinder(**kwargs)


def test_config_runs_with_linear_scaling(make_cfg) -> None:
    from lightning_tricks.train import train

    cfg = make_cfg("+callbacks=[batch_size_finder,linear_scaling]", "callbacks.linear_scaling.reference_batch_size=64")
    finder = instantiate(cfg.callbacks.batch_size_finder)
    assert isinstance(finder, BatchSizeFinder) and finder.stages == ("fit",)
    assert (finder._mode, finder._init_val, finder._max_trials, finder._steps_per_trial) == ("power", 32, 4, 2)
    metrics, objects = train(cfg)
    finder, scaling = (
        next(c for c in objects["callbacks"] if isinstance(c, t)) for t in (BatchSizeFinder, LinearScaling)
    )
    assert finder.found == objects["datamodule"].batch_size == 256  # 32, 64, 128, 256
    assert scaling.factor == 4.0
    group = objects["trainer"].optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(cfg.optimizer.lr * 4.0)  # the base LR the schedule scales
    assert objects["trainer"].global_step == 6 and 0.0 <= metrics["test/acc"] <= 1.0


@pytest.mark.parametrize("init_val,cap", [(2, 100), (3, 3), (5, 4), (1, 1024), (7, 1000)])
def test_power_search_bound_is_the_last_doubling_within_the_cap(init_val: int, cap: int) -> None:
    from lightning_tricks.schedules import bounded_search

    start, trials, max_val = bounded_search(init_val, 25, 8192, cap, "power")
    sizes = [start * 2**k for k in range(trials)]
    assert start == min(init_val, cap) and max_val == 8192
    assert sizes[-1] <= cap < sizes[-1] * 2  # every size tried fits, one more doubling would not
    assert bounded_search(init_val, 25, 8192, cap, "binsearch") == (min(init_val, cap), 25, min(8192, cap))
    assert bounded_search(init_val, 25, 8192, None, "power") == (init_val, 25, 8192)
