"""SpeedNet (lightning_tricks/models/speed.py): shapes, the exact layer function, memory-format independence,
switches, bad arguments, its config, and a tiny training run whose loss must fall."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from hydra.utils import instantiate
from torch import nn

from lightning_tricks.models import SpeedNet


def _randomize_bn(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics (the defaults hide ordering mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_shapes_and_feature_sizes():
    net = SpeedNet((1, 28, 28), 10, widths=(8, 16, 32))
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert net.feature_sizes == [(14, 14), (7, 7), (3, 3)]
    assert net.backbone(torch.zeros(3, 1, 28, 28)).shape == (3, 32)
    net = SpeedNet((3, 32, 32), 5, widths=(4, 4, 4, 4, 4))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 5) and net.feature_sizes[-1] == (1, 1)


def test_parameter_count_matches_the_formula():
    # conv 3x3 without bias, BN (weight + bias) per stage; extra convs likewise; linear head with bias
    a, b, c = 6, 10, 14
    net = SpeedNet((1, 28, 28), 10, widths=(a, b, c), convs_per_stage=2)
    stage = lambda cin, w: cin * w * 9 + 2 * w + (w * w * 9 + 2 * w)  # noqa: E731
    expected = stage(1, a) + stage(a, b) + stage(b, c) + c * 10 + 10
    assert sum(p.numel() for p in net.parameters()) == expected


def test_parameter_count_of_the_flatten_head():
    # widths (6, 10) on 28x28: 10 channels of 7x7 flattened -> hidden 16 -> 10 classes
    net = SpeedNet((1, 28, 28), 10, widths=(6, 10), head="flatten", hidden=16)
    convs = (1 * 6 * 9 + 2 * 6) + (6 * 10 * 9 + 2 * 10)
    assert sum(p.numel() for p in net.parameters()) == convs + (490 * 16 + 16) + (16 * 10 + 10)
    no_hidden = SpeedNet((1, 28, 28), 10, widths=(6, 10), head="flatten")
    assert sum(p.numel() for p in no_hidden.parameters()) == convs + 490 * 10 + 10


def test_flatten_head_is_the_flattened_map_through_two_linear_layers():
    torch.manual_seed(0)
    net = SpeedNet((1, 28, 28), 10, widths=(4, 8), head="flatten", hidden=16).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        features = net.backbone[1](net.backbone[0](x))  # (3, 8, 7, 7), stored channels-last
        flat = features.reshape(3, -1)  # logical (C, H, W) order, whatever the memory format
        first, second = net.head[0], net.head[2]
        expected = F.relu(flat @ first.weight.T + first.bias) @ second.weight.T + second.bias
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_forward_is_conv_pool_bn_relu_then_global_max_and_linear(train):
    """The exact function, rebuilt from torch.nn.functional with the net's own weights."""
    torch.manual_seed(0)
    net = SpeedNet((1, 12, 12), 4, widths=(5, 7), channels_last=False)
    _randomize_bn(net)
    net.train(train)
    x = torch.randn(6, 1, 12, 12)
    s1, s2 = net.backbone[0], net.backbone[1]

    def stage(h, s):
        conv, bn = s[0], s[2]
        h = F.max_pool2d(F.conv2d(h, conv.weight, padding=1), 2)
        if train:  # batch statistics of the pooled map (biased variance), as BatchNorm in training
            mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        h = (h - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
        return F.relu(h * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])

    with torch.no_grad():
        expected = stage(stage(x, s1), s2).amax(dim=(2, 3)) @ net.head[0].weight.T + net.head[0].bias
        out = net(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "convs, residual, head, hidden",
    [(1, False, "max", 0), (2, True, "max", 0), (3, False, "flatten", 0), (1, False, "flatten", 12)],
)
def test_channels_last_gives_the_same_function(convs, residual, head, hidden):
    torch.manual_seed(0)
    kwargs = {"widths": (8, 16, 32), "convs_per_stage": convs, "residual": residual, "head": head, "hidden": hidden}
    fast = SpeedNet((1, 28, 28), 10, **kwargs)
    plain = SpeedNet((1, 28, 28), 10, **kwargs, channels_last=False)
    _randomize_bn(fast)
    plain.load_state_dict(fast.state_dict())
    conv = fast.backbone[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.backbone[0][0].weight.is_contiguous()
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(4, 1, 28, 28)
    for train in (False, True):
        fast.train(train)
        plain.train(train)
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    assert seen and all(seen)  # the first conv ran on an NHWC input


def test_residual_block_is_identity_plus_branch():
    """With the extra conv's BN zeroed the branch outputs 0: a residual stage passes its input through."""
    torch.manual_seed(0)
    net = SpeedNet((1, 8, 8), 3, widths=(4,), convs_per_stage=2, residual=True, channels_last=False).eval()
    block = net.backbone[0][4]
    with torch.no_grad():
        block.f[1].weight.zero_()
        block.f[1].bias.zero_()
        h = torch.randn(2, 4, 4, 4)
        torch.testing.assert_close(block(h), h, rtol=0, atol=0)
        block.f[1].bias.fill_(1.0)  # branch = relu(1) = 1 everywhere
        torch.testing.assert_close(block(h), h + 1, rtol=0, atol=0)
    plain = SpeedNet((1, 8, 8), 3, widths=(4,), convs_per_stage=2, residual=False)
    assert not any(type(m).__name__ == "_Residual" for m in plain.modules())


def test_head_scale_multiplies_the_logits():
    torch.manual_seed(0)
    one = SpeedNet((1, 28, 28), 10, widths=(4, 8), head_scale=1.0).eval()
    eighth = SpeedNet((1, 28, 28), 10, widths=(4, 8), head_scale=0.125).eval()
    eighth.load_state_dict(one.state_dict())
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(eighth(x), one(x) * 0.125)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"widths": []}, "widths must be a non-empty list of positive ints"),
        ({"widths": [8, 0]}, "widths must be a non-empty list of positive ints"),
        ({"widths": "8"}, "widths must be a non-empty list of positive ints"),
        ({"convs_per_stage": 0}, "convs_per_stage must be an int >= 1, got 0"),
        ({"convs_per_stage": 1.5}, "convs_per_stage must be an int >= 1, got 1.5"),
        ({"residual": "yes"}, "residual must be true or false, got 'yes'"),
        ({"channels_last": 1}, "channels_last must be true or false, got 1"),
        ({"head_scale": 0.0}, r"head_scale must be a number > 0, got 0.0"),
        ({"head": "avg"}, r"head must be one of \('max', 'flatten'\), got 'avg'"),
        ({"hidden": -1, "head": "flatten"}, "hidden must be an int >= 0, got -1"),
        ({"hidden": 64}, r"hidden=64 needs head='flatten' \(head='max' is one linear layer\); set hidden: 0"),
        ({"widths": [4, 4, 4, 4, 4, 4]}, r"cannot be halved 6 times \(28x28 -> 14x14 .* -> 0x0\); use fewer widths"),
        ({"input_shape": (784,)}, r"SpeedNet needs input_shape \(C, H, W\), got \(784,\)"),
        ({"num_classes": 1}, "num_classes must be an int >= 2, got 1"),
    ],
)
def test_bad_arguments_fail_in_one_line(kwargs, match):
    args = {"input_shape": (1, 28, 28), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        SpeedNet(**args)


def test_config_instantiates_with_the_data_shape(tmp_path):
    cfg = compose_train(["model=speed", "data=fashion_mnist"], output_dir=tmp_path)
    net = instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    assert isinstance(net, SpeedNet) and net.channels_last and net.feature_sizes[-1] == (3, 3)
    cfg = compose_train(["experiment=speedrun_fashion_mnist"], output_dir=tmp_path)
    assert cfg.model._target_ == "lightning_tricks.models.SpeedNet"


def test_a_few_steps_on_digits_lower_the_loss():
    """Twenty SGD steps on 256 digits images: the training loss must fall well below its start."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:256], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y[:256])
    net = SpeedNet((1, 8, 8), 10, widths=(16, 32))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
