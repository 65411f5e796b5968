"""EarlyStopping in a Trainer: overfitting digits, restore-best, resume mid-strip, DDP, configs, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate
from test_stopping import PQ_TRAIN, PQ_VAL, UP_CURVE
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    Callback,
    CSVLogger,
    EarlyStoppingReason,
    LightningModule,
    MisconfigurationException,
    ModelCheckpoint,
    PLEarlyStopping,
    Trainer,
    seed_everything,
)
from lightning_tricks.callbacks import EarlyStopping, RestoreBest
from lightning_tricks.data import DigitsDataModule, TensorBatchLoader
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.stopping import GL, PQ, UP, first_stop

MAX_EPOCHS = 25


# ------------------------------------------------------------------------------------------------
# a deliberately overfitting setting: 32 training digits, a 512-512 MLP, Adam, no regularization
# ------------------------------------------------------------------------------------------------
_SPLITS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _loaders() -> tuple[TensorBatchLoader, TensorBatchLoader]:
    if not _SPLITS:
        dm = DigitsDataModule(val_fraction=0.5)
        dm.setup()
        _SPLITS.update(dm.splits)
    x, y = _SPLITS["train"]
    xv, yv = _SPLITS["val"]
    return (
        TensorBatchLoader(x[:32], y[:32], batch_size=16, shuffle=True, drop_last=True),
        TensorBatchLoader(xv, yv, batch_size=1024),
    )


def _overfit_module() -> Classifier:
    seed_everything(0)
    return Classifier(MLP((1, 8, 8), 10, hidden=(512, 512), norm="none"), 10, {"name": "adam", "lr": 3e-3})


def _trainer(callbacks, **kwargs) -> Trainer:
    opts = dict(
        max_epochs=MAX_EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kwargs)
    return Trainer(callbacks=callbacks, **opts)


CASES = {
    "patience": dict(criterion="patience", patience=3),
    "increase": dict(criterion="increase", patience=2),
    "gl": dict(criterion=GL(alpha=5.0)),
    # Adam drives the training loss down geometrically, so P_5 stays in the hundreds and PQ small
    "pq": dict(criterion=PQ(alpha=0.02, strip=5)),
    "up": dict(criterion=UP(strips=2, strip=3)),
    "gl_accuracy": dict(monitor="val/acc", mode="max", criterion=GL(alpha=3.0)),  # E = 1 - acc
}


@pytest.mark.parametrize("case", list(CASES))
def test_overfitting_digits_stop_early_and_restore_the_best_weights(case):
    module = _overfit_module()
    train, val = _loaders()
    es = EarlyStopping(**CASES[case], restore_best=True, log_values=True)
    trainer = _trainer([es])
    trainer.fit(module, train, val)

    # stopped early, exactly where the pure rule stops on the recorded curves
    assert es.stop_reason is not None, f"{case} did not stop in {MAX_EPOCHS} epochs: {es.history}"
    assert es.stopped_epoch < MAX_EPOCHS - 1 and es.epochs == list(range(es.stopped_epoch + 1))
    replay = first_stop(es.history, es.train_history, es.rule, name=es.monitor)
    assert replay.index == es.stopped_epoch
    assert es.stop_reason == f"stopped at epoch {es.stopped_epoch}: {replay.decision.reason}"
    assert es.best_epoch < es.stopped_epoch
    # every criterion's value was logged at the last check
    for key in ("gl", "up_count", "wait_count"):
        assert f"early_stopping/{key}" in trainer.callback_metrics
    assert trainer.callback_metrics["early_stopping/wait_count"] == es.wait_count

    # the module holds the best epoch's weights: re-validating gives the best logged value
    assert es.history[-1] != es.best_value
    metrics = trainer.validate(module, val, verbose=False)[0]
    assert metrics[es.monitor] == pytest.approx(es.best_value, rel=1e-6, abs=1e-7)


def test_restore_from_the_best_checkpoint(tmp_path):
    module = _overfit_module()
    train, val = _loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=1)
    es = EarlyStopping(criterion=GL(alpha=5.0), restore_best=RestoreBest(source="checkpoint"))
    trainer = _trainer([es, ckpt], enable_checkpointing=True)
    trainer.fit(module, train, val)
    assert es.stop_reason is not None and es.best_weights is None  # nothing kept in memory
    assert f"epoch={es.best_epoch}-" in Path(ckpt.best_model_path).name
    metrics = trainer.validate(module, val, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(es.best_value, rel=1e-6, abs=1e-7)


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
@pytest.mark.parametrize("case", ["up", "pq"])
def test_resume_mid_strip_stops_on_the_same_epoch(tmp_path, case):
    train, val = _loaders()
    strip = CASES[case]["criterion"].strip
    full = EarlyStopping(**CASES[case], restore_best=True)
    every_epoch = ModelCheckpoint(
        dirpath=tmp_path, filename="e{epoch:02d}", auto_insert_metric_name=False, save_top_k=-1, every_n_epochs=1
    )
    module = _overfit_module()
    _trainer([full, every_epoch], enable_checkpointing=True).fit(module, train, val)
    assert full.stop_reason is not None

    # resume mid-strip, more than a strip before the stop (the resumed run crosses a strip end) and after
    # the best epoch (its weights must come from the checkpoint); checks are 1-based: check = epoch + 1
    resume = max(e for e in range(full.best_epoch + 1, full.stopped_epoch - strip) if (e + 1) % strip != 0)
    path = tmp_path / f"e{resume:02d}.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][full.state_key]
    assert saved["history"] == full.history[: resume + 1] and saved["best_weights"]
    resumed = EarlyStopping(**CASES[case], restore_best=True)
    module2 = _overfit_module()
    again = ModelCheckpoint(
        dirpath=tmp_path, filename="e{epoch:02d}", auto_insert_metric_name=False, save_top_k=-1, every_n_epochs=1
    )
    _trainer([resumed, again], enable_checkpointing=True).fit(module2, *_loaders(), ckpt_path=str(path))

    assert resumed.stopped_epoch == full.stopped_epoch
    assert resumed.stop_reason == full.stop_reason
    assert resumed.history == full.history and resumed.epochs == full.epochs
    assert resumed.train_history == full.train_history
    # both ended with the best epoch's weights, which the resumed run took from the checkpoint
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, module2.state_dict()[name]), name


def _with_best_copy(es: EarlyStopping) -> EarlyStopping:
    """A state as after three checks, the second the best, whose weights are held in memory."""
    es.history, es.train_history, es.epochs, es.measured = [1.0, 0.5, 0.7], [2.0, 1.0, math.nan], [0, 1, 2], ["raw"] * 3
    es.restorer.best_value, es.restorer.best_epoch, es.restorer._weights = 0.5, 1, {"w": torch.ones(3)}
    return es


def test_state_round_trips_with_plain_types():
    es = _with_best_copy(EarlyStopping(criterion=UP(strip=2, strips=2), restore_best=True))
    state = es.state_dict()
    assert state["history"] == [1.0, 0.5, 0.7] and state["epochs"] == [0, 1, 2]
    assert torch.equal(state["best_weights"]["w"], torch.ones(3)) and state["best_epoch"] == 1
    other = EarlyStopping(criterion=UP(strip=2, strips=2), restore_best=True)
    other.load_state_dict(state)
    assert other.history == es.history and other.epochs == es.epochs and other.best_epoch == 1
    assert other.best_weights is not None and torch.equal(other.best_weights["w"], torch.ones(3))
    # smaller checkpoints: the in-memory copy is left out on request
    light = _with_best_copy(EarlyStopping(restore_best=RestoreBest(save_weights=False)))
    assert "best_weights" not in light.state_dict() and light.state_dict()["best_epoch"] == 1
    # distinct keys for two instances side by side
    keys = {
        EarlyStopping(criterion="gl").state_key,
        EarlyStopping(criterion="pq").state_key,
        EarlyStopping(criterion=GL(alpha=2.0)).state_key,
        EarlyStopping(monitor="val/acc").state_key,
    }
    assert len(keys) == 4
    # a checkpoint without the best weights: the final weights stay, with a warning
    resumed = EarlyStopping(restore_best=True)
    resumed.load_state_dict(light.state_dict())
    layer = nn.Linear(2, 2)
    before = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="not available"):
        resumed.on_train_end(None, layer)
    assert torch.equal(layer.weight, before)


def test_a_checkpoint_written_before_restore_best_kept_its_own_state_still_restores():
    old = {"history": [1.0, 0.5, 0.7], "epochs": [0, 1, 2], "measured": ["raw", "ema", "raw"]}
    old.update(best_weights={"w": torch.ones(3)}, best_weights_check=1)
    es = EarlyStopping(restore_best=True)
    es.load_state_dict(old)
    assert (es.restorer.best_epoch, es.restorer.best_value, es.restorer.measured_on) == (1, 0.5, "ema")
    assert torch.equal(es.best_weights["w"], torch.ones(3))


# ------------------------------------------------------------------------------------------------
# a scripted module: logs a given validation curve (plus a per-rank drift) and a training metric
# ------------------------------------------------------------------------------------------------
class Scripted(LightningModule):
    def __init__(self, val: list[float], train: list[float] | None = None, drift: float = 0.0) -> None:
        super().__init__()
        self.val_curve, self.train_curve, self.drift = val, train, drift
        self.layer = nn.Linear(2, 1)
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        if self.train_curve is not None:
            self.log("train/err", self.train_curve[self.current_epoch], on_step=False, on_epoch=True, batch_size=2)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        # rank r sees val[e] - r * drift * e; not synced on purpose
        value = self.val_curve[self.current_epoch] - self.global_rank * self.drift * self.current_epoch
        self.seen.append(value)
        self.log("val/err", value, on_epoch=True, sync_dist=False, batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _scripted_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)


def _scripted_trainer(callbacks, **kwargs) -> Trainer:
    opts = dict(max_epochs=len(PQ_VAL), limit_train_batches=1, limit_val_batches=1)
    opts.update(kwargs)
    return _trainer(callbacks, **opts)


@pytest.mark.parametrize("after_validation", [False, True])
def test_scripted_curve_stops_on_the_epoch_worked_out_by_hand(tmp_path, after_validation):
    # tests/test_stopping.py: PQ_0.3 with strip 3 stops at check 9 (epoch 8): GL/P_3 = 9.091/23.81 = 0.382
    es = EarlyStopping(
        monitor="val/err",
        criterion=PQ(alpha=0.3, strip=3, train_monitor="train/err"),
        check_on_train_epoch_end=not after_validation,
    )
    module = Scripted(PQ_VAL, PQ_TRAIN)
    trainer = _scripted_trainer([es], logger=CSVLogger(tmp_path, name="", version=""))
    if after_validation:  # the training metric of a check is then the previous epoch's: shift it by one
        module.train_curve = PQ_TRAIN[1:] + [PQ_TRAIN[-1]]
        with pytest.warns(UserWarning, match="one epoch behind"):
            trainer.fit(module, _scripted_loader(), _scripted_loader())
    else:
        trainer.fit(module, _scripted_loader(), _scripted_loader())
    assert es.stopped_epoch == 8 and es.history == pytest.approx(PQ_VAL[:9])
    assert es.stop_reason == "stopped at epoch 8: PQ=GL/P_3=9.09/23.8=0.382 > alpha=0.3 (best 0.44 at 4)"
    # every criterion's value went to the logger at every check, whichever hook ran the check
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("early_stopping/gl")]
    assert len(rows) == 9
    assert float(rows[-1]["early_stopping/pq"]) == pytest.approx(0.381818, abs=1e-5)
    assert float(rows[-1]["early_stopping/gl"]) == pytest.approx(100 * (0.48 / 0.44 - 1), rel=1e-5)


def test_min_checks_and_reason_in_max_mode():
    # UP_CURVE as an accuracy; UP_2 (strip 2) stops at check 8, with min_checks=9 at the next strip end, 10
    curve = [1.0 - v for v in UP_CURVE]
    es = EarlyStopping(monitor="val/err", mode="max", criterion=UP(strips=2, strip=2), min_checks=9)
    _scripted_trainer([es]).fit(Scripted(curve), _scripted_loader(), _scripted_loader())
    assert es.stopped_epoch == 9
    assert es.stop_reason.startswith("stopped at epoch 9: UP_2: val/err rose at the end of 2 successive strips")
    assert es.stop_reason.endswith("(best 0.5 at 4)")


class _EveryEpoch(Callback):
    """The module's weights at the end of every epoch (before EarlyStopping's check)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


@pytest.mark.parametrize(
    ("accelerator", "best_on_cpu"),
    [
        ("cpu", False),
        pytest.param("gpu", False, marks=pytest.mark.gpu),
        pytest.param("gpu", True, marks=pytest.mark.gpu),
    ],
)
def test_restored_weights_are_exactly_the_best_epochs(accelerator, best_on_cpu):
    # UP_CURVE: best 0.5 at epoch 4; UP_2 (strip 2) stops at epoch 7
    es = EarlyStopping(monitor="val/err", criterion=UP(strips=2, strip=2), restore_best=RestoreBest(on_cpu=best_on_cpu))
    record = _EveryEpoch()
    module = Scripted(UP_CURVE)
    _scripted_trainer([record, es], accelerator=accelerator).fit(module, _scripted_loader(), _scripted_loader())
    assert es.stopped_epoch == 7 and es.best_epoch == 4 and len(record.weights) == 8
    device = "cpu" if best_on_cpu or accelerator == "cpu" else "cuda"
    assert all(t.device.type == device for t in es.best_weights.values())
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, record.weights[4][name]), name
        assert not torch.equal(tensor, record.weights[7][name]), name


def test_perfect_accuracy_then_worse_gives_an_infinite_gl():
    # E = 1 - acc: E_opt = 0 at epoch 1, so any later error is an infinite relative loss
    es = EarlyStopping(monitor="val/err", mode="max", criterion=GL(alpha=5.0))
    trainer = _scripted_trainer([es])
    trainer.fit(Scripted([0.9, 1.0, 0.99, 1.0, 1.0]), _scripted_loader(), _scripted_loader())
    assert es.stop_reason == "stopped at epoch 2: GL=inf > alpha=5 (best 1 at 1)"
    assert trainer.callback_metrics["early_stopping/gl"] == math.inf


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"criterion": "plateau"},
            r"criterion must be one of \('patience', 'increase', 'gl', 'pq', 'up'\), got 'plateau'",
        ),
        ({"criterion": "increase", "min_delta": -0.1}, r"min_delta must be a number in \[0, inf\), got -0\.1"),
        ({"min_checks": -1}, r"min_checks must be an int >= 0, got -1"),
        ({"log_values": 1}, r"log_values must be a bool, got 1"),
        ({"mode": "maximum"}, r"`mode` can be min, max, got maximum"),  # Lightning's message (and exception)
        ({"monitor": ""}, r"monitor must be a non-empty metric name, got ''"),
        ({"restore_best": "yes"}, r"restore_best must be a bool, got 'yes'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EarlyStopping(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GL(alpha=0), r"alpha must be a number in \(0, inf\), got 0"),
        (lambda: PQ(alpha=-2.0), r"alpha must be a number in \(0, inf\), got -2\.0"),
        (lambda: UP(strip=2.5), r"strip must be an int >= 1, got 2\.5"),
        (lambda: RestoreBest(source="disk"), r"source must be one of \('memory', 'checkpoint'\), got 'disk'"),
        (lambda: RestoreBest(on_cpu="yes"), r"on_cpu must be a bool, got 'yes'"),
    ],
)
def test_bad_criterion_and_restore_arguments_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_monitored_metric_never_logged_names_it_and_the_choices():
    es = EarlyStopping(monitor="val/loss")
    with pytest.raises(RuntimeError, match=r"monitor='val/loss' was not logged; the logged metrics are \['val/err'\]"):
        _scripted_trainer([es]).fit(Scripted(PQ_VAL), _scripted_loader(), _scripted_loader())


def test_pq_without_the_training_metric_names_it():
    es = EarlyStopping(monitor="val/err", criterion="pq")
    with pytest.raises(RuntimeError, match=r"train_monitor='train/loss_epoch'.*not logged.*'val/err'"):
        _scripted_trainer([es]).fit(Scripted(PQ_VAL), _scripted_loader(), _scripted_loader())


def test_restore_from_checkpoint_needs_a_matching_model_checkpoint(tmp_path):
    es = EarlyStopping(monitor="val/err", restore_best=RestoreBest(source="checkpoint"))
    other = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(monitor='val/err', mode='min'.*'val/acc', 'max'"):
        _scripted_trainer([es, other], enable_checkpointing=True).fit(
            Scripted(PQ_VAL), _scripted_loader(), _scripted_loader()
        )


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "criterion"),
    [
        ("early_stopping", "patience"),
        ("early_stopping_gl", "gl"),
        ("early_stopping_pq", "pq"),
        ("early_stopping_up", "up"),
    ],
)
def test_configs_compose_and_instantiate(name, criterion):
    cfg = compose_train([f"+callbacks={name}"])
    es = instantiate(cfg.callbacks[name])
    assert isinstance(es, EarlyStopping) and es.criterion.name == criterion
    # the class defaults are Lightning's (restore_best off); our configs turn restore-best and logging on
    assert es.restore_best is True and es.log_values is True and EarlyStopping().restore_best is False
    removed = compose_train([f"+callbacks={name}", f"~callbacks.{name}"])
    assert name not in removed.callbacks


# ------------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo), each rank logging its own, unsynced value
# ------------------------------------------------------------------------------------------------
class _Dump(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        es = next(cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping))
        out = {
            "stopped": es.stopped_epoch,
            "reason": es.stop_reason,
            "history": es.history,
            "seen": pl_module.seen,
            "best": es.best_epoch,
            "restored": es.restorer.best_epoch,
            "weight": pl_module.layer.weight.tolist(),
            "current_epoch": trainer.current_epoch,
        }
        Path(self.path, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))

    def teardown(self, trainer, pl_module, stage):
        # end the gloo group before the spawned worker exits: left to process exit, gloo's threads can abort the
        # worker ("terminate called without an active exception") after a run that finished correctly
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_ddp_ranks_stop_on_the_same_epoch(tmp_path):
    # rank 0 sees UP_CURVE: UP_2 with strip 2 stops at check 8 (epoch 7). Rank 1 sees UP_CURVE[e] - 0.05 e,
    # which keeps falling at every strip end, so on its own it would never stop.
    drifted = [v - 0.05 * e for e, v in enumerate(UP_CURVE)]
    assert first_stop(drifted, rule=EarlyStopping(criterion=UP(strips=2, strip=2)).rule).index is None
    es = EarlyStopping(monitor="val/err", criterion=UP(strips=2, strip=2), restore_best=True)
    trainer = _scripted_trainer(
        [es, _Dump(str(tmp_path))], max_epochs=len(UP_CURVE), accelerator="cpu", devices=2, strategy="ddp_spawn"
    )
    trainer.fit(Scripted(UP_CURVE, drift=0.05), _scripted_loader(), _scripted_loader())
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["seen"] != r1["seen"]  # the ranks logged different values ...
    assert r0["stopped"] == r1["stopped"] == 7  # ... and stopped together, on rank zero's curve
    assert r0["current_epoch"] == r1["current_epoch"] == 8
    assert r0["history"] == r1["history"] == pytest.approx(UP_CURVE[:8])
    assert r0["reason"] == r1["reason"] and r0["reason"].startswith("stopped at epoch 7: UP_2")
    assert r0["best"] == r1["best"] == 4
    # restore-best follows rank zero too (rank 1's own best would be its last epoch): the same weights on both
    assert r0["restored"] == r1["restored"] == 4 and r0["weight"] == r1["weight"]


# ------------------------------------------------------------------------------------------------
# a drop-in for Lightning's EarlyStopping (issue 19): checkpoints both ways, arguments, copies
# ------------------------------------------------------------------------------------------------
# patience 3: best 0.5 at epoch 1, no improvement at epochs 2, 3, 4 -> stops at epoch 4. A run resumed
# after epoch 2 that lost the state would take 0.7 (epoch 3) as its first best and stop at epoch 6.
_PATIENCE_CURVE = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]


class _StateAtStart(Callback):
    """The EarlyStopping fields right after a checkpoint was restored (on_train_start)."""

    def __init__(self, es) -> None:
        self.es, self.seen = es, None

    def on_train_start(self, trainer, pl_module):
        self.seen = {
            "wait_count": self.es.wait_count,
            "best_score": float(self.es.best_score),
            "stopped_epoch": self.es.stopped_epoch,
        }


def _save_after_epoch_2(es, tmp_path: Path) -> Path:
    trainer = _scripted_trainer([es], max_epochs=3, default_root_dir=tmp_path)
    trainer.fit(Scripted(_PATIENCE_CURVE), _scripted_loader(), _scripted_loader())
    path = tmp_path / "after_epoch_2.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*")
@pytest.mark.parametrize("direction", ["lightning_to_ours", "ours_to_lightning"])
def test_checkpoints_move_between_lightnings_early_stopping_and_ours(tmp_path, direction):
    writer_cls, reader_cls = (
        (PLEarlyStopping, EarlyStopping) if direction == "lightning_to_ours" else (EarlyStopping, PLEarlyStopping)
    )
    writer = writer_cls(monitor="val/err", patience=3)
    path = _save_after_epoch_2(writer, tmp_path)
    saved = torch.load(path, weights_only=True)["callbacks"]
    assert list(saved) == ["EarlyStopping{'monitor': 'val/err', 'mode': 'min'}"]  # Lightning's key
    assert saved[writer.state_key]["wait_count"] == 1 and saved[writer.state_key]["stopped_epoch"] == 0

    reader = reader_cls(monitor="val/err", patience=3)
    probe = _StateAtStart(reader)
    trainer = _scripted_trainer([reader, probe], max_epochs=len(_PATIENCE_CURVE), default_root_dir=tmp_path)
    trainer.fit(Scripted(_PATIENCE_CURVE), _scripted_loader(), _scripted_loader(), ckpt_path=str(path))
    assert probe.seen == {"wait_count": 1, "best_score": 0.5, "stopped_epoch": 0}  # carried over
    # and it decides as the uninterrupted run: stopped at epoch 4 with best 0.5 and 3 checks without improvement
    assert reader.stopped_epoch == 4 and reader.wait_count == 3 and float(reader.best_score) == 0.5
    assert reader.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    if isinstance(reader, EarlyStopping):  # our extra state starts from its defaults: the curve after the resume
        assert reader.history == pytest.approx(_PATIENCE_CURVE[3:5]) and reader.epochs == [3, 4]


def test_our_criteria_load_lightnings_entry_and_our_older_key():
    lightning = PLEarlyStopping(monitor="val/err", patience=3)
    lightning.wait_count, lightning.best_score, lightning.stopped_epoch = 2, torch.tensor(0.25), 7
    gl = EarlyStopping(monitor="val/err", criterion="gl")
    assert gl.state_key == "EarlyStopping{'monitor': 'val/err', 'mode': 'min', 'rule': 'GL_5'}"
    gl.on_load_checkpoint(None, None, {"callbacks": {lightning.state_key: lightning.state_dict()}})
    assert (gl.wait_count, float(gl.best_score), gl.stopped_epoch, gl.history) == (2, 0.25, 7, [])
    # a checkpoint of ours from before issue 19 keyed the patience rule with 'rule': read from there
    old_key = "EarlyStopping{'monitor': 'val/err', 'mode': 'min', 'rule': 'patience 3 (no_improvement)'}"
    ours = EarlyStopping(monitor="val/err", patience=3)
    ours.on_load_checkpoint(None, None, {"callbacks": {old_key: {"wait_count": 1, "history": [0.5, 0.6]}}})
    assert ours.wait_count == 1 and ours.history == [0.5, 0.6] and ours.train_history[0] != ours.train_history[0]


def test_state_dict_returns_copies_and_plain_values():
    es = _with_best_copy(EarlyStopping(criterion=UP(strip=2, strips=2), restore_best=True))
    state = es.state_dict()
    es.restorer._weights["w"].add_(1.0)  # the next improvement overwrites the buffers in place ...
    es.history.append(0.8)
    es.epochs.append(3)
    assert torch.equal(state["best_weights"]["w"], torch.ones(3))  # ... the state taken before does not change
    assert state["history"] == [1.0, 0.5, 0.7] and state["epochs"] == [0, 1, 2]
    assert state["train_history"] == [2.0, 1.0, None]  # nan as None: two equal states compare equal
    again = EarlyStopping(criterion=UP(strip=2, strips=2), restore_best=True)
    again.load_state_dict(state)
    assert math.isnan(again.train_history[2]) and again.state_dict()["train_history"] == [2.0, 1.0, None]
    state["best_weights"]["w"].zero_()  # loading copied too
    assert torch.equal(again.best_weights["w"], torch.ones(3))


@pytest.mark.parametrize("restore_best", [False, True])
def test_a_bare_trainer_without_a_module_does_not_crash(tmp_path, restore_best):
    es = EarlyStopping(monitor="foo", restore_best=restore_best, log_values=True)
    trainer = Trainer(default_root_dir=tmp_path)
    assert trainer.lightning_module is None
    trainer.callback_metrics["foo"] = torch.tensor([[[0.0]]])
    es._run_early_stopping_check(trainer)
    es.on_train_end(trainer, None)
    assert es.history == [0.0] and es.wait_count == 0 and float(es.best_score) == 0.0
    assert es.state_dict()["history"] == [0.0]
    assert not list(tmp_path.iterdir())  # nothing logged anywhere


def test_lightnings_arguments_values_and_exceptions():
    es = EarlyStopping()
    assert es.restore_best is False and es.log_values is False  # a swapped import changes nothing
    assert EarlyStopping(criterion="gl").log_values is True
    # Lightning's positional order: monitor, min_delta, patience, verbose, mode
    es = EarlyStopping("val_acc", 0.1, 5, False, "max")
    assert (es.monitor, es.min_delta, es.patience, es.mode) == ("val_acc", 0.1, 5, "max")
    assert EarlyStopping(monitor="val/err", patience=0).patience == 0  # accepted, acts as 1 (as in Lightning)
    with pytest.raises(MisconfigurationException, match="`mode` can be min, max, got maximum"):
        EarlyStopping(mode="maximum")
    with pytest.raises(ValueError, match="`mode` can be"):
        EarlyStopping(mode="maximum")


@pytest.mark.parametrize(
    ("kwargs", "curve", "stopped", "reason", "message"),
    [
        (
            dict(stopping_threshold=0.45),
            [1.0, 0.5, 0.4, 0.3],
            2,
            EarlyStoppingReason.STOPPING_THRESHOLD,
            "Stopping threshold reached",
        ),
        (
            dict(divergence_threshold=2.0),
            [1.0, 0.5, 3.0, 0.3],
            2,
            EarlyStoppingReason.DIVERGENCE_THRESHOLD,
            "Divergence threshold reached",
        ),
    ],
)
@pytest.mark.parametrize("criterion", ["patience", "gl"])
def test_threshold_stops_use_lightnings_reason_and_message(kwargs, curve, stopped, reason, message, criterion):
    es = EarlyStopping(monitor="val/err", criterion=GL(alpha=1000.0) if criterion == "gl" else criterion, **kwargs)
    _scripted_trainer([es], max_epochs=len(curve)).fit(Scripted(curve), _scripted_loader(), _scripted_loader())
    assert es.stopped_epoch == stopped and es.stopping_reason == reason
    assert es.stopping_reason_message.startswith(message)


def test_the_patience_decision_goes_through_lightnings_method():
    # a subclass (or a mock) of _evaluate_stopping_criteria is obeyed, with Lightning's rule and with ours
    for criterion in ("patience", "up"):
        es = EarlyStopping(monitor="val/err", criterion=criterion)
        with mock.patch.object(
            EarlyStopping, "_evaluate_stopping_criteria", side_effect=[(False, "A"), (True, "B")]
        ) as evaluate:
            _scripted_trainer([es], max_epochs=len(UP_CURVE)).fit(
                Scripted(UP_CURVE), _scripted_loader(), _scripted_loader()
            )
        assert evaluate.call_count == 2 and es.stopped_epoch == 1 and es.stopping_reason_message == "B"
    # with our criterion Lightning's patience does not stop: UP_2 (strip 2) decides, at epoch 7
    es = EarlyStopping(monitor="val/err", criterion=UP(strips=2, strip=2), patience=1)
    _scripted_trainer([es], max_epochs=len(UP_CURVE)).fit(Scripted(UP_CURVE), _scripted_loader(), _scripted_loader())
    assert es.stopped_epoch == 7 and es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert es.stop_reason.startswith("stopped at epoch 7: UP_2")


# ------------------------------------------------------------------------------------------------
# restore-best on its own, beside Lightning's EarlyStopping
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_restore_best_beside_lightnings_early_stopping(tmp_path, source):
    # UP_CURVE under Lightning's patience 2: best 0.5 at epoch 4, no improvement at 5 and 6 -> stops at 6
    stopper = PLEarlyStopping(monitor="val/err", patience=2)
    restore = RestoreBest(source=source)  # monitor and mode taken from Lightning's callback
    record = _EveryEpoch()
    callbacks = [record, stopper, restore]
    if source == "checkpoint":
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, monitor="val/err", mode="min", save_top_k=1))
    module = Scripted(UP_CURVE)
    trainer = _scripted_trainer(callbacks, enable_checkpointing=source == "checkpoint", default_root_dir=tmp_path)
    trainer.fit(module, _scripted_loader(), _scripted_loader())
    assert stopper.stopped_epoch == 6 and (restore.monitor, restore.mode) == ("val/err", "min")
    assert (restore.best_epoch, restore.best_value) == (4, pytest.approx(0.5))
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, record.weights[4][name]), name
        assert not torch.equal(tensor, record.weights[6][name]), name


def test_restore_best_without_a_metric_to_follow_names_what_to_add():
    trainer = _scripted_trainer([RestoreBest()])
    with pytest.raises(ValueError, match=r"RestoreBest\(monitor=None\) takes the early stopping callback's monitor"):
        trainer.fit(Scripted(UP_CURVE), _scripted_loader(), _scripted_loader())


# ------------------------------------------------------------------------------------------------
# Lightning's own tests with ours swapped in (needs a Lightning checkout: LIGHTNING_SRC, LIGHTNING_REF)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LIGHTNING_SRC"), reason="set LIGHTNING_SRC to a Lightning checkout")
def test_lightnings_own_early_stopping_tests_pass_with_ours():
    from lightning_early_stopping_suite import run

    ref = os.environ.get("LIGHTNING_REF", pytorch_lightning_version())
    assert run(Path(os.environ["LIGHTNING_SRC"]), ref or None, ["-x", "-W", "ignore"]) == 0


def pytorch_lightning_version() -> str:
    import pytorch_lightning

    return pytorch_lightning.__version__
