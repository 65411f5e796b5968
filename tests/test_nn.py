"""Layers: IC block, DropConnect, drop path, fractional max pooling, weight norm, block builders."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.nn import (
    DropConnectConv2d,
    DropConnectLinear,
    DropPath,
    FractionalMaxPool2d,
    ICBlock,
    apply_weight_norm,
    check_norm,
    conv_block,
    conv_stack,
    drop_path,
    drop_path_rates,
    dropconnect_weight,
    linear_block,
    mlp_stack,
    norm_layer,
    remove_weight_norm,
    weight_normed_layers,
)

# -- IC block ---------------------------------------------------------------------------------


def _ic_with_stats(dims: int, p: float) -> ICBlock:
    torch.manual_seed(0)
    block = ICBlock(6, p=p, dims=dims)
    norm = block[0]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2.0)
    return block


@pytest.mark.parametrize("dims", [1, 2])
def test_ic_block_eval_is_batchnorm_eval_then_identity(dims):
    block = _ic_with_stats(dims, p=0.5).eval()
    norm = block[0]
    x = torch.randn(5, 6) if dims == 1 else torch.randn(5, 6, 4, 4)
    expected = F.batch_norm(
        x, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False, eps=norm.eps
    )
    out = block(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(out, block(x))  # deterministic


@pytest.mark.parametrize("dims,p", [(1, 0.3), (2, 0.5)])
def test_ic_block_train_zeroes_at_rate_p_and_scales_by_inverse_keep(dims, p):
    block = _ic_with_stats(dims, p=p).train()
    reference = copy.deepcopy(block[0]).train()  # BatchNorm in training mode on the same batch
    x = torch.randn(512, 6) * 3 + 1 if dims == 1 else torch.randn(64, 6, 12, 12) * 3 + 1
    torch.manual_seed(1)
    out = block(x)
    normed = reference(x)
    dropped = out == 0
    rate = dropped.float().mean().item()
    n = out.numel()
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5, (rate, p)
    torch.testing.assert_close(out[~dropped], normed[~dropped] / (1 - p), rtol=1e-5, atol=1e-6)
    # the running statistics move as BatchNorm's do
    torch.testing.assert_close(block[0].running_mean, reference.running_mean)


def test_ic_block_rejects_bad_arguments():
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            ICBlock(4, p=p)
    with pytest.raises(ValueError, match="dims"):
        ICBlock(4, p=0.1, dims=3)
    with pytest.raises(ValueError, match="num_features"):
        ICBlock(0, p=0.1)


# -- DropConnect -------------------------------------------------------------------------------


def test_dropconnect_linear_uses_masked_scaled_weights_in_training():
    p = 0.4
    layer = DropConnectLinear(7, 5, p=p, generator=torch.Generator().manual_seed(3)).train()
    x = torch.randn(9, 7)
    out = layer(x)
    mask = torch.empty_like(layer.weight).bernoulli_(1 - p, generator=torch.Generator().manual_seed(3))
    expected = x @ (layer.weight * mask / (1 - p)).T + layer.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert 0 < mask.mean() < 1
    # the next call draws a new mask
    assert not torch.equal(layer(x), out)


def test_dropconnect_eval_is_the_plain_layer():
    layer = DropConnectLinear(7, 5, p=0.4).eval()
    x = torch.randn(9, 7)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    conv = DropConnectConv2d(2, 3, 3, padding=1, p=0.4).eval()
    xi = torch.randn(2, 2, 6, 6)
    assert torch.equal(conv(xi), F.conv2d(xi, conv.weight, conv.bias, padding=1))


def test_dropconnect_conv_uses_masked_scaled_weights_in_training():
    p = 0.25
    conv = DropConnectConv2d(2, 3, 3, padding=1, p=p, generator=torch.Generator().manual_seed(5)).train()
    x = torch.randn(2, 2, 6, 6)
    out = conv(x)
    mask = torch.empty_like(conv.weight).bernoulli_(1 - p, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, F.conv2d(x, conv.weight * mask / (1 - p), conv.bias, padding=1))


def test_dropconnect_weight_keeps_fraction_one_minus_p():
    weight = torch.ones(400, 500)
    dropped, mask = dropconnect_weight(weight, 0.3, generator=torch.Generator().manual_seed(0))
    assert abs(mask.mean().item() - 0.7) < 0.005
    torch.testing.assert_close(dropped.unique(), torch.tensor([0.0, 1 / 0.7]))
    same, none = dropconnect_weight(weight, 0.3, training=False)
    assert same is weight and none is None


def test_dropconnect_rejects_bad_p():
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        DropConnectLinear(2, 2, p=1.0)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        DropConnectConv2d(2, 2, 3, p=-0.2)


# -- drop path ---------------------------------------------------------------------------------


def test_drop_path_rate_zero_and_eval_are_identity():
    x = torch.randn(8, 3, 4, 4)
    assert DropPath(0.0).train()(x) is x
    assert DropPath(0.5).eval()(x) is x


def test_drop_path_keeps_fraction_one_minus_p_per_sample():
    p = 0.2
    x = torch.ones(20000, 3, 2)
    out = drop_path(x, p, training=True, generator=torch.Generator().manual_seed(0))
    kept = (out != 0).all(dim=(1, 2))
    dropped = (out == 0).all(dim=(1, 2))
    assert bool((kept | dropped).all())  # whole samples are dropped or kept
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / 20000) ** 0.5
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    module = DropPath(p)
    module.generator = torch.Generator().manual_seed(0)
    assert torch.equal(module.train()(x), out)


def test_drop_path_rates_rise_linearly():
    assert drop_path_rates(0.3, 3) == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="drop path rate"):
        drop_path_rates(1.0, 3)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        DropPath(1.0)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        drop_path(torch.ones(2, 2), 1.2, training=True)


# -- fractional max pooling --------------------------------------------------------------------


def test_fractional_max_pool_random_in_training_fixed_in_eval():
    pool = FractionalMaxPool2d(2**-0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, 16, 16)
    a, b = pool.train()(x), pool(x)
    assert a.shape == (4, 3, 11, 11)
    assert not torch.equal(a, b)
    pool.eval()
    assert torch.equal(pool(x), pool(x))
    # every output is a maximum over a window of the input, hence an input value of the same channel
    values = set(x[0, 0].flatten().tolist())
    assert set(a[0, 0].flatten().tolist()) <= values
    with pytest.raises(ValueError, match="output_ratio"):
        FractionalMaxPool2d(1.5)
    with pytest.raises(ValueError, match="eval_sample"):
        FractionalMaxPool2d(eval_sample=1.0)


# -- weight norm -------------------------------------------------------------------------------


def test_apply_weight_norm_keeps_the_function_and_splits_length_and_direction():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x = torch.randn(2, 1, 6, 6)
    before = net(x)
    names = apply_weight_norm(net, exclude=r"^3$")
    assert names == ["0"] and weight_normed_layers(net) == ["0"]
    torch.testing.assert_close(net(x), before)
    param_names = {n for n, _ in net.named_parameters()}
    assert {"0.parametrizations.weight.original0", "0.parametrizations.weight.original1"} <= param_names
    g = net[0].parametrizations.weight.original0
    assert g.shape == (4, 1, 1, 1)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        g.mul_(2.0)  # the length is a separate parameter: doubling it doubles the kernel
    torch.testing.assert_close(net[0].weight, 2 * w0)
    assert remove_weight_norm(net) == ["0"]
    assert weight_normed_layers(net) == [] and isinstance(net[0].weight, nn.Parameter)
    with pytest.raises(ValueError, match="matched no layer"):
        apply_weight_norm(net, include="nothing_here")


# -- builders ----------------------------------------------------------------------------------


def _types(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module]


def test_builders_place_norm_and_dropout():
    assert _types(linear_block(4, 8, "ic", 0.1)) == ["ICBlock", "Linear", "ReLU"]
    assert _types(linear_block(4, 8, "ic", 0.1, ic_input=False, activation=None)) == ["Linear"]
    classic = linear_block(4, 8, "classic", 0.1)
    assert _types(classic) == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] and classic[0].bias is None
    assert _types(linear_block(4, 8, "none", 0.0, activation=nn.GELU)) == ["Linear", "GELU"]
    assert _types(conv_block(3, 8, norm="ic", p=0.1, pool="max")) == ["ICBlock", "Conv2d", "ReLU", "MaxPool2d"]
    assert _types(conv_block(3, 8, norm="classic", p=0.1)) == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout2d"]
    stack = mlp_stack(16, [8, 4], "ic", 0.1)
    assert [_types(b) for b in stack] == [["Linear", "ReLU"], ["ICBlock", "Linear", "ReLU"]]
    assert stack(torch.randn(3, 16)).shape == (3, 4)
    assert conv_stack(1, [4, 8], "classic", pool="fractional")(torch.randn(2, 1, 16, 16)).shape == (2, 8, 7, 7)
    with pytest.raises(ValueError, match="norm must be one of"):
        linear_block(4, 8, "post")
    with pytest.raises(ValueError, match="pool must be one of"):
        conv_block(3, 8, pool="avg")
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        mlp_stack(4, [4], "ic", 1.0)


def test_builders_norm_switch():
    layer = linear_block(4, 8, "layer", 0.1)
    assert _types(layer) == ["Linear", "LayerNorm", "ReLU", "Dropout"] and layer[0].bias is None
    weight = linear_block(4, 8, "weight")
    assert _types(weight) == ["ParametrizedLinear", "ReLU"] and weight[0].bias is not None
    assert weight_normed_layers(weight) == ["0"]
    assert _types(linear_block(4, 8, "batch")) == _types(linear_block(4, 8, "classic"))
    conv = conv_block(3, 8, norm="layer", pool="max")
    assert _types(conv) == ["Conv2d", "GroupNorm", "ReLU", "MaxPool2d"] and conv[1].num_groups == 1
    assert conv[0].bias is None
    assert _types(conv_block(3, 8, norm="weight")) == ["ParametrizedConv2d", "ReLU"]
    assert conv_stack(1, [4, 8], "weight")(torch.randn(2, 1, 8, 8)).shape == (2, 8, 8, 8)


def test_check_norm_and_norm_layer():
    assert [check_norm(n) for n in ("classic", "batch", "layer", "weight", "ic", "none")] == [
        "batch",
        "batch",
        "layer",
        "weight",
        "ic",
        "none",
    ]
    with pytest.raises(ValueError, match=r"norm must be one of .* \('classic' = 'batch'\), got 'post'"):
        check_norm("post")
    assert _types(norm_layer("batch", 4, dims=1) + norm_layer("batch", 4, dims=2)) == ["BatchNorm1d", "BatchNorm2d"]
    assert _types(norm_layer("layer", 4, dims=1) + norm_layer("layer", 4, dims=2)) == ["LayerNorm", "GroupNorm"]
    assert norm_layer("weight", 4, 1) == norm_layer("ic", 4, 2) == norm_layer("none", 4, 2) == []
    # GroupNorm(1, C) is LayerNorm over (C, H, W) followed by a per-channel affine
    (gn,) = norm_layer("layer", 3, dims=2)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 5)
    expected = F.layer_norm(x, (3, 5, 5)) * gn.weight[:, None, None] + gn.bias[:, None, None]
    torch.testing.assert_close(gn(x), expected)
    with pytest.raises(ValueError, match="dims must be 1 or 2, got 3"):
        norm_layer("batch", 4, dims=3)


# -- an IC model trains --------------------------------------------------------------------------


def test_ic_mlp_trains_on_digits():
    from lightning_tricks._lightning import Trainer, seed_everything
    from lightning_tricks.data import DigitsDataModule
    from lightning_tricks.mixins import Classifier, classification_loss
    from lightning_tricks.models import MLP

    seed_everything(0)
    dm = DigitsDataModule(batch_size=64, loader="resident")
    dm.setup()
    module = Classifier(MLP((1, 8, 8), 10, hidden=(64, 64), norm="ic", dropout=0.1), 10, {"name": "sgd", "lr": 0.05})
    x, y = dm.splits["train"]

    def full_loss() -> float:
        module.eval()
        with torch.no_grad():
            loss = classification_loss(module(x), y).item()
        module.train()
        return loss

    before = full_loss()
    trainer = Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    after = full_loss()
    assert any(isinstance(m, ICBlock) for m in module.modules())
    assert before > 2.0 and after < 0.5 * before, (before, after)
    acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
    assert acc > 0.85
