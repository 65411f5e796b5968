"""One LR owner: LRSchedule is the only writer of the LR; SWA, SnapshotEnsemble, LinearScaling, the range
test and FreezeUnfreeze contribute through its plan (:class:`lightning_tricks.lr_plan.LRPlan`), in any
callback order. The plan's rules are tested first, without a Trainer.

Every LR here is read inside ``optimizer.step()``, after the closure (so after every hook that runs
before the update): the value the update uses.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import SWALR
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    MisconfigurationException,
    ModelCheckpoint,
    Trainer,
    seed_everything,
)
from lightning_tricks.averaging import swa_lr
from lightning_tricks.callbacks import (
    SWA,
    FreezeUnfreeze,
    LinearScaling,
    LRRangeTest,
    LRSchedule,
    SnapshotEnsemble,
)
from lightning_tricks.lr_plan import LRPlan
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.schedules import (
    Constant,
    Cosine,
    CosineRestarts,
    Step,
    SWALRPhase,
    Warmup,
)

BATCHES, EPOCHS = 4, 4  # 16 optimizer steps
T = BATCHES * EPOCHS


class RecordsLR:
    """Mixin: records every group's LR inside the torch optimizer's ``step()``, after the closure (training
    step, backward and every ``on_before_optimizer_step`` hook) ran, right before the update."""

    seen: list[list[float]]

    def on_train_start(self) -> None:
        super().on_train_start()  # type: ignore[misc]
        for opt in self.trainer.optimizers:  # type: ignore[attr-defined]
            if getattr(opt.step, "records_lr", False):
                continue
            update = opt.step

            def step(closure: Any = None, _opt: Any = opt, _update: Any = update) -> Any:
                loss = None
                if closure is not None:
                    with torch.enable_grad():
                        loss = closure()
                self.seen.append([float(g["lr"]) for g in _opt.param_groups])
                _update()
                return loss

            step.records_lr = True  # type: ignore[attr-defined]
            opt.step = step


class Tiny(RecordsLR, LightningModule):
    """Linear regression; one or two groups (the bias at a tenth of the LR); optionally a torch scheduler."""

    def __init__(self, lr: float = 0.1, two_groups: bool = False, scheduler: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.lr, self.two_groups, self.scheduler = lr, two_groups, scheduler
        self.batch_size = 4
        self.seen = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        params: Any = self.parameters()
        if self.two_groups:
            params = [{"params": [self.layer.weight]}, {"params": [self.layer.bias], "lr": self.lr / 10}]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        if self.scheduler:
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2)]  # stepped per epoch
        return opt

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4 * BATCHES, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class Net(RecordsLR, Classifier):
    """A small classifier with a ``backbone`` (for FreezeUnfreeze)."""

    def __init__(self) -> None:
        super().__init__(MLP((8,), 3, hidden=(16,)), 3, {"name": "sgd", "lr": 0.2, "momentum": 0.9})
        self.seen = []

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16 * BATCHES, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=16)


def trainer(tmp_path: Path, callbacks: list, **kwargs: Any) -> Trainer:
    opts = {
        "max_epochs": EPOCHS,
        "logger": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **opts,
    )


def owners(t: Trainer) -> list[LRSchedule]:
    return [c for c in t.callbacks if isinstance(c, LRSchedule)]


# -- the plan, without a Trainer -------------------------------------------------------------------
def _torch_lrs(make, base_lrs: list[float], steps: int) -> list[list[float]]:
    """The LR of each group at steps 0..steps-1 under a torch scheduler (stepped once per step)."""
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": b} for b in base_lrs])
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_plan_equals_torch_schedulers_for_every_group() -> None:
    from torch.optim import lr_scheduler as tl

    cases = [
        (Step(step_size=3, gamma=0.5), lambda o: tl.StepLR(o, step_size=3, gamma=0.5)),
        (Cosine(), lambda o: tl.CosineAnnealingLR(o, T_max=T)),
        (
            Warmup(steps=4, start_factor=0.1, then=Cosine()),
            lambda o: tl.SequentialLR(
                o,
                [tl.LinearLR(o, start_factor=0.1, total_iters=4), tl.CosineAnnealingLR(o, T_max=T - 4)],
                milestones=[4],
            ),
        ),
    ]
    for schedule, make in cases:
        plan = LRPlan(schedule)
        plan.start({0: [0.3, 0.03]}, T)
        want = _torch_lrs(make, [0.3, 0.03], T)
        for t in range(T):
            assert plan.lrs(t)[0] == pytest.approx(want[t], rel=1e-9, abs=1e-15), (schedule, t)


def test_plan_plateau_equals_reduce_lr_on_plateau_and_waits_for_the_warmup() -> None:
    from lightning_tricks.schedules import Plateau

    metrics = [1.0, 0.9, 0.95, 0.95, 0.97, 0.8, 0.85, 0.9, 0.99]
    plan = LRPlan(Warmup(steps=2, then=Plateau(factor=0.5, patience=1, min_lr=0.02)))
    plan.start({0: [0.1, 0.05]}, 100)
    assert plan.step_plateau(1, 0.1) is None  # in the warmup: not counted
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": b} for b in (0.1, 0.05)])
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=0.02)
    for k, m in enumerate(metrics):
        plan.step_plateau(2 + k, m)
        ref.step(m)
        assert plan.lrs(2 + k)[0] == [g["lr"] for g in opt.param_groups], k
    assert plan.plateau is not None and plan.plateau.reductions == 2  # after 0.95, 0.95 and 0.85, 0.9


def test_plan_phase_starts_from_the_scheduled_lr_and_stops_the_plateau() -> None:
    from lightning_tricks.schedules import Plateau

    sched = Cosine()
    plan = LRPlan(sched)
    plan.start({0: [0.1], 1: [0.2]}, 20)
    plan.add_phase("SWA", SWALRPhase(swa_lr=0.01, start_step=10, anneal="linear", anneal_steps=2))
    assert plan.lrs(9) == {0: [0.1 * sched(9, 20)], 1: [0.2 * sched(9, 20)]}
    assert plan.lrs(10)[1] == [pytest.approx(0.5 * 0.2 * sched(10, 20) + 0.5 * 0.01)]
    assert plan.lrs(15) == {0: [0.01], 1: [0.01]}
    with pytest.raises(ValueError, match="EMA and SWA both put an LR phase"):
        plan.add_phase("EMA", SWALRPhase(swa_lr=0.02, start_step=3))
    plateau = LRPlan(Plateau(patience=0, factor=0.5))
    plateau.start({0: [0.1]}, 20)
    plateau.add_phase("SWA", SWALRPhase(swa_lr=0.01, start_step=5))
    assert plateau.step_plateau(3, 1.0) is False and plateau.step_plateau(4, 2.0) is True
    assert plateau.step_plateau(5, 3.0) is None and plateau.plateau.reductions == 1  # the phase owns the tail


def test_plan_contribution_rules_and_base_changes() -> None:
    open_plan = LRPlan()  # no schedule of its own: a trick may set one, once
    open_plan.start({0: [0.1]}, 8)
    assert open_plan.lrs(5) == {0: [0.1]}
    cycles = CosineRestarts(T_0=4)
    open_plan.set_schedule("SnapshotEnsemble", cycles)
    assert open_plan.lrs(5) == {0: [0.1 * cycles(5, 8)]}
    with pytest.raises(ValueError, match="Other and SnapshotEnsemble both set the LR schedule"):
        open_plan.set_schedule("Other", Cosine())
    user = LRPlan(Cosine())
    with pytest.raises(ValueError, match="sets the LR schedule to .* but LRSchedule has its own schedule"):
        user.set_schedule("SnapshotEnsemble", cycles)
    user.set_schedule("SnapshotEnsemble", Cosine())  # exactly the user's: accepted
    user.start({0: [0.1, 0.01]}, 8)
    assert user.change_base(lambda i, j, x: x * 2) == [(0, 0, 0.1, 0.2), (0, 1, 0.01, 0.02)]
    user.add_groups(0, [0.005])
    assert user.lrs(0) == {0: [0.2, 0.02, 0.005]}
    assert not user.past_end(7) and user.past_end(8)
    with pytest.raises(ValueError, match="needs total_steps"):
        LRPlan(Warmup(steps=0.1)).start({0: [0.1]}, None)


def test_plan_state_round_trips_with_the_plateau() -> None:
    from lightning_tricks.schedules import Plateau

    plan = LRPlan(Plateau(patience=0, factor=0.5))
    plan.start({0: [0.1]}, 10)
    plan.change_base(lambda i, j, x: 0.4)
    for m in (1.0, 2.0, 3.0):
        plan.step_plateau(1, m)
    fresh = LRPlan(Plateau(patience=0, factor=0.5))
    fresh.start({0: [0.1]}, 10)
    assert fresh.load_state_dict(plan.state_dict()) == []
    assert fresh.lrs(3) == plan.lrs(3) == {0: [0.1]}
    assert fresh.load_state_dict({"base_lrs": {0: [1.0, 2.0]}, "total_steps": 12})[0].startswith("the checkpoint has 2")


# -- the pure phase against torch's SWALR -----------------------------------------------------------
@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("per", ["steps", "epochs", "constant"])
def test_swa_phase_equals_torch_swalr(anneal: str, per: str) -> None:
    lr0, target, start, per_epoch, length = 0.3, 0.02, 7, 3, 4
    kwargs = {"steps": {"anneal_steps": length}, "epochs": {"anneal_epochs": length}, "constant": {}}[per]
    phase = SWALRPhase(swa_lr=target, start_step=start, anneal=anneal, steps_per_epoch=per_epoch, **kwargs)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr0)
    ref = SWALR(opt, swa_lr=target, anneal_epochs=0 if per == "constant" else length, anneal_strategy=anneal)
    for t in range(start, start + 6 * per_epoch):
        # SWALR is stepped once per step (anneal_steps) or at each epoch start (anneal_epochs)
        if per != "epochs" or (t - start) % per_epoch == 0:
            ref.step()
        assert phase.lr(t, lr0) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0), t
        k, n = phase.count(t)
        assert phase.lr(t, lr0) == swa_lr(k, lr0, target, n, anneal)  # today's formula, bit for bit
    assert not phase.active(start - 1) and phase.active(start)
    with pytest.raises(ValueError, match="before the phase's start_step 7"):
        phase.lr(start - 1, lr0)


def test_swa_phase_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="swa_lr must be in \\(0.0, inf\\), got -1"):
        SWALRPhase(swa_lr=-1, start_step=0)
    with pytest.raises(ValueError, match="anneal_epochs=2 needs steps_per_epoch"):
        SWALRPhase(swa_lr=0.1, start_step=0, anneal_epochs=2)
    with pytest.raises(ValueError, match="not both"):
        SWALRPhase(swa_lr=0.1, start_step=0, anneal_epochs=2, anneal_steps=2, steps_per_epoch=1)
    with pytest.raises(ValueError, match="start_step must be an int >= 0, got -3"):
        SWALRPhase(swa_lr=0.1, start_step=-3)


# -- SWA + LRSchedule: the same LR in both orders ----------------------------------------------------
SCHEDULES = {
    "constant": Constant(),
    "warmup_cosine": Warmup(steps=2, then=Cosine(min_factor=0.1)),
    "step": Step(step_size=3, gamma=0.5),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize(
    "swa_kwargs",
    [{}, {"anneal_epochs": 1}, {"anneal_steps": 3, "anneal": "linear"}],
    ids=["constant", "anneal_epochs", "anneal_steps"],
)
def test_swa_lr_beside_lr_schedule_is_the_same_in_both_orders(tmp_path: Path, schedule: str, swa_kwargs: dict) -> None:
    sched = SCHEDULES[schedule]
    start = 2 * BATCHES  # SWA(start=2): the first step of epoch 2
    anneal = swa_kwargs.get("anneal", "cos")
    want = []
    for t in range(T):
        if t < start:
            want.append(0.1 * sched(t, T))
        else:
            k, n = (
                ((t - start) // BATCHES + 1, 1)
                if "anneal_epochs" in swa_kwargs
                else (t - start + 1, 3)
                if "anneal_steps" in swa_kwargs
                else (1, 0)
            )
            want.append(swa_lr(k, 0.1 * sched(start, T), 0.01, n, anneal))
    seen = {}
    for order in ("schedule-first", "swa-first"):
        callbacks = [LRSchedule(sched), SWA(start=2, swa_lr=0.01, **swa_kwargs)]
        if order == "swa-first":
            callbacks.reverse()
        module = Tiny(lr=0.1)
        t = trainer(tmp_path / order, callbacks)
        t.fit(module)
        assert len(owners(t)) == 1  # the user's LRSchedule is the owner: none was added
        seen[order] = [lrs[0] for lrs in module.seen]
    assert seen["schedule-first"] == seen["swa-first"] == want
    assert want[-1] == pytest.approx(0.01)


def test_swa_lr_needs_an_lr_schedule_and_a_subclass_counts_as_the_owner(tmp_path: Path) -> None:
    t = trainer(tmp_path / "alone", [SWA(start=2, swa_lr=0.01)])
    with pytest.raises(
        MisconfigurationException, match=r"SWA\(swa_lr=0\.01\) changes the learning rate .*LRSchedule\(\)"
    ):
        t.fit(Tiny(lr=0.1))
    assert t.global_step == 0 and not owners(t)  # refused, and no LRSchedule was added
    module = Tiny(lr=0.1)
    t = trainer(tmp_path / "owner", [SWA(start=2, swa_lr=0.01), LRSchedule()])
    t.fit(module)
    assert [lrs[0] for lrs in module.seen] == [0.1] * 8 + [0.01] * 8

    class MySchedule(LRSchedule):  # found with isinstance, not by class name
        pass

    module = Tiny(lr=0.1)
    mine = MySchedule(Cosine())
    t = trainer(tmp_path / "subclass", [SWA(start=2, swa_lr=0.01), mine])
    t.fit(module)
    assert owners(t) == [mine]
    assert [lrs[0] for lrs in module.seen] == [0.1 * Cosine()(s, T) for s in range(8)] + [0.01] * 8
    assert LRSchedule.of(t, "test") is mine


def test_swa_phase_applies_to_every_group_from_its_lr_at_the_start(tmp_path: Path) -> None:
    sched = Cosine()
    module = Tiny(lr=0.1, two_groups=True)
    trainer(tmp_path, [SWA(start=1, swa_lr=0.01, anneal_steps=4), LRSchedule(sched)]).fit(module)
    for t, (w, b) in enumerate(module.seen):
        if t < BATCHES:
            assert (w, b) == (0.1 * sched(t, T), 0.01 * sched(t, T))
        else:  # SWA's swa_lr is absolute: the same target for both groups
            assert (w, b) == (swa_lr(t - 3, 0.1 * sched(4, T), 0.01, 4), swa_lr(t - 3, 0.01 * sched(4, T), 0.01, 4))


# -- any other writer fails loudly -------------------------------------------------------------------
class ForeignWriter(Callback):
    """Sets the LR at step 2, in ``on_train_batch_start`` or in ``on_before_optimizer_step``."""

    def __init__(self, hook: str = "batch_start") -> None:
        self.hook = hook

    def _write(self, trainer: Trainer) -> None:
        if trainer.global_step == 2:
            trainer.optimizers[0].param_groups[0]["lr"] = 0.5

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.hook == "batch_start":
            self._write(trainer)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.hook == "before_step":
            self._write(trainer)


@pytest.mark.parametrize("order", ["writer-first", "writer-last"])
@pytest.mark.parametrize("owner", ["constant", "swa"])
@pytest.mark.parametrize("hook", ["batch_start", "before_step"])
def test_a_foreign_lr_writer_fails_fit_with_the_values(tmp_path: Path, order: str, owner: str, hook: str) -> None:
    ours = [LRSchedule(Constant())] if owner == "constant" else [LRSchedule(), SWA(start=3, swa_lr=0.01)]
    writer = ForeignWriter(hook)
    callbacks = [writer, *ours] if order == "writer-first" else [*ours, writer]
    module = Tiny(lr=0.1)
    t = trainer(tmp_path, callbacks)
    with pytest.raises(
        RuntimeError,
        match=r"optimizer 0 \(SGD\) group 0 has lr=0\.5 where it wrote 0\.1 for step 2: "
        r"something else set param_group\['lr'\]",
    ):
        t.fit(module)
    if hook == "before_step" and order == "writer-last":  # caught right after that update
        assert module.seen == [[0.1], [0.1], [0.5]] and t.global_step == 3
    else:  # caught before the update that would use it
        assert module.seen == [[0.1], [0.1]] and t.global_step == 2


# -- pairs that cannot compose: refused at fit start, one message naming both ------------------------
def test_refusals_name_both_and_come_before_the_first_step(tmp_path: Path) -> None:
    cases = [
        (
            [SnapshotEnsemble(cycles=2, evaluate=False), LRSchedule(Cosine())],
            Tiny(),
            ["SnapshotEnsemble(cycles=2, schedule=True)", "LRSchedule(Cosine("],
        ),
        (
            [LRSchedule(Constant()), LRSchedule(Cosine())],
            Tiny(),
            ["LRSchedule(Constant(factor=1.0))", "LRSchedule(Cosine(", "both drive optimizer 0"],
        ),
        ([SWA(start=2, swa_lr=0.01)], Tiny(), ["SWA(swa_lr=0.01)", "LRSchedule()"]),
        (
            [SnapshotEnsemble(cycles=2, evaluate=False)],
            Tiny(),
            ["SnapshotEnsemble(cycles=2, schedule=True)", "LRSchedule()"],
        ),
        ([LRSchedule(), SWA(start=2, swa_lr=0.01)], Tiny(scheduler=True), ["LRSchedule()", "StepLR"]),
        ([LRSchedule(Constant())], Tiny(scheduler=True), ["LRSchedule(Constant(factor=1.0))", "StepLR"]),
    ]
    for callbacks, module, names in cases:
        for order in (callbacks, callbacks[::-1]):
            t = trainer(tmp_path, list(order))
            with pytest.raises(MisconfigurationException) as info:
                t.fit(module)
            message = str(info.value)
            assert all(n in message for n in names), (names, message)
            assert t.global_step == 0 and module.seen == []


def test_snapshot_cycles_compose_with_an_lr_schedule_of_exactly_those_cycles(tmp_path: Path) -> None:
    cosine = CosineRestarts(T_0=8, T_mult=1, min_factor=0.0)  # 2 cycles of 16 steps
    for order in ("snapshot-first", "schedule-first"):
        callbacks = [SnapshotEnsemble(cycles=2, evaluate=False), LRSchedule(cosine)]
        if order == "schedule-first":
            callbacks.reverse()
        module = Tiny(lr=0.1)
        t = trainer(tmp_path / order, callbacks)
        t.fit(module)
        assert [lrs[0] for lrs in module.seen] == [0.1 * cosine(s, T) for s in range(T)]
        assert len(callbacks[0].snapshots if order == "snapshot-first" else callbacks[1].snapshots) == 2


# -- contributions keep the LRs they gave before ------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_snapshot_cycles_through_the_owner_give_huang_lrs(tmp_path: Path, accumulate: int) -> None:
    module = Tiny(lr=0.1, two_groups=True)
    snap = SnapshotEnsemble(cycles=2, evaluate=False)
    t = trainer(tmp_path, [snap, LRSchedule()], accumulate_grad_batches=accumulate)
    t.fit(module)
    total = T // accumulate
    cosine = CosineRestarts(T_0=math.ceil(total / 2), T_mult=1, min_factor=0.0)
    assert module.seen == [[0.1 * cosine(s, total), 0.01 * cosine(s, total)] for s in range(total)]
    assert snap.steps == [total // 2, total] and len(snap.snapshots) == 2
    assert "base_lrs" not in snap.state_dict()  # the owner keeps them


@pytest.mark.parametrize("order", ["scaling-first", "schedule-first"])
def test_linear_scaling_scales_the_owner_base_lrs(tmp_path: Path, order: str) -> None:
    sched = Warmup(steps=2, then=Cosine())
    callbacks = [LinearScaling(reference_batch_size=2), LRSchedule(sched)]
    if order == "schedule-first":
        callbacks.reverse()
    module = Tiny(lr=0.1, two_groups=True)
    t = trainer(tmp_path, callbacks)
    t.fit(module)
    factor = 4 / 2
    assert module.seen == [[0.1 * factor * sched(s, T), 0.01 * factor * sched(s, T)] for s in range(T)]
    # alone: the scaled LR is the optimizer's starting LR and holds (no LRSchedule needed); with the module's
    # own scheduler that scheduler owns the LR and its base_lrs are scaled
    module = Tiny(lr=0.1)
    t = trainer(tmp_path, [LinearScaling(reference_batch_size=2)])
    t.fit(module)
    assert [lrs[0] for lrs in module.seen] == [0.1 * factor] * T and not owners(t)
    module = Tiny(lr=0.1, scheduler=True)
    t = trainer(tmp_path, [LinearScaling(reference_batch_size=2)])
    with pytest.warns(UserWarning, match="scaled the base LRs of the module's StepLR"):
        t.fit(module)
    assert [lrs[0] for lrs in module.seen] == pytest.approx(
        [0.2 * 0.1 ** (s // (2 * BATCHES)) for s in range(T)], rel=1e-12
    )


def test_range_test_hands_off_base_lrs_through_the_owner(tmp_path: Path) -> None:
    sched = Cosine()
    finder = LRRangeTest(min_lr=1e-4, max_lr=1.0, num_steps=6, skip_begin=0, skip_end=0, plot_path=None, apply_to="lr")
    module = Tiny(lr=0.1, two_groups=True)
    t = trainer(tmp_path, [LRSchedule(sched), finder])
    t.fit(module)
    lr = finder.applied_lr
    assert lr is not None and lr != 0.1
    ratio = 0.01 / 0.1  # the groups keep their ratio to the first
    # (the sweep's own steps, run and undone before training, come first in module.seen)
    assert module.seen[-T:] == [[lr * sched(s, T), lr * ratio * sched(s, T)] for s in range(T)]
    # alone: the applied LR is the optimizer's starting LR and holds
    finder = LRRangeTest(min_lr=1e-4, max_lr=1.0, num_steps=6, skip_begin=0, skip_end=0, plot_path=None)
    module = Tiny(lr=0.1)
    t = trainer(tmp_path, [finder])
    t.fit(module)
    assert not owners(t) and [lrs[0] for lrs in module.seen][-T:] == [finder.applied_lr] * T


def test_unfrozen_groups_join_the_schedule_at_their_base_lr(tmp_path: Path) -> None:
    sched = Cosine()
    module = Net()
    t = trainer(tmp_path, [FreezeUnfreeze(backbone="backbone", unfreeze_at_epoch=2, lr_factor=0.1), LRSchedule(sched)])
    t.fit(module)
    assert all(len(lrs) == len(module.seen[0]) for lrs in module.seen[:8])
    heads = len(module.seen[0])
    for s, lrs in enumerate(module.seen):
        assert lrs[:heads] == [0.2 * sched(s, T)] * heads
        if s >= 8:  # the backbone groups: head base LR x lr_factor, on the same schedule
            assert len(lrs) > heads and lrs[heads:] == [0.2 * 0.1 * sched(s, T)] * (len(lrs) - heads)
    assert all("initial_lr" in g for g in t.optimizers[0].param_groups)


# -- resume: the SWA phase continues exactly ----------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*dirpath has changed.*")
def test_the_swa_phase_resumes_exactly(tmp_path: Path) -> None:
    def run(ckpt_path: Any, lr: float, where: Path) -> tuple[Trainer, Tiny]:
        seed_everything(0)
        module = Tiny(lr=lr)
        ckpt = ModelCheckpoint(dirpath=where, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        callbacks = [SWA(start=2, swa_lr=0.01, anneal_steps=3), LRSchedule(), ckpt]
        t = trainer(where, callbacks, enable_checkpointing=True)
        t.fit(module, ckpt_path=ckpt_path)
        return t, module

    full_t, full = run(None, 0.1, tmp_path / "a")
    checkpoint = torch.load(tmp_path / "a" / "epoch=0.ckpt", weights_only=False)
    owner = owners(full_t)[0]
    assert checkpoint["callbacks"][owner.state_key]["base_lrs"] == {0: [0.1]}
    resumed_t, resumed = run(str(tmp_path / "a" / "epoch=0.ckpt"), 0.1, tmp_path / "b")
    assert resumed.seen == full.seen[BATCHES:]
    assert owners(resumed_t)[0].state_dict() == owner.state_dict()
    for name, w in full.state_dict().items():
        assert torch.equal(w, resumed.state_dict()[name]), name
