"""LR range test: the pure rule, the sweep on digits, exact restoration, applying the suggestion, configs."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import EndProcessGroup
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    Callback,
    LightningModule,
    MisconfigurationException,
    Trainer,
    seed_everything,
)
from lightning_tricks.callbacks import LinearScaling, LRRangeTest, LRSchedule
from lightning_tricks.callbacks.lr_range_test import lr_range_test
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.lr_range_test import (
    LossSmoother,
    RangeTestResult,
    diverged,
    smooth_losses,
    suggest_min_div10,
    suggest_steepest,
    sweep_lr,
)
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.schedules import OneCycle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# the pure rule
# ---------------------------------------------------------------------------------------------
def test_sweep_is_geometric_or_linear_between_the_bounds() -> None:
    exp = [sweep_lr(i, 9, 1e-6, 1e2) for i in range(9)]
    assert exp[0] == pytest.approx(1e-6) and exp[-1] == pytest.approx(1e2)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(exp, exp[1:]))
    lin = [sweep_lr(i, 5, 0.0 + 1e-3, 1.0, "linear") for i in range(5)]
    assert [b - a for a, b in zip(lin, lin[1:])] == pytest.approx([(1.0 - 1e-3) / 4] * 4)
    assert sweep_lr(3, 5, 1e-3, 1.0, "exponential") == pytest.approx(exp_at(3, 5, 1e-3, 1.0))


def exp_at(i: int, n: int, lo: float, hi: float) -> float:
    return lo * (hi / lo) ** (i / (n - 1))


def test_smoothing_is_a_bias_corrected_ema() -> None:
    rng = random.Random(0)
    losses = [2.0 + rng.random() for _ in range(50)]
    beta, avg = 0.9, 0.0
    expected = []
    for i, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        expected.append(avg / (1 - beta ** (i + 1)))
    assert smooth_losses(losses, beta) == pytest.approx(expected, rel=1e-12)
    assert smooth_losses([3.0, 1.0], 0.0) == [3.0, 1.0]
    assert LossSmoother(0.98).update(5.0) == pytest.approx(5.0)  # no start-up bias toward 0
    with pytest.raises(ValueError, match=r"smooth must be in \[0, 1\), got 1.0"):
        LossSmoother(1.0)


def test_divergence_rule() -> None:
    assert diverged(8.1, 2.0, 4.0) == (True, "smoothed loss 8.1 > 4 x best 2")
    assert diverged(7.9, 2.0, 4.0) == (False, "")
    assert diverged(100.0, 2.0, None) == (False, "")
    assert diverged(math.nan, 2.0, 4.0)[0] and diverged(math.inf, 2.0, None)[0]


def test_steepest_suggestion_on_a_known_curve() -> None:
    lrs = [sweep_lr(i, 101, 1e-5, 1e1) for i in range(101)]
    # loss falls fastest (in log lr) at lr = 1e-2, reaches its minimum at 1e-1 and then climbs
    losses = [2.0 - math.tanh(2 * (math.log10(lr) + 2)) + max(0.0, math.log10(lr) + 1) ** 2 * 5 for lr in lrs]
    i = suggest_steepest(lrs, losses, skip_begin=5, skip_end=1)
    assert lrs[i] == pytest.approx(1e-2, rel=0.15)
    low = min(range(101), key=losses.__getitem__)
    assert suggest_min_div10(lrs, losses) == pytest.approx(lrs[low] / 10)
    # non-finite points are ignored; the search never goes past the minimum
    noisy = losses[:]
    noisy[30] = math.nan
    noisy[-5:] = [math.inf] * 5
    assert suggest_steepest(lrs, noisy, 5, 1) == i
    assert suggest_steepest(lrs[:5], losses[:5], skip_begin=10) is None  # too few points
    result = RangeTestResult(lrs=lrs, losses=losses, skip_begin=5)
    assert result.suggestion == lrs[i] and result.suggest("min_div10") == result.suggestion_min_div10
    with pytest.raises(ValueError, match="method must be"):
        result.suggest("valley")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    lrs = [sweep_lr(i, 30, 1e-4, 1.0) for i in range(30)]
    result = RangeTestResult(lrs=lrs, losses=[2 - i / 20 for i in range(30)], raw_losses=[2.0] * 30, skip_begin=2)
    fig = result.plot(tmp_path / "sub" / "lr.png")
    assert (tmp_path / "sub" / "lr.png").read_bytes()[:8] == PNG_MAGIC
    assert fig.axes[0].get_xscale() == "log"


# ---------------------------------------------------------------------------------------------
# on digits
# ---------------------------------------------------------------------------------------------
def digits_module(lr: float = 0.05) -> Classifier:
    return Classifier(MLP((1, 8, 8), 10, hidden=(64,)), 10, {"name": "sgd", "lr": lr})


def test_function_form_on_digits_suggests_an_lr_where_the_loss_falls(tmp_path: Path) -> None:
    seed_everything(0)
    module = digits_module()
    before = copy.deepcopy(module.state_dict())
    dm = DigitsDataModule(batch_size=64, loader="resident")
    result = lr_range_test(
        module,
        dm,
        min_lr=1e-4,
        max_lr=10.0,
        num_steps=80,
        plot_path=tmp_path / "lr.png",
        trainer_kwargs={"accelerator": "cpu", "default_root_dir": tmp_path},
    )
    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) <= 80
    assert result.lrs[0] == pytest.approx(1e-4)
    # the band where the smoothed loss falls: from where it has dropped 5% below its start to its minimum
    s = result.losses
    start = next(i for i, v in enumerate(s) if v < 0.95 * s[0])
    low = min(range(len(s)), key=s.__getitem__)
    assert result.lrs[start] <= result.suggestion <= result.lrs[low]
    assert result.lrs[start] <= result.suggestion_min_div10 <= result.lrs[low]
    assert (tmp_path / "lr.png").read_bytes()[:8] == PNG_MAGIC
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights (and BN buffers) untouched
    # the suggestion trains: one epoch at it brings the loss well below its start
    module = digits_module(lr=result.suggestion)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    assert float(trainer.callback_metrics["train/loss_epoch"]) < 0.6 * result.raw_losses[0]


def test_stops_when_the_loss_diverges(tmp_path: Path) -> None:
    seed_everything(0)
    result = lr_range_test(
        digits_module(),
        DigitsDataModule(batch_size=64, loader="resident"),
        min_lr=1e-3,
        max_lr=1e4,
        num_steps=60,
        trainer_kwargs={"accelerator": "cpu"},
    )
    assert len(result.lrs) < 60
    assert result.stop_reason.startswith("stopped at lr")
    last, best = result.losses[-1], min(v for v in result.losses if math.isfinite(v))
    assert not math.isfinite(last) or last > 4 * best


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        self.first_step_lrs: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.first_step_lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)


class Snapshot(Callback):
    """At fit start: optionally step the optimizer a few times (so it has state), then copy everything."""

    def __init__(self, prime: bool) -> None:
        self.prime = prime
        self.state: dict[str, Any] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        opt = trainer.optimizers[0]
        if self.prime:
            for _ in range(3):
                pl_module.net(torch.randn(8, 4)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        self.state = {
            "model": copy.deepcopy(pl_module.state_dict()),
            "opt": copy.deepcopy(opt.state_dict()),
            "rng": torch.get_rng_state(),
            "step": trainer.global_step,
        }


def assert_same_tree(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def test_weights_optimizer_state_rng_and_loop_are_restored_bit_for_bit(tmp_path: Path) -> None:
    seed_everything(0)
    module = Tiny()
    before, after = Snapshot(prime=True), Snapshot(prime=False)
    finder = LRRangeTest(min_lr=1e-4, max_lr=1.0, num_steps=20, skip_begin=2, apply_to=None, plot_path=None)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=2,
        callbacks=[before, finder, after],
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert len(finder.result.lrs) == 20  # optimizer steps, not batches (40 batches were used)
    assert_same_tree(before.state, after.state)  # model, Adam state (step, exp_avg, ...), lr, RNG, step
    assert after.state["opt"]["state"]  # the optimizer did have state to restore
    assert trainer.global_step == 6  # the real fit then ran its own 12 batches / 2
    assert module.first_step_lrs[-6:] == [1e-2] * 6  # with the configured LR (apply_to=None)


def test_apply_to_lr_sets_the_base_lr_and_the_module_config(tmp_path: Path) -> None:
    seed_everything(0)
    module = digits_module()
    finder = LRRangeTest(min_lr=1e-4, max_lr=10.0, num_steps=60, apply_to="lr", plot_path="lr.png")
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[finder],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, loader="resident"))
    lr = finder.result.suggestion
    assert finder.applied_lr == lr and module.optimizer_config.lr == lr
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [lr, lr]  # decay and no_decay groups
    assert (tmp_path / "lr.png").read_bytes()[:8] == PNG_MAGIC  # relative to default_root_dir


def test_apply_to_one_cycle_sets_the_peak_of_the_schedule(tmp_path: Path) -> None:
    seed_everything(0)
    module = digits_module()
    one_cycle = OneCycle(pct_start=0.3)
    schedule = LRSchedule(one_cycle, momentum=one_cycle.momentum())
    finder = LRRangeTest(min_lr=1e-4, max_lr=10.0, num_steps=60, apply_to="one_cycle", plot_path=None)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[schedule, finder],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, loader="resident"))
    peak = finder.result.suggestion_min_div10
    assert finder.method == "min_div10" and finder.applied_lr == peak
    group = trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == peak  # LRSchedule's base LR = OneCycle's max LR
    assert group["lr"] == pytest.approx(peak * one_cycle(9, 10))


def test_configuration_errors(tmp_path: Path) -> None:
    def fit(callbacks: list) -> None:
        Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=tmp_path,
        ).fit(Tiny())

    with pytest.raises(MisconfigurationException, match="needs an LRSchedule callback with a OneCycle schedule"):
        fit([LRRangeTest(apply_to="one_cycle")])
    with pytest.raises(MisconfigurationException, match="LinearScaling both set the base LR"):
        fit([LRRangeTest(apply_to="lr"), LinearScaling(batch_size=8)])
    for kwargs, match in [
        ({"min_lr": 1.0, "max_lr": 0.1}, r"bounds reversed.*min_lr=1.0 >= max_lr=0.1"),
        ({"min_lr": -1e-3}, r"min_lr must be a positive finite number, got -0.001"),
        ({"num_steps": 1}, r"num_steps must be an int >= 2, got 1"),
        ({"mode": "cubic"}, r"mode must be one of .* got 'cubic'"),
        ({"smooth": 1.0}, r"smooth must be in \[0, 1\), got 1.0"),
        ({"diverge_threshold": 0.5}, r"diverge_threshold must be None or a number > 1, got 0.5"),
        ({"apply_to": "momentum"}, r"apply_to must be one of .* got 'momentum'"),
        ({"suggestion": "valley"}, r"suggestion must be one of .* got 'valley'"),
    ]:
        with pytest.raises(ValueError, match=match):
            LRRangeTest(**kwargs)


def test_lr_range_test_config_runs_with_the_one_cycle_recipe(make_cfg, tmp_path: Path) -> None:
    from lightning_tricks.train import train

    cfg = make_cfg(
        "+callbacks=lr_range_test",
        "schedule=one_cycle",
        "callbacks.lr_range_test.apply_to=one_cycle",
        "callbacks.lr_range_test.num_steps=30",
        "callbacks.lr_range_test.min_lr=1e-4",
        "test=false",
    )
    assert isinstance(instantiate(cfg.callbacks.lr_range_test), LRRangeTest)
    _, objects = train(cfg)
    finder = next(c for c in objects["callbacks"] if isinstance(c, LRRangeTest))
    assert finder.applied_lr is not None and finder.applied_lr == finder.result.suggestion_min_div10
    assert Path(finder.plot_file) == tmp_path / "lr_range_test.png" and Path(finder.plot_file).is_file()
    assert objects["trainer"].optimizers[0].param_groups[0]["initial_lr"] == finder.applied_lr


class RecordingRangeTest(LRRangeTest):
    """Writes what each DDP rank ended up with (DDP workers cannot hand objects back)."""

    def __init__(self, out_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        before = copy.deepcopy(pl_module.state_dict())
        super().on_fit_start(trainer, pl_module)
        same = all(torch.equal(before[k], v) for k, v in pl_module.state_dict().items())
        scaling = next(c for c in trainer.callbacks if isinstance(c, LinearScaling))
        torch.save(
            {
                "lrs": self.result.lrs,
                "losses": self.result.losses,
                "suggestion": self.result.suggestion,
                "same": same,
                "world": trainer.world_size,
                "factor": scaling.factor,
            },
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_ddp_ranks_share_one_curve_and_restore_their_weights(tmp_path: Path) -> None:
    finder = RecordingRangeTest(
        str(tmp_path), min_lr=1e-3, max_lr=1.0, num_steps=12, skip_begin=3, apply_to=None, plot_path=None
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LinearScaling(reference_batch_size=64), finder, EndProcessGroup()],
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["same"] and r1["same"]
    assert r0["lrs"] == r1["lrs"] and r0["losses"] == r1["losses"] and r0["suggestion"] == r1["suggestion"]
    assert len(r0["lrs"]) == 12
    assert r0["world"] == 2 and r0["factor"] == 0.25  # 8 per device x 2 devices / 64


def test_a_curve_that_never_fell_suggests_nothing():
    rising = RangeTestResult(lrs=[1e-1, 1.0, 10.0, 100.0], losses=[2.0, 2.5, 9.0, 40.0], skip_begin=0, skip_end=0)
    assert not rising.fell
    assert rising.suggestion is None and rising.suggestion_min_div10 is None
    flat = RangeTestResult(lrs=[1e-3, 1e-2, 1e-1], losses=[2.0, 1.995, 1.999], skip_begin=0, skip_end=0)
    assert not flat.fell and flat.suggest("min_div10") is None  # 0.25% is noise, not a fall
    falling = RangeTestResult(lrs=[1e-3, 1e-2, 1e-1], losses=[2.0, 1.5, 3.0], skip_begin=0, skip_end=0)
    assert falling.fell and falling.suggestion_min_div10 == pytest.approx(1e-3)


def test_range_test_from_a_diverging_start_leaves_the_lr(tmp_path):
    seed_everything(0)
    module = Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 0.05})
    finder = LRRangeTest(min_lr=1e4, max_lr=1e6, num_steps=20, skip_begin=0, apply_to="lr", suggestion="min_div10")
    trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[finder],
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="never fell below its first value"):
        trainer.fit(module, DigitsDataModule(batch_size=32, loader="resident"))
    assert finder.result is not None and not finder.result.fell
    assert finder.applied_lr is None
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05  # the configured LR stays


def test_sweep_record_ignores_the_first_points_for_the_best_loss_but_stops_on_a_non_finite_one() -> None:
    from lightning_tricks.lr_range_test import SweepRecord

    rec = SweepRecord(smooth=0.0, diverge_threshold=2.0, skip_begin=2)
    # points 1-2 are skipped: a low first loss must not become the best, so 1.5 later is no divergence
    assert rec.add(1e-4, 0.1) == (False, "")
    assert rec.add(1e-3, 1.0) == (False, "")
    assert rec.add(1e-2, 1.5) == (False, "")
    assert rec.best == 1.5
    assert rec.add(1e-1, 3.5) == (True, "smoothed loss 3.5 > 2 x best 1.5")
    early = SweepRecord(smooth=0.0, diverge_threshold=None, skip_begin=5)
    stop, reason = early.add(1e-4, math.inf)
    assert stop and reason == "loss is inf"
    assert early.lrs == [1e-4] and early.raw == [math.inf]
