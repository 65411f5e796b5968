"""Sanity checks: initial loss, overfit a tiny subset, update/weight ratios, gradient norms, dead ReLUs."""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    Callback,
    Logger,
    ModelCheckpoint,
    Trainer,
    seed_everything,
)
from lightning_tricks.callbacks import (
    InitialLossCheck,
    OverfitCheck,
    UpdateRatioMonitor,
)
from lightning_tricks.callbacks.sanity import DeadUnitMonitor, GradNormMonitor
from lightning_tricks.data import DigitsDataModule, TensorBatchLoader
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP
from lightning_tricks.sanity import (
    SanityCheckError,
    UpdateRatio,
    expected_initial_loss,
    grad_norms,
    initial_loss,
    judge_initial_loss,
    judge_ratio,
    overfit_check,
    relu_stats,
    take_samples,
    update_ratios,
)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64, loader="resident")
    dm.setup("fit")
    return dm


def make_module(seed=0, lr=0.05, hidden=(32,), **opt):
    torch.manual_seed(seed)
    return Classifier(MLP((1, 8, 8), 10, hidden=hidden), 10, {"name": "sgd", "lr": lr, **opt})


def tiny_trainer(**kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    base.update(kw)
    return Trainer(**base)


def fixed_loader(dm, n=192, batch_size=64):
    x, y = dm.splits["train"]
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=False)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def with_prefix(self, prefix):
        return [
            (s, {k: v for k, v in m.items() if k.startswith(prefix)})
            for s, m in self.rows
            if any(k.startswith(prefix) for k in m)
        ]


# -- 1. initial loss: core -----------------------------------------------------------------------
def test_expected_initial_loss_and_judge():
    assert expected_initial_loss(10) == math.log(10)
    ok, reason = judge_initial_loss(math.log(10) * 1.05, math.log(10), rtol=0.1)
    assert ok and "within 0.1" in reason
    ok, reason = judge_initial_loss(math.log(10) * 1.5, math.log(10), rtol=0.1)
    assert not ok and "50% above the expected 2.303" in reason and "last-layer" in reason
    ok, reason = judge_initial_loss(0.5, math.log(10), rtol=0.1)
    assert not ok and "below" in reason and "not softmax cross-entropy" in reason
    ok, reason = judge_initial_loss(math.nan, math.log(10))
    assert not ok and "non-finite" in reason
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        expected_initial_loss(1)


def test_initial_loss_passes_fresh_flags_large_head_and_leaves_module_unchanged(digits):
    x, y = digits.splits["train"]
    module = make_module()
    module.net.head[-1].bias.data.zero_()
    before = copy.deepcopy(module.state_dict())
    modes = [m.training for m in module.modules()]
    report = initial_loss(module, (x[:128], y[:128]), num_classes=10)
    # exact: the same eval-mode forward by hand
    with torch.no_grad():
        module.eval()
        want = float(nn.functional.cross_entropy(module(x[:128]), y[:128]))
        module.train()
    assert report.loss == pytest.approx(want, abs=1e-6)
    assert report.passed and report.expected == math.log(10) and report.num_classes == 10
    assert abs(report.loss - math.log(10)) < 0.1 * math.log(10)
    assert [m.training for m in module.modules()] == modes  # modes restored
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # no BN buffer update

    with torch.no_grad():
        module.net.head[-1].weight.mul_(50.0)
    bad = initial_loss(module, (x[:128], y[:128]))
    assert not bad.passed and bad.loss > 3 * math.log(10)
    assert "above the expected 2.303" in bad.reason and "last-layer weights" in bad.reason


def test_initial_loss_num_classes_mismatch_and_explicit_expected(digits):
    x, y = digits.splits["train"]
    module = make_module()
    report = initial_loss(module, (x[:64], y[:64]), num_classes=12)
    assert not report.passed and "num_classes=12 but the logits have 10 columns" in report.reason
    report = initial_loss(module, (x[:64], y[:64]), expected=0.1, rtol=0.1)
    assert not report.passed and report.expected == 0.1
    with pytest.raises(ValueError, match="expected must be 'log_num_classes' or a number"):
        initial_loss(module, (x[:64], y[:64]), expected="log")


# -- 1. initial loss: callback -------------------------------------------------------------------
def test_initial_loss_check_callback(digits):
    module = make_module()
    cb = InitialLossCheck(action="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(max_steps=1, callbacks=[cb]).fit(module, train_dataloaders=fixed_loader(digits))
    assert not [w for w in caught if "InitialLossCheck" in str(w.message)]  # a healthy model: no warning
    assert cb.report is not None and cb.report.passed and cb.report.num_classes == 10

    big = make_module()
    with torch.no_grad():
        big.net.head[-1].weight.mul_(50.0)
    with pytest.raises(SanityCheckError, match="InitialLossCheck failed: initial loss .* above the expected 2.303"):
        tiny_trainer(max_steps=1, callbacks=[InitialLossCheck(action="raise")]).fit(
            big, train_dataloaders=fixed_loader(digits)
        )
    warn_cb = InitialLossCheck(action="warn")
    with pytest.warns(UserWarning, match="InitialLossCheck failed"):
        tiny_trainer(max_steps=1, callbacks=[warn_cb]).fit(copy.deepcopy(big), train_dataloaders=fixed_loader(digits))
    assert not warn_cb.report.passed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rtol": 0}, "rtol must be a number in \\(0, inf\\], got 0"),
        ({"action": "stop"}, "action must be one of"),
        ({"expected": -1.0}, "expected must be 'log_num_classes' or a number > 0, got -1.0"),
    ],
)
def test_initial_loss_check_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InitialLossCheck(**kwargs)


# -- 2. overfit a tiny subset ------------------------------------------------------------------------
def test_overfit_check_reaches_near_zero_and_leaves_everything_untouched(digits):
    module = make_module(hidden=(64, 64))
    opt = module.configure_optimizers()
    before = copy.deepcopy(module.state_dict())
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    result = overfit_check(module, digits, num_samples=20, steps=200, target_loss=0.05, optimizer=opt)
    assert result.passed, result.reason
    assert result.final_loss <= 0.05 and result.num_samples == 20 and result.accuracy == 1.0
    assert result.initial_loss > 1.5 and result.steps < 200
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # bit-identical
    assert all(p.grad is None for p in module.parameters())
    assert opt.state_dict()["state"] == {}  # the real optimizer never stepped
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG did not advance


def test_overfit_check_fails_with_zero_lr(digits):
    module = make_module()
    result = overfit_check(module, digits, num_samples=20, steps=30, lr=0.0)
    assert not result.passed
    assert result.final_loss == result.initial_loss  # nothing moved
    assert "the learning rate is zero" in result.reason
    assert "> target 0.05 after 30 steps on 20 samples" in result.reason


def test_overfit_check_turns_regularization_off(digits):
    torch.manual_seed(0)
    module = Classifier(
        MLP((1, 8, 8), 10, hidden=(64,), dropout=0.5),
        10,
        {"name": "sgd", "lr": 0.05, "weight_decay": 0.5},
        label_smoothing=0.5,
    )
    result = overfit_check(module, digits, num_samples=20, steps=200)
    # weight decay 0.5 and label smoothing 0.5 would keep the loss far above 0.05; dropout 0.5 would make it noisy
    assert result.passed, result.reason
    assert module.training and module.net.backbone[-1].training  # the real module's dropout untouched


def test_take_samples_from_every_source(digits):
    x, y = digits.splits["train"]
    want_x, want_y = x[:7], y[:7]
    sources = [
        (x, y),
        digits,
        DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True),  # items 0..6, not a shuffled batch
        TensorBatchLoader(x, y, batch_size=5, shuffle=True),
        [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:9], y[6:9])],  # a list of batches is an iterable... of batches
    ]
    for source in sources[:4]:
        got_x, got_y = take_samples(source, 7)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y), type(source)
    got_x, got_y = take_samples(iter(sources[4]), 7)
    assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)


def test_overfit_check_callback_keeps_real_run_bit_identical(digits):
    def run(callbacks):
        seed_everything(0)
        module = make_module(hidden=(32,))
        tiny_trainer(max_steps=3, callbacks=callbacks).fit(module, train_dataloaders=fixed_loader(digits))
        return module.state_dict()

    cb = OverfitCheck(num_samples=20, steps=200)
    with_check, without = run([cb]), run([])
    assert cb.result is not None and cb.result.passed, cb.result
    assert all(torch.equal(with_check[k], without[k]) for k in without)
    with pytest.raises(SanityCheckError, match="OverfitCheck failed: loss .* > target"):
        run([OverfitCheck(steps=10, lr=0.0, action="raise")])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 0}, "num_samples must be an int >= 1, got 0"),
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"target_loss": 0.0}, "target_loss must be a number in \\(0, inf\\], got 0.0"),
        ({"lr": -1.0}, "lr must be a number in \\[0, inf\\] or None, got -1.0"),
    ],
)
def test_overfit_check_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OverfitCheck(**kwargs)


# -- 3. update/weight ratio -----------------------------------------------------------------------------
def test_update_ratios_core_matches_formula():
    torch.manual_seed(0)
    before = [torch.randn(4, 3), torch.randn(5), torch.zeros(2)]
    after = [b + 1e-3 * torch.randn_like(b) for b in before]
    got = update_ratios(before, after)
    want = [
        float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-12))
        for a, b in zip(after, before)
    ]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    params = [nn.Parameter(b.clone()) for b in before]
    tracker = UpdateRatio(params)
    tracker.snapshot()
    with torch.no_grad():
        for p, a in zip(params, after):
            p.copy_(a)
    assert tracker.ratios().tolist() == pytest.approx(want, rel=1e-6)
    assert judge_ratio("w", 1e-3, (1e-4, 1e-2))[0]
    assert "LR is likely too high" in judge_ratio("w", 0.1, (1e-4, 1e-2))[1]
    assert "too low" in judge_ratio("w", 1e-6, (1e-4, 1e-2))[1]


class RecordUpdate(Callback):
    """Test-side hand computation: clones every weight before each optimizer step and the ratio after."""

    def __init__(self):
        self.before = {}
        self.ratios = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.step = trainer.global_step
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.ndim >= 2}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        self.ratios[self.step] = {
            n: float(torch.linalg.vector_norm(params[n].detach() - b) / torch.linalg.vector_norm(b))
            for n, b in self.before.items()
        }


def test_update_ratio_monitor_logs_hand_computed_ratios(digits):
    module = make_module(hidden=(32, 32), momentum=0.9)
    logger = MemoryLogger()
    monitor = UpdateRatioMonitor(every_n_steps=2, band=(1e-9, 1e-8))  # everything is "too high": warns
    record = RecordUpdate()
    trainer = tiny_trainer(max_steps=5, callbacks=[record, monitor], logger=logger, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="UpdateRatioMonitor") as caught:
        trainer.fit(module, train_dataloaders=fixed_loader(digits, n=320))
    rows = logger.with_prefix("update_ratio/")
    assert [s for s, _ in rows] == [0, 2, 4]  # measured steps only
    names = [n for n, p in module.named_parameters() if p.ndim >= 2]
    for step, metrics in rows:
        want = record.ratios[step]
        assert set(metrics) == {f"update_ratio/{n}" for n in names} | {"update_ratio/median"}
        for n in names:
            assert metrics[f"update_ratio/{n}"] == pytest.approx(want[n], rel=1e-5)
        assert metrics["update_ratio/median"] == pytest.approx(statistics.median(want.values()), rel=1e-5)
    ours = [w for w in caught if "UpdateRatioMonitor" in str(w.message)]
    assert len(ours) == len(names)  # once per tensor, not once per measured step
    assert monitor.warned == set(names)


@pytest.mark.filterwarnings("ignore:UpdateRatioMonitor")
def test_update_ratio_monitor_skipped_steps_do_nothing(digits, monkeypatch):
    module = make_module()
    monitor = UpdateRatioMonitor(every_n_steps=4)
    calls = []
    monkeypatch.setattr(UpdateRatio, "snapshot", lambda self: calls.append("snap"))
    monkeypatch.setattr(UpdateRatio, "ratios", lambda self: calls.append("ratio") or torch.zeros(len(self.params)))
    tiny_trainer(max_steps=9, callbacks=[monitor]).fit(module, train_dataloaders=fixed_loader(digits, n=640))
    assert calls == ["snap", "ratio"] * 3  # steps 0, 4, 8


def test_update_ratio_monitor_resume_keeps_warned_set(digits, tmp_path):
    def run(max_steps, ckpt=None, callbacks=()):
        module = make_module(hidden=(32,))
        monitor = UpdateRatioMonitor(every_n_steps=2, band=(1e-3, 2e-3))
        trainer = tiny_trainer(
            max_steps=max_steps, callbacks=[monitor, *callbacks], enable_checkpointing=bool(callbacks)
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, train_dataloaders=fixed_loader(digits, n=192), ckpt_path=ckpt)
        return module, monitor, [w for w in caught if "UpdateRatioMonitor" in str(w.message)]

    full, full_mon, _ = run(5)
    save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    run(3, callbacks=[save])
    resumed, res_mon, warns = run(5, ckpt=str(tmp_path / "epoch=0-step=3.ckpt"))
    assert res_mon.warned == full_mon.warned and res_mon.last == full_mon.last
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    restored = res_mon.warned - {w.message.args[0].split(" of ")[1].split(" is ")[0] for w in warns}
    assert restored  # names warned before the checkpoint were not warned again after the resume


# -- gradient norms and dead units ------------------------------------------------------------------
def test_grad_norms_and_relu_stats_core():
    a, b, c = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0, 2.0])
    norms, total = grad_norms([a, b, c])
    assert norms.tolist() == [5.0, 3.0, 0.0] and total.item() == pytest.approx(math.sqrt(34))
    zero, dead = relu_stats(torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]))  # (N=2, C=2, L=2)
    assert zero.item() == 7 / 8 and dead.item() == 0.5


def test_grad_norm_and_dead_unit_monitors(digits):
    module = make_module(hidden=(16, 16))
    with torch.no_grad():  # the second hidden layer's pre-activations are all negative: every unit dead
        module.net.backbone[4].weight.zero_()
        bn = module.net.backbone[5]
        bn.bias.fill_(-1.0)
    logger = MemoryLogger()
    expected = {}

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            expected[trainer.global_step] = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))

    grad_mon, dead_mon = GradNormMonitor(every_n_steps=2), DeadUnitMonitor(every_n_steps=2)
    tiny_trainer(max_steps=3, callbacks=[Probe(), grad_mon, dead_mon], logger=logger).fit(
        module, train_dataloaders=fixed_loader(digits)
    )
    grad_rows = logger.with_prefix("grad_norm/")
    assert [s for s, _ in grad_rows] == [0, 2]
    for step, metrics in grad_rows:
        assert metrics["grad_norm/total"] == pytest.approx(expected[step], rel=1e-5)
    dead_rows = logger.with_prefix("dead_units/")
    assert [s for s, _ in dead_rows] == [0, 2]
    first = dead_rows[0][1]
    assert first["dead_units/net.backbone.6"] == 1.0  # the ReLU after the dead layer
    assert 0.0 <= first["dead_units/net.backbone.3"] < 1.0
    assert all(not m._forward_hooks for m in module.modules())  # hooks only live on measured steps


# -- configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, cls",
    [
        ("initial_loss_check", InitialLossCheck),
        ("overfit_check", OverfitCheck),
        ("update_ratio_monitor", UpdateRatioMonitor),
    ],
)
def test_config_composes_and_instantiates(name, cls):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=f"callbacks/{name}")
    cb = instantiate(cfg.callbacks[name])
    assert isinstance(cb, cls)
