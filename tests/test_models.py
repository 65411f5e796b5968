"""Reference models: the norm / head / pool switches build the right layers, compute the right things, train."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.models import MLP, ResNet
from lightning_tricks.nn import DropConnectLinear, FractionalMaxPool2d, ICBlock, weight_normed_layers


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


@pytest.mark.parametrize(
    "norm, kinds, bias",
    [
        ("batch", ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Dropout"], False),
        ("classic", ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Dropout"], False),
        ("layer", ["Flatten", "Linear", "LayerNorm", "ReLU", "Dropout"], False),
        ("weight", ["Flatten", "ParametrizedLinear", "ReLU", "Dropout"], True),
        ("none", ["Flatten", "Linear", "ReLU", "Dropout"], True),
    ],
)
def test_mlp_norm_switch_builds_the_right_layers(norm, kinds, bias):
    net = MLP((1, 8, 8), 10, hidden=(16,), norm=norm, dropout=0.1)
    assert _kinds(net.backbone) == kinds
    assert (net.backbone[1].bias is not None) is bias  # no bias before a norm with a shift
    assert net.norm == ("batch" if norm == "classic" else norm)
    assert weight_normed_layers(net) == (["backbone.1", "head.0"] if norm == "weight" else [])
    assert net(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    if norm == "layer":  # LayerNorm over the 16 features of each sample
        assert net.backbone[2].normalized_shape == (16,)


def test_weight_norm_weight_is_g_times_unit_direction():
    torch.manual_seed(0)
    mlp = MLP((1, 8, 8), 10, hidden=(16,), norm="weight")
    net = ResNet((1, 8, 8), 10, widths=(4, 8), norm="weight")
    layers = [(mlp.backbone[1], (1,)), (mlp.head[0], (1,)), (net.backbone[0][0], (1, 2, 3))]
    for layer, dims in layers:
        g = layer.parametrizations.weight.original0
        v = layer.parametrizations.weight.original1
        with torch.no_grad():  # any g and v, not just the initial ones (where g = ||v||)
            g.uniform_(0.5, 2.0)
            v.normal_()
        expected = g * v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=1e-7)
    # every conv and linear of the ResNet is normalized, the shortcut's 1x1 conv and the head included
    weight_layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert weight_normed_layers(net) == weight_layers and len(weight_layers) == 7
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in net.modules())
    assert net.backbone[1].branch[0].bias is not None  # no norm shift follows: the conv keeps its bias


def test_resnet_layer_norm_is_groupnorm_over_the_whole_feature_map():
    net = ResNet((3, 8, 8), 5, widths=(4, 8), norm="layer")
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    # stem, 2 per block x 2 blocks, the second block's shortcut
    assert len(norms) == 6 and all(m.num_groups == 1 for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    x = torch.randn(2, 3, 8, 8)
    stem_conv, stem_norm = net.backbone[0][0], net.backbone[0][1]
    assert stem_conv.bias is None
    with torch.no_grad():
        stem_norm.weight.uniform_(0.5, 1.5)
        stem_norm.bias.uniform_(-0.5, 0.5)
        h = stem_conv(x)
        reference = F.layer_norm(h, h.shape[1:]) * stem_norm.weight[:, None, None] + stem_norm.bias[:, None, None]
        torch.testing.assert_close(stem_norm(h), reference)
    assert net(x).shape == (2, 5)
    # no batch statistics: a sample's output does not depend on the rest of the batch, in training too
    torch.testing.assert_close(net.train()(x)[:1], net(x[:1]))


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_dropconnect_head_is_random_in_training_and_plain_in_eval(model):
    torch.manual_seed(0)
    if model == "mlp":
        net = MLP((1, 8, 8), 10, hidden=(16,), head="dropconnect", dropconnect_p=0.5)
    else:
        net = ResNet((1, 8, 8), 10, widths=(4, 8), head="dropconnect", dropconnect_p=0.5)
    head = net.head[-1]
    assert isinstance(head, DropConnectLinear) and head.p == 0.5 and head.out_features == 10
    x = torch.randn(6, 1, 8, 8)
    net.train()
    with torch.no_grad():
        features = net.backbone.eval()(x)  # fixed features (BN in eval), only the head trains below
        a, b = head.train()(features), head(features)
        assert not torch.equal(a, b)  # a new weight mask per forward
        net.eval()
        plain = F.linear(features, head.weight, head.bias)
        assert torch.equal(net(x), net(x)) and torch.allclose(net(x), plain, atol=1e-6)


def test_resnet_pool_switches_and_output_sizes():
    sizes = {}

    def spatial(pool, **kw):
        net = ResNet((1, 8, 8), 10, widths=(4, 8, 16), pool=pool, **kw).eval()
        out = []
        hooks = [b.register_forward_hook(lambda m, i, o: out.append(o.shape[-1])) for b in net.backbone[1:-2]]
        assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        for h in hooks:
            h.remove()
        return net, out

    net, sizes["stride"] = spatial("stride")
    assert not any(isinstance(m, (nn.MaxPool2d, FractionalMaxPool2d)) for m in net.modules())
    net, sizes["max"] = spatial("max")
    assert _kinds(net.backbone)[1:5] == ["BasicBlock", "MaxPool2d", "BasicBlock", "MaxPool2d"]
    assert all(c.stride == (1, 1) for c in net.modules() if isinstance(c, nn.Conv2d))
    net, sizes["fractional"] = spatial("fractional")
    pools = [m for m in net.modules() if isinstance(m, FractionalMaxPool2d)]
    assert len(pools) == 2 and pools[0].output_ratio == (2**-0.5, 2**-0.5)
    assert sizes["stride"] == [8, 4, 2]
    assert sizes["max"] == [8, 4, 4, 2, 2]  # block, pool, block, pool, block
    assert sizes["fractional"] == [8, 5, 5, 3, 3]  # floor(8 / sqrt 2) = 5, floor(5 / sqrt 2) = 3
    _, half = spatial("fractional", pool_ratio=0.5)
    assert half == [8, 4, 4, 2, 2]
    # fractional pooling: random regions in training, fixed in eval
    x = torch.randn(2, 1, 8, 8)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(1)
    a = net(x)
    assert not torch.equal(a, net(x))


def test_resnet_shapes_and_switches():
    for norm in ("classic", "batch", "layer", "weight", "ic", "none"):
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
        ({"norm": "group"}, r"norm must be one of \('batch', 'layer', 'weight', 'ic', 'none'\).*got 'group'"),
        ({"head": "conv"}, r"head must be one of \('linear', 'dropconnect'\), got 'conv'"),
        ({"head": "dropconnect", "dropconnect_p": 1.0}, r"dropconnect_p must be in \[0, 1\), got 1.0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"num_classes": 1}, "num_classes must be an int >= 2, got 1"),
        ({"hidden": (0,)}, "hidden sizes must be positive"),
    ],
)
def test_mlp_bad_args(kwargs, match):
    args = {"input_shape": (1, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        MLP(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_shape": (64,)}, r"ResNet needs input_shape \(C, H, W\), got \(64,\)"),
        ({"pool": "avg"}, r"pool must be one of \('stride', 'max', 'fractional'\), got 'avg'"),
        ({"pool": "fractional", "pool_ratio": 1.0}, r"pool_ratio must be in \(0, 1\), got 1.0"),
        ({"norm": "group"}, "norm must be one of"),
        (
            {"pool": "max", "widths": (4, 4, 4, 4, 4)},
            r"input 8x8 cannot be pooled 4 times with pool='max': 8x8 -> 4x4 -> 2x2 -> 1x1 -> 0x0",
        ),
        ({"pool": "fractional", "widths": (4,) * 6}, r"8x8 -> 5x5 -> 3x3 -> 2x2 -> 1x1 -> 0x0; use fewer widths"),
    ],
)
def test_resnet_bad_args(kwargs, match):
    args = {"input_shape": (1, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        ResNet(**args)
    ResNet((1, 8, 8), 10, widths=(4, 4, 4, 4), pool="max")  # 8 -> 4 -> 2 -> 1 still fits


def test_layer_norm_mlp_trains_on_digits():
    from lightning_tricks._lightning import Trainer, seed_everything
    from lightning_tricks.data import DigitsDataModule
    from lightning_tricks.mixins import Classifier, classification_loss

    seed_everything(0)
    dm = DigitsDataModule(batch_size=64, loader="resident")
    dm.setup()
    module = Classifier(MLP((1, 8, 8), 10, hidden=(32,), norm="layer"), 10, {"name": "sgd", "lr": 0.1})
    x, y = dm.splits["train"]

    def full_loss() -> float:
        with torch.no_grad():
            return classification_loss(module(x), y).item()

    before = full_loss()
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    assert before > 2.0 and full_loss() < 0.5 * before


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.norm=layer", "model.head=dropconnect"],
        ["model=resnet", "model.widths=[8,16]", "model.norm=weight", "model.pool=fractional"],
    ],
)
def test_switches_from_the_config(make_cfg, overrides):
    from lightning_tricks.train import train

    metrics, objects = train(make_cfg(*overrides))
    net = objects["module"].net
    assert 0.0 <= metrics["test/acc"] <= 1.0 and objects["trainer"].global_step == 6
    if "model.norm=weight" in overrides:
        assert weight_normed_layers(net) and any(isinstance(m, FractionalMaxPool2d) for m in net.modules())
    else:
        assert isinstance(net.head[-1], DropConnectLinear) and net.norm == "layer"
