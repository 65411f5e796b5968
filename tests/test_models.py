import pytest
import torch
from torch import nn

from lightning_tricks.models import MLP, ResNet
from lightning_tricks.nn import ICBlock


def _kinds(seq):
    return [type(m).__name__ for m in seq]


def test_mlp_placements():
    classic = MLP((1, 8, 8), 10, hidden=(16, 16), norm="classic", dropout=0.1)
    assert _kinds(classic.backbone) == [
        "Flatten",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Dropout",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Dropout",
    ]
    ic = MLP((1, 8, 8), 10, hidden=(16, 16), norm="ic", dropout=0.1)
    assert _kinds(ic.backbone) == ["Flatten", "Linear", "ReLU", "ICBlock", "Linear", "ReLU"]
    assert _kinds(ic.head) == ["ICBlock", "Linear"]
    assert _kinds(ic.backbone[3]) == ["BatchNorm1d", "Dropout"]  # BN first, then dropout
    none = MLP((1, 8, 8), 10, hidden=(16,), norm="none")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in none.modules())
    for m in (classic, ic, none):
        assert m(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_resnet_shapes_and_switches():
    for norm in ("classic", "ic", "none"):
        net = ResNet((3, 16, 16), 7, widths=(8, 16), blocks_per_stage=2, norm=norm, dropout=0.1, drop_path_rate=0.2)
        assert net(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    net = ResNet((3, 16, 16), 7, widths=(8, 16), blocks_per_stage=2, drop_path_rate=0.2)
    rates = [m.p for m in net.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx([0.05, 0.1, 0.15, 0.2])
    ic = ResNet((3, 16, 16), 7, widths=(8,), norm="ic", dropout=0.1)
    assert sum(isinstance(m, ICBlock) for m in ic.modules()) == 3  # two in the block, one before the head
    big = ResNet((3, 32, 32), 10, widths=(64, 128, 256, 512), blocks_per_stage=2)
    assert 10e6 < sum(p.numel() for p in big.parameters()) < 12e6  # ResNet-18 sized


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "batch"}, "norm must be one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"num_classes": 1}, "num_classes must be an int >= 2, got 1"),
        ({"hidden": (0,)}, "hidden sizes must be positive"),
    ],
)
def test_mlp_bad_args(kwargs, match):
    args = {"input_shape": (1, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        MLP(**args)


def test_resnet_needs_image_shape():
    with pytest.raises(ValueError, match=r"ResNet needs input_shape \(C, H, W\), got \(64,\)"):
        ResNet((64,), 10)
