"""MixupCutmix: mixup or CutMix per batch / pair / sample with timm's semantics, its core and its callback."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_tricks._lightning import ModelCheckpoint, Trainer, seed_everything
from lightning_tricks.augment import (
    MixCutParams,
    mixup_cutmix_batch,
    mixup_cutmix_params,
    sample_beta_n,
)
from lightning_tricks.callbacks import CutMix, Cutout, Mixup, MixupCutmix
from lightning_tricks.data import DigitsDataModule
from lightning_tricks.mixins import Classifier
from lightning_tricks.models import MLP

CONF = str(Path(__file__).resolve().parents[1] / "conf")
F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, h: int = 8, w: int = 10, c: int = 2) -> torch.Tensor:
    """Random images whose pixels are all distinct, so a pixel tells which image it came from."""
    return torch.randn(n, c, h, w, generator=_gen(123))


def _reference(n, h, w, mixup_alpha, cutmix_alpha, prob, switch_prob, mode, seed=None, g=None):
    """The documented draws, one slot at a time, each box worked out here (a plain loop); from ``g`` when
    given (it goes on from where it is), else from a generator seeded with ``seed``."""
    g = _gen(seed) if g is None else g
    k = 1 if mode == "batch" else n if mode == "elem" else n // 2
    apply = (torch.rand(k, generator=g, dtype=F64) < prob).tolist()
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cut = (torch.rand(k, generator=g, dtype=F64) < switch_prob).tolist()
    else:
        cut = [cutmix_alpha > 0] * k
    lam_mix = sample_beta_n(mixup_alpha, k, g).tolist() if mixup_alpha > 0 else [1.0] * k
    lam_cut = sample_beta_n(cutmix_alpha, k, g).tolist() if cutmix_alpha > 0 else [1.0] * k
    cy = torch.randint(0, h, (k,), generator=g).tolist() if cutmix_alpha > 0 else [0] * k
    cx = torch.randint(0, w, (k,), generator=g).tolist() if cutmix_alpha > 0 else [0] * k
    slots = []  # (lam, use_cutmix, box, lam before the area correction)
    for s in range(k):
        if not apply[s]:
            slots.append((1.0, False, (0, 0, 0, 0), 1.0))
        elif cut[s]:
            cut_h, cut_w = int(h * math.sqrt(1 - lam_cut[s])), int(w * math.sqrt(1 - lam_cut[s]))
            top, left = min(max(cy[s] - cut_h // 2, 0), h), min(max(cx[s] - cut_w // 2, 0), w)
            bottom, right = min(max(cy[s] - cut_h // 2 + cut_h, 0), h), min(max(cx[s] - cut_w // 2 + cut_w, 0), w)
            box = (top, left, bottom, right)
            slots.append((1.0 - (bottom - top) * (right - left) / (h * w), True, box, lam_cut[s]))
        else:
            slots.append((lam_mix[s], False, (0, 0, 0, 0), lam_mix[s]))
    identity = (1.0, False, (0, 0, 0, 0), 1.0)
    per_sample = []
    for i in range(n):
        if mode == "batch":
            per_sample.append(slots[0])
        elif mode == "elem":
            per_sample.append(slots[i])
        else:
            j = n - 1 - i
            per_sample.append(slots[min(i, j)] if i != j else identity)
    return per_sample


def _reference_images(x, per_sample):
    """timm's per-sample loop: paste the partner's box, or blend with the partner."""
    n = x.shape[0]
    out = x.clone()
    for i, (lam, use_cutmix, (top, left, bottom, right), _) in enumerate(per_sample):
        j = n - 1 - i
        if use_cutmix:
            out[i, :, top:bottom, left:right] = x[j, :, top:bottom, left:right]
        elif lam != 1.0:
            out[i] = lam * x[i] + (1 - lam) * x[j]
    return out


# -- the core ---------------------------------------------------------------------------------------


def test_sample_beta_n_has_beta_moments():
    draws = sample_beta_n(0.4, 20000, _gen(1))
    assert draws.dtype == F64 and 0.0 <= draws.min() and draws.max() <= 1.0
    assert abs(draws.mean().item() - 0.5) < 0.01
    assert abs(draws.var().item() - 1 / (4 * (2 * 0.4 + 1))) < 0.005  # Beta(a, a): 1 / (4 (2a + 1))
    assert torch.equal(sample_beta_n(0.4, 5, _gen(2)), sample_beta_n(0.4, 5, _gen(2)))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("n", [8, 7])
@pytest.mark.parametrize(
    "alphas,switch_prob,prob",
    [((0.8, 1.0), 0.5, 1.0), ((1.0, 0.0), 0.5, 1.0), ((0.0, 1.0), 0.5, 0.7), ((0.3, 2.0), 0.3, 0.6)],
)
def test_params_and_images_match_a_per_sample_reference(mode, n, alphas, switch_prob, prob):
    h, w = 8, 10
    for seed in range(6):
        params = mixup_cutmix_params(n, (h, w), *alphas, prob, switch_prob, mode, _gen(seed))
        ref = _reference(n, h, w, *alphas, prob, switch_prob, mode, seed)
        assert params.index.tolist() == list(range(n - 1, -1, -1))  # i is mixed with N-1-i, as timm
        assert params.lam.tolist() == [r[0] for r in ref]  # CutMix: exactly 1 - clipped box area / (H W)
        assert params.use_cutmix.tolist() == [r[1] for r in ref]
        assert [tuple(b) for b in params.boxes.tolist()] == [r[2] for r in ref]
        x = _images(n, h, w)
        out = mixup_cutmix_batch(x, torch.arange(n) % 3, 3, *alphas, prob, switch_prob, mode, params=params)
        torch.testing.assert_close(out.x, _reference_images(x, ref), rtol=0, atol=1e-6)


def test_cutmix_label_weight_is_the_share_of_own_pixels_per_sample():
    n, h, w = 16, 9, 11
    x = _images(n, h, w, c=3)
    y = torch.arange(n) % 5
    out = mixup_cutmix_batch(x, y, 5, mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", generator=_gen(3))
    lam = out.params.lam
    assert len(set(lam.tolist())) > n // 2  # elem: one lambda per sample
    clipped = 0
    ref = _reference(n, h, w, 0.0, 1.0, 1.0, 0.5, "elem", 3)
    for i in range(n):
        j = n - 1 - i
        from_partner = (out.x[i] == x[j]).all(dim=0)  # (H, W): pixels copied from the partner
        from_self = (out.x[i] == x[i]).all(dim=0)
        assert bool((from_partner | from_self).all())  # every pixel is one or the other, exactly
        top, left, bottom, right = out.params.boxes[i].tolist()
        box = torch.zeros(h, w, dtype=torch.bool)
        box[top:bottom, left:right] = True
        if i != j:
            assert torch.equal(from_partner, box)  # the pasted pixels are exactly the box
        # label weight = own pixel share = 1 - box area / (H W)
        assert lam[i].item() == 1.0 - box.sum().item() / (h * w)
        expected = lam[i] * F.one_hot(y[i], 5).double() + (1 - lam[i]) * F.one_hot(y[j], 5).double()
        torch.testing.assert_close(out.y[i], expected.float())
        lam0 = ref[i][3]  # the drawn lambda, before the correction
        unclipped = int(h * math.sqrt(1 - lam0)) * int(w * math.sqrt(1 - lam0))
        assert box.sum().item() <= unclipped
        clipped += box.sum().item() < unclipped  # the box lost pixels at the border, so lam went up
    assert clipped > 0


def test_mixup_labels_use_the_image_weight_per_sample():
    n = 10
    x = torch.eye(n)  # sample i is e_i: a mixed row shows its own weight and its partner's
    y = torch.arange(n) % 4
    out = mixup_cutmix_batch(x, y, 4, mixup_alpha=1.0, cutmix_alpha=0.0, mode="elem", generator=_gen(7))
    for i in range(n):
        j = n - 1 - i
        own = out.x[i, i].item()
        assert own == pytest.approx(out.params.lam[i].item(), abs=1e-6)
        assert out.x[i, j].item() == pytest.approx(1 - own, abs=1e-6)
        expected = own * F.one_hot(y[i], 4).float() + (1 - own) * F.one_hot(y[j], 4).float()
        torch.testing.assert_close(out.y[i], expected, rtol=0, atol=1e-6)


def test_modes_give_one_lambda_per_batch_pair_or_sample():
    n = 12
    lam = {
        mode: mixup_cutmix_params(n, None, 1.0, 0.0, mode=mode, generator=_gen(2)).lam
        for mode in ("batch", "pair", "elem")
    }
    assert len(set(lam["batch"].tolist())) == 1
    assert len(set(lam["elem"].tolist())) == n
    assert len(set(lam["pair"].tolist())) == n // 2
    assert torch.equal(lam["pair"], lam["pair"].flip(0))  # i and N-1-i share theirs


def test_pair_mode_swaps_the_box_and_blends_both_ways():
    n, h, w = 8, 8, 8
    x = _images(n, h, w)
    out = mixup_cutmix_batch(x, torch.arange(n) % 2, 2, 0.8, 1.0, switch_prob=0.5, mode="pair", generator=_gen(11))
    p = out.params
    assert p.use_cutmix.any() and (~p.use_cutmix).any()
    for i in range(n // 2):
        j = n - 1 - i
        assert torch.equal(p.boxes[i], p.boxes[j]) and p.lam[i] == p.lam[j]
        top, left, bottom, right = p.boxes[i].tolist()
        if p.use_cutmix[i]:
            assert torch.equal(out.x[i, :, top:bottom, left:right], x[j, :, top:bottom, left:right])
            assert torch.equal(out.x[j, :, top:bottom, left:right], x[i, :, top:bottom, left:right])
        else:
            lam = p.lam[i].item()
            torch.testing.assert_close(out.x[i], lam * x[i] + (1 - lam) * x[j])
            torch.testing.assert_close(out.x[j], lam * x[j] + (1 - lam) * x[i])
    odd = mixup_cutmix_batch(x[:7], torch.arange(7) % 2, 2, 1.0, 0.0, mode="pair", generator=_gen(1))
    assert odd.params.lam[3] == 1.0 and torch.equal(odd.x[3], x[3])  # the middle one is left alone


def test_prob_zero_leaves_the_batch_untouched_and_prob_acts_per_sample():
    x, y = _images(8), torch.arange(8) % 3
    for mode in ("batch", "pair", "elem"):
        out = mixup_cutmix_batch(x, y, 3, prob=0.0, mode=mode, generator=_gen(0))
        assert out.x is x and not out.params.mixed and (out.params.lam == 1).all()
        assert torch.equal(out.y, F.one_hot(y, 3).float())
    lam = mixup_cutmix_params(4000, (8, 8), 1.0, 1.0, prob=0.3, mode="elem", generator=_gen(4)).lam
    assert abs((lam < 1).double().mean().item() - 0.3) < 0.03


def test_switch_prob_one_or_zero_picks_cutmix_or_mixup():
    x, y = _images(8), torch.arange(8) % 3
    for seed in range(5):
        cut = mixup_cutmix_batch(x, y, 3, 0.8, 1.0, switch_prob=1.0, mode="elem", generator=_gen(seed))
        assert cut.params.use_cutmix.all()
        every_pixel_is_own_or_partner = (cut.x == x) | (cut.x == x.flip(0))
        assert every_pixel_is_own_or_partner.all()
        mix = mixup_cutmix_batch(x, y, 3, 0.8, 1.0, switch_prob=0.0, mode="elem", generator=_gen(seed))
        assert not mix.params.use_cutmix.any() and (mix.params.boxes == 0).all()
        lam = mix.params.lam.float().view(-1, 1, 1, 1)
        torch.testing.assert_close(mix.x, lam * x + (1 - lam) * x.flip(0))
    half = mixup_cutmix_params(4000, (8, 8), 0.8, 1.0, switch_prob=0.5, mode="elem", generator=_gen(9))
    assert abs(half.use_cutmix.double().mean().item() - 0.5) < 0.03


def test_label_smoothing_is_folded_in_as_timm_on_and_off_values():
    n, classes, eps = 8, 5, 0.1
    x, y = _images(n), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    out = mixup_cutmix_batch(x, y, classes, 0.8, 1.0, mode="elem", label_smoothing=eps, generator=_gen(6))
    off, on = eps / classes, 1 - eps + eps / classes  # timm's mixup_target
    for i in range(n):
        j, lam = n - 1 - i, out.params.lam[i].item()
        expected = [lam * (on if c == y[i] else off) + (1 - lam) * (on if c == y[j] else off) for c in range(classes)]
        torch.testing.assert_close(out.y[i], torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.y.sum(1), torch.ones(n))
    clean = mixup_cutmix_batch(x, y, classes, prob=0.0, label_smoothing=eps, generator=_gen(6))
    assert clean.x is x
    torch.testing.assert_close(clean.y, F.one_hot(y, classes).float() * (on - off) + off)


def test_bad_inputs_fail_with_one_line_naming_the_value():
    cases = [
        (dict(mixup_alpha=-0.5), r"mixup_alpha must be a number in \[0, inf\), got -0.5"),
        (dict(cutmix_alpha=float("nan")), r"cutmix_alpha must be a number in \[0, inf\), got nan"),
        (dict(mixup_alpha=0.0, cutmix_alpha=0.0), r"mixup_alpha and cutmix_alpha are both 0"),
        (dict(prob=1.5), r"prob must be a number in \[0, 1\], got 1.5"),
        (dict(prob=-0.1), r"prob must be a number in \[0, 1\], got -0.1"),
        (dict(switch_prob=2), r"switch_prob must be a number in \[0, 1\], got 2"),
        (dict(mode="sample"), r"mode must be one of \('batch', 'pair', 'elem'\), got 'sample'"),
        (dict(label_smoothing=1.0), r"label_smoothing must be a number in \[0, 1\), got 1.0"),
    ]
    for kwargs, message in cases:
        for make in (lambda kw: MixupCutmix(**kw), lambda kw: mixup_cutmix_batch(_images(2), torch.arange(2), 2, **kw)):
            with pytest.raises(ValueError, match=message) as info:
                make(kwargs)
            assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"cutmix needs images \(N, C, H, W\), got shape \(4, 6\)"):
        mixup_cutmix_batch(torch.zeros(4, 6), torch.arange(4), 6)
    out = mixup_cutmix_batch(torch.eye(4, 6), torch.arange(4), 6, 1.0, 0.0, generator=_gen(0))  # mixup-only: any shape
    assert out.x.shape == (4, 6)
    with pytest.raises(ValueError, match="params are for 3 samples, the batch has 4"):
        mixup_cutmix_batch(torch.zeros(4, 6), torch.arange(4), 6, 1.0, 0.0, params=MixCutParams(*_params3()))


def _params3():
    p = mixup_cutmix_params(3, None, 1.0, 0.0, generator=_gen(0))
    return p.lam, p.use_cutmix, p.boxes, p.index


def test_fixed_generator_reproduces_the_batch():
    x, y = _images(8), torch.arange(8) % 3
    a = mixup_cutmix_batch(x, y, 3, mode="elem", generator=_gen(42))
    b = mixup_cutmix_batch(x, y, 3, mode="elem", generator=_gen(42))
    c = mixup_cutmix_batch(x, y, 3, mode="elem", generator=_gen(43))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


# -- the callback -----------------------------------------------------------------------------------


def _fake_trainer(epoch: int = 0, max_epochs: int = 10, callbacks=None) -> SimpleNamespace:
    return SimpleNamespace(
        current_epoch=epoch, max_epochs=max_epochs, global_rank=0, datamodule=None, callbacks=callbacks or []
    )


def _hook(cb, batch, epoch=0):
    cb.on_train_batch_start(_fake_trainer(epoch), None, batch, 0)
    return batch


def _ready(cb):
    cb.setup(_fake_trainer(callbacks=[cb]), None, "fit")
    return cb


def test_callback_draws_batch_count_from_its_seed_sequence_as_documented():
    """Batch ``count`` of rank 0 is row ``count % BLOCK`` of block ``count // BLOCK``, whose batches draw in turn
    from ``SeedSequence([seed, 0])`` + block, in the order the core documents."""
    import numpy as np

    from lightning_tricks.callbacks.augment import BLOCK

    cb = _ready(MixupCutmix(0.8, 1.0, mode="elem", num_classes=3, seed=5))
    x, y = _images(8), torch.arange(8) % 3
    first = int(np.random.SeedSequence([5, 0]).generate_state(1, dtype=np.uint64)[0])
    for count in (0, 1, 2, BLOCK - 1, BLOCK, 2 * BLOCK + 1):
        cb.batches = count
        xm, ym = _hook(cb, [x, y])
        g = _gen(first + count // BLOCK)
        for _ in range(count % BLOCK):  # the rows before it
            _reference(8, 8, 10, 0.8, 1.0, 1.0, 0.5, "elem", g=g)
        ref = _reference(8, 8, 10, 0.8, 1.0, 1.0, 0.5, "elem", g=g)
        torch.testing.assert_close(xm, _reference_images(x, ref), rtol=0, atol=1e-6)
        for i in range(8):
            lam, j = ref[i][0], 7 - i
            want = lam * F.one_hot(y[i], 3).double() + (1 - lam) * F.one_hot(y[j], 3).double()
            torch.testing.assert_close(ym[i], want.float(), rtol=0, atol=1e-6)
        assert torch.equal(ym.labels, y)
        assert cb.batches == count + 1


def test_callback_prob_zero_keeps_the_very_same_batch():
    cb = _ready(MixupCutmix(prob=0.0, num_classes=3, seed=0))
    x, y = _images(8), torch.arange(8) % 3
    for _ in range(5):
        batch = _hook(cb, [x, y])
        assert batch[0] is x and batch[1] is y


def test_switch_off_epoch_stops_mixing_and_keeps_the_smoothing():
    x, y = _images(8), torch.arange(8) % 3
    cb = _ready(MixupCutmix(1.0, 0.0, until_epoch=2, num_classes=3, seed=1))
    mixed = _hook(cb, [x, y], epoch=1)
    assert mixed[1].dtype.is_floating_point and not torch.equal(mixed[0], x)
    for epoch in (2, 3):
        off = _hook(cb, [x, y], epoch=epoch)
        assert off[0] is x and off[1] is y
    smooth = _ready(MixupCutmix(1.0, 0.0, until_epoch=2, label_smoothing=0.3, num_classes=3, seed=1))
    off = _hook(smooth, [x, y], epoch=2)
    assert off[0] is x
    torch.testing.assert_close(off[1], F.one_hot(y, 3).float() * 0.7 + 0.1)
    assert MixupCutmix(off_last_epochs=2).active(7, 10) and not MixupCutmix(off_last_epochs=2).active(8, 10)


def test_resume_restores_the_generator():
    x, y = _images(8), torch.arange(8) % 3
    first = _ready(MixupCutmix(mode="pair", num_classes=3, seed=9))
    for _ in range(3):
        _hook(first, [x, y])
    state = first.state_dict()
    assert state == {"seed": 9, "batches": 3}
    resumed = MixupCutmix(mode="pair", num_classes=3, seed=None)
    resumed.load_state_dict(state)
    _ready(resumed)
    a, b = _hook(first, [x, y]), _hook(resumed, [x, y])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    fresh = _hook(_ready(MixupCutmix(mode="pair", num_classes=3, seed=9)), [x, y])
    assert not torch.equal(fresh[0], a[0])  # batch 3's draws, not batch 0's


def _digits_fit(callbacks, tmp_path=None, max_epochs=1, ckpt_path=None, label_smoothing=0.0, made=None):
    seed_everything(0)
    module = Classifier(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 0.05}, label_smoothing)
    trainer = Trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=tmp_path is not None,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    if made is not None:
        made.append(trainer)
    trainer.fit(module, DigitsDataModule(batch_size=32, loader="resident"), ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`")
def test_trainer_resume_matches_the_uninterrupted_run(tmp_path):
    def make():
        return MixupCutmix(0.8, 1.0, mode="elem", seed=4)

    full_cb = make()
    _, full = _digits_fit([full_cb], max_epochs=3)
    save = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _digits_fit([make(), save], tmp_path, max_epochs=1)
    resumed_cb = make()
    _, resumed = _digits_fit([resumed_cb], max_epochs=3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed_cb.state_dict() == full_cb.state_dict() == {"seed": 4, "batches": 9}
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "pair,names",
    [
        ((Mixup, CutMix), ("CutMix", "Mixup")),
        ((MixupCutmix, Mixup), ("MixupCutmix", "Mixup")),
        ((CutMix, MixupCutmix), ("MixupCutmix", "CutMix")),
    ],
)
def test_two_label_mixers_are_refused_before_the_first_step(pair, names):
    for order in (pair, pair[::-1]):
        made: list = []
        with pytest.raises(ValueError, match="use one MixupCutmix") as info:
            _digits_fit([cls(seed=1) for cls in order], made=made)
        assert made[0].global_step == 0
        message = str(info.value)
        assert all(name in message for name in names) and "\n" not in message
        assert message.startswith(f"{names[0]} and {names[1]} both mix the labels")


def test_double_label_smoothing_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"MixupCutmix\(label_smoothing=0.1\) and the module's label_smoothing=0.1"):
        _digits_fit([MixupCutmix(label_smoothing=0.1)], label_smoothing=0.1)


def test_with_cutout_on_digits_in_a_fixed_order_and_soft_targets():
    class Spy(Classifier):
        def training_step(self, batch, batch_idx):
            self.last_y = batch[1]
            return super().training_step(batch, batch_idx)

    def run(callbacks):
        seed_everything(0)
        module = Spy(MLP((1, 8, 8), 10, hidden=(16,)), 10, {"name": "sgd", "lr": 0.05})
        trainer = Trainer(
            max_epochs=1,
            limit_train_batches=3,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.callbacks.extend(callbacks)
        trainer.fit(module, DigitsDataModule(batch_size=32, loader="resident"))
        return module

    a = run([MixupCutmix(mode="elem", label_smoothing=0.1, seed=2), Cutout(size=2, seed=3)])
    b = run([Cutout(size=2, seed=3), MixupCutmix(mode="elem", label_smoothing=0.1, seed=2)])
    assert a.last_y.shape == (32, 10) and torch.equal(a.last_y, b.last_y)
    torch.testing.assert_close(a.last_y.sum(1), torch.ones(32))
    assert a.last_y.min() >= 0.01 - 1e-6  # smoothing eps / C = 0.01 on every class
    for (name, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(wa, wb), name


def test_config_composes_and_train_runs_with_it(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="callbacks/mixup_cutmix")
    cb = instantiate(cfg.callbacks.mixup_cutmix)
    assert type(cb) is MixupCutmix and (cb.mixup_alpha, cb.cutmix_alpha, cb.mode) == (0.8, 1.0, "batch")

    from conftest import compose_train

    from lightning_tricks.train import train

    cfg = compose_train(["trainer=debug", "+callbacks=mixup_cutmix", "logger=[]"], output_dir=tmp_path)
    metrics, objects = train(cfg)
    assert any(isinstance(c, MixupCutmix) and c.batches > 0 for c in objects["callbacks"])
    assert all(v == v for v in metrics.values() if isinstance(v, float))
