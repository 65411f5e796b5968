"""Reduce-on-plateau (issue 18): the pure core equals torch's ReduceLROnPlateau LR for LR, LRSchedule steps it
once per validation in a Trainer, behind a warmup, beside the other LR contributors, and resumes exactly."""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    LightningModule,
    MisconfigurationException,
    ModelCheckpoint,
    Trainer,
    seed_everything,
)
from lightning_tricks.averaging import swa_lr
from lightning_tricks.callbacks import SWA, LinearScaling, LRSchedule, SnapshotEnsemble
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.schedules import Cosine, Plateau, Warmup, plateau_of

# ---------------------------------------------------------------------------------------------------------
# the pure core against torch
# ---------------------------------------------------------------------------------------------------------
BASES = [0.1, 0.037, 3e-7]  # the last is small enough for eps=1e-8 to stop its reductions


def metric_curve(n: int, seed: int, mode: str) -> list[float]:
    """A noisy curve that improves, stalls and jumps, with exact repeats and a NaN: many reductions."""
    rng = random.Random(seed)
    values, m = [], 1.0
    for i in range(n):
        drift = -0.01 if mode == "min" else 0.01
        m += drift * (i % 40 < 10) + rng.gauss(0, 0.02) * (3 if i % 13 == 0 else 1)
        values.append(m)
    values[50] = values[49]  # an exact tie: not an improvement
    values[120] = math.nan  # never an improvement
    return values


def torch_reference(kwargs: dict, bases: list[float], metrics: list[float]) -> list[tuple[list[float], tuple]]:
    """After each ``step(metric)``: every group's LR and (best, num_bad_epochs, cooldown_counter, last_epoch)."""
    params = [nn.Parameter(torch.zeros(1)) for _ in bases]
    opt = torch.optim.SGD([{"params": [p], "lr": b} for p, b in zip(params, bases)])
    ref = ReduceLROnPlateau(opt, **kwargs)
    out = []
    for m in metrics:
        ref.step(m)
        out.append(([g["lr"] for g in opt.param_groups], (ref.best, ref.num_bad_epochs, ref.cooldown_counter)))
    return out


def core_state(p: Plateau) -> tuple:
    return (p.best, p.num_bad_epochs, p.cooldown_counter)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode, threshold", [("rel", 1e-2), ("abs", 5e-3)])
@pytest.mark.parametrize("cooldown", [0, 3])
@pytest.mark.parametrize("min_lr", [0.0, 2e-3, [1e-3, 1e-4, 0.0]], ids=["no-floor", "floor", "floor-per-group"])
def test_core_equals_torch_lr_for_lr(mode, threshold_mode, threshold, cooldown, min_lr) -> None:
    kwargs = dict(
        mode=mode,
        factor=0.3,
        patience=2,
        threshold=threshold,
        threshold_mode=threshold_mode,
        cooldown=cooldown,
        min_lr=min_lr,
        eps=1e-8,
    )
    metrics = metric_curve(400, seed=len(threshold_mode) + 10 * cooldown + (mode == "max"), mode=mode)
    reference = torch_reference(kwargs, BASES, metrics)
    plateau = Plateau(**kwargs)  # type: ignore[arg-type]
    product = 1.0
    for k, (m, (lrs, state)) in enumerate(zip(metrics, reference)):
        before = plateau.reductions
        factor = plateau.step(m)
        product *= 0.3 if plateau.reductions > before else 1.0
        assert plateau.lrs(BASES) == lrs, k  # exactly, bit for bit
        assert core_state(plateau) == state, k
        assert factor == plateau.current_factor == plateau(k, None) == product, k
    assert plateau.last_epoch == len(metrics)
    assert plateau.reductions >= 5  # the curve exercised the rule
    floor = [min_lr] * 3 if isinstance(min_lr, float) else min_lr
    final = reference[-1][0]
    if min_lr == 2e-3:
        assert final[:2] == [2e-3, 2e-3]  # clamped at min_lr
    assert final[2] == 3e-7 or final[2] > floor[2]  # eps: a 3e-7 group never moves by more than 1e-8


def test_current_factor_is_the_iterated_product_and_lrs_replay_torch() -> None:
    p = Plateau(factor=0.1, patience=0)
    for m in (1.0, 2.0, 3.0, 4.0):
        p.step(m)
    assert p.reductions == 3 and p.current_factor == (1.0 * 0.1) * 0.1 * 0.1
    # torch multiplies each group's current LR, so a group's LR is ((b * f) * f) * f, not b * f ** 3
    assert p.lrs([0.3]) == [((0.3 * 0.1) * 0.1) * 0.1]


def test_state_round_trips_and_resumes_the_same_decisions() -> None:
    kwargs: dict[str, Any] = dict(mode="max", factor=0.5, patience=3, cooldown=2, threshold_mode="abs", threshold=0.01)
    metrics = metric_curve(200, seed=3, mode="max")
    full = Plateau(**kwargs)
    seen_full = [(full.step(m), full.lrs(BASES)) for m in metrics]
    for stop in (1, 57, 123):
        first = Plateau(**kwargs)
        for m in metrics[:stop]:
            first.step(m)
        state = first.state_dict()
        assert all(isinstance(v, (int, float)) for v in state.values())
        resumed = Plateau(**kwargs)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        seen = [(resumed.step(m), resumed.lrs(BASES)) for m in metrics[stop:]]
        assert seen == seen_full[stop:]
        assert resumed.state_dict() == full.state_dict()
    # state is not configuration: equality and repr ignore it (LRSchedule's checkpoint key uses the repr)
    fresh = Plateau(**kwargs)
    assert fresh == full and repr(fresh) == repr(full) and "best" not in repr(full)
    full.reset()
    assert full.state_dict() == fresh.state_dict()


BAD = [
    ({"factor": 1.0}, "factor must be in (0, 1) (the LR is multiplied by it at each reduction), got 1.0"),
    ({"factor": 1.5}, "factor must be in (0.0, 1.0], got 1.5"),
    ({"factor": 0.0}, "factor must be in (0.0, 1.0], got 0.0"),
    ({"factor": -0.1}, "factor must be in (0.0, 1.0], got -0.1"),
    ({"patience": -1}, "patience must be an int >= 0 (a number of validations), got -1"),
    ({"patience": 2.5}, "patience must be an int >= 0 (a number of validations), got 2.5"),
    ({"cooldown": -2}, "cooldown must be an int >= 0 (a number of validations), got -2"),
    ({"mode": "mean"}, "mode must be one of ('min', 'max'), got 'mean'"),
    ({"threshold_mode": "relative"}, "threshold_mode must be one of ('rel', 'abs'), got 'relative'"),
    ({"threshold": -1e-3}, "threshold must be in [0.0, inf), got -0.001"),
    ({"min_lr": -1.0}, "min_lr must be in [0.0, inf), got -1.0"),
    ({"min_lr": [0.0, -1e-4]}, "min_lr[1] must be in [0.0, inf), got -0.0001"),
    ({"min_lr": "0.01"}, "min_lr must be a number >= 0 or a list of them (one per group), got '0.01'"),
    ({"eps": -1e-8}, "eps must be in [0.0, inf), got -1e-08"),
    ({"monitor": ""}, "monitor must be the name of a logged metric (a non-empty string), got ''"),
]


@pytest.mark.parametrize(
    "kwargs, message", BAD, ids=[next(iter(k)) + "=" + repr(next(iter(k.values()))) for k, _ in BAD]
)
def test_bad_input_fails_with_one_line_naming_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Plateau(**kwargs)
    assert str(info.value) == message and "\n" not in message
    # YAML integers given as floats are fine
    assert Plateau(patience=3.0, cooldown=1.0).patience == 3  # type: ignore[arg-type]


def test_min_lr_list_must_match_the_groups_and_plateau_of_finds_it_behind_warmups() -> None:
    p = Plateau(min_lr=[0.0, 0.1])
    with pytest.raises(ValueError, match=r"min_lr has 2 values \(one per parameter group\) but the optimizer has 3"):
        p.lrs([1.0, 1.0, 1.0])
    inner = Plateau()
    assert plateau_of(inner) == (inner, 0)
    assert plateau_of(Warmup(steps=5, then=Warmup(steps=0.5, then=inner)), 105) == (inner, 5 + 50)
    assert plateau_of(Warmup(steps=5, then=Cosine()), 100) is None
    with pytest.raises(ValueError, match="a Plateau reduces the learning rate; it cannot be a momentum schedule"):
        LRSchedule(Cosine(), momentum=Warmup(steps=2, then=Plateau()))


# ---------------------------------------------------------------------------------------------------------
# LRSchedule(Plateau) in a Trainer
# ---------------------------------------------------------------------------------------------------------
class ScriptedDigits(Classifier):
    """An MLP on digits whose validation also logs ``val/scripted``, a value from a script (indexed by the epoch,
    so a resumed run continues it, or by the validation), and records the LR of every group at each optimizer
    step (module hooks run after the callbacks'). Two groups with different base LRs: weights 0.1, biases 0.03."""

    def __init__(self, script: list[float], two_lrs: bool = True) -> None:
        super().__init__(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
        self.script, self.two_lrs = script, two_lrs
        self.seen: list[tuple[int, list[float]]] = []
        self.validated_at: list[int] = []  # global_step of each validation (not the sanity check)
        self.by_epoch = True  # the script is indexed by epoch (resumable); False: by validation (several per epoch)

    def configure_optimizers(self) -> Any:
        if not self.two_lrs:
            return super().configure_optimizers()
        weights = [p for n, p in self.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
        return torch.optim.SGD([{"params": weights, "lr": 0.1}, {"params": biases, "lr": 0.03}], lr=0.1, momentum=0.9)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.log("val/scripted", 1e9)  # must not count
            return
        index = self.current_epoch if self.by_epoch else len(self.validated_at)
        self.validated_at.append(self.trainer.global_step)
        self.log("val/scripted", self.script[index])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.seen.append((self.trainer.global_step, [g["lr"] for g in optimizer.param_groups]))


def digits_trainer(tmp_path: Path, callbacks: list, **kwargs: Any) -> Trainer:
    opts: dict[str, Any] = {
        "max_epochs": 8,
        "limit_train_batches": 3,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "enable_checkpointing": False,
        **kwargs,
    }
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **opts,
    )


def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32)


def expected_lrs(
    kwargs: dict, bases: list[float], script: list[float], validated_at: list[int], steps: int, counts: Any = None
) -> list[list[float]]:
    """torch's ReduceLROnPlateau stepped after each validation (those ``counts`` accepts): the LR of each step."""
    params = [nn.Parameter(torch.zeros(1)) for _ in bases]
    opt = torch.optim.SGD([{"params": [p], "lr": b} for p, b in zip(params, bases)])
    ref = ReduceLROnPlateau(opt, **kwargs)
    lrs_after: list[tuple[int, list[float]]] = [(0, list(bases))]
    for value, at in zip(script, validated_at):
        if counts is None or counts(at):
            ref.step(value)
        lrs_after.append((at, [g["lr"] for g in opt.param_groups]))
    return [[*(lrs for at, lrs in lrs_after if at <= t)][-1] for t in range(steps)]


SCRIPT = [1.0, 0.8, 0.85, 0.9, 0.7, 0.75, 0.8, 0.9, 0.95, 0.6, 0.65, 0.7, 0.7, 0.71, 0.72, 0.73]


@pytest.mark.parametrize(
    "plateau_kwargs, trainer_kwargs, per_epoch",
    [
        ({"mode": "min", "factor": 0.5, "patience": 1}, {}, 1),
        ({"mode": "max", "factor": 0.3, "patience": 0, "cooldown": 1, "min_lr": [0.01, 0.005]}, {}, 1),
        (  # validation every 2 steps: the plateau steps once per validation, several per epoch
            {"mode": "min", "factor": 0.5, "patience": 1, "threshold_mode": "abs", "threshold": 0.02},
            {"limit_train_batches": 4, "val_check_interval": 2, "max_epochs": 4},
            2,
        ),
    ],
    ids=["min-per-epoch", "max-cooldown-min_lr", "every-2-steps"],
)
def test_lr_sequence_in_a_trainer_equals_torch(tmp_path: Path, plateau_kwargs, trainer_kwargs, per_epoch) -> None:
    seed_everything(0)
    script = SCRIPT if plateau_kwargs["mode"] == "min" else [-v for v in SCRIPT]
    module = ScriptedDigits(script)
    module.by_epoch = per_epoch == 1
    callback = LRSchedule(Plateau(monitor="val/scripted", **plateau_kwargs))
    trainer = digits_trainer(tmp_path, [callback], num_sanity_val_steps=2, **trainer_kwargs)
    trainer.fit(module, digits())
    steps = trainer.global_step
    assert len(module.validated_at) == trainer.max_epochs * per_epoch  # type: ignore[operator]
    want = expected_lrs(plateau_kwargs, [0.1, 0.03], script, module.validated_at, steps)
    assert [lrs for _, lrs in module.seen] == want  # exactly
    plateau = callback.schedule
    assert isinstance(plateau, Plateau) and plateau.reductions >= 2 and plateau.last_epoch == len(module.validated_at)
    assert len({tuple(lrs) for lrs in want}) >= 3  # the LR did move


def test_only_validations_during_fit_count(tmp_path: Path) -> None:
    module = ScriptedDigits([1.0, 2.0, 3.0])
    callback = LRSchedule(Plateau(monitor="val/scripted", patience=0))
    trainer = digits_trainer(tmp_path, [callback], max_epochs=2, num_sanity_val_steps=2)
    trainer.fit(module, digits())
    assert isinstance(callback.schedule, Plateau)
    before = callback.schedule.state_dict()
    assert before["last_epoch"] == 2 and before["reductions"] == 1
    module.by_epoch = False
    trainer.validate(module, digits(), verbose=False)  # logs 3.0: worse, but not a step of the plateau
    assert callback.schedule.state_dict() == before


def test_lr_sequence_equals_lightnings_own_reduce_on_plateau(tmp_path: Path) -> None:
    """The same module with torch's scheduler returned from configure_optimizers (Lightning steps it with the
    monitored metric at each epoch end) trains with the same LRs as with LRSchedule(Plateau(...))."""
    kwargs = {"mode": "min", "factor": 0.5, "patience": 1, "cooldown": 1}

    class WithTorchScheduler(ScriptedDigits):
        def configure_optimizers(self) -> Any:
            opt = super().configure_optimizers()
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": ReduceLROnPlateau(opt, **kwargs), "monitor": "val/scripted"},
            }

    seen = {}
    for name, module, callbacks in (
        ("ours", ScriptedDigits(SCRIPT), [LRSchedule(Plateau(monitor="val/scripted", **kwargs))]),  # type: ignore[arg-type]
        ("torch", WithTorchScheduler(SCRIPT), []),
    ):
        seed_everything(0)
        digits_trainer(tmp_path / name, callbacks).fit(module, digits())
        seen[name] = module.seen
    assert seen["ours"] == seen["torch"]
    assert seen["ours"][-1][1] != seen["ours"][0][1]


def test_warmup_then_plateau_ignores_validations_during_the_warmup(tmp_path: Path) -> None:
    # 3 steps per epoch, a 4-step warmup: the validation after epoch 0 (step 3) ends inside the warmup and is not
    # counted. Counting it would make 0.5 the best and reduce at step 6 (patience 0); not counting it, the 1.0 seen
    # at step 6 is the first value.
    script = [0.5, 1.0, 1.0, 0.9, 0.95, 0.97, 0.99, 1.0]
    kwargs = {"mode": "min", "factor": 0.5, "patience": 0}
    warmup = Warmup(steps=4, then=Plateau(monitor="val/scripted", **kwargs))  # type: ignore[arg-type]
    module = ScriptedDigits(script)
    callback = LRSchedule(warmup)
    trainer = digits_trainer(tmp_path, [callback])
    trainer.fit(module, digits())
    assert module.validated_at[:2] == [3, 6]
    after = expected_lrs(
        kwargs, [0.1, 0.03], script, module.validated_at, trainer.global_step, counts=lambda at: at >= 4
    )
    for t, lrs in module.seen:
        if t < 4:  # the ramp, times the plateau factor 1
            assert lrs == [0.1 * (t / 4 * 1.0), 0.03 * (t / 4 * 1.0)], t
        else:
            assert lrs == after[t], t
    plateau = warmup.then
    assert isinstance(plateau, Plateau) and plateau.last_epoch == len(script) - 1  # all but the one in the warmup
    assert plateau.reductions >= 2 and module.seen[6][1] == [0.1, 0.03]  # no reduction at step 6


def test_a_missing_metric_fails_with_one_line_naming_it_and_the_logged_ones(tmp_path: Path) -> None:
    trainer = digits_trainer(tmp_path, [LRSchedule(Plateau(monitor="val/los"))])
    with pytest.raises(MisconfigurationException) as info:
        trainer.fit(ScriptedDigits(SCRIPT), digits())
    message = str(info.value)
    assert "\n" not in message
    assert "conditioned on metric 'val/los', which is not available at the end of validation" in message
    available = message.split("Available metrics are: ")[1].split("]")[0]
    assert "'val/loss'" in available and "'val/scripted'" in available
    assert trainer.global_step == 3  # at the first validation


def test_validation_off_or_a_min_lr_per_group_that_does_not_match_is_refused_at_fit_start(tmp_path: Path) -> None:
    trainer = digits_trainer(tmp_path, [LRSchedule(Plateau())], limit_val_batches=0)
    with pytest.raises(MisconfigurationException, match=r"validation is off \(trainer limit_val_batches=0\)"):
        trainer.fit(ScriptedDigits(SCRIPT), digits())
    assert trainer.global_step == 0
    trainer = digits_trainer(tmp_path, [LRSchedule(Plateau(min_lr=[0.0, 0.0, 0.0]))])
    with pytest.raises(ValueError, match=r"optimizer 0: min_lr has 3 values .* the optimizer has 2 group\(s\)"):
        trainer.fit(ScriptedDigits(SCRIPT), digits())
    assert trainer.global_step == 0


def test_no_validation_at_all_is_said(tmp_path: Path) -> None:
    trainer = digits_trainer(tmp_path, [LRSchedule(Plateau())], max_epochs=2, check_val_every_n_epoch=5)
    with pytest.warns(UserWarning, match="never took a step: no validation ended after step 0"):
        trainer.fit(ScriptedDigits(SCRIPT), digits())


# -- resume ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*dirpath has changed.*")
def test_resume_after_epoch_k_gives_the_same_lrs_and_state(tmp_path: Path) -> None:
    kwargs = {"mode": "min", "factor": 0.5, "patience": 1, "cooldown": 2}

    def run(where: Path, ckpt_path: Any = None) -> tuple[LRSchedule, ScriptedDigits]:
        seed_everything(0)
        module = ScriptedDigits(SCRIPT)
        callback = LRSchedule(Plateau(monitor="val/scripted", **kwargs))  # type: ignore[arg-type]
        ckpt = ModelCheckpoint(dirpath=where, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = digits_trainer(where, [callback, ckpt], enable_checkpointing=True, max_epochs=10)
        trainer.fit(module, digits(), ckpt_path=ckpt_path)
        return callback, module

    full_cb, full = run(tmp_path / "a")
    # reductions at steps 12 and 24 (see SCRIPT); after epoch index 4 the state holds a reduction, a running
    # cooldown and a best: a plateau that did not get it back would reduce from the base LR at step 24
    k = 4
    state = torch.load(tmp_path / "a" / f"epoch={k}.ckpt", weights_only=False)["callbacks"][full_cb.state_key]
    assert state["plateau"]["reductions"] >= 1 and state["plateau"]["cooldown_counter"] > 0
    resumed_cb, resumed = run(tmp_path / "b", tmp_path / "a" / f"epoch={k}.ckpt")
    steps_done = (k + 1) * 3
    assert [s for s, _ in resumed.seen] == list(range(steps_done, 30))
    assert resumed.seen == full.seen[steps_done:]  # the same LRs, exactly
    assert resumed_cb.state_dict() == full_cb.state_dict()  # base LRs and plateau state
    assert [lrs for s, lrs in full.seen if s in (23, 24)] == [[0.05, 0.015], [0.025, 0.0075]]  # after the resume


# -- beside the other LR contributors ----------------------------------------------------------------------
class Tiny(LightningModule):
    """Linear regression, 4 training batches and one validation batch per epoch; logs a scripted metric."""

    def __init__(self, script: list[float], two_groups: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.script, self.two_groups = script, two_groups
        self.batch_size = 4  # read by LinearScaling
        self.seen: list[list[float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        self.log("val/scripted", self.script[self.current_epoch])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.seen.append([g["lr"] for g in optimizer.param_groups])

    def configure_optimizers(self) -> Any:
        params: Any = self.parameters()
        if self.two_groups:
            params = [{"params": [self.layer.weight]}, {"params": [self.layer.bias], "lr": 0.01}]
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def _data(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)

    def train_dataloader(self) -> DataLoader:
        return self._data()

    def val_dataloader(self) -> DataLoader:
        return self._data()


def tiny_trainer(tmp_path: Path, callbacks: list, **kwargs: Any) -> Trainer:
    opts: dict[str, Any] = {"max_epochs": 6, "limit_val_batches": 1, "num_sanity_val_steps": 0, **kwargs}
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **opts,
    )


TINY_SCRIPT = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # patience 0: a reduction at every validation after the first


@pytest.mark.parametrize("order", ["plateau-first", "swa-first"])
def test_swa_phase_starts_from_the_plateau_lr_and_the_plateau_stops_in_it(tmp_path: Path, order: str) -> None:
    plateau = Plateau(monitor="val/scripted", factor=0.5, patience=0)
    callbacks: list = [LRSchedule(plateau), SWA(start=3, swa_lr=0.01, anneal_steps=2, anneal="linear")]
    if order == "swa-first":
        callbacks.reverse()
    module = Tiny(TINY_SCRIPT, two_groups=True)
    tiny_trainer(tmp_path, callbacks).fit(module)
    # SWA starts at epoch 3, step 12. The validations at steps 4 (the first: the best) and 8 (a reduction) count;
    # those at 12, 16, 20 end where the next step is in SWA's phase, which owns the LR: not counted
    assert plateau.last_epoch == 2 and plateau.reductions == 1
    assert module.seen[:12] == [[0.1, 0.01]] * 8 + [[0.1 * 0.5, 0.01 * 0.5]] * 4
    start = [0.1 * 0.5, 0.01 * 0.5]  # the plateau's LRs at step 12
    assert module.seen[12:] == [[swa_lr(t - 11, s, 0.01, 2, "linear") for s in start] for t in range(12, 24)]


@pytest.mark.parametrize("order", ["scaling-first", "schedule-first"])
def test_linear_scaling_scales_the_lrs_the_reductions_start_from(tmp_path: Path, order: str) -> None:
    plateau = Plateau(monitor="val/scripted", factor=0.5, patience=0, min_lr=0.05)
    callbacks: list = [LinearScaling(reference_batch_size=2), LRSchedule(plateau)]
    if order == "schedule-first":
        callbacks.reverse()
    module = Tiny(TINY_SCRIPT, two_groups=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # x2 without a warmup
        tiny_trainer(tmp_path, callbacks).fit(module)
    base = [0.1 * 2.0, 0.01 * 2.0]  # batch 4 against a reference of 2
    lrs = [base]
    for _ in range(5):  # torch's rule, group by group: max(lr * 0.5, 0.05), kept if it moved by more than eps
        lrs.append([max(lr * 0.5, 0.05) if lr - max(lr * 0.5, 0.05) > 1e-8 else lr for lr in lrs[-1]])
    # the validation at step 4 sets the best; each later one (steps 8, 12, ...) is a reduction
    assert module.seen == [lrs[max(0, t // 4 - 1)] for t in range(24)]
    assert module.seen[-1] == [0.05, 0.02]  # floored at min_lr; the group below it never moves


def test_snapshot_cycles_replace_the_schedule_so_they_are_refused_beside_a_plateau(tmp_path: Path) -> None:
    for callbacks in (
        [LRSchedule(Plateau(monitor="val/scripted")), SnapshotEnsemble(cycles=2, evaluate=False)],
        [SnapshotEnsemble(cycles=2, evaluate=False), LRSchedule(Plateau(monitor="val/scripted"))],
    ):
        trainer = tiny_trainer(tmp_path, callbacks)
        with pytest.raises(MisconfigurationException) as info:
            trainer.fit(Tiny(TINY_SCRIPT))
        assert "SnapshotEnsemble(cycles=2, schedule=True) sets the LR schedule" in str(info.value)
        assert "LRSchedule(Plateau(monitor='val/scripted'" in str(info.value) and trainer.global_step == 0


# ---------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------
def test_configs_default_to_val_loss_and_can_follow_the_run_monitor() -> None:
    from conftest import compose_train

    plain = instantiate(compose_train(["schedule=plateau"]).schedule)
    assert isinstance(plain.schedule, Plateau)
    assert (plain.schedule.monitor, plain.schedule.mode) == ("val/loss", "min")
    warm = instantiate(compose_train(["schedule=warmup_plateau"]).schedule)
    assert isinstance(warm.schedule, Warmup) and isinstance(warm.schedule.then, Plateau)
    assert (warm.schedule.then.monitor, warm.schedule.then.mode) == ("val/loss", "min")
    follow = compose_train(
        ["schedule=plateau", "schedule.schedule.monitor=${monitor}", "schedule.schedule.mode=${monitor_mode}"]
    )
    followed = instantiate(follow.schedule).schedule
    assert (followed.monitor, followed.mode) == ("val/acc", "max")


@pytest.mark.parametrize("name", ["plateau", "warmup_plateau"])
def test_schedule_configs_run_through_train(make_cfg, name: str) -> None:
    from lightning_tricks.train import train

    # trainer=debug: 3 steps and one validation per epoch; a patience of 0 and factor 0.5 make it act
    cfg = make_cfg(f"schedule={name}", "trainer.max_epochs=4", "test=false")
    key = "schedule.schedule" if name == "plateau" else "schedule.schedule.then"
    OmegaConf.update(cfg, f"{key}.patience", 0)
    OmegaConf.update(cfg, f"{key}.factor", 0.5)
    OmegaConf.update(cfg, f"{key}.threshold", 0.9)  # only a fall of val/loss by 90% counts as an improvement
    metrics, objects = train(cfg)
    callback = next(c for c in objects["callbacks"] if isinstance(c, LRSchedule))
    found = plateau_of(callback.schedule, callback.plan.total)
    assert found is not None
    plateau, start = found
    assert start == (0 if name == "plateau" else 1)  # 5% of 12 steps, rounded
    assert plateau.last_epoch == 4 and plateau.reductions >= 1 and math.isfinite(plateau.best)
    group = objects["trainer"].optimizers[0].param_groups[0]
    assert group["lr"] == plateau.lrs([group["initial_lr"]])[0] < group["initial_lr"]
