"""Refit on training + validation data (Deep Learning §7.8, Algorithms 7.2 and 7.3): the rules without a
Trainer, then ``train()`` with ``refit.mode=epochs|loss`` on the digits data, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_tricks.refit import mean_loss, merge_splits, reached_target, refit_epochs
from lightning_tricks.train import ConfigError, train

TINY = ["trainer.max_epochs=3", "model.hidden=[32]", "logger=none", "~callbacks.curve_plot"]


def test_rules() -> None:
    assert refit_epochs(0) == 1 and refit_epochs(4) == 5
    with pytest.raises(ValueError, match="best_epoch must be an int >= 0, got -1"):
        refit_epochs(-1)
    assert reached_target(0.099, 0.1) and not reached_target(0.1, 0.1) and not reached_target(math.inf, 0.1)
    x, y = merge_splits((torch.zeros(2, 3), torch.tensor([1, 2])), (torch.ones(1, 3), torch.tensor([0])))
    assert x.tolist() == [[0.0] * 3, [0.0] * 3, [1.0] * 3] and y.tolist() == [1, 2, 0]


def test_mean_loss_is_the_per_example_mean_over_uneven_batches_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    xs, ys = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    batches = [(xs[:3], ys[:3]), (xs[3:], ys[3:])]
    with torch.no_grad():
        logits = model[0](xs)  # eval mode: dropout off
    expected = sum(-torch.log_softmax(logits[i], 0)[ys[i]].item() for i in range(5)) / 5
    assert mean_loss(model, batches) == pytest.approx(expected, rel=1e-6)
    assert model.training  # the mode is given back


def best_epoch_of(objects) -> int:
    checkpoint = next(c for c in objects["callbacks"] if getattr(c, "best_model_path", ""))
    return int(torch.load(checkpoint.best_model_path, weights_only=True)["epoch"])


@pytest.mark.slow
def test_refit_epochs_trains_the_best_runs_passes_on_the_merged_data_and_reports_beside(make_cfg) -> None:
    metrics, objects = train(make_cfg(*TINY, "refit.mode=epochs"))
    assert metrics["status"] == "ok"
    assert metrics["refit/epochs"] == best_epoch_of(objects) + 1
    assert 0.5 < metrics["refit/test/acc"] <= 1.0 and 0.5 < metrics["test/acc"] <= 1.0
    splits = objects["datamodule"].splits
    assert len(splits["train"][1]) + len(splits["val"][1]) > len(splits["train"][1])


@pytest.mark.slow
def test_refit_loss_continues_until_the_validation_split_loss_is_below_the_training_loss(make_cfg) -> None:
    metrics, objects = train(make_cfg(*TINY, "refit.mode=loss", "refit.max_epochs=4"))
    assert 1 <= metrics["refit/epochs"] <= 4
    if metrics["refit/reached_target"]:
        assert metrics["refit/val_split_loss"] < metrics["refit/target_loss"]
    else:
        assert metrics["refit/epochs"] == 4 and metrics["refit/val_split_loss"] >= metrics["refit/target_loss"]
    assert "refit/test/acc" in metrics


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["refit.mode=epochs", "data.val_fraction=0", "monitor=train/loss_epoch", "monitor_mode=min"],
            r"refit.mode=epochs needs a validation split",
        ),
        (["refit.mode=loss", "~callbacks.model_checkpoint"], r"refit.mode=loss needs a best epoch to go by"),
        (["refit.mode=all"], r"refit.mode must be one of \('none', 'epochs', 'loss'\), got 'all'"),
    ],
)
def test_refusals_come_before_training(make_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*TINY, *overrides))
