"""Weight initialization (lightning_tricks/init.py, model.init) and zero-initialized residual branches.

Each layer's standard deviation is compared with the scheme's formula written here from the layer's shape
(fan_in = in_channels * kernel area, fan_out = out_channels * kernel area), within five standard errors of
a sample standard deviation (relative error sqrt((kurtosis - 1) / (4 n)) for n weights).
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch import nn

from lightning_tricks.data import DigitsDataModule
from lightning_tricks.init import INITS, init_weights, zero_last_norm_scale
from lightning_tricks.models import MLP, ResNet, SpeedNet, TimmModel
from lightning_tricks.models.cnn import BasicBlock
from lightning_tricks.sanity import initial_loss

RELU_GAIN = math.sqrt(2.0)
OUTPUT_GAIN = 0.1
# kurtosis of the weights' distribution: normal 3, uniform 9/5; a normal truncated at 2 sigma ~2.36
KURTOSIS = {"normal": 3.0, "uniform": 1.8, "trunc": 2.36}


def _shape_fans(w: torch.Tensor) -> tuple[int, int]:
    k = 1
    for s in w.shape[2:]:
        k *= s
    return w.shape[1] * k, w.shape[0] * k


def expected_std(scheme: str, w: torch.Tensor, gain: float) -> tuple[float, str]:
    fan_in, fan_out = _shape_fans(w)
    if scheme == "kaiming_normal":
        return gain / math.sqrt(fan_in), "normal"
    if scheme == "kaiming_uniform":
        bound = gain * math.sqrt(3 / fan_in)
        return bound / math.sqrt(3), "uniform"  # U(-b, b) has std b / sqrt(3)
    if scheme == "xavier_normal":
        return gain * math.sqrt(2 / (fan_in + fan_out)), "normal"
    if scheme == "xavier_uniform":
        return gain * math.sqrt(6 / (fan_in + fan_out)) / math.sqrt(3), "uniform"
    if scheme == "trunc_normal":
        return gain / math.sqrt(fan_in), "trunc"
    if scheme == "orthogonal":
        return gain / math.sqrt(max(w.shape[0], fan_in)), "orthogonal"
    raise AssertionError(scheme)


def _models(scheme: str) -> list[nn.Module]:
    return [
        MLP((1, 8, 8), 10, hidden=(256, 128), init=scheme),
        ResNet((1, 8, 8), 10, widths=(16, 32), init=scheme),
        SpeedNet(
            (3, 16, 16), 10, widths=(16, 32), convs_per_stage=2, residual=True, head="flatten", hidden=64, init=scheme
        ),
    ]


@pytest.mark.parametrize("scheme", [s for s in INITS if s != "default"])
def test_every_layer_std_matches_the_formula(scheme):
    torch.manual_seed(0)
    checked = 0
    for model in _models(scheme):
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        for layer in layers:
            w = layer.weight.detach().double()
            gain = OUTPUT_GAIN if layer is layers[-1] else RELU_GAIN
            want, kind = expected_std(scheme, w, gain)
            n = w.numel()
            if kind == "orthogonal":
                m = w.reshape(w.shape[0], -1)
                gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
                torch.testing.assert_close(gram, gain**2 * torch.eye(len(gram), dtype=gram.dtype), atol=1e-5, rtol=0)
                assert w.pow(2).mean().sqrt().item() == pytest.approx(want, rel=1e-5)
            else:
                rel_se = math.sqrt((KURTOSIS[kind] - 1) / (4 * n))
                assert abs(w.std().item() / want - 1) < 5 * rel_se + 1e-9, (type(model).__name__, tuple(w.shape))
                if kind == "uniform":
                    assert w.abs().max().item() <= want * math.sqrt(3) + 1e-12
                if kind == "trunc":  # truncated at two standard deviations of the untruncated normal
                    assert w.abs().max().item() <= 2 * want / 0.8796256610342398 + 1e-12
            if layer.bias is not None:
                assert torch.count_nonzero(layer.bias) == 0
            checked += 1
    assert checked >= 15


def test_default_keeps_pytorchs_initialization():
    torch.manual_seed(0)
    a = ResNet((1, 8, 8), 10, widths=(8, 16))
    torch.manual_seed(0)
    b = ResNet((1, 8, 8), 10, widths=(8, 16), init="default")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert init_weights(a, "default") == []


def test_init_is_drawn_from_the_generator_and_refuses_bad_values():
    make = lambda: nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))  # noqa: E731
    a, b = make(), make()
    init_weights(a, "xavier_normal", generator=torch.Generator().manual_seed(3))
    init_weights(b, "xavier_normal", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="init must be one of .*got 'he'"):
        MLP((1, 8, 8), 10, init="he")
    with pytest.raises(ValueError, match="parametrized weight"):
        init_weights(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)), "orthogonal")
    # weight norm is added after the initialization: w = g * v / ||v|| starts equal to the drawn weight
    torch.manual_seed(0)
    net = MLP((1, 8, 8), 10, hidden=(512,), norm="weight", init="kaiming_normal")
    w = net.backbone[1].weight.detach()
    assert w.std().item() == pytest.approx(RELU_GAIN / 8, rel=5 / math.sqrt(2 * w.numel()))


@pytest.fixture(scope="module")
def digits_batch():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x, y = dm.splits["train"]
    return x[:256], y[:256]


@pytest.mark.parametrize("scheme", INITS)
def test_initial_loss_check_passes_with_every_init(scheme, digits_batch):
    torch.manual_seed(0)
    models = [
        MLP((1, 8, 8), 10, init=scheme),
        ResNet((1, 8, 8), 10, init=scheme),
        ResNet((1, 8, 8), 10, init=scheme, zero_init_residual=True),
        SpeedNet((1, 8, 8), 10, widths=(16, 32), init=scheme),
    ]
    for model in models:
        report = initial_loss(model, digits_batch, num_classes=10)
        assert report.passed, (scheme, type(model).__name__, report.reason)


def test_zero_init_residual_makes_every_block_its_shortcut():
    torch.manual_seed(0)
    net = ResNet((3, 16, 16), 10, widths=(8, 16), blocks_per_stage=2, init="kaiming_normal", zero_init_residual=True)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 4
    x = torch.randn(4, 8, 16, 16)
    for block in blocks:
        bns = [m for m in block.branch if isinstance(m, nn.BatchNorm2d)]
        assert torch.count_nonzero(bns[-1].weight) == 0 and torch.all(bns[0].weight == 1)
    first = blocks[0]  # 8 -> 8 channels: the shortcut is the identity
    torch.testing.assert_close(first(x), torch.relu(x))
    down = blocks[2]  # 8 -> 16, stride 2: the shortcut is conv-BN
    torch.testing.assert_close(down(x), torch.relu(down.shortcut(x)))
    # only the branches' last norms are zero: the stem and shortcut norms keep scale 1
    zeros = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and torch.count_nonzero(m.weight) == 0]
    assert len(zeros) == 4

    layer_norm = ResNet((1, 8, 8), 10, widths=(8,), norm="layer", zero_init_residual=True)
    block = next(m for m in layer_norm.modules() if isinstance(m, BasicBlock))
    assert torch.count_nonzero(block.branch[-1].weight) == 0 and isinstance(block.branch[-1], nn.GroupNorm)


def test_zero_init_residual_speednet_and_refusals():
    net = SpeedNet((1, 16, 16), 10, widths=(8, 16), convs_per_stage=3, residual=True, zero_init_residual=True)
    residuals = [m for m in net.modules() if type(m).__name__ == "_Residual"]
    assert len(residuals) == 4
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(residuals[0](x), x)
    with pytest.raises(ValueError, match="zero_init_residual=true needs residual blocks"):
        SpeedNet((1, 16, 16), 10, widths=(8,), zero_init_residual=True)
    with pytest.raises(ValueError, match="norm=batch or layer.*got norm='weight'"):
        ResNet((1, 8, 8), 10, widths=(8,), norm="weight", zero_init_residual=True)
    with pytest.raises(ValueError, match="zero_init_residual must be a bool"):
        ResNet((1, 8, 8), 10, widths=(8,), zero_init_residual="yes")
    with pytest.raises(ValueError, match="has no normalization layer"):
        zero_last_norm_scale([nn.Sequential(nn.Linear(2, 2))])


# -- timm: a fake module with timm's create_model and a block with zero_init_last ----------------------------
class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class _TinyTimmNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, **_: object) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(in_chans, 32, 3, padding=1), _Block(32)
        self.fc: nn.Module = nn.Linear(32, num_classes)
        self.num_features = 32

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, **_: object) -> None:
        self.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


@pytest.fixture
def tiny_timm(monkeypatch):
    fake = types.ModuleType("timm")
    fake.is_model = lambda name: name == "tiny"  # type: ignore[attr-defined]
    fake.create_model = lambda name, **kw: _TinyTimmNet(kw["num_classes"], kw["in_chans"])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake)


def test_timm_model_init_and_zero_init_residual(tiny_timm, tmp_path):
    torch.manual_seed(0)
    model = TimmModel((3, 8, 8), 10, name="tiny", init="xavier_uniform", zero_init_residual=True)
    stem = model.backbone.stem.weight.detach()
    want, _ = expected_std("xavier_uniform", stem, RELU_GAIN)
    assert abs(stem.std().item() / want - 1) < 5 * math.sqrt(0.8 / (4 * stem.numel()))
    assert torch.count_nonzero(model.backbone.stem.bias) == 0
    head = model.head.weight.detach()
    assert head.abs().max().item() <= OUTPUT_GAIN * math.sqrt(6 / (32 + 10)) + 1e-12
    assert torch.count_nonzero(model.backbone.block.bn.weight) == 0
    weights = tmp_path / "w.pth"
    torch.save({"stem.weight": stem}, weights)
    with pytest.raises(ValueError, match="would overwrite the pretrained weights"):
        TimmModel((3, 8, 8), 10, name="tiny", init="orthogonal", pretrained_path=str(weights))


def test_init_switches_from_the_config(make_cfg):
    from hydra.utils import instantiate

    from lightning_tricks.train import train

    cfg = make_cfg("model=resnet", "model.widths=[8,16]", "model.init=orthogonal", "model.zero_init_residual=true")
    net = instantiate(cfg.model, input_shape=(1, 8, 8), num_classes=10)
    stem = net.backbone[0][0].weight.detach().reshape(8, -1)  # 8 x 9: orthonormal rows times sqrt(2)
    torch.testing.assert_close(stem @ stem.T, 2 * torch.eye(8), atol=1e-5, rtol=0)
    assert sum(torch.count_nonzero(m.weight) == 0 for m in net.modules() if isinstance(m, nn.BatchNorm2d)) == 2
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 6 and math.isfinite(metrics["test/loss"])
