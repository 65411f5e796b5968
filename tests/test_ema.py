"""EMA callback: exact values against torch's AveragedModel in real Trainer runs, evaluation, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EndProcessGroup
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    Callback,
    ModelCheckpoint,
    Trainer,
    seed_everything,
)
from lightning_tricks.averaging import averaged_state_dict, raw_state_dict
from lightning_tricks.callbacks import EMA, SWA
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _loader(batch_size: int = 16) -> DataLoader:
    return DataLoader(_data(), batch_size=batch_size, shuffle=False)


class RefClassifier(Classifier):
    """Keeps a reference AveragedModel updated in ``optimizer_step``: once per real optimizer step."""

    def __init__(self, decay: float | None = None, warmup: bool = False, start_step: int = 0, every: int = 1) -> None:
        super().__init__(MLP((8,), 3, hidden=(16,)), 3, {"name": "sgd", "lr": 0.2, "momentum": 0.9})
        self.decay, self.warmup = decay, warmup
        self.__dict__["ref"] = None  # kept out of the module tree (not a submodule/parameter)
        self.start_step, self.every = start_step, every
        self.steps = 0
        self.last = 0

    @property
    def avg_fn(self) -> Any:
        if self.decay is None:
            return None
        return _warmup_avg_fn(self.decay) if self.warmup else get_ema_multi_avg_fn(self.decay)

    def on_fit_start(self) -> None:
        if self.start_step == 0 and self.ref is None:
            self.__dict__["ref"] = AveragedModel(self.net, multi_avg_fn=self.avg_fn)
            self.ref.update_parameters(self.net)  # AveragedModel's first update copies

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.steps += 1
        if self.steps == self.start_step and self.ref is None:
            self.__dict__["ref"] = AveragedModel(self.net, multi_avg_fn=self.avg_fn)
            self.ref.update_parameters(self.net)
            self.last = self.steps
        elif self.ref is not None and self.steps - self.last >= self.every:
            self.ref.update_parameters(self.net)
            self.last = self.steps


def _warmup_avg_fn(decay: float) -> Any:
    """EMA with decay ``min(decay, (1 + k) / (10 + k))``, ``k`` = updates after the initial copy."""

    @torch.no_grad()
    def fn(ema: list, cur: list, n_averaged: torch.Tensor) -> None:
        k = int(n_averaged) - 1
        torch._foreach_lerp_(ema, cur, 1 - min(decay, (1 + k) / (10 + k)))

    return fn


def _trainer(callbacks: list, **kwargs: Any) -> Trainer:
    opts = dict(
        max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
    )
    opts.update(kwargs)
    return Trainer(callbacks=callbacks, **opts)


def _assert_ema_equals_ref(ema: EMA, module: RefClassifier, atol: float = 1e-6) -> None:
    got = ema.average_tensors()
    ref = dict(module.ref.module.named_parameters())
    assert set(got) == {f"net.{n}" for n in ref}
    for name, p in ref.items():
        torch.testing.assert_close(got[f"net.{name}"], p, rtol=0, atol=atol)


# -- exact values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 4])
def test_ema_equals_averaged_model_without_warmup(accumulate: int) -> None:
    seed_everything(0)
    decay = 0.8
    module = RefClassifier(decay)
    ema = EMA(decay=decay, warmup=False, average_at_end=False)
    _trainer([ema], accumulate_grad_batches=accumulate, limit_val_batches=0).fit(module, _loader())
    # 6 batches per epoch: 6 steps, or 2 with accumulation (after batch 4 and the epoch-end flush)
    assert ema.num_updates == module.steps == (12 if accumulate == 1 else 4)
    _assert_ema_equals_ref(ema, module)


@pytest.mark.parametrize("accumulate", [1, 4])
def test_ema_with_warmup_equals_averaged_model_with_warmup_fn(accumulate: int) -> None:
    seed_everything(0)
    module = RefClassifier(0.99, warmup=True)
    ema = EMA(decay=0.99, warmup=True, average_at_end=False)
    _trainer([ema], accumulate_grad_batches=accumulate, limit_val_batches=0).fit(module, _loader())
    _assert_ema_equals_ref(ema, module)
    assert ema.current_decay() == pytest.approx((1 + ema.num_updates) / (10 + ema.num_updates))


def test_ema_start_step_and_every_n_steps() -> None:
    seed_everything(0)
    module = RefClassifier(0.49, start_step=3, every=2)  # updates every 2 steps with decay 0.7 ** 2
    ema = EMA(decay=0.7, warmup=False, start_step=3, every_n_steps=2, average_at_end=False)
    assert ema.current_decay() == 0.7**2 == 0.48999999999999994
    _trainer([ema], limit_val_batches=0).fit(module, _loader())
    assert ema.num_updates == (12 - 3) // 2
    _assert_ema_equals_ref(ema, module)


def test_ema_every_n_steps_keeps_the_horizon() -> None:
    """Warmup then decay, raised to the power n: after n steps the weight of the old average is the same
    as n every-step updates with the plain decay would leave (hand-computed values)."""
    ema = EMA(decay=0.999, warmup=True, every_n_steps=4)
    assert ema.current_decay() == pytest.approx(0.1**4, rel=1e-15)  # k = 0: min(0.999, 1/10) ** 4
    ema.num_updates = 10_000
    assert ema.current_decay() == pytest.approx(0.996005996001, rel=1e-12)  # 0.999 ** 4
    assert EMA(decay=0.999, every_n_steps=1).current_decay() == pytest.approx(0.1, abs=0)


def test_ema_average_at_end_and_float32_buffers_average() -> None:
    seed_everything(0)
    module = RefClassifier(0.9)
    ema = EMA(decay=0.9, warmup=False, buffers="average")
    _trainer([ema], limit_val_batches=0).fit(module, _loader())
    assert ema.holds_average
    avg = ema.average_tensors()
    assert "net.backbone.2.running_mean" in avg and "net.backbone.2.num_batches_tracked" not in avg
    for name, t in module.state_dict().items():
        if name in avg:
            torch.testing.assert_close(t, avg[name], rtol=0, atol=0)
    raw = ema.raw_tensors(module)
    assert not torch.equal(raw["net.head.0.weight"], module.net.head[0].weight)


def test_ema_checkpoint_saved_while_module_holds_the_average_keeps_raw_weights_beside_it(tmp_path: Path) -> None:
    seed_everything(0)
    module = RefClassifier()
    ema = EMA(decay=0.9)
    trainer = _trainer([ema], limit_val_batches=0)
    trainer.fit(module, _loader())
    assert ema.holds_average
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    ckpt = torch.load(tmp_path / "end.ckpt", weights_only=True)
    raw = ema.raw_tensors(module)
    held = module.state_dict()
    assert not torch.equal(raw["net.head.0.weight"], held["net.head.0.weight"])
    for name, t in ckpt["state_dict"].items():  # what a test runs on: the average
        assert torch.equal(t, held[name]), name
    for name, t in raw_state_dict(ckpt).items():  # what training goes on from
        assert torch.equal(t, raw[name]), name
    for name, t in ckpt["callbacks"][ema.state_key]["average"].items():
        assert torch.equal(t, ema.average_tensors()[name]), name
    assert torch.equal(averaged_state_dict(ckpt)["net.head.0.weight"], module.net.head[0].weight.detach())


def test_ema_checkpoint_during_fit_holds_the_average_that_was_validated(tmp_path: Path) -> None:
    class Record(Callback):
        def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
            self.validated = {k: v.clone() for k, v in pl_module.state_dict().items()}

    seed_everything(0)
    module = RefClassifier(0.9)
    ema = EMA(decay=0.9, warmup=False)
    record = Record()
    # the averaging callback after the one recording: the recorder sees the average still held
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = _trainer([record, ema, ckpt], max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, _loader(), _loader(32))
    saved = torch.load(tmp_path / "epoch=1-step=12.ckpt", weights_only=True)
    for name, t in saved["state_dict"].items():
        assert torch.equal(t, record.validated[name]), name
    for name, p in module.ref.module.named_parameters():  # torch's AveragedModel, updated by the module itself
        torch.testing.assert_close(saved["state_dict"][f"net.{name}"], p, rtol=0, atol=1e-6)
    raw = raw_state_dict(saved)
    assert not torch.equal(raw["net.head.0.weight"], saved["state_dict"]["net.head.0.weight"])
    for name, t in ema.raw_tensors(module).items():  # the last checkpoint: raw weights = the final raw weights
        assert torch.equal(raw[name], t), name


def test_ema_says_a_weights_only_checkpoint_holds_the_raw_weights(tmp_path: Path) -> None:
    seed_everything(0)
    module = RefClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    trainer = _trainer([EMA(decay=0.9), ckpt], max_epochs=1, enable_checkpointing=True, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(save_weights_only=True\) beside EMA: .* the raw weights"):
        trainer.fit(module, _loader())
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    assert "callbacks" not in saved  # no callback hook ran: the file has the raw weights only


def test_ema_without_an_average_evaluates_raw_weights_and_says_so() -> None:
    import warnings

    seed_everything(0)
    module = RefClassifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer([EMA(start_step=9)]).fit(module, _loader(), _loader(32))  # validation before the start: raw
    assert not [w for w in caught if "no average yet" in str(w.message)]
    fresh = _trainer([EMA()])
    with pytest.warns(UserWarning, match="no average yet"):
        got = fresh.test(module, _loader(32), verbose=False)[0]
    assert got == _trainer([]).test(module, _loader(32), verbose=False)[0]


@pytest.mark.parametrize("first", ["validate", "test"])
def test_ema_and_swa_after_an_evaluation_before_fit_train_and_average_exactly(first: str) -> None:
    """validate() or test() before fit (inference mode) leaves an average that the fit then updates: EMA equals
    torch's AveragedModel, SWA the equal-weight mean, as without the evaluation first."""
    seed_everything(0)
    module = RefClassifier(0.8)
    ema = EMA(decay=0.8, warmup=False, average_at_end=False)
    trainer = _trainer([ema])
    with pytest.warns(UserWarning, match="no average yet"):
        getattr(trainer, first)(module, _loader(32), verbose=False)
    trainer.fit(module, _loader())
    assert ema.num_updates == module.steps == 12
    _assert_ema_equals_ref(ema, module)

    def swa_average(evaluate_first: bool) -> dict[str, torch.Tensor]:
        seed_everything(0)
        module, swa = RefClassifier(), SWA(start=1, average_at_end=False)
        trainer = _trainer([swa], max_epochs=3)
        if evaluate_first:
            with pytest.warns(UserWarning, match="no average yet"):
                getattr(trainer, first)(module, _loader(32), verbose=False)
        trainer.fit(module, _loader())
        return swa.average_tensors()

    with_evaluation, without = swa_average(True), swa_average(False)
    assert with_evaluation and all(torch.equal(with_evaluation[k], without[k]) for k in without)


def test_ema_keeps_float32_average_of_bfloat16_weights() -> None:
    seed_everything(0)
    module = RefClassifier()
    ema = EMA(decay=0.9, warmup=False, average_at_end=False)
    _trainer([ema], precision="bf16-true", max_epochs=1, limit_val_batches=0).fit(module, _loader())
    assert module.net.head[0].weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in ema.average_tensors().values())
    assert ema.num_updates == 6


# -- evaluation ------------------------------------------------------------------------------------
def _fit_eval(evaluate: str) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    seed_everything(0)
    module = RefClassifier()
    ema = EMA(decay=0.9, evaluate=evaluate)
    trainer = _trainer([ema])
    trainer.fit(module, _loader(), _loader(32))
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test = {k: float(v) for k, v in trainer.test(module, _loader(32), verbose=False)[0].items()}
    return val, test, ema.raw_tensors(module)["net.head.0.weight"]


def test_ema_evaluate_both_logs_ema_under_module_names_and_raw_with_suffix() -> None:
    val_ema, test_ema, w_ema = _fit_eval("ema")
    val_raw, test_raw, w_raw = _fit_eval("raw")
    val_both, test_both, w_both = _fit_eval("both")
    assert torch.equal(w_ema, w_raw) and torch.equal(w_ema, w_both)  # evaluation never changes training
    assert val_ema["val/loss"] != pytest.approx(val_raw["val/loss"], abs=1e-4)  # the two weights differ
    want = {**val_ema, "val/loss_raw": val_raw["val/loss"], "val/acc_raw": val_raw["val/acc"]}
    assert val_both == pytest.approx(want, abs=1e-6)
    # after fit the module holds the average: "raw" tests swap the raw weights in, "both" logs both
    assert test_ema == pytest.approx({k: v for k, v in test_both.items() if not k.endswith("_raw")}, abs=1e-6)
    assert test_both["test/loss_raw"] == pytest.approx(test_raw["test/loss"], abs=1e-6)
    assert test_both["test/acc_raw"] == pytest.approx(test_raw["test/acc"], abs=1e-6)


def test_ema_test_from_checkpoint_uses_that_checkpoints_average(tmp_path: Path) -> None:
    seed_everything(0)
    module = RefClassifier()
    ema = EMA(decay=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = _trainer([ema, ckpt], max_epochs=3, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(module, _loader())
    path = tmp_path / "epoch=0-step=6.ckpt"
    got = trainer.test(module, _loader(32), ckpt_path=str(path), verbose=False)[0]
    # reference: the merged averaged weights in a plain module, tested without the callback
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert set(checkpoint["callbacks"][ema.state_key]["average"]) == {n for n, _ in module.named_parameters()}
    plain = RefClassifier()
    plain.load_state_dict(averaged_state_dict(checkpoint))
    want = _trainer([]).test(plain, _loader(32), verbose=False)[0]
    assert got == pytest.approx(want, abs=1e-6)
    assert got == pytest.approx(_trainer([]).test(RefClassifier(), _loader(32), ckpt_path=str(path), verbose=False)[0])
    raw = RefClassifier()
    raw.load_state_dict(raw_state_dict(checkpoint))
    raw_loss = _trainer([]).test(raw, _loader(32), verbose=False)[0]["test/loss"]
    assert raw_loss != pytest.approx(want["test/loss"], abs=1e-4)


# -- resume ----------------------------------------------------------------------------------------
def test_ema_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    def run(ckpt_path: str | None, dirpath: Path) -> tuple[EMA, RefClassifier]:
        seed_everything(0 if ckpt_path is None else 1)
        module = RefClassifier()
        ema = EMA(decay=0.95, every_n_steps=2, evaluate="both")
        ckpt = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1)
        trainer = _trainer([ema, ckpt], max_epochs=4, accumulate_grad_batches=2, enable_checkpointing=True)
        trainer.fit(module, _loader(), _loader(32), ckpt_path=ckpt_path)
        return ema, module

    full_ema, full = run(None, tmp_path / "a")
    resumed_ema, resumed = run(str(tmp_path / "a" / "epoch=1-step=6.ckpt"), tmp_path / "b")
    assert resumed_ema.num_updates == full_ema.num_updates == 6
    for name, t in full_ema.average_tensors().items():
        assert torch.equal(t, resumed_ema.average_tensors()[name]), name
    for name, t in full.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name
    full_raw, resumed_raw = full_ema.raw_tensors(full), resumed_ema.raw_tensors(resumed)
    for name, t in full_raw.items():
        assert torch.equal(t, resumed_raw[name]), name


# -- arguments and config --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.0}, "decay must be a number in \\(0, 1\\), got 1.0"),
        ({"decay": 0.0}, "decay must be a number in"),
        ({"decay": 1.5}, "decay must be a number in"),
        ({"decay": True}, "decay must be a number in"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"start_step": -1}, "start_step"),
        ({"evaluate": "avg"}, "evaluate must be one of"),
        ({"buffers": "mean"}, "buffers must be"),
        ({"raw_suffix": ""}, "raw_suffix"),
    ],
)
def test_ema_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


def test_ema_start_beyond_the_run_fails_at_setup() -> None:
    with pytest.raises(ValueError, match="start_step=50 is beyond the run"):
        _trainer([EMA(start_step=50)], limit_val_batches=0).fit(RefClassifier(), _loader())
    with pytest.raises(ValueError, match="start_step=5 is not before the end"):
        _trainer([EMA(start_step=5)], max_steps=5, limit_val_batches=0).fit(RefClassifier(), _loader())


def test_ema_state_keys_differ_by_arguments() -> None:
    assert EMA(decay=0.9).state_key != EMA(decay=0.99).state_key


def test_ema_config_composes_and_instantiates() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="callbacks/ema")
    ema = instantiate(cfg.callbacks.ema)
    assert isinstance(ema, EMA) and ema.decay == 0.999 and ema.evaluate == "ema"


# -- DDP -------------------------------------------------------------------------------------------
class _SaveAverage(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:  # after the callbacks' on_train_end
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        swa = next(c for c in trainer.callbacks if isinstance(c, SWA))
        torch.save(
            {
                "avg": ema.average_tensors(),
                "ref": dict(pl_module.ref.module.named_parameters()),
                "swa": swa.average_tensors(),
                "module": pl_module.state_dict(),
            },
            f"{self.out}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_ema_and_swa_under_ddp_are_identical_on_all_ranks(tmp_path: Path) -> None:
    seed_everything(0)
    module = RefClassifier(0.9)
    ema = EMA(decay=0.9, warmup=False, average_at_end=False)
    swa = SWA(start=0, update_every="step")  # ends with the SWA weights and BatchNorm statistics in the module
    trainer = _trainer(
        [ema, swa, _SaveAverage(str(tmp_path)), EndProcessGroup()],
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_val_batches=0,
    )
    trainer.fit(module, _loader(8))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name, t in r0["avg"].items():
        assert torch.equal(t, r1["avg"][name])
        torch.testing.assert_close(t, r0["ref"][name[len("net.") :]], rtol=0, atol=1e-6)
    for name, t in r0["swa"].items():
        assert torch.equal(t, r1["swa"][name])
    # each rank recomputed BatchNorm statistics on its own shard; they were averaged across ranks
    assert r0["module"]["net.backbone.2.running_mean"].abs().sum() > 0
    for name, t in r0["module"].items():
        torch.testing.assert_close(t, r1["module"][name], rtol=0, atol=1e-6)
