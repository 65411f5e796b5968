"""Whitening: ZCA of whole images (data.normalize=zca) and the frozen patch-whitening first layer (model.whiten).

Expectations are computed here with numpy from the raw training pixels (covariance, eigenvectors, patches cut
by slicing), never by the code under test. The leak checks fit on a training split, change the validation
and test data, and show that the fitted statistics do not move.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_tricks.data import DigitsDataModule
from lightning_tricks.data.base import TensorDataModule
from lightning_tricks.models import ResNet, SpeedNet
from lightning_tricks.nn import PatchWhitening, fit_patch_whitening
from lightning_tricks.whitening import ZCA, patch_whitening_filters


def _correlated_images(n: int, seed: int, shape=(2, 3, 3)) -> torch.Tensor:
    """Pixels in [0, 1] with strongly correlated, full-rank covariance."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    z = torch.randn(n, d, generator=g) @ mix
    return torch.sigmoid(0.5 * z).view(n, *shape)


def _numpy_cov(x: np.ndarray) -> np.ndarray:
    c = x - x.mean(0)
    return c.T @ c / len(x)


class SyntheticModule(TensorDataModule):
    num_classes = 2
    input_shape = (2, 3, 3)

    def __init__(self, train, val, test, **kwargs):
        super().__init__(**kwargs)
        self._data = {"train": train, "val": val, "test": test}

    def load(self):
        return {k: (x, torch.zeros(len(x), dtype=torch.int64)) for k, x in self._data.items()}


# -- ZCA core ---------------------------------------------------------------------------------------------
def test_zca_whitened_training_data_have_identity_covariance():
    x = _correlated_images(20000, 0).double()
    zca = ZCA.fit(x, eps=1e-10)
    white = zca(x).flatten(1).numpy()
    np.testing.assert_allclose(_numpy_cov(white), np.eye(18), atol=1e-6)
    np.testing.assert_allclose(white.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(zca.matrix.numpy(), zca.matrix.numpy().T, atol=1e-10)  # ZCA: symmetric W
    torch.testing.assert_close(zca.inverse(zca(x)), x)


def test_zca_eps_damps_each_direction_by_lambda_over_lambda_plus_eps():
    x = _correlated_images(5000, 1).double()
    eps = 0.003
    white = ZCA.fit(x, eps=eps)(x).flatten(1).numpy()
    lam, vec = np.linalg.eigh(_numpy_cov(x.flatten(1).numpy()))
    want = vec @ np.diag(lam / (lam + eps)) @ vec.T
    np.testing.assert_allclose(_numpy_cov(white), want, atol=1e-8)
    assert lam.min() < eps < lam.max()  # the test exercises both regimes


def test_zca_datamodule_fits_on_the_training_split_only():
    train = _correlated_images(3000, 2)
    val, test = _correlated_images(400, 3), _correlated_images(400, 4)
    a = SyntheticModule(train, val, test, normalize="zca", zca_eps=1e-6, batch_size=32)
    b = SyntheticModule(train, 5 * val + 3, -test, normalize="zca", zca_eps=1e-6, batch_size=32)
    a.setup()
    b.setup()
    assert a.zca is not None and b.zca is not None and a.norm_shift is None
    torch.testing.assert_close(a.zca.matrix, b.zca.matrix, rtol=0, atol=0)
    torch.testing.assert_close(a.zca.mean, b.zca.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.splits["train"][0], b.splits["train"][0], rtol=0, atol=0)
    # every split is mapped with the training split's mean and matrix, computed here with numpy
    flat = train.flatten(1).double().numpy()
    lam, vec = np.linalg.eigh(_numpy_cov(flat))
    w = vec @ np.diag(1 / np.sqrt(lam + 1e-6)) @ vec.T
    for name, raw in (("train", train), ("val", val), ("test", test)):
        want = (raw.flatten(1).double().numpy() - flat.mean(0)) @ w
        np.testing.assert_allclose(a.splits[name][0].flatten(1).numpy(), want, atol=2e-4)
    np.testing.assert_allclose(_numpy_cov(a.splits["train"][0].flatten(1).double().numpy()), np.eye(18), atol=5e-3)
    # the validation split is whitened by the training statistics, not its own: its mean is not 0 in b
    assert b.splits["val"][0].flatten(1).mean(0).abs().max() > 1


def test_zca_digits_carved_validation_split_and_augmentation_in_pixel_space():
    raw = DigitsDataModule(normalize="none")
    raw.setup()
    dm = DigitsDataModule(normalize="zca", augment="random_resized_crop")
    dm.setup()
    train = raw.splits["train"][0].flatten(1).double().numpy()  # the carved training split, before ZCA
    lam, vec = np.linalg.eigh(_numpy_cov(train))
    lam = lam.clip(min=0)
    want = vec @ np.diag(lam / (lam + 0.01)) @ vec.T  # zca_eps: 0.01 by default
    got = _numpy_cov(dm.splits["train"][0].flatten(1).double().numpy())
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the policy sees pixels: ZCA's inverse, the policy, ZCA
    x = dm.splits["train"][0][:32]
    pixels = dm.zca.inverse(x)
    torch.testing.assert_close(pixels, raw.splits["train"][0][:32], atol=1e-4, rtol=0)
    out = dm.apply_policy(x, torch.Generator().manual_seed(0))
    expected = dm.zca(dm.augment_policy(pixels, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="zca_eps must be a number in"):
        DigitsDataModule(normalize="zca", zca_eps=0.0)


# -- patch whitening -------------------------------------------------------------------------------------
def _patches_by_slicing(x: np.ndarray, k: int) -> np.ndarray:
    n, c, h, w = x.shape
    rows = [x[:, :, i : i + k, j : j + k].reshape(n, c * k * k) for i in range(h - k + 1) for j in range(w - k + 1)]
    return np.concatenate(rows)


@pytest.mark.parametrize(("channels", "kernel"), [(1, 2), (3, 2), (2, 3)])
def test_patch_whitening_outputs_on_training_patches_are_white(channels, kernel):
    x = _correlated_images(300, 5, shape=(channels, 8, 8))
    eps = 1e-7
    layer = PatchWhitening(channels, kernel, eps).fit(x)
    out = layer(x).double()  # (N, 2 C k^2, H - k + 1, W - k + 1)
    d = channels * kernel * kernel
    assert out.shape == (300, 2 * d, 9 - kernel, 9 - kernel)
    first = out[:, :d].permute(0, 2, 3, 1).reshape(-1, d).numpy()
    np.testing.assert_allclose(_numpy_cov(first), np.eye(d), atol=1e-4)
    np.testing.assert_allclose(first.mean(0), 0, atol=1e-4)
    torch.testing.assert_close(out[:, d:], -out[:, :d])
    # the filters are the eigenvectors of the patches' covariance, largest eigenvalue first
    patches = _patches_by_slicing(x.double().numpy(), kernel)
    lam, vec = np.linalg.eigh(_numpy_cov(patches))
    filters = layer.weight[:d].reshape(d, d).double().numpy() * np.sqrt(lam[::-1, None] + eps)
    np.testing.assert_allclose(np.abs(filters @ vec[:, ::-1]), np.eye(d), atol=1e-3)


def test_patch_whitening_is_frozen_refuses_to_run_unfitted_and_reloads():
    net = ResNet((1, 8, 8), 10, widths=(8, 16), whiten=True)
    layer = net.backbone[0]
    assert isinstance(layer, PatchWhitening) and layer.out_channels == 8
    assert not any(p is layer.weight for p in net.parameters())  # buffers: no optimizer ever sees them
    with pytest.raises(RuntimeError, match="PatchWhitening is not fitted"):
        net(torch.zeros(2, 1, 8, 8))
    x = _correlated_images(50, 6, shape=(1, 8, 8))
    assert fit_patch_whitening(net, x) == [layer]
    fresh = ResNet((1, 8, 8), 10, widths=(8, 16), whiten=True)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), net(x))
    speed = SpeedNet((3, 16, 16), 10, widths=(8, 16), whiten=True, whiten_kernel=3)
    assert speed.feature_sizes == [(7, 7), (3, 3)]  # 16 - 3 + 1 = 14, halved twice
    with pytest.raises(ValueError, match="whiten_kernel=9 is larger than the input 8x8"):
        ResNet((1, 8, 8), 10, whiten=True, whiten_kernel=9)
    with pytest.raises(ValueError, match="whiten must be a bool"):
        ResNet((1, 8, 8), 10, whiten="yes")


def test_whiten_from_the_config_fits_on_training_images_and_stays_frozen(make_cfg):
    from lightning_tricks.train import train

    metrics, objects = train(make_cfg("model=resnet", "model.widths=[8,16]", "model.whiten=true"))
    assert objects["trainer"].global_step == 6 and np.isfinite(metrics["test/loss"])
    layer = objects["module"].net.backbone[0]
    train_images = objects["datamodule"].splits["train"][0]
    weight, bias = patch_whitening_filters(train_images[:5000], 2, 5e-4)
    torch.testing.assert_close(layer.weight, weight)  # unchanged by 6 optimizer steps
    torch.testing.assert_close(layer.bias, bias)
