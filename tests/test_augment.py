"""Batch augmentation: the pure mixup / CutMix / Cutout / crop-flip functions and their callbacks."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks._lightning import (
    LightningModule,
    ModelCheckpoint,
    Trainer,
    seed_everything,
)
from lightning_tricks.augment import (
    RandomCropFlip,
    cutmix_batch,
    cutout_batch,
    cutout_boxes,
    mixup_batch,
    random_crop_flip,
    sample_beta,
)
from lightning_tricks.callbacks import CutMix, Cutout, Mixup

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _identity_batch(n: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is the unit vector e_i, so a mixed row shows its weights and partner directly."""
    return torch.eye(n), torch.arange(n) % classes


# -- Beta draws -------------------------------------------------------------------------------


def test_sample_beta_is_reproducible_and_has_beta_moments():
    a = [sample_beta(0.4, _gen(1)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g = _gen(2)
    draws = torch.tensor([sample_beta(0.4, g) for _ in range(4000)])
    assert abs(draws.mean().item() - 0.5) < 0.03
    assert abs(draws.var().item() - 1 / (4 * (2 * 0.4 + 1))) < 0.02  # Beta(a, a): 1 / (4 (2a + 1))
    assert 0.0 <= draws.min() and draws.max() <= 1.0
    for alpha in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"alpha must be a number in \(0, inf\)"):
            sample_beta(alpha)


# -- mixup ------------------------------------------------------------------------------------


def test_mixup_mixes_labels_with_the_image_lambda():
    x, y = _identity_batch()
    out = mixup_batch(x, y, num_classes=4, alpha=0.4, generator=_gen(3))
    lam, idx = out.lam, out.index
    assert 0 < lam < 1 and sorted(idx.tolist()) == list(range(6))
    torch.testing.assert_close(out.x, lam * x + (1 - lam) * x[idx])
    onehot = F.one_hot(y, 4).float()
    torch.testing.assert_close(out.y, lam * onehot + (1 - lam) * onehot[idx])
    # the image weight read off the pixels equals the label weight
    for i in range(6):
        if idx[i] != i:
            assert out.x[i, i].item() == pytest.approx(lam)
            if y[i] != y[idx[i]]:
                assert out.y[i, y[i]].item() == pytest.approx(out.x[i, i].item())
    torch.testing.assert_close(out.y.sum(1), torch.ones(6))
    again = mixup_batch(x, y, num_classes=4, alpha=0.4, generator=_gen(3))
    assert again.lam == lam and torch.equal(again.index, idx)


def test_mixup_with_given_lambda_and_soft_targets():
    x = torch.randn(4, 3)
    soft = torch.softmax(torch.randn(4, 5), dim=1)
    idx = torch.tensor([3, 2, 1, 0])
    out = mixup_batch(x, soft, lam=0.3, index=idx)
    torch.testing.assert_close(out.x, 0.3 * x + 0.7 * x[idx])
    torch.testing.assert_close(out.y, 0.3 * soft + 0.7 * soft[idx])
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\], got 1.5"):
        mixup_batch(x, soft, lam=1.5)
    with pytest.raises(ValueError, match="num_classes is needed"):
        mixup_batch(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha must be a number in"):
        mixup_batch(x, soft, alpha=0.0)


# -- CutMix -----------------------------------------------------------------------------------


def _constant_images(n: int = 5, h: int = 8, w: int = 10) -> torch.Tensor:
    """Image i is filled with the value i + 1, so each output pixel tells where it came from."""
    return (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 2, h, w).clone()


def test_cutmix_pastes_the_box_and_corrects_lambda_to_its_area():
    x, y = _constant_images(), torch.tensor([0, 1, 2, 3, 4])
    out = cutmix_batch(x, y, num_classes=5, alpha=1.0, generator=_gen(4))
    top, left, bottom, right = out.box
    inside = torch.zeros(8, 10, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    for i in range(5):
        j = out.index[i].item()
        assert torch.equal(out.x[i][:, inside], x[j][:, inside])
        assert torch.equal(out.x[i][:, ~inside], x[i][:, ~inside])
    assert out.lam == pytest.approx(1 - inside.float().mean().item())
    onehot = F.one_hot(y, 5).float()
    torch.testing.assert_close(out.y, out.lam * onehot + (1 - out.lam) * onehot[out.index])
    # label weight of the own class equals the fraction of own pixels
    for i in range(5):
        if out.index[i] != i:
            own = (out.x[i] == i + 1).float().mean().item()
            assert out.y[i, i].item() == pytest.approx(own)


def test_cutmix_box_clipped_at_the_corner_changes_lambda():
    x, y = _constant_images(2, 8, 8), torch.tensor([0, 1])
    out = cutmix_batch(x, y, 2, lam=0.75, index=torch.tensor([1, 0]), center=(0, 0))
    # sides int(8 * sqrt(0.25)) = 4 around (0, 0): rows/cols [-2, 2) clipped to [0, 2)
    assert out.box == (0, 0, 2, 2)
    assert out.lam == pytest.approx(1 - 4 / 64)
    torch.testing.assert_close(out.y[0], torch.tensor([1 - 4 / 64, 4 / 64]))
    with pytest.raises(ValueError, match=r"cutmix needs images \(N, C, H, W\)"):
        cutmix_batch(torch.zeros(2, 3), y, 2)


# -- Cutout -----------------------------------------------------------------------------------


def _boxes_mask(centers: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    """Reference: loop over samples and boxes."""
    mask = torch.zeros(centers.shape[0], h, w, dtype=torch.bool)
    for i in range(centers.shape[0]):
        for cy, cx in centers[i].tolist():
            r0, c0 = max(cy - size // 2, 0), max(cx - size // 2, 0)
            r1, c1 = min(cy - size // 2 + size, h), min(cx - size // 2 + size, w)
            mask[i, r0:r1, c0:c1] = True
    return mask


def test_cutout_zeroes_exactly_the_drawn_boxes():
    x = torch.randn(7, 3, 12, 10) + 5.0  # no pixel is zero by chance
    out, boxes = cutout_batch(x, 5, count=2, generator=_gen(5))
    g = _gen(5)
    centers = torch.stack([torch.randint(0, 12, (7, 2), generator=g), torch.randint(0, 10, (7, 2), generator=g)], -1)
    assert torch.equal(boxes, cutout_boxes(7, 2, 5, 12, 10, centers=centers))
    mask = _boxes_mask(centers, 5, 12, 10)[:, None].expand_as(x)
    assert bool((out[mask] == 0).all())
    assert torch.equal(out[~mask], x[~mask])
    assert (out == 0).sum() == mask.sum()


def test_cutout_size_as_fraction_and_bad_sizes():
    x = torch.ones(2, 1, 8, 8)
    out, boxes = cutout_batch(x, 0.5, centers=torch.tensor([[[4, 4]], [[0, 7]]]))
    assert boxes.tolist() == [[[2, 2, 6, 6]], [[0, 5, 2, 8]]]
    assert (out == 0).sum().item() == 16 + 6
    with pytest.raises(ValueError, match=r"cutout size 9 is larger than the image \(8x8\)"):
        cutout_batch(x, 9)
    with pytest.raises(ValueError, match="fraction must be in"):
        cutout_batch(x, 1.5)
    with pytest.raises(ValueError, match="count must be an int >= 1, got 0"):
        cutout_batch(x, 2, count=0)


# -- random crop + flip -----------------------------------------------------------------------


def test_random_crop_flip_matches_a_per_sample_reference():
    x = torch.randn(6, 2, 5, 7)
    pad = 2
    offsets = torch.randint(0, 2 * pad + 1, (6, 2), generator=_gen(6))
    flips = torch.tensor([True, False, True, False, False, True])
    out = random_crop_flip(x, pad, offsets=offsets, flips=flips)
    padded = F.pad(x, (pad,) * 4)
    for i in range(6):
        dy, dx = offsets[i].tolist()
        crop = padded[i, :, dy : dy + 5, dx : dx + 7]  # crop at the offset, then flip
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)
    centered = random_crop_flip(x, pad, offsets=torch.full((6, 2), pad), flips=torch.zeros(6, dtype=torch.bool))
    assert torch.equal(centered, x)
    flipped = random_crop_flip(x, 0, offsets=torch.zeros(6, 2, dtype=torch.long), flips=torch.ones(6, dtype=torch.bool))
    assert torch.equal(flipped, x.flip(-1))


def test_random_crop_flip_transform_is_seeded_and_validated():
    x = torch.randn(16, 1, 8, 8)
    a, b = RandomCropFlip(2, seed=1)(x), RandomCropFlip(2, seed=1)(x)
    assert torch.equal(a, b) and not torch.equal(a, x)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        RandomCropFlip(-1)
    with pytest.raises(ValueError, match="does nothing"):
        RandomCropFlip(0, flip=False)


# -- callbacks: pure hook calls ----------------------------------------------------------------


def _fake_trainer(epoch: int = 0, max_epochs: int = 10, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, global_rank=rank, datamodule=None)


def _run_hook(cb, batch, epoch=0, max_epochs=10):
    cb.on_train_batch_start(_fake_trainer(epoch, max_epochs), None, batch, 0)
    return batch


def test_callbacks_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, inf\), got 0"):
        Mixup(alpha=0)
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, inf\), got -1.0"):
        CutMix(alpha=-1.0)
    with pytest.raises(ValueError, match=r"p must be a number in \(0, 1\], got 1.5"):
        Mixup(p=1.5)
    with pytest.raises(ValueError, match="until_epoch must be an int >= 1"):
        CutMix(until_epoch=0)
    with pytest.raises(ValueError, match="off_last_epochs must be an int >= 0"):
        Mixup(off_last_epochs=-1)
    with pytest.raises(ValueError, match="size must be an int >= 1, got 0"):
        Cutout(size=0)
    with pytest.raises(ValueError, match=r"size must be a number in \(0, 1\], got 1.5"):
        Cutout(size=1.5)
    with pytest.raises(ValueError, match="count must be an int >= 1"):
        Cutout(size=2, count=0)


def test_mixup_callback_probability_switch_off_and_ranks():
    cb = Mixup(alpha=1.0, p=0.5, num_classes=4, seed=7, off_last_epochs=2)
    cb.setup(_fake_trainer(), None, "fit")
    x, y = _identity_batch(6, 4)
    mixed = [_run_hook(cb, [x, y])[1].dtype.is_floating_point for _ in range(400)]
    assert abs(sum(mixed) / 400 - 0.5) < 0.1
    assert not _run_hook(cb, [x, y], epoch=8)[1].dtype.is_floating_point  # the last 2 of 10 epochs are off
    # same seed and rank: same draws; another rank: different draws
    draws = {}
    for rank in (0, 0, 1):
        c = Mixup(alpha=1.0, num_classes=4, seed=7)
        c.setup(_fake_trainer(rank=rank), None, "fit")
        draws.setdefault(rank, []).append(_run_hook(c, [x, y])[0])
    assert torch.equal(draws[0][0], draws[0][1]) and not torch.equal(draws[0][0], draws[1][0])


def test_callbacks_need_a_mutable_batch():
    x, y = _identity_batch(4, 2)
    for cb in (Mixup(num_classes=2), Cutout(size=1)):
        cb.setup(_fake_trainer(), None, "fit")
        with pytest.raises(TypeError, match="must be a list or a dict; got a tuple"):
            _run_hook(cb, (x.view(4, 1, 2, 2), y))
    cb = Mixup(input_key="image", target_key="label", seed=0)
    cb.setup(_fake_trainer(), None, "fit")
    with pytest.raises(ValueError, match="needs num_classes"):
        _run_hook(cb, {"image": x, "label": y})
    cb = Mixup(input_key="image", target_key="label", num_classes=2, seed=0)
    cb.setup(_fake_trainer(), None, "fit")
    batch = _run_hook(cb, {"image": x, "label": y, "id": 3})
    assert batch["label"].shape == (4, 2) and batch["id"] == 3


def test_cutout_callback_changes_only_the_images():
    cb = Cutout(size=3, count=1, seed=0)
    cb.setup(_fake_trainer(), None, "fit")
    x, y = torch.ones(5, 1, 8, 8), torch.arange(5)
    batch = _run_hook(cb, [x, y])
    assert batch[1] is y and (batch[0] == 0).sum(dim=(1, 2, 3)).min() >= 1
    assert bool((x == 1).all())  # the input tensor itself is not written to
    only_images = _run_hook(cb, [x])  # Cutout needs no targets in the batch
    assert len(only_images) == 1 and (only_images[0] == 0).any()
    with pytest.raises(ValueError, match="larger than the image"):
        _run_hook(Cutout(size=9), [x, y])


# -- callbacks: with a Trainer ----------------------------------------------------------------


class Recorder(LightningModule):
    """A plain user module: ``x, y = batch`` and ``F.cross_entropy`` (which takes soft targets)."""

    def __init__(self, in_features: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, classes)
        self.seen: dict[str, list] = {"train": [], "val": [], "test": []}

    def _step(self, batch, stage):
        x, y = batch
        self.seen[stage].append((x.clone(), y.clone()))
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 12, classes: int = 4) -> DataLoader:
    x = torch.eye(n, 6) if n <= 6 else torch.randn(n, 6)
    return DataLoader(TensorDataset(x, torch.arange(n) % classes), batch_size=4)


def _trainer(callbacks, **kwargs) -> Trainer:
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


def test_mixup_callback_with_a_plain_module_mixes_train_only():
    x = torch.eye(8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = Recorder(8, 4)
    trainer = _trainer([Mixup(alpha=1.0, num_classes=4, seed=3)], max_epochs=1)
    trainer.fit(module, loader, loader)
    trainer.test(module, loader, verbose=False)
    xm, ym = module.seen["train"][0]
    assert ym.shape == (8, 4) and ym.dtype == torch.float32
    # read lambda and the partner off the identity images; the labels use the same lambda
    for i in range(8):
        others = [k for k in (xm[i] > 0).nonzero().flatten().tolist() if k != i]
        j = others[0] if others else i
        own = xm[i, i].item()
        expected = own * F.one_hot(y[i], 4).float() + (1 - own) * F.one_hot(y[j], 4).float()
        torch.testing.assert_close(ym[i], expected)
    assert (xm.max(dim=1).values < 1).any()
    for stage in ("val", "test"):
        xs, ys = module.seen[stage][0]
        assert torch.equal(xs, x) and torch.equal(ys, y)


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_mixup_and_cutmix_with_the_classifier_on_digits(mix):
    from lightning_tricks.data import DigitsDataModule
    from lightning_tricks.mixins import Classifier
    from lightning_tricks.models import MLP

    class Spy(Classifier):
        def training_step(self, batch, batch_idx):
            self.last_y = batch[1]
            return super().training_step(batch, batch_idx)

    seed_everything(0)
    dm = DigitsDataModule(batch_size=64, loader="dataloader")
    module = Spy(MLP((1, 8, 8), 10, hidden=(32,)), 10, {"name": "sgd", "lr": 0.05}, label_smoothing=0.1)
    trainer = _trainer(
        [CutMix(alpha=1.0) if mix == "cutmix" else Mixup(alpha=0.4), Cutout(size=0.25)],
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=2,
    )
    trainer.fit(module, datamodule=dm)
    y = module.last_y
    assert y.shape == (64, 10) and y.dtype.is_floating_point  # num_classes found on the module
    torch.testing.assert_close(y.sum(1), torch.ones(64))
    assert ((y > 0).sum(1) > 1).any()
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert "val/acc" in trainer.callback_metrics


def test_cutout_checks_the_image_size_at_setup():
    from lightning_tricks.data import DigitsDataModule
    from lightning_tricks.mixins import Classifier
    from lightning_tricks.models import MLP

    module = Classifier(MLP((1, 8, 8), 10, hidden=(8,)), 10)
    with pytest.raises(ValueError, match=r"cutout size 9 is larger than the image \(8x8\)"):
        _trainer([Cutout(size=9)], max_steps=1).fit(module, datamodule=DigitsDataModule(loader="dataloader"))


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`")
def test_mixup_resume_matches_the_uninterrupted_run(tmp_path):
    def run(epochs, ckpt=None, seed=11, save=None):
        torch.manual_seed(0)
        module = Recorder(6, 4)
        callbacks = [Mixup(alpha=0.5, num_classes=4, seed=seed)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=save, save_last=True, save_top_k=0))
        trainer = _trainer(callbacks, max_epochs=epochs, enable_checkpointing=bool(save), limit_val_batches=0)
        trainer.fit(module, _loader(12, 4), ckpt_path=ckpt)
        return module

    full = run(3)
    run(1, save=tmp_path)
    # the resumed run restores the saved seed and batch count (its own seed argument is ignored)
    resumed = run(3, ckpt=str(tmp_path / "last.ckpt"), seed=None, save=tmp_path)
    assert torch.equal(full.layer.weight, resumed.layer.weight)
    full_batches = [y for _, y in full.seen["train"][3:]]
    assert all(torch.equal(a, b) for a, b in zip(full_batches, [y for _, y in resumed.seen["train"]]))


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [("mixup", Mixup), ("cutmix", CutMix), ("cutout", Cutout)])
def test_callback_yaml_composes_and_instantiates(name, cls):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=f"callbacks/{name}")
    cb = instantiate(cfg.callbacks[name])
    assert type(cb) is cls and cb.p == 1.0


def test_train_runs_with_mixup_cutmix_cutout(tmp_path):
    from conftest import compose_train

    from lightning_tricks.train import train

    cfg = compose_train(
        ["trainer=debug", "data.loader=dataloader", "+callbacks=[mixup,cutout]", "logger=[]"], output_dir=tmp_path
    )
    metrics, objects = train(cfg)
    assert any(isinstance(c, Mixup) for c in objects["callbacks"])
    assert all(v == v for v in metrics.values())  # no NaN


def test_stacked_augmentations_act_in_a_fixed_order_whatever_the_list_order():
    def run(order: str, setup: bool = True) -> list:
        made = {"mixup": Mixup(alpha=1.0, num_classes=4, seed=1), "cutout": Cutout(size=2, seed=2)}
        stack = [made[n] for n in order.split(",")]
        trainer = SimpleNamespace(current_epoch=0, max_epochs=10, global_rank=0, datamodule=None, callbacks=stack)
        if setup:
            for cb in stack:
                cb.setup(trainer, None, "fit")
        # 6 samples: the drawn permutation is not the identity (with 2 it is half the time, and no order shows)
        batch = [torch.arange(6 * 16, dtype=torch.float32).reshape(6, 1, 4, 4) + 1, torch.tensor([0, 3, 1, 2, 0, 1])]
        for cb in stack:
            cb.on_train_batch_start(trainer, None, batch, 0)
        assert made["mixup"].batches == made["cutout"].batches == 1
        return batch

    a, b = run("mixup,cutout"), run("cutout,mixup")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # without setup each acts alone in list order, and the order shows
    assert not torch.equal(run("mixup,cutout", setup=False)[0], run("cutout,mixup", setup=False)[0])
    assert torch.equal(run("cutout,mixup", setup=False)[0], a[0])  # the fixed order is cutout, then mixup


def test_cutout_matches_masked_fill_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 9, 7)
    for count in (1, 3):
        out, boxes = cutout_batch(x, 4, count, generator=g, value=-1.5)
        mask = torch.zeros(6, 9, 7, dtype=torch.bool)
        for i, k in ((i, k) for i in range(6) for k in range(count)):
            top, left, bottom, right = boxes[i, k].tolist()
            assert 0 <= top <= bottom <= 9 and 0 <= left <= right <= 7
            mask[i, top:bottom, left:right] = True
        assert torch.equal(out, x.masked_fill(mask[:, None], -1.5))


# -- the callbacks' output against the formulas, the draws read off the batch ----------------------------


def test_cutmix_callback_pastes_one_box_of_the_partner_and_weighs_labels_by_area():
    x, y = _constant_images(6, 8, 10), torch.arange(6) % 4  # image i is filled with i + 1
    cb = CutMix(alpha=1.0, num_classes=4, seed=5)
    cb.setup(_fake_trainer(), None, "fit")
    pasted = 0
    for _ in range(20):
        xm, ym = _run_hook(cb, [x, y])
        box = (xm != x).any(dim=0).any(dim=0)  # (H, W): the pixels some sample took from its partner
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        pasted += bool(box.any())
        if box.any():  # one rectangle
            assert (
                int(box.sum()) == len(rows) * len(cols) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            )
        kept = 1.0 - box.float().mean().item()
        partners = xm[:, 0][:, box].long() - 1 if box.any() else torch.arange(6)[:, None]  # the values say whose
        for i in range(6):
            j = int(partners[i, 0])
            assert bool((partners[i] == j).all()) and bool((xm[i][:, ~box] == i + 1).all())
            want = kept * F.one_hot(y[i], 4).float() + (1 - kept) * F.one_hot(y[j], 4).float()
            torch.testing.assert_close(ym[i], want, rtol=0, atol=1e-6)
        assert torch.equal(ym.labels, y)
    assert pasted > 10


def test_cutout_callback_fills_one_clipped_square_per_image():
    x = torch.randn(16, 3, 9, 11) + 5.0  # no pixel equals the fill by chance
    cb = Cutout(size=4, count=1, value=-1.0, seed=2)
    cb.setup(_fake_trainer(), None, "fit")
    out, y = _run_hook(cb, [x, torch.zeros(16)])
    clipped = 0
    for i in range(16):
        filled = (out[i] == -1.0).all(dim=0)
        assert torch.equal(out[i][:, ~filled], x[i][:, ~filled])
        rows, cols = filled.any(1).nonzero().flatten(), filled.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4 and int(filled.sum()) == len(rows) * len(cols)
        assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)
        touches = rows.min() == 0 or rows.max() == 8 or cols.min() == 0 or cols.max() == 10
        assert (len(rows), len(cols)) == (4, 4) or touches  # a smaller square only where the border clips it
        clipped += (len(rows), len(cols)) != (4, 4)
    assert clipped > 0


def test_draws_depend_on_seed_rank_and_batch_count_only():
    x, y = torch.randn(8, 1, 6, 6), torch.arange(8) % 4

    def first(cls, rank=0, batches=0, seed=7, **kw):
        cb = cls(seed=seed, **kw)
        cb.setup(_fake_trainer(rank=rank), None, "fit")
        cb.batches = batches
        return _run_hook(cb, [x, y])[0]

    for cls, kw in ((Mixup, {"num_classes": 4}), (CutMix, {"num_classes": 4}), (Cutout, {"size": 2})):
        a = first(cls, **kw)
        assert torch.equal(a, first(cls, **kw))  # reproducible
        assert not torch.equal(a, first(cls, rank=1, **kw))  # DDP ranks draw differently
        assert not torch.equal(a, first(cls, batches=1, **kw))  # each batch draws anew
        assert not torch.equal(a, first(cls, seed=8, **kw))


def test_draws_of_a_batch_do_not_depend_on_other_shapes_in_its_block():
    """A ragged last batch (another shape) in the middle of a block leaves the full batches' draws as they are,
    so a run resumed at any batch count draws what the uninterrupted run drew."""
    x, y = torch.randn(8, 1, 6, 6), torch.arange(8) % 4
    small = [torch.randn(3, 1, 6, 6), torch.arange(3) % 4]
    for cls, kw in ((Mixup, {"num_classes": 4}), (CutMix, {"num_classes": 4}), (Cutout, {"size": 2})):
        through, fresh = cls(seed=3, **kw), cls(seed=3, **kw)
        for cb in (through, fresh):
            cb.setup(_fake_trainer(), None, "fit")
        _run_hook(through, [x, y])
        _run_hook(through, list(small))  # batch 1: another shape
        resumed_state = through.state_dict()
        fresh.load_state_dict(resumed_state)
        assert resumed_state["batches"] == 2
        a, b = _run_hook(through, [x, y])[0], _run_hook(fresh, [x, y])[0]
        assert torch.equal(a, b)


def test_block_draws_are_the_core_block_draws():
    """Batch ``count`` of a callback is row ``count % BLOCK`` of the core's draws for ``BLOCK`` batches from a
    generator seeded with ``rank_seed(seed, rank) + count // BLOCK`` (after ``BLOCK`` uniforms for ``U < p``
    when ``p < 1``), applied by the core's arithmetic."""
    from lightning_tricks.augment import (
        cutmix_apply,
        cutmix_draws,
        cutout_centers,
        cutout_images,
        mixup_apply,
        mixup_draws,
        rank_seed,
    )
    from lightning_tricks.callbacks.augment import BLOCK

    x, y = torch.randn(8, 2, 6, 7), torch.arange(8) % 4
    for count in (0, 5, BLOCK + 2):
        for cls, kw, draw, apply in (
            (Mixup, {"num_classes": 4}, lambda g: mixup_draws(x, 1.0, BLOCK, g), lambda d: mixup_apply(x, y, 4, *d)),
            (CutMix, {"num_classes": 4}, lambda g: cutmix_draws(x, 1.0, BLOCK, g), lambda d: cutmix_apply(x, y, 4, d)),
            (
                Cutout,
                {"size": 3, "count": 2},
                lambda g: cutout_centers(x, 2, g, BLOCK).split(8),
                lambda d: (cutout_images(x, 3, d),),
            ),
        ):
            cb = cls(seed=11, **kw)
            cb.setup(_fake_trainer(rank=1), None, "fit")
            cb.batches = count
            got = _run_hook(cb, [x, y])
            want = apply(draw(_gen(rank_seed(11, 1) + count // BLOCK))[count % BLOCK])
            assert torch.equal(got[0], want[0])
            if cls is not Cutout:
                assert torch.equal(got[1], want[1]) and torch.equal(got[1].labels, y)
    # p < 1: the block's first BLOCK uniforms say which batches are mixed, then the draws follow
    cb = Mixup(p=0.5, seed=4, num_classes=4)
    cb.setup(_fake_trainer(), None, "fit")
    g = _gen(rank_seed(4, 0))
    applied = (torch.rand(BLOCK, generator=g, dtype=torch.float64) < 0.5).tolist()
    draws = mixup_draws(x, 1.0, BLOCK, g)
    assert 0 < sum(applied) < BLOCK
    for row in range(BLOCK):
        got = _run_hook(cb, [x, y])
        if applied[row]:
            assert torch.equal(got[0], mixup_apply(x, y, 4, *draws[row]).x)
        else:
            assert got[0] is x and got[1] is y


def test_block_draws_follow_their_formulas_and_one_batch_is_a_block_of_one():
    """The block draws in their documented order (every ``lam``, then every permutation as the argsort of float64
    uniforms, then every box center, rows before columns), the paper's CutMix box, and the single-batch
    functions equal to a block of one."""
    from lightning_tricks.augment import (
        box_mask,
        cutmix_box,
        cutmix_draws,
        cutmix_params,
        mixup_draws,
        mixup_params,
        random_permutations,
        sample_beta_n,
    )

    x = torch.randn(5, 1, 7, 9)
    g = _gen(3)
    lams = sample_beta_n(0.4, 4, g)
    keys = torch.rand((4, 5), generator=g, dtype=torch.float64)
    rows, cols = torch.randint(0, 7, (4,), generator=g), torch.randint(0, 9, (4,), generator=g)
    mixed = mixup_draws(x, 0.4, 4, _gen(3))
    assert [m[0] for m in mixed] == lams.tolist()
    assert all(torch.equal(m[1], keys[i].argsort()) for i, m in enumerate(mixed))
    for i, params in enumerate(cutmix_draws(x, 0.4, 4, _gen(3))):
        lam, cy, cx = lams[i].item(), int(rows[i]), int(cols[i])
        cut_h, cut_w = int(7 * math.sqrt(1 - lam)), int(9 * math.sqrt(1 - lam))  # the paper's box, clipped
        top, left = min(max(cy - cut_h // 2, 0), 7), min(max(cx - cut_w // 2, 0), 9)
        bottom, right = min(max(cy - cut_h // 2 + cut_h, 0), 7), min(max(cx - cut_w // 2 + cut_w, 0), 9)
        assert params.box == (top, left, bottom, right) == cutmix_box(7, 9, lam, center=(cy, cx))
        assert params.lam == 1 - (bottom - top) * (right - left) / 63
        assert torch.equal(params.index, keys[i].argsort())
        want = torch.zeros(7, 9)
        want[top:bottom, left:right] = 1.0
        assert torch.equal(params.inside, want)
    one, drawn = cutmix_params(x, 0.4, generator=_gen(8)), cutmix_draws(x, 0.4, 1, _gen(8))[0]
    assert one.lam == drawn.lam and one.box == drawn.box and torch.equal(one.index, drawn.index)
    assert torch.equal(one.inside, drawn.inside)
    (lam, index), (lam1, index1) = mixup_params(x, 0.4, generator=_gen(8)), mixup_draws(x, 0.4, 1, _gen(8))[0]
    assert lam == lam1 and torch.equal(index, index1)
    assert torch.equal(box_mask(torch.tensor([one.box]), 7, 9)[0].float(), one.inside)
    # every permutation of 3 equally often: 6,000 rows, about 1,000 each (5 standard deviations: 144)
    perms = random_permutations(6000, 3, _gen(1))
    assert all(sorted(p) == [0, 1, 2] for p in perms.tolist())
    counts = torch.unique(perms, dim=0, return_counts=True)[1]
    assert len(counts) == 6 and int((counts - 1000).abs().max()) < 144


def test_split_core_functions_equal_the_one_call_forms():
    """mixup_batch, cutmix_batch and cutout_images are their params/windows function then their arithmetic, with
    the draws in the documented order; the soft targets equal one_hot for small and large class counts."""
    from lightning_tricks.augment import (
        IDENTITY_CLASSES,
        box_mask,
        cutmix_apply,
        cutmix_params,
        cutout_fill,
        cutout_windows,
        mixup_apply,
        mixup_params,
        paste_box,
        soft_targets,
    )

    x, y = torch.randn(6, 3, 9, 8), torch.tensor([0, 3, 1, 3, 2, 0])
    a, b = mixup_batch(x, y, 4, 0.4, generator=_gen(5)), mixup_apply(x, y, 4, *mixup_params(x, 0.4, generator=_gen(5)))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.lam == b.lam
    g = _gen(5)
    lam = sample_beta(0.4, g)
    keys = torch.rand((1, 6), generator=g, dtype=torch.float64)
    assert a.lam == lam and torch.equal(a.index, keys[0].argsort())  # lam, then the permutation
    a, b = (
        cutmix_batch(x, y, 4, 1.0, generator=_gen(6)),
        cutmix_apply(x, y, 4, cutmix_params(x, 1.0, generator=_gen(6))),
    )
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.box == b.box
    top, left, bottom, right = a.box
    want = x.clone()
    want[:, :, top:bottom, left:right] = x[a.index][:, :, top:bottom, left:right]  # slicing reference
    assert torch.equal(a.x, want) and torch.equal(paste_box(x, a.index, a.box), want)
    assert int(box_mask(torch.tensor(a.box), 9, 8).sum()) == (bottom - top) * (right - left)
    with pytest.raises(ValueError, match="cutmix needs floating point inputs, got dtype torch.uint8"):
        cutmix_batch(x.to(torch.uint8), y, 4, generator=_gen(0))
    centers = torch.stack(
        [torch.randint(0, 9, (6, 2), generator=_gen(1)), torch.randint(0, 8, (6, 2), generator=_gen(2))], -1
    )
    assert torch.equal(
        cutout_fill(x, cutout_windows(x, 4, centers), -1.0), cutout_batch(x, 4, 2, centers=centers, value=-1.0)[0]
    )
    for classes in (4, IDENTITY_CLASSES, IDENTITY_CLASSES + 1):
        labels = torch.tensor([0, classes - 1, 1])
        assert torch.equal(soft_targets(labels, classes), F.one_hot(labels, classes).float())
    with pytest.raises(IndexError):
        soft_targets(torch.tensor([4]), 4)  # out of range still raises on the CPU


def test_mixup_cutmix_params_with_prob_zero_draws_nothing():
    from lightning_tricks.augment import mixup_cutmix_params

    g = _gen(9)
    state = g.get_state()
    p = mixup_cutmix_params(5, (8, 8), prob=0.0, mode="elem", generator=g)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(p.lam, torch.ones(5, dtype=torch.float64)) and not p.use_cutmix.any() and not p.mixed
