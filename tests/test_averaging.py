"""The weight-averaging cores against their formulas and torch.optim.swa_utils (no Trainer)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn
from torch.optim.swa_utils import update_bn as torch_update_bn

from lightning_tricks.averaging import (
    WeightAverage,
    averaged_state_dict,
    bn_buffers,
    ema_decay,
    lerp_,
    swa_lr,
    swa_weight,
    update_bn,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


@torch.no_grad()
def _perturb(net: nn.Module, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    net.train()
    net(torch.randn(16, 5, generator=g))  # moves the BatchNorm statistics


# -- formulas -------------------------------------------------------------------------------------
def test_ema_decay_is_the_warmup_formula() -> None:
    for t in (0, 1, 5, 50, 10_000):
        assert ema_decay(t, 0.999) == pytest.approx(min(0.999, (1 + t) / (10 + t)), abs=0)
        assert ema_decay(t, 0.999, warmup=False) == 0.999
    assert ema_decay(0, 0.5) == pytest.approx(0.1)
    assert ema_decay(5, 0.9, warmup=False, every_n_steps=3) == 0.9 * 0.9 * 0.9 == 0.7290000000000001
    assert ema_decay(2, 0.999, every_n_steps=2) == (3 / 12) ** 2 == 0.0625  # warmup value, squared
    assert ema_decay(7, 0.9, warmup=False, every_n_steps=1) == 0.9
    with pytest.raises(ValueError, match="every_n_steps"):
        ema_decay(0, 0.9, every_n_steps=0)
    with pytest.raises(ValueError, match="num_updates"):
        ema_decay(-1, 0.9)


def test_swa_weight_is_one_over_n_plus_one() -> None:
    assert [swa_weight(n) for n in range(5)] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    with pytest.raises(ValueError, match="num_averaged"):
        swa_weight(-1)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("anneal_len", [1, 3, 5])
def test_swa_lr_equals_torch_swalr(anneal: str, anneal_len: int) -> None:
    lr0, target = 0.2, 0.01
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr0)
    sched = SWALR(opt, swa_lr=target, anneal_epochs=anneal_len, anneal_strategy=anneal)
    for k in range(1, 9):
        opt.step()
        sched.step()
        assert swa_lr(k, lr0, target, anneal_len, anneal) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert swa_lr(1, lr0, target, 0, anneal) == target
    with pytest.raises(ValueError, match="anneal must be"):
        swa_lr(1, lr0, target, 2, "exp")


# -- the foreach update ---------------------------------------------------------------------------
def test_lerp_matches_formula_same_and_mixed_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    avg = [torch.randn(4, generator=g), torch.randn(2, 3, generator=g)]
    val = [torch.randn(4, generator=g), torch.randn(2, 3, generator=g)]
    want = [a + 0.3 * (v - a) for a, v in zip(avg, val)]
    lerp_(avg, val, 0.3)
    for a, w in zip(avg, want):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-6)
    val16 = [v.bfloat16() for v in val]
    want = [a + 0.3 * (v.float() - a) for a, v in zip(avg, val16)]
    lerp_(avg, val16, 0.3)
    for a, w in zip(avg, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, w, rtol=0, atol=1e-6)
    lerp_(avg, val, 1.0)  # weight 1 copies exactly
    for a, v in zip(avg, val):
        assert torch.equal(a, v)


@pytest.mark.parametrize("buffers", [False, True])
def test_weight_average_equals_averaged_model_ema(buffers: bool) -> None:
    net = _net()
    decay = 0.9
    ours = WeightAverage(net, buffers=buffers)
    ref = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=buffers)
    ref.update_parameters(net)  # AveragedModel's first update copies; ours copies at construction
    for i in range(6):
        _perturb(net, i)
        ours.update_(1 - decay)
        ref.update_parameters(net)
    ref_tensors = dict(ref.module.named_parameters())
    if buffers:
        ref_tensors.update({n: b for n, b in ref.module.named_buffers() if b.is_floating_point()})
    got = ours.tensors()
    assert set(got) == set(ref_tensors)
    assert "1.running_mean" in got if buffers else "1.running_mean" not in got
    for name, t in got.items():
        torch.testing.assert_close(t, ref_tensors[name], rtol=0, atol=1e-6)


def test_weight_average_update_is_one_foreach_call_per_group() -> None:
    net = _net()
    avg = WeightAverage(net)
    assert len(avg._groups) == 1  # one device, one dtype
    with mock.patch("torch._foreach_lerp_", wraps=torch._foreach_lerp_) as lerp:
        avg.update_(0.1)
    assert lerp.call_count == 1
    assert len(lerp.call_args.args[0]) == len(list(net.parameters()))


def test_weight_average_keeps_float32_for_bfloat16_weights() -> None:
    net = _net().bfloat16()
    avg = WeightAverage(net)
    start = {n: t.clone() for n, t in avg.tensors().items()}
    assert all(t.dtype == torch.float32 for t in start.values())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
    avg.update_(0.001)
    for n, p in net.named_parameters():
        want = start[n] + 0.001 * (p.detach().float() - start[n])
        torch.testing.assert_close(avg.tensors()[n], want, rtol=0, atol=1e-6)


def test_weight_average_copy_to_module_and_state_roundtrip() -> None:
    net = _net()
    avg = WeightAverage(net)
    _perturb(net, 0)
    state = avg.state_dict()
    avg.copy_to_module_()
    for n, p in net.named_parameters():
        assert torch.equal(p, state[n])
    _perturb(net, 1)
    avg.update_(0.5)
    avg.load_state_dict(state)
    for n, t in avg.tensors().items():
        assert torch.equal(t, state[n])
    with pytest.raises(KeyError, match="lacks"):
        avg.load_state_dict({})


def test_weight_average_on_a_separate_device_uses_staging_copies() -> None:
    net = _net()
    avg = WeightAverage(net, device="cpu")
    ref = WeightAverage(net)
    _perturb(net, 0)
    avg.update_(0.25)
    ref.update_(0.25)
    for n, t in avg.tensors().items():
        assert torch.equal(t, ref.tensors()[n])


# -- BatchNorm -----------------------------------------------------------------------------------
def test_update_bn_equals_torch_update_bn() -> None:
    net = _net()
    twin = _net()
    twin.load_state_dict(net.state_dict())
    data = [(torch.randn(10, 5, generator=torch.Generator().manual_seed(i)), torch.zeros(10)) for i in range(4)]
    net.eval()
    twin.eval()
    seen = update_bn(net, data)
    torch_update_bn(data, twin)
    assert seen == 4
    assert not net.training
    for (n, a), (_, b) in zip(bn_buffers(net).items(), bn_buffers(twin).items()):
        assert torch.equal(a, b), n
    assert net[1].momentum == 0.1
    assert update_bn(nn.Linear(2, 2), data) == 0
    assert update_bn(net, data, max_batches=2) == 2


def test_averaged_state_dict_merges_the_average() -> None:
    raw = {"w": torch.ones(2, dtype=torch.bfloat16), "b": torch.zeros(1)}
    ema_state = {"started": True, "average": {"w": torch.full((2,), 0.5)}}
    ckpt = {"state_dict": raw, "callbacks": {"EMA{'decay': 0.9}": ema_state, "Other": {"x": 1}}}
    merged = averaged_state_dict(ckpt)
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(merged["w"].float(), torch.full((2,), 0.5))
    assert merged["b"] is raw["b"]
    assert averaged_state_dict(ckpt, which="EMA")["w"][0] == 0.5
    with pytest.raises(KeyError, match="exactly one"):
        averaged_state_dict(ckpt, which="SWA")
    with pytest.raises(KeyError, match="exactly one"):
        averaged_state_dict({"state_dict": raw, "callbacks": {}})
    assert math.isclose(float(merged["w"][1]), 0.5)
