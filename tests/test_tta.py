"""Test-time augmentation: the pure views / mean of softmax, the module's test step, the ensembles."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import Trainer, seed_everything
from lightning_tricks.augment import TTA_MODES, check_tta, tta_predict, tta_views
from lightning_tricks.callbacks import LRSchedule, SnapshotEnsemble
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.ensemble import CheckpointEnsemble, EnsembleModule, evaluate_members
from lightning_tricks.losses import classification_loss
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP

SHAPE = (1, 6, 6)


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _labels(x: torch.Tensor) -> torch.Tensor:
    # depends on the left/right halves, so a flip changes some predictions of a trained model
    return (x[..., :3].mean(dim=(1, 2, 3)) > x[..., 3:].mean(dim=(1, 2, 3))).long() + (x.mean(dim=(1, 2, 3)) > 0).long()


def _loader(n: int = 24, batch_size: int = 8) -> DataLoader:
    x = _images(n)
    return DataLoader(TensorDataset(x, _labels(x)), batch_size=batch_size)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(SHAPE, 3, hidden=(16,))


class Symmetric(nn.Module):
    """A flip-invariant classifier: ``g(x + flip(x))`` (addition commutes, so the logits are bit-equal)."""

    def __init__(self) -> None:
        super().__init__()
        self.g = MLP(SHAPE, 3, hidden=(8,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x + x.flip(-1))


def _trainer(**kwargs: Any) -> Trainer:
    opts: dict[str, Any] = dict(
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
    )
    opts.update(kwargs)
    return Trainer(**opts)


# -- the core ---------------------------------------------------------------------------------------


def test_flip_is_the_mean_of_the_two_softmaxes():
    net = _net().eval()
    x = _images(5)
    with torch.no_grad():
        by_hand = (F.softmax(net(x), dim=-1) + F.softmax(net(torch.flip(x, dims=[3])), dim=-1)) / 2
        torch.testing.assert_close(tta_predict(net, x, "flip"), by_hand, rtol=0, atol=1e-7)
        assert torch.equal(tta_predict(net, x, "none"), net(x).softmax(-1))


def test_crop_views_are_shifted_zero_padded_copies():
    x = _images(3)
    views = tta_views(x, "flip_crop", padding=2)
    assert len(views) == 10 and len(tta_views(x, "crop")) == 5 and len(tta_views(x, "flip")) == 2
    padded = F.pad(x, (2, 2, 2, 2))
    corners = [padded[..., dy : dy + 6, dx : dx + 6] for dy in (0, 4) for dx in (0, 4)]
    for view, want in zip(views[:5], [x, *corners]):
        assert torch.equal(view, want)
    for view, plain in zip(views[5:], views[:5]):
        assert torch.equal(view, plain.flip(-1))
    net = _net().eval()
    with torch.no_grad():
        want = torch.stack([net(v).softmax(-1) for v in views]).mean(0)
        torch.testing.assert_close(tta_predict(net, x, "flip_crop"), want)


def test_a_flip_invariant_model_gives_the_same_predictions():
    net = Symmetric().eval()
    x = _images(7)
    with torch.no_grad():
        assert torch.equal(tta_predict(net, x, "flip"), tta_predict(net, x, "none"))


def test_bad_modes_and_flips_refused_in_one_line():
    with pytest.raises(ValueError, match=r"tta must be one of \('none', 'flip', 'crop', 'flip_crop'\), got 'hflip'"):
        check_tta("hflip")
    with pytest.raises(ValueError, match="tta must be one of"):
        Classifier(_net(), 3, tta="hflip")
    with pytest.raises(ValueError, match=r"tta='flip' averages over horizontally flipped images, but digits has"):
        check_tta("flip", False, "digits")
    assert check_tta("crop", False) == "crop"
    with pytest.raises(ValueError, match=r"needs images \(N, C, H, W\)"):
        tta_views(torch.zeros(2, 5), "flip")
    assert set(TTA_MODES) == {"none", "flip", "crop", "flip_crop"}


# -- the module ---------------------------------------------------------------------------------------


def test_tta_none_is_the_plain_test_step_bit_for_bit():
    x = _images(8)
    y = _labels(x)
    module = Classifier(_net(), 3, tta="none")
    (result,) = _trainer().test(module, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    with torch.no_grad():
        logits = module.net.eval()(x)
    assert result["test/loss"] == classification_loss(logits, y).item()
    assert result["test/acc"] == (logits.argmax(-1) == y).float().mean().item()
    preds = _trainer().predict(module, DataLoader(TensorDataset(x), batch_size=8))
    assert torch.equal(preds[0], logits.softmax(-1))


@pytest.mark.parametrize("mode", ["flip", "flip_crop"])
def test_test_step_scores_the_tta_probabilities(mode):
    x = _images(8)
    y = _labels(x)
    module = Classifier(_net(), 3, tta=mode)
    (result,) = _trainer().test(module, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    with torch.no_grad():
        net = module.net.eval()
        probs = torch.stack([net(v).softmax(-1) for v in tta_views(x, mode)]).mean(0)
    assert result["test/loss"] == pytest.approx(-probs[torch.arange(8), y].log().mean().item(), rel=1e-6)
    assert result["test/acc"] == pytest.approx((probs.argmax(-1) == y).float().mean().item())
    with torch.no_grad():
        out = module.eval().evaluation_outputs([x, y], "test")
        torch.testing.assert_close(out["test/loss"], -probs[torch.arange(8), y].log())
        plain = module.evaluation_outputs([x, y], "val")  # validation never uses TTA
        torch.testing.assert_close(plain["val/loss"], F.cross_entropy(net(x), y, reduction="none"))
    preds = _trainer().predict(module, DataLoader(TensorDataset(x), batch_size=8))
    torch.testing.assert_close(preds[0], probs)


def test_flip_tta_is_refused_at_setup_for_data_whose_class_flips():
    seed_everything(0)
    dm = DigitsDataModule(batch_size=32, loader="resident")
    dm.flip = False  # what the data modules say for digits / MNIST
    module = Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10, tta="flip")
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"tta='flip' .* DataModule DigitsDataModule has flip=False") as info:
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0 and "\n" not in str(info.value)
    crop = Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10, tta="crop")  # no flip: allowed
    _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, limit_test_batches=1).fit(crop, datamodule=dm)
    with pytest.raises(ValueError, match="has flip=False"):
        _trainer(limit_test_batches=1).test(module, datamodule=dm, verbose=False)


def test_flip_tta_warns_when_training_never_flipped():
    def fit(**data: Any) -> None:
        seed_everything(0)
        module = Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10, tta="flip")
        dm = DigitsDataModule(batch_size=32, loader="resident", flip=True, **data)
        _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, datamodule=dm)

    with pytest.warns(UserWarning, match="trains without augmentation"):
        fit()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trains without augmentation")
        fit(augment="crop_flip")


def test_flip_invariant_module_tests_the_same_with_and_without_tta():
    results = {}
    for mode in ("none", "flip"):
        torch.manual_seed(0)
        net = Symmetric()
        (results[mode],) = _trainer().test(Classifier(net, 3, tta=mode), _loader(), verbose=False)
    assert results["none"]["test/acc"] == results["flip"]["test/acc"]
    assert results["none"]["test/loss"] == pytest.approx(results["flip"]["test/loss"], rel=1e-6)


# -- ensembles ----------------------------------------------------------------------------------------


def _states(k: int = 3) -> list[dict[str, torch.Tensor]]:
    return [Classifier(_net(seed), 3).state_dict() for seed in range(k)]


def _by_hand(states, x, mode) -> torch.Tensor:
    total = torch.zeros(x.shape[0], 3)
    with torch.no_grad():
        for state in states:
            module = Classifier(_net(), 3)
            module.load_state_dict(state)
            module.eval()
            total += torch.stack([module(v).softmax(-1) for v in tta_views(x, mode)]).mean(0)
    return total / len(states)


def test_checkpoint_ensemble_uses_tta_given_or_from_the_template():
    states = _states()
    x = _images(6)
    want = _by_hand(states, x, "flip")
    given = CheckpointEnsemble(lambda: Classifier(_net(), 3), states, tta="flip")
    torch.testing.assert_close(given.predict_proba(x), want)
    from_template = CheckpointEnsemble(lambda: Classifier(_net(), 3, tta="flip"), states)
    assert from_template.tta == "flip"
    torch.testing.assert_close(from_template.predict_proba(x), want)
    plain = CheckpointEnsemble(lambda: Classifier(_net(), 3), states)
    assert plain.tta == "none"
    torch.testing.assert_close(plain.predict_proba(x), _by_hand(states, x, "none"))
    assert not torch.allclose(plain.predict_proba(x), want)
    loader = _loader()
    metrics = given.evaluate(loader)
    xs, ys = loader.dataset.tensors
    probs = _by_hand(states, xs, "flip")
    assert metrics["ensemble/acc"] == pytest.approx((probs.argmax(-1) == ys).float().mean().item())
    assert metrics["ensemble/nll"] == pytest.approx(-probs[torch.arange(len(ys)), ys].log().mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="tta must be one of"):
        EnsembleModule([_net()], tta="mirror")


def test_evaluate_members_with_tta_and_a_custom_forward():
    states = _states(2)
    module = Classifier(_net(), 3)
    loader = _loader()
    calls = []

    def forward(m: nn.Module, batch: Any) -> torch.Tensor:
        calls.append(batch[0].shape)
        return m(batch[0])

    out = evaluate_members(module, states, lambda: loader, forward=forward, tta="crop")
    assert len(calls) == 2 * len(loader) * 5  # members x batches x views
    xs, ys = loader.dataset.tensors
    probs = _by_hand(states, xs, "crop")
    assert out["ensemble"]["acc"] == pytest.approx((probs.argmax(-1) == ys).float().mean().item())


def test_snapshot_ensemble_evaluates_with_the_modules_tta():
    seed_everything(0)
    module = Classifier(_net(), 3, {"name": "sgd", "lr": 0.2, "momentum": 0.9}, tta="flip")
    snap = SnapshotEnsemble(cycles=2)
    trainer = _trainer(max_epochs=2, callbacks=[snap, LRSchedule()], limit_val_batches=0)
    trainer.fit(module, _loader())
    (result,) = trainer.test(module, _loader(), verbose=False)
    xs, ys = _loader().dataset.tensors
    probs = _by_hand(snap.snapshots, xs, "flip")
    assert result["test/ensemble/acc"] == pytest.approx((probs.argmax(-1) == ys).float().mean().item())
    assert result["test/ensemble/nll"] == pytest.approx(-probs[torch.arange(len(ys)), ys].log().mean().item(), 1e-5)
    plain = _by_hand(snap.snapshots, xs, "none")
    assert abs(result["test/ensemble/nll"] + plain[torch.arange(len(ys)), ys].log().mean().item()) > 1e-3
    assert snap.ensemble(lambda: Classifier(_net(), 3)).tta == "none"  # nothing given, a template without TTA
    snap.tta = "crop"  # the callback's own mode goes to its ensemble
    torch.testing.assert_close(
        snap.ensemble(lambda: Classifier(_net(), 3)).predict_proba(xs), _by_hand(snap.snapshots, xs, "crop")
    )
    with pytest.raises(ValueError, match="tta must be one of"):
        SnapshotEnsemble(cycles=2, tta="flips")


def test_snapshot_ensemble_refuses_flip_on_data_whose_class_flips():
    dm = DigitsDataModule(batch_size=32, loader="resident")
    dm.flip = False
    module = Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10)
    trainer = _trainer(max_epochs=2, callbacks=[SnapshotEnsemble(cycles=2, tta="flip")], limit_train_batches=2)
    with pytest.raises(ValueError, match="DataModule DigitsDataModule has flip=False"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0
