"""The weights service: swaps on plain modules, and restore-best beside EMA/SWA in both callback orders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_tricks._lightning import (
    Callback,
    ModelCheckpoint,
    Trainer,
    seed_everything,
)
from lightning_tricks.averaging import RAW_WEIGHTS_KEY, raw_state_dict
from lightning_tricks.callbacks import EMA, SWA, EarlyStopping, RestoreBest
from lightning_tricks.callbacks._weights import AVERAGE, BEST, RAW, weights_of
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP


# -- the service on plain modules ----------------------------------------------------------------------
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _assert_state(net: nn.Module, want: dict[str, torch.Tensor]) -> None:
    for k, v in net.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_one_service_per_module_not_stored_on_it() -> None:
    a, b = _net(), _net()
    assert weights_of(a) is weights_of(a) and weights_of(a) is not weights_of(b)
    assert not any(isinstance(v, type(weights_of(a))) for v in vars(a).values())
    with pytest.raises(TypeError, match="needs an nn.Module, got int"):
        weights_of(3)  # type: ignore[arg-type]


def test_hold_swaps_in_and_hold_raw_puts_the_exact_raw_weights_back() -> None:
    net = _net()
    w = weights_of(net)
    raw = _state(net)
    ema = {"0.weight": torch.full((4, 3), 2.0), "0.bias": torch.full((4,), -1.0)}
    w.hold("ema", ema)
    assert w.held == "ema"
    assert torch.equal(net[0].weight, ema["0.weight"]) and torch.equal(net[0].bias, ema["0.bias"])
    assert torch.equal(net[1].weight, raw["1.weight"])  # not named: untouched
    for k, v in raw.items():
        assert torch.equal(w.raw_tensors()[k], v), k
    # a second label: the raw weights come back first, ONE backup stays the raw weights
    w.hold("best", {"0.bias": torch.zeros(4)})
    assert w.held == "best" and torch.equal(net[0].weight, raw["0.weight"]) and torch.equal(net[0].bias, torch.zeros(4))
    for k, v in raw.items():
        assert torch.equal(w.raw_tensors()[k], v), k
    w.hold_raw()
    assert w.held == RAW
    _assert_state(net, raw)


def test_unknown_names_and_the_raw_label_are_refused() -> None:
    net = _net()
    w = weights_of(net)
    raw = _state(net)
    w.hold("swa", {"0.weight": torch.ones(4, 3)})
    with pytest.raises(KeyError, match=r"'ema': the module Sequential has no tensor\(s\) \['nope'\]"):
        w.hold("ema", {"nope": torch.ones(1)})
    assert w.held == "swa" or w.held == RAW
    w.hold_raw()
    _assert_state(net, raw)
    with pytest.raises(ValueError, match="label must be a non-empty name other than 'raw', got 'raw'"):
        w.hold("raw", {})


def _checkpoint(net: nn.Module, *keys: str) -> dict[str, Any]:
    """What Lightning hands ``on_save_checkpoint``: the module's state dict and each callback's state."""
    return {"state_dict": dict(net.state_dict()), "callbacks": {k: {"average": {}} for k in keys}}


def test_checkpoint_holds_what_the_module_holds_and_keeps_the_raw_values_aside() -> None:
    net = _net()
    w = weights_of(net)
    raw = _state(net)
    w.hold("best", {"0.weight": torch.ones(4, 3)}, rank=BEST)  # e.g. restore-best after fit
    ckpt = _checkpoint(net, "EarlyStopping", "EMA")
    w.save_into(ckpt, "EarlyStopping")
    w.save_into(ckpt, "EMA", "ema", {"0.weight": torch.zeros(4, 3)}, AVERAGE)  # held weights are not replaced
    assert torch.equal(ckpt["state_dict"]["0.weight"], torch.ones(4, 3))
    record = ckpt["callbacks"]["EarlyStopping"][RAW_WEIGHTS_KEY]
    assert record["label"] == "best" and set(record["tensors"]) == {"0.weight"}
    for k, v in raw_state_dict(ckpt).items():
        assert torch.equal(v, raw[k]), k
    # loading it: Lightning puts the state dict in, the service puts the raw weights back
    other = _net()
    with torch.no_grad():
        other[0].weight.fill_(5.0)
    other.load_state_dict(ckpt["state_dict"])
    weights_of(other).load_raw(ckpt)
    assert weights_of(other).held == RAW
    _assert_state(other, raw)


@pytest.mark.parametrize("order", [("EMA", "SWA"), ("SWA", "EMA")])
def test_the_outranking_offer_goes_into_the_checkpoint_whatever_the_order(order: tuple[str, str]) -> None:
    net = _net()
    w = weights_of(net)
    raw = _state(net)
    ema = {"0.weight": torch.full((4, 3), 2.0), "1.running_mean": torch.full((4,), 2.0)}  # buffers averaged
    swa = {"0.weight": torch.full((4, 3), 3.0), "0.bias": torch.full((4,), 3.0)}
    offers = {"EMA": ("ema", ema), "SWA": ("swa", swa)}
    ckpt = _checkpoint(net, *order)
    for key in order:
        w.save_into(ckpt, key, *offers[key], AVERAGE)
    sd = ckpt["state_dict"]
    assert sd["0.weight"] is swa["0.weight"]  # same dtype and device: stored once in the file
    assert torch.equal(sd["0.bias"], swa["0.bias"])
    assert torch.equal(sd["1.running_mean"], raw["1.running_mean"])  # EMA's buffer average is not SWA's model
    assert RAW_WEIGHTS_KEY not in ckpt["callbacks"]["EMA"]
    record = ckpt["callbacks"]["SWA"][RAW_WEIGHTS_KEY]
    assert (record["label"], record["rank"]) == ("swa", AVERAGE)
    assert set(record["tensors"]) == {"0.weight", "0.bias"}
    for k, v in raw_state_dict(ckpt).items():
        assert torch.equal(v, raw[k]), k
    # a float64 state dict gets the offer cast to its dtype
    ckpt = _checkpoint(net.double(), "EMA")
    w.save_into(ckpt, "EMA", *offers["EMA"], AVERAGE)
    assert ckpt["state_dict"]["0.weight"].dtype == torch.float64
    assert torch.equal(ckpt["state_dict"]["0.weight"], ema["0.weight"].double())


def test_no_offer_leaves_the_raw_weights_and_says_so() -> None:
    net = _net()
    raw = _state(net)
    ckpt = _checkpoint(net, "EMA")
    weights_of(net).save_into(ckpt, "EMA")  # e.g. EMA(evaluate="raw"), or before its start
    assert ckpt["callbacks"]["EMA"][RAW_WEIGHTS_KEY] == {"label": RAW, "rank": 0, "tensors": {}}
    _assert_state(net, raw)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, raw[k]), k
    weights_only = {"state_dict": dict(net.state_dict())}  # Lightning's save_weights_only: no callback states
    weights_of(net).save_into(weights_only, "EMA", "ema", {"0.weight": torch.ones(4, 3)})
    assert torch.equal(weights_only["state_dict"]["0.weight"], raw["0.weight"])


def test_after_load_writes_are_backed_up_and_keep_and_raw_restore_exactly() -> None:
    net = _net()
    w = weights_of(net)
    raw = _state(net)

    def recompute() -> None:  # like SWA's BatchNorm recompute
        net[1].running_mean.fill_(7.0)

    w.hold("swa", {"0.weight": torch.ones(4, 3)}, after_load=recompute, also=["1.running_mean"])
    held = _state(net)
    assert torch.equal(held["1.running_mean"], torch.full((4,), 7.0))
    with w.raw():
        assert w.held == RAW
        _assert_state(net, raw)
    assert w.held == "swa"
    _assert_state(net, held)
    with w.keep():
        w.hold("snapshot_1", {"0.bias": torch.full((4,), 3.0)})
        assert torch.equal(net[0].bias, torch.full((4,), 3.0))
    assert w.held == "swa"
    _assert_state(net, held)
    w.hold_raw()
    _assert_state(net, raw)  # the BatchNorm statistics too


def test_measured_tensors_survive_the_swap_back_only_when_tracked() -> None:
    net = _net()
    w = weights_of(net)
    raw = _state(net)
    avg = {"0.weight": torch.full((4, 3), 5.0)}
    for track in (False, True):
        w.track_measured(track)
        w.evaluation_start()
        w.hold("ema", avg)
        w.evaluation_end()
        w.evaluation_end()  # a second participant: no-op
        assert w.measured == "ema"
        assert torch.equal(w.measured_tensors()["0.weight"], avg["0.weight"])  # still held
        w.hold_raw()
        if not track:
            with pytest.raises(RuntimeError, match="ran on 'ema', which is no longer in the module"):
                w.measured_tensors()
        else:
            got = w.measured_tensors()
            assert torch.equal(got["0.weight"], avg["0.weight"]) and torch.equal(got["0.bias"], raw["0.bias"])
    w.evaluation_start()
    w.evaluation_end()
    assert w.measured == RAW and torch.equal(w.measured_tensors()["0.weight"], raw["0.weight"])


@pytest.mark.parametrize("order", ["average_first", "best_first"])
def test_hand_over_precedence_does_not_depend_on_order(order: str) -> None:
    net = _net()
    w = weights_of(net)
    raw = _state(net)
    avg, best = {"0.bias": torch.full((4,), 1.0)}, {"0.bias": torch.full((4,), 2.0)}
    w.fit_start()
    offers = [(AVERAGE, "ema", avg), (BEST, "best", best)]
    for rank, label, tensors in offers if order == "average_first" else offers[::-1]:
        w.hand_over(rank, label, tensors)
    assert w.held == "best" and torch.equal(net[0].bias, best["0.bias"])
    assert torch.equal(w.raw_tensors()["0.bias"], raw["0.bias"])
    w.fit_start()  # a new fit trains the raw weights, and the hand-over starts over
    _assert_state(net, raw)
    assert w.hand_over(AVERAGE, "ema", avg) and w.held == "ema"


# -- restore-best beside EMA / SWA on digits ---------------------------------------------------------
class _Record(Callback):
    """Records the weights the module trains from at the start of each fit."""

    def __init__(self) -> None:
        self.fit_start: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:  # after every on_fit_start
        self.fit_start.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


class _Averages(Callback):
    """The averaging callback's average (with SWA's BatchNorm statistics) at every validation end."""

    def __init__(self) -> None:
        self.at_check: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # the module holds what is measured
        if not trainer.sanity_checking:
            self.at_check.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _module(lr: float = 0.5) -> Classifier:
    return Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": lr, "momentum": 0.9})


def _fit(averaging: Callback, order: str, lr: float) -> tuple[Any, ...]:
    seed_everything(0)
    dm = DigitsDataModule(batch_size=32, loader="resident")
    module = _module(lr)
    es = EarlyStopping(monitor="val/loss", patience=3, restore_best=True)
    record, seen = _Record(), _Averages()
    callbacks = [averaging, es] if order == "average_first" else [es, averaging]
    trainer = Trainer(
        callbacks=[*callbacks, record, seen],
        max_epochs=6,
        limit_train_batches=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    return trainer, module, dm, es, record, seen


@pytest.mark.parametrize("order", ["average_first", "best_first"])
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_restore_best_beside_an_average_revalidates_to_the_best_logged_value(
    kind: str, order: str, tmp_path: Path
) -> None:
    # SWA: a large LR makes the later averages worse, so the best check is not the last one
    averaging = EMA(decay=0.9) if kind == "ema" else SWA(start=1, update_every="step")
    trainer, module, dm, es, record, seen = _fit(averaging, order, 0.5 if kind == "ema" else 2.0)
    best = es.best_check
    assert es.measured[best] == kind and best < len(es.history) - 1  # not simply the last check
    assert weights_of(module).held == "best"
    # the module holds exactly what was measured at the best check: the average (SWA: its BN statistics)
    for name, t in module.state_dict().items():
        assert torch.equal(t, seen.at_check[best][name]), name
    # ... so re-validating gives the best logged value
    got = trainer.validate(module, dm, verbose=False)[0]["val/loss"]
    assert got == pytest.approx(es.best_value, abs=1e-6)
    assert got != pytest.approx(es.history[-1], abs=1e-4)
    # a checkpoint saved now holds the restored best (what a test runs on), and the raw (last training)
    # weights for resume beside it
    raw = {k: v.clone() for k, v in weights_of(module).raw_tensors().items()}
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", weights_only=True)
    assert not torch.equal(raw["net.head.0.weight"], module.net.head[0].weight)
    for name, t in saved["state_dict"].items():
        assert torch.equal(t, seen.at_check[best][name]), name
    for name, t in raw_state_dict(saved).items():
        assert torch.equal(t, raw[name]), name
    # a second fit trains from the raw weights
    again = Trainer(
        callbacks=[averaging, es, record],
        max_epochs=7,
        limit_train_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    again.fit(module, dm)
    for name, t in record.fit_start[-1].items():
        assert torch.equal(t, raw[name]), name


def test_restore_best_without_an_average_restores_the_raw_weights_at_the_best_check(tmp_path: Path) -> None:
    seed_everything(0)
    dm = DigitsDataModule(batch_size=32, loader="resident")
    module = _module()
    es = EarlyStopping(monitor="val/loss", patience=3, restore_best=True)
    seen = _Averages()
    trainer = Trainer(
        callbacks=[es, seen],
        max_epochs=6,
        limit_train_batches=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    assert set(es.measured) == {RAW}
    for name, t in module.state_dict().items():
        assert torch.equal(t, seen.at_check[es.best_check][name]), name
    assert trainer.validate(module, dm, verbose=False)[0]["val/loss"] == pytest.approx(es.best_value, abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*dirpath")
def test_restore_from_checkpoint_beside_ema_restores_the_checkpoints_average(tmp_path: Path) -> None:
    seed_everything(0)
    dm = DigitsDataModule(batch_size=32, loader="resident")
    module = _module()
    ema = EMA(decay=0.9)
    es = EarlyStopping(monitor="val/loss", patience=3, restore_best=RestoreBest(source="checkpoint"))
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=1)
    trainer = Trainer(
        callbacks=[es, ema, ckpt],
        max_epochs=6,
        limit_train_batches=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    assert weights_of(module).held == "best" and es.measured[es.best_check] == "ema"
    got = trainer.validate(module, dm, verbose=False)[0]["val/loss"]
    assert got == pytest.approx(es.best_value, abs=1e-6)


def test_evaluate_both_needs_the_hook_and_says_how_to_fix_it() -> None:
    from lightning_tricks._lightning import LightningModule

    class NoHook(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"EMA\(evaluate='both'\).*NoHook does not define.*evaluate='ema' / 'raw'"):
        EMA(evaluate="both").setup(None, NoHook(), "fit")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"SWA\(evaluate='both'\).*evaluate='average' / 'raw'"):
        SWA(evaluate="both").setup(Trainer(max_epochs=4, logger=False), NoHook(), "validate")


@pytest.mark.parametrize("order", ["ema_first", "swa_first"])
def test_two_averages_at_the_end_are_ordered_by_label_not_by_list_order(order: str) -> None:
    net = _net()
    w = weights_of(net)
    ema, swa = {"0.bias": torch.full((4,), 1.0)}, {"0.bias": torch.full((4,), 2.0)}
    w.fit_start()
    offers = [("ema", ema), ("swa", swa)]
    for label, tensors in offers if order == "ema_first" else offers[::-1]:
        w.hand_over(AVERAGE, label, tensors)
    assert w.held == "swa" and torch.equal(net[0].bias, swa["0.bias"])
    assert w.outranks(BEST, "best") and not w.outranks(AVERAGE, "ema")


class _Held(Callback):
    """What the module holds when this callback's on_test_epoch_end runs."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, torch.Tensor]]] = []

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.seen.append((weights_of(pl_module).held, {k: v.clone() for k, v in pl_module.state_dict().items()}))


def test_snapshot_evaluation_puts_back_what_the_module_held() -> None:
    from lightning_tricks.callbacks import LRSchedule, SnapshotEnsemble

    seed_everything(0)
    dm = DigitsDataModule(batch_size=32, loader="resident")
    module = _module()
    ema, snap, before, after = EMA(decay=0.9), SnapshotEnsemble(cycles=2), _Held(), _Held()
    trainer = Trainer(
        callbacks=[ema, before, snap, after, LRSchedule()],
        max_epochs=2,
        limit_train_batches=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, dm)
    raw = {k: v.clone() for k, v in weights_of(module).raw_tensors().items()}
    for name, t in snap.snapshots[-1].items():  # the last snapshot is the raw weights, not the held average
        assert torch.equal(t, raw[name]), name
    got = trainer.test(module, dm, verbose=False)[0]
    (label_before, state_before), (label_after, state_after) = before.seen[0], after.seen[0]
    assert label_before == label_after == "ema"
    for name, t in state_before.items():
        assert torch.equal(t, state_after[name]), name
    # the test loop measured the average; the last snapshot (raw weights) measures something else
    assert got["test/snapshot_2/nll"] != pytest.approx(got["test/loss"], abs=1e-4)
