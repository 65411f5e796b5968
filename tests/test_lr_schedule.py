"""LRSchedule in a Trainer: optimizer-step counting, accumulation, momentum, logging, resume, configs."""

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
    LearningRateMonitor,
    LightningModule,
    Logger,
    MisconfigurationException,
    ModelCheckpoint,
    Trainer,
    seed_everything,
)
from lightning_tricks.callbacks import LRSchedule
from lightning_tricks.schedules import Constant, Cosine, OneCycle, Step, Warmup

CONF = Path(__file__).resolve().parents[1] / "conf"


class Tiny(LightningModule):
    """A linear regression over 10 batches of 4 that records the LR it trains with."""

    def __init__(
        self, optimizer: str = "sgd", lr: float = 0.1, with_scheduler: bool = False, two_groups: bool = False
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.optimizer_name, self.lr, self.with_scheduler, self.two_groups = optimizer, lr, with_scheduler, two_groups
        self.at_step: list[tuple[int, float, float | None]] = []  # (global_step, lr, momentum) at each update
        self.in_forward: list[tuple[int, float]] = []  # (global_step, lr) seen by training_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.in_forward.append((self.trainer.global_step, self.trainer.optimizers[0].param_groups[0]["lr"]))
        return F.mse_loss(self.layer(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # module hooks run after callback hooks: this is what the update uses
        g = optimizer.param_groups[0]
        mom = g["betas"][0] if "betas" in g else g.get("momentum")
        self.at_step.append((self.trainer.global_step, g["lr"], mom))

    def configure_optimizers(self) -> Any:
        params: Any = self.parameters()
        if self.two_groups:
            params = [
                {"params": [self.layer.weight], "name": "weights"},
                {"params": [self.layer.bias], "name": "bias", "lr": self.lr / 10},
            ]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr)
        else:
            opt = torch.optim.Adagrad(params, lr=self.lr)
        if self.with_scheduler:
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5)]
        return opt

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class ListLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))


def tiny_trainer(tmp_path: Path, callbacks: list, **kwargs: Any) -> Trainer:
    kwargs = {"max_epochs": 2, "logger": False, "enable_checkpointing": False, **kwargs}
    return Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_lr_follows_optimizer_steps_with_gradient_accumulation(tmp_path: Path) -> None:
    sched = Warmup(steps=2, then=Cosine(min_factor=0.1))
    module = Tiny(lr=0.1)
    callback = LRSchedule(sched)
    tiny_trainer(tmp_path, [callback], accumulate_grad_batches=3).fit(module)
    total = 8  # 2 epochs x ceil(10 batches / 3)
    assert callback.plan.total == total and callback.plan.lrs(3) == {0: [pytest.approx(0.1 * sched(3, total))]}
    expected = [0.1 * sched(t, total) for t in range(total)]
    assert [s for s, _, _ in module.at_step] == list(range(total))
    assert [lr for _, lr, _ in module.at_step] == pytest.approx(expected, abs=1e-12)
    assert module.at_step[0][1] == 0.0  # step 0 already uses the schedule's first value
    # every batch of an accumulation window trains under the LR of the step it contributes to
    assert len(module.in_forward) == 20
    for (step, lr), b in zip(module.in_forward, range(20)):
        epoch, i = divmod(b, 10)
        assert step == epoch * 4 + i // 3
        assert lr == pytest.approx(expected[step], abs=1e-12)


def test_lr_monitor_sees_the_lr_of_the_coming_step_in_any_callback_order(tmp_path: Path) -> None:
    sched = Warmup(steps=3, then=Step(step_size=2, gamma=0.5))
    for monitor_first in (True, False):
        logger = ListLogger()
        callbacks = [LearningRateMonitor(logging_interval="step"), LRSchedule(sched, log=False)]
        if not monitor_first:
            callbacks.reverse()
        module = Tiny(lr=0.4)
        tiny_trainer(tmp_path, callbacks, max_epochs=1, logger=logger, log_every_n_steps=1).fit(module)
        monitored = [m["lr-SGD"] for _, m in logger.rows if "lr-SGD" in m]
        assert monitored == pytest.approx([0.4 * sched(t, 10) for t in range(10)], abs=1e-12)


def test_momentum_schedule_sets_sgd_momentum_and_adam_beta1(tmp_path: Path) -> None:
    oc = OneCycle(pct_start=0.25)
    for name in ("sgd", "adam"):
        module = Tiny(optimizer=name, lr=0.2)
        tiny_trainer(tmp_path, [LRSchedule(oc, momentum=oc.momentum(0.8, 0.95))], max_epochs=1).fit(module)
        assert [lr for _, lr, _ in module.at_step] == pytest.approx([0.2 * oc(t, 10) for t in range(10)], abs=1e-12)
        assert [m for _, _, m in module.at_step] == pytest.approx(
            [oc.momentum(0.8, 0.95)(t, 10) for t in range(10)], abs=1e-12
        )


def test_logs_the_lr_it_sets_per_step_and_per_group(tmp_path: Path) -> None:
    logger = ListLogger()
    sched = Step(step_size=3, gamma=0.5)
    module = Tiny(lr=0.4)
    trainer = tiny_trainer(
        tmp_path, [LRSchedule(sched, momentum=Constant(0.5))], max_epochs=1, logger=logger, log_every_n_steps=1
    )
    trainer.fit(module)
    logged = {step: m["lr"] for step, m in logger.rows if "lr" in m}
    # logged under the index of the step that used it
    assert [logged[t] for t in range(10)] == pytest.approx([0.4 * sched(t, 10) for t in range(10)], abs=1e-7)
    assert float(trainer.callback_metrics["momentum"]) == 0.5
    # groups with different base LRs are logged one by one, under their names
    module = Tiny(lr=0.4, two_groups=True)
    trainer = tiny_trainer(tmp_path, [LRSchedule(sched)], max_epochs=1, log_every_n_steps=1)
    trainer.fit(module)
    assert float(trainer.callback_metrics["lr/weights"]) == pytest.approx(0.4 * sched(9, 10))
    assert float(trainer.callback_metrics["lr/bias"]) == pytest.approx(0.04 * sched(9, 10))
    assert trainer.optimizers[0].param_groups[1]["initial_lr"] == pytest.approx(0.04)


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.filterwarnings("ignore:.*ended before the epoch ended.*")
def test_resume_from_a_mid_run_checkpoint_continues_the_same_lr_curve(tmp_path: Path) -> None:
    seed_everything(0)
    oc = OneCycle(pct_start=0.3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full = Tiny(lr=0.3)
    cb = LRSchedule(oc, momentum=oc.momentum())
    tiny_trainer(tmp_path, [cb, ckpt], enable_checkpointing=True).fit(full)
    assert len(full.at_step) == 20
    state = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)["callbacks"][cb.state_key]
    # plateau: the state of a Plateau schedule (tests/test_plateau.py); steps: per-optimizer counts (manual)
    assert state == {"base_lrs": {0: [0.3]}, "total_steps": 20, "plateau": None, "steps": None}

    # a fresh module whose optimizer starts at another LR: the checkpoint decides
    resumed = Tiny(lr=0.9)
    trainer = tiny_trainer(tmp_path, [LRSchedule(oc, momentum=oc.momentum())])
    trainer.fit(resumed, ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert [s for s, _, _ in resumed.at_step] == list(range(4, 20))
    assert resumed.at_step == full.at_step[4:]  # exactly equal, LR and momentum


def test_groups_added_during_training_join_the_schedule(tmp_path: Path) -> None:
    class Unfreezes(Tiny):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([self.layer.weight], lr=self.lr)

        def on_train_epoch_start(self) -> None:
            if self.current_epoch == 1:  # e.g. unfreezing a backbone with a lower LR
                self.trainer.optimizers[0].add_param_group({"params": [self.layer.bias], "lr": 0.01})

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            self.at_step.append((self.trainer.global_step, *[g["lr"] for g in optimizer.param_groups]))

    sched = Cosine()
    module = Unfreezes(lr=0.1)
    trainer = tiny_trainer(tmp_path, [LRSchedule(sched)], log_every_n_steps=1)
    trainer.fit(module)
    assert module.at_step[9] == (9, pytest.approx(0.1 * sched(9, 20)))
    assert module.at_step[12] == (12, pytest.approx(0.1 * sched(12, 20)), pytest.approx(0.01 * sched(12, 20)))
    assert float(trainer.callback_metrics["lr/pg1"]) == pytest.approx(0.01 * sched(19, 20))


def test_refuses_a_module_that_returns_its_own_scheduler(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, [LRSchedule(Cosine())])
    with pytest.raises(MisconfigurationException, match="module's own LR scheduler StepLR would both set the LR"):
        trainer.fit(Tiny(with_scheduler=True))


def test_trainer_dependent_errors_name_the_problem(tmp_path: Path) -> None:
    match = r"warmup steps=50 \(50 steps\) must be shorter than the run \(total_steps=20\)"
    with pytest.raises(ValueError, match=match):
        tiny_trainer(tmp_path, [LRSchedule(Warmup(steps=50, then=Cosine()))]).fit(Tiny())
    with pytest.raises(ValueError, match=r"pass LRSchedule\(total_steps=...\)"):
        tiny_trainer(tmp_path, [LRSchedule(Cosine())], max_epochs=-1, max_steps=-1).fit(Tiny())
    with pytest.raises(MisconfigurationException, match="has neither 'momentum' nor 'betas'"):
        tiny_trainer(tmp_path, [LRSchedule(Cosine(), momentum=Constant(0.9))]).fit(Tiny(optimizer="adagrad"))
    # an explicit run length wins over the Trainer's estimate
    module = Tiny()
    tiny_trainer(tmp_path, [LRSchedule(Cosine(), total_steps=40)], max_epochs=1).fit(module)
    assert module.at_step[-1][1] == pytest.approx(0.1 * Cosine()(9, 40))


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="schedule must be None or callable"):
        LRSchedule("cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total_steps must be an int >= 1 or None, got 0"):
        LRSchedule(Cosine(), total_steps=0)
    with pytest.raises(ValueError, match=r"optimizers must be .* got -1"):
        LRSchedule(Cosine(), optimizers=-1)
    assert LRSchedule(Cosine()).state_key != LRSchedule(Cosine(min_factor=0.1)).state_key


# ---------------------------------------------------------------------------------------------
# configs: every conf/schedule/*.yaml composes and instantiates into a working LRSchedule
# ---------------------------------------------------------------------------------------------
SCHEDULE_CONFIGS = sorted(p.stem for p in (CONF / "schedule").glob("*.yaml"))


def test_every_schedule_has_a_config() -> None:
    wanted = {
        "constant",
        "step",
        "multistep",
        "exponential",
        "inverse",
        "poly",
        "sigmoid",
        "cosine",
        "cosine_restarts",
        "cyclic",
        "one_cycle",
        "linear",
        "warmup",
        "warmup_cosine",
        "plateau",
        "warmup_plateau",
    }
    assert wanted <= set(SCHEDULE_CONFIGS)


@pytest.mark.parametrize("name", SCHEDULE_CONFIGS)
def test_schedule_config_composes_and_instantiates(name: str) -> None:
    from conftest import compose_train

    cfg = compose_train([f"schedule={name}"])
    if name == "none":  # no LRSchedule (tricks that change the LR during fit then refuse: tests/test_lr_owner.py)
        assert not cfg.get("schedule")
        return
    callback = instantiate(cfg.schedule)
    assert isinstance(callback, LRSchedule)
    if name == "constant":  # no schedule of its own: the base LR, open to a contributed schedule
        assert callback.schedule is None and callback.plan.factor(500) == 1.0
        return
    total = 1000
    callback.schedule.check(total)
    curve = callback.schedule.curve(total)
    assert all(math.isfinite(v) and v >= 0 for v in curve)
    if callback.momentum is not None:
        moms = callback.momentum.curve(total)
        assert all(0 <= m < 1 for m in moms)
        assert moms[int(curve.index(max(curve)))] == min(moms)  # momentum lowest where the LR peaks


def test_warmup_cosine_recipe_runs_through_train(make_cfg) -> None:
    from lightning_tricks.train import train

    metrics, objects = train(make_cfg("schedule=warmup_cosine", "trainer.max_epochs=2", "test=false"))
    callback = next(c for c in objects["callbacks"] if isinstance(c, LRSchedule))
    trainer = objects["trainer"]
    assert callback.plan.total == trainer.global_step == 6
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(group["initial_lr"] * callback.schedule(6, 6))  # the next step's LR


@pytest.mark.parametrize("log", [True, False])
def test_log_switch_and_log_every_n_steps(log, tmp_path):
    """``log=False`` logs nothing (Lightning's ``callback.log = module.log`` must not turn it back on);
    ``log=True`` logs on the steps the loggers write, every ``log_every_n_steps``."""
    from lightning_tricks._lightning import Callback, Trainer, seed_everything
    from lightning_tricks.callbacks import LRSchedule
    from lightning_tricks.data import DigitsDataModule
    from lightning_tricks.mixins import Classifier
    from lightning_tricks.models import MLP
    from lightning_tricks.schedules import Cosine

    class Seen(Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "lr" in trainer.callback_metrics and trainer.callback_metrics["lr"] == pl_module_lr(trainer):
                self.steps.append(trainer.global_step)

    def pl_module_lr(trainer):  # the LR the step just taken used: the schedule at global_step - 1
        return schedule.plan.lrs(trainer.global_step - 1)[0][0]

    seed_everything(0)
    schedule = LRSchedule(Cosine(), log=log)
    seen = Seen()
    trainer = Trainer(
        max_steps=12,
        log_every_n_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[schedule, seen],
        default_root_dir=tmp_path,
    )
    trainer.fit(
        Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 0.1}),
        DigitsDataModule(batch_size=32, loader="resident"),
    )
    assert seen.steps == ([4, 8, 12] if log else [])
