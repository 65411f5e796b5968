"""The recipe's pure cores, without a Trainer: the fine-search region and its samples, the diagnosis of curves."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lightning_tricks.recipe import (
    ADVICE,
    DiagnoseThresholds,
    FineRegion,
    diagnose,
    fine_region,
    sample_fine,
)

# ----------------------------------------------------------------------------------------------
# fine search: the region spanned by the best coarse runs, widened on a log scale
# ----------------------------------------------------------------------------------------------
COARSE = [
    {"lr": 0.001, "weight_decay": 1e-5, "val/acc": 0.50, "val/loss": 1.5},
    {"lr": 0.01, "weight_decay": 1e-4, "val/acc": 0.90, "val/loss": 0.4},
    {"lr": 0.1, "weight_decay": 1e-3, "val/acc": 0.95, "val/loss": 0.3},
    {"lr": 1.0, "weight_decay": 1e-4, "val/acc": 0.80, "val/loss": 0.2},
    {"lr": 10.0, "weight_decay": 0.0, "val/acc": -math.inf, "val/loss": math.nan},  # diverged
]


def test_fine_region_spans_the_top_k_coarse_runs_widened_by_the_factor():
    region = fine_region(COARSE, "val/acc", "max", top_k=3, factor=2.0)
    # top 3 by val/acc: (0.1, 1e-3) 0.95, (0.01, 1e-4) 0.90, (1.0, 1e-4) 0.80
    assert [r["lr"] for r in region.top] == [0.1, 0.01, 1.0]
    assert region.lr == (0.01 / 2.0, 1.0 * 2.0)
    assert region.weight_decay == (1e-4 / 2.0, 1e-3 * 2.0)
    one = fine_region(COARSE, "val/acc", "max", top_k=1, factor=3.0)
    assert one.lr == (0.1 / 3.0, 0.1 * 3.0) and one.weight_decay == (1e-3 / 3.0, 1e-3 * 3.0)


def test_fine_region_ranks_by_the_monitor_mode_and_skips_diverged_runs():
    low = fine_region(COARSE, "val/loss", "min", top_k=2, factor=2.0)  # best: 0.2 (lr 1.0), 0.3 (lr 0.1)
    assert [r["lr"] for r in low.top] == [1.0, 0.1] and low.lr == (0.1 / 2.0, 1.0 * 2.0)
    everything = fine_region(COARSE, "val/acc", "max", top_k=10, factor=2.0)  # 4 finite rows, not the diverged one
    assert len(everything.top) == 4 and everything.lr == (0.001 / 2.0, 1.0 * 2.0)
    assert everything.weight_decay == (1e-5 / 2.0, 1e-3 * 2.0)


def test_fine_region_with_zero_weight_decay():
    zeros = [{"lr": 0.1, "weight_decay": 0.0, "acc": 0.9}, {"lr": 0.3, "weight_decay": 0.0, "acc": 0.8}]
    region = fine_region(zeros, "acc", top_k=2, factor=2.0)
    assert region.weight_decay == (0.0, 0.0)  # zero has no log scale: it stays 0
    assert all(wd == 0.0 for _, wd in sample_fine(region, 20, seed=0))
    mixed = [*zeros, {"lr": 0.2, "weight_decay": 1e-3, "acc": 0.85}]
    assert fine_region(mixed, "acc", top_k=3, factor=2.0).weight_decay == (1e-3 / 2.0, 1e-3 * 2.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 1.0}, "factor must be > 1, got 1.0"),
        ({"factor": 0.5}, "factor must be > 1, got 0.5"),
        ({"top_k": 0}, "top_k must be an int >= 1, got 0"),
        ({"mode": "maximum"}, "mode must be one of"),
    ],
)
def test_fine_region_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fine_region(COARSE, "val/acc", **kwargs)


def test_fine_region_needs_a_finite_coarse_run():
    with pytest.raises(ValueError, match="no coarse run has a finite val/acc"):
        fine_region([COARSE[-1]], "val/acc")


def test_sample_fine_is_the_log_uniform_formula_with_a_seeded_generator():
    region = FineRegion(lr=(0.005, 2.0), weight_decay=(5e-5, 2e-3))
    u = torch.rand(6, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64).tolist()

    def expected(v: float, low: float, high: float) -> float:
        x = math.exp(math.log(low) + v * (math.log(high) - math.log(low)))
        return min(max(float(f"{x:.3g}"), low), high)

    want = [(expected(a, *region.lr), expected(b, *region.weight_decay)) for a, b in u]
    assert sample_fine(region, 6, seed=7) == want  # rounded to 3 significant digits: equal


def test_sample_fine_stays_in_the_region_and_is_reproducible():
    region = fine_region(COARSE, "val/acc", "max", top_k=3, factor=2.0)
    state = torch.random.get_rng_state()
    samples = sample_fine(region, 500, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not touched
    lo, hi = region.lr
    wlo, whi = region.weight_decay
    assert all(lo <= lr <= hi and wlo <= wd <= whi for lr, wd in samples)
    assert min(lr for lr, _ in samples) < lo * 1.1 and max(lr for lr, _ in samples) > hi / 1.1  # fills the box
    assert sample_fine(region, 500, seed=3) == samples
    assert sample_fine(region, 500, seed=4) != samples
    # the LR draws do not depend on whether weight decay is searched
    fixed = FineRegion(region.lr, (0.0, 0.0))
    assert [lr for lr, _ in sample_fine(fixed, 500, seed=3)] == [lr for lr, _ in samples]


def test_sample_fine_rounding_never_leaves_the_region():
    # every draw rounds to 0.0123 (3 significant digits), below the box: it is kept at the box's edge
    region = FineRegion(lr=(0.0123451, 0.0123459), weight_decay=(0.0123451, 0.0123459))
    assert sample_fine(region, 5, seed=0) == [(0.0123451, 0.0123451)] * 5


def test_sample_fine_is_uniform_in_log_lr():
    samples = sample_fine(FineRegion(lr=(1e-4, 1.0), weight_decay=(0.0, 0.0)), 4000, seed=0)
    logs = [math.log10(lr) for lr, _ in samples]
    for decade in range(-4, 0):  # a quarter of the draws in each decade
        share = sum(decade <= v < decade + 1 for v in logs) / len(logs)
        assert abs(share - 0.25) < 0.03, (decade, share)


def test_sample_fine_refuses_bad_arguments():
    region = FineRegion(lr=(0.01, 0.1), weight_decay=(0.0, 0.0))
    with pytest.raises(ValueError, match="trials must be an int >= 1, got 0"):
        sample_fine(region, 0, seed=0)
    with pytest.raises(ValueError, match=r"region.lr must be 0 < low <= high"):
        sample_fine(FineRegion(lr=(0.0, 0.1), weight_decay=(0.0, 0.0)), 2, seed=0)


# ----------------------------------------------------------------------------------------------
# diagnosis of a run's curves
# ----------------------------------------------------------------------------------------------
def curves(train_loss, val_loss, train_acc=None, val_acc=None):
    out = {"train/loss": train_loss, "val/loss": val_loss}
    if train_acc is not None:
        out["train/acc"], out["val/acc"] = train_acc, val_acc
    return out


TRAIN_LOSS = [1.0, 0.5, 0.2, 0.1, 0.05, 0.05]  # six epochs: the rules read means of the last w = 3


def test_overfitting_by_the_accuracy_gap():
    d = diagnose(curves(TRAIN_LOSS, [0.5] * 6, [0.6, 0.8, 0.9, 1.0, 1.0, 1.0], [0.6, 0.75, 0.85, 0.875, 0.875, 0.875]))
    assert d.verdict == "overfitting" and d.epochs == 6 and d.numbers["window"] == 3
    assert d.numbers["train_acc"] == 1.0 and d.numbers["val_acc"] == 0.875 and d.numbers["acc_gap"] == 0.125
    assert d.numbers["train_loss"] == pytest.approx((0.1 + 0.05 + 0.05) / 3)
    assert d.numbers["loss_gap"] == pytest.approx(0.5 - (0.1 + 0.05 + 0.05) / 3)
    assert d.numbers["val_rise"] == 0.0 and d.numbers["val_fall"] == 0.0
    assert d.signals == ("train acc 1.0000 - val acc 0.8750 = 12.5 pp > 5 pp",)
    assert d.reason == d.signals[0] + " [means of the last 3 epochs]" and d.advice == ADVICE["overfitting"]


def test_overfitting_when_the_validation_loss_rose_from_its_lowest():
    # 3-epoch means of the val loss: 0.6667, 0.4667, 0.4167 (epochs 3-5, the lowest), 0.4833 (the end)
    val_loss = [1.0, 0.6, 0.4, 0.4, 0.45, 0.6]
    d = diagnose(curves(TRAIN_LOSS, val_loss, [0.5, 0.8, 0.9, 0.93, 0.95, 0.95], [0.5, 0.8, 0.9, 0.92, 0.93, 0.93]))
    assert d.verdict == "overfitting" and len(d.signals) == 1  # no "still falling": the end is not the lowest
    assert d.numbers["min_val_loss"] == pytest.approx(1.25 / 3) and d.numbers["min_val_loss_epoch"] == 5
    assert d.numbers["val_rise"] == pytest.approx(1.45 / 1.25 - 1) and d.numbers["acc_gap"] == pytest.approx(0.05 / 3)
    assert (
        d.reason
        == "val loss 0.4833 ended 16.0% above its lowest 0.4167 (epochs 3-5) > 10.0% [means of the last 3 epochs]"
    )
    assert "stop there (trainer.max_epochs=5)" in d.advice


def test_one_noisy_epoch_does_not_decide():
    val_loss = [1.0, 0.5, 0.3, 0.3, 0.3, 0.36]  # the last epoch alone is 20% above the lowest
    acc = [0.9, 0.95, 0.97, 0.98, 0.98, 0.98]
    d = diagnose(curves(TRAIN_LOSS, val_loss, acc, acc))
    assert d.verdict == "fine" and d.numbers["val_rise"] == pytest.approx(0.96 / 0.9 - 1)  # 6.7% on 3-epoch means
    pointwise = diagnose(curves(TRAIN_LOSS, val_loss, acc, acc), DiagnoseThresholds(tail=1))
    assert pointwise.verdict == "overfitting" and pointwise.numbers["val_rise"] == pytest.approx(0.2)


def test_underfitting_when_the_model_does_not_fit_its_training_data():
    d = diagnose(curves(TRAIN_LOSS, [1.25] * 6, [0.3, 0.5, 0.6, 0.7, 0.7, 0.7], [0.3, 0.5, 0.6, 0.68, 0.68, 0.68]))
    assert d.verdict == "underfitting" and d.advice == ADVICE["underfitting"]
    assert d.numbers["train_acc"] == pytest.approx(0.7) and d.numbers["acc_gap"] == pytest.approx(0.02)
    assert d.signals == ("train acc 0.7000 < 0.9: the model does not fit its training data",)


def test_underfitting_when_the_validation_loss_is_still_falling():
    acc = [0.8, 0.9, 0.93, 0.96, 0.96, 0.96]
    d = diagnose(curves(TRAIN_LOSS, [1.0, 0.8, 0.6, 0.4, 0.3, 0.2], acc, [a - 0.01 for a in acc]))
    assert d.verdict == "underfitting"
    assert d.numbers["val_loss"] == pytest.approx(0.3) and d.numbers["val_fall"] == pytest.approx(1 - 0.3 / 0.8)
    assert d.reason == (
        "val loss 0.3 ended 62.5% below the 3 epoch(s) before (0.8) > 10.0%: still improving"
        " [means of the last 3 epochs]"
    )
    assert d.advice.startswith("train longer first")


def test_fine_when_no_rule_fires():
    train_acc = [0.7, 0.9, 0.95, 0.98, 0.99, 0.99, 0.99, 0.99]
    val_acc = [0.7, 0.9, 0.96, 0.97, 0.975, 0.975, 0.975, 0.975]
    d = diagnose(curves([*TRAIN_LOSS, 0.04, 0.04], [1.0, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], train_acc, val_acc))
    assert d.verdict == "fine" and d.signals == () and d.advice == ADVICE["fine"] and d.epochs == 8
    assert d.numbers["acc_gap"] == pytest.approx(0.015) and d.numbers["val_rise"] == pytest.approx(0.0, abs=1e-12)
    assert "gap 1.5 pp <= 5 pp" in d.reason and "val loss at its lowest, 0.0% below the 3 epoch(s) before" in d.reason


def test_overfitting_and_underfitting_together_report_both():
    d = diagnose(curves(TRAIN_LOSS, [0.9] * 6, [0.5, 0.6, 0.7, 0.8, 0.8, 0.8], [0.5, 0.55, 0.6, 0.6, 0.6, 0.6]))
    assert d.verdict == "overfitting" and len(d.signals) == 2
    assert d.reason == (
        "train acc 0.8000 - val acc 0.6000 = 20.0 pp > 5 pp "
        "(also: train acc 0.8000 < 0.9: the model does not fit its training data) [means of the last 3 epochs]"
    )


def test_thresholds_are_strict_and_decide():
    c = curves(TRAIN_LOSS[:5], [1.0, 0.5, 0.5, 0.5, 0.625], [0.5, 0.6, 0.7, 0.75, 0.75], [0.5, 0.5, 0.5, 0.5, 0.5])
    # tail=1 reads the last epoch: acc gap 0.25 and val rise 0.25 exactly (exact in binary);
    # at a threshold nothing fires
    at = DiagnoseThresholds(max_acc_gap=0.25, max_val_rise=0.25, min_train_acc=0.5, tail=1)
    assert diagnose(c, at).verdict == "fine"
    d = diagnose(c, dataclasses.replace(at, max_acc_gap=0.24))
    assert d.verdict == "overfitting" and d.signals == ("train acc 0.7500 - val acc 0.5000 = 25.0 pp > 24 pp",)
    d = diagnose(c, dataclasses.replace(at, max_val_rise=0.24))
    assert (
        d.verdict == "overfitting" and d.reason == "val loss 0.625 ended 25.0% above its lowest 0.5 (epoch 2) > 24.0%"
    )
    assert diagnose(c, dataclasses.replace(at, min_train_acc=0.76)).verdict == "underfitting"


def test_too_few_epochs_is_inconclusive():
    c = curves([1.0, 0.5], [1.0, 0.9], [0.5, 1.0], [0.5, 0.5])
    d = diagnose(c)
    assert d.verdict == "inconclusive" and d.epochs == 2 and d.advice == ADVICE["inconclusive"] and d.numbers == {}
    assert d.reason == (
        "only 2 epoch(s) of train and validation loss; a verdict needs >= 3 (recipe.diagnose.min_epochs)"
    )
    d = diagnose(c, DiagnoseThresholds(min_epochs=2))  # window min(3, 2 // 2) = 1: the last epoch
    assert d.verdict == "overfitting" and d.numbers["window"] == 1 and d.numbers["acc_gap"] == 0.5
    # validation every other epoch: epochs with both curves count
    assert diagnose({"train/loss": [1, 0.5, 0.4, 0.3], "val/loss": [(2, 0.6), (4, 0.5)]}).epochs == 2


def test_missing_or_non_finite_curves_are_inconclusive():
    assert diagnose({}).reason == "no train/loss or val/loss curve to read"
    assert diagnose({"train/loss": TRAIN_LOSS}).reason == "no val/loss curve to read"
    d = diagnose(curves([1.0, 0.5, math.nan, math.nan], [1.0, 0.5, 0.4, 0.4]))
    assert d.verdict == "inconclusive" and d.reason == "train/loss is nan at epoch 3: the run diverged"
    assert "lower the LR" in d.advice


def test_losses_alone_and_point_curves():
    plain = curves(TRAIN_LOSS, [1.0, 0.6, 0.4, 0.4, 0.45, 0.6])
    d = diagnose(plain)
    assert d.verdict == "overfitting" and "acc_gap" not in d.numbers  # decided by the val-loss rise alone
    points = {k: [(e + 1, v) for e, v in enumerate(vals)] for k, vals in plain.items()}
    assert diagnose(points) == d
    # a zero lowest: a rise from it is unbounded, staying at it is no rise
    one = DiagnoseThresholds(tail=1)
    assert diagnose(curves(TRAIN_LOSS[:4], [1.0, 0.5, 0.0, 0.1]), one).numbers["val_rise"] == math.inf
    assert diagnose(curves(TRAIN_LOSS[:4], [1.0, 0.5, 0.0, 0.0]), one).numbers["val_rise"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_epochs": 1}, "min_epochs must be an int >= 2, got 1"),
        ({"tail": 0}, "tail must be an int >= 1, got 0"),
        ({"tail": True}, "tail must be an int >= 1, got True"),
        ({"max_acc_gap": 1.5}, "max_acc_gap must be a number in [0, 1], got 1.5"),
        ({"min_train_acc": -0.1}, "min_train_acc must be a number in [0, 1], got -0.1"),
        ({"max_val_rise": -1.0}, "max_val_rise must be a number in [0, inf), got -1.0"),
        ({"still_falling": math.inf}, "still_falling must be a number in [0, inf), got inf"),
    ],
)
def test_thresholds_are_validated(kwargs, message):
    with pytest.raises(ValueError) as info:
        DiagnoseThresholds(**kwargs)
    assert str(info.value) == message
