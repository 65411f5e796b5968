"""What each trick costs per training step: a raw PyTorch loop vs bare Lightning vs Lightning + each callback.

Same run, same data resident on the device (random tensors, a fixed number of batches per epoch so
epoch-end hooks are included, amortized), same model and optimizer, for:

- ``raw``: a hand-written PyTorch loop (forward, cross-entropy, backward, SGD step, zero_grad);
- ``lightning``: bare Lightning (``Trainer`` + a minimal ``LightningModule`` that logs its epoch loss);
- ``lightning`` + each of our per-step callbacks alone (LRSchedule, EMA, SWA, EarlyStopping,
  UpdateRatioMonitor at its default interval, L1Regularization, Mixup, CutMix, Cutout);
- ``lightning`` + the whole bag-of-tricks stack (linear scaling, warmup + cosine, EMA, mixup,
  label smoothing, no bias/norm decay, L1, update-ratio monitor, early stopping);
- ``lightning`` + Lightning's own ``EMAWeightAveraging`` and ``StochasticWeightAveraging``.

Models: the 1.6M-parameter MLP 512-1024-1024-10 (its 512 inputs shaped ``(2, 16, 16)`` so image
augmentations apply; batch 64) and a ResNet (ResNet-18 size with ``--full``; a small one on the CPU).

**How a step is timed.** A timer callback, first in the callback list, reads the clock in
``on_train_batch_start`` of batch ``warmup_steps`` and of batch ``warmup_steps + timed_steps`` (the device
synchronized before each read): the interval holds exactly ``timed_steps`` whole steps, every other
callback's hooks, the batch fetches and the epoch ends in between, and none of the fixed start-up or
teardown costs (``fit`` set-up, the first steps' allocator and kernel warm-up, end-of-fit copies). The
raw loop is timed the same way. Each configuration runs ``repeats`` times, configurations interleaved
within each repeat; ratios are taken per repeat against bare Lightning of the same repeat, then
averaged. The same repeat also times the floor: one ``torch._foreach_lerp_`` pass over the model's
parameters after each optimizer step of the raw loop; every configuration's added ms per step (vs bare
Lightning of the same repeat) is also given in floors, and the time inside its callback hooks is clocked.
The goals (``LIGHT`` / ``ONE_PASS`` / ``GOAL_*`` below) are judged on the MLP rows, on the CPU as on a
GPU.

    python benchmarks/overhead.py                          # small CPU setting (SETTINGS)
    python benchmarks/overhead.py --full --device cuda     # GPU setting (FULL)
    python benchmarks/overhead.py --configs lightning,ema,lightning_ema --models mlp
    python benchmarks/overhead.py --profile stack          # torch profiler table of one configuration
    python benchmarks/overhead.py --paired --configs mixup,cutmix,cutout --models mlp

**Paired (``--paired``).** On a shared machine the step time drifts by several % between fits, more than
the 2% a light callback may add. The paired measure takes the cost within one fit instead: the
configuration's per-step hooks run on odd steps only, each odd step is compared with the even step just
before it, and the differences are averaged with the top and bottom tenth dropped (epoch ends, collector
pauses). A drift slower than two steps cancels. Its hooks run colder than every step (their kernels wait
two steps), so it errs on the high side. It suits configurations whose whole cost is in their per-step
hooks (the light callbacks and the batch augmentations, not SWA's epoch ends).

Writes ``benchmarks/results/overhead_<device>[_<models>].md`` / ``.csv`` (and
``overhead_profile_<config>_<model>_<device>.txt``, ``overhead_paired_<device>[_<models>].md`` / ``.csv``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SETTINGS: dict[str, Any] = {
    "device": "cpu",
    "threads": 1,  # CPU intra-op threads (the 2-core CI machine is shared)
    "models": ["mlp", "resnet"],
    "configs": None,  # None: all of CONFIGS, in order
    "batch_size": {"mlp": 64, "resnet": 32},
    "steps_per_epoch": 50,  # batches per epoch of the random resident data
    "warmup_steps": 10,  # untimed steps at the start of every fit
    "timed_steps": 60,
    "repeats": 3,
    "mlp": {"input_shape": (2, 16, 16), "hidden": (1024, 1024)},  # 512-1024-1024-10, 1.6M params
    "resnet": {"input_shape": (3, 32, 32), "widths": (16, 32, 64), "blocks_per_stage": 1},
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "profile_steps": 20,
    "seed": 0,
}

FULL: dict[str, Any] = {
    **SETTINGS,
    "device": "cuda",
    "threads": None,
    "batch_size": {"mlp": 64, "resnet": 128},
    "steps_per_epoch": 200,
    "warmup_steps": 50,
    "timed_steps": 500,
    "repeats": 5,
    "resnet": {"input_shape": (3, 32, 32), "widths": (64, 128, 256, 512), "blocks_per_stage": 2},  # 11.2M
    "profile_steps": 50,
}

#: Goals, judged on the MLP rows on every device (the CPU included): a light callback or a batch
#: augmentation adds at most 2% to a bare Lightning step; a callback that makes one pass over the weights
#: per step (EMA, L1, the every-step weight check) at most 1.2 floors in its hooks, the floor being one
#: ``torch._foreach_lerp_`` pass over the model's parameters measured in the same run; the whole stack at
#: most 28%; Lightning's ``EMAWeightAveraging`` adds at least 3x (CPU; 5x on a GPU) what our EMA adds.
#: The hooks' own µs are reported against their floors, not judged: a simpler form that stays inside
#: these ratios wins over a faster one.
LIGHT = ("lr_schedule", "lr_schedule_nolog", "early_stopping", "update_ratio", "divergence_guard_50")
AUGMENT = ("mixup", "cutmix", "cutout")
ONE_PASS = ("ema", "l1", "l1_subgradient", "divergence_guard")
GOAL_LIGHT_RATIO = 1.02
GOAL_ONE_PASS_FLOORS = 1.2
GOAL_STACK_RATIO = 1.28
GOAL_EMA_VS_LIGHTNING = {"cpu": 3.0, "cuda": 5.0}


# -- the model, the module, the data ---------------------------------------------------------------
def build_net(model: str, s: dict) -> torch.nn.Module:
    from lightning_tricks.models import MLP, ResNet

    if model == "mlp":
        return MLP(s["mlp"]["input_shape"], 10, hidden=s["mlp"]["hidden"], norm="none")
    if model == "resnet":
        r = s["resnet"]
        return ResNet(r["input_shape"], 10, widths=r["widths"], blocks_per_stage=r["blocks_per_stage"])
    raise ValueError(f"model must be 'mlp' or 'resnet', got {model!r}")


def make_module(net: torch.nn.Module, optimizer: dict, label_smoothing: float = 0.0):
    """A minimal LightningModule: forward, cross-entropy (hard or soft targets), epoch-mean loss logged."""
    from lightning_tricks._lightning import LightningModule
    from lightning_tricks.losses import classification_loss
    from lightning_tricks.optim import OptimizerConfig, build_optimizer

    class StepModule(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.num_classes = 10
            self.label_smoothing = label_smoothing
            self.optimizer_config = OptimizerConfig.from_any(optimizer)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch[0], batch[1]
            loss = classification_loss(self.net(x), y, self.label_smoothing)
            # accumulated on the device, reduced at the epoch end: no host sync per step
            self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=x.shape[0])
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return build_optimizer(self, self.optimizer_config)

    return StepModule()


def make_loader(model: str, s: dict, device: torch.device):
    """Random inputs and labels resident on ``device``, ``steps_per_epoch`` batches per epoch."""
    from lightning_tricks.data import TensorBatchLoader

    shape = s["mlp"]["input_shape"] if model == "mlp" else s["resnet"]["input_shape"]
    bs = s["batch_size"][model]
    n = bs * s["steps_per_epoch"]
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorBatchLoader(x, y, batch_size=bs, shuffle=True, drop_last=True, device=device)


def optimizer_cfg(s: dict, no_decay_bias_norm: bool = False) -> dict:
    return {
        "name": "sgd",
        "lr": s["lr"],
        "momentum": s["momentum"],
        "weight_decay": s["weight_decay"],
        "no_decay_bias_norm": no_decay_bias_norm,
    }


# -- configurations --------------------------------------------------------------------------------
@dataclass
class Config:
    """One row: ``callbacks(s, batch_size)`` builds its callbacks (``None``: the raw PyTorch loop)."""

    label: str
    callbacks: Callable[[dict, int], list] | None
    stack: bool = False  # the whole bag of tricks: label smoothing + no-decay groups in the module
    reference: bool = False  # a Lightning callback, for comparison
    needs: str = ""  # module that must exist (skipped with a note if it does not)


def _lr_schedule(s: dict, bs: int, log: bool = True) -> list:
    from lightning_tricks.callbacks import LRSchedule
    from lightning_tricks.schedules import Cosine, Warmup

    return [LRSchedule(Warmup(steps=0.05, then=Cosine()), log=log)]


def _ema(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import EMA

    return [EMA(decay=0.999)]


def _swa(update_every: str) -> Callable[[dict, int], list]:
    def make(s: dict, bs: int) -> list:
        from lightning_tricks.callbacks import SWA

        return [SWA(start=0, update_every=update_every)]

    return make


def _early_stopping(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import EarlyStopping

    # checked at every epoch end on the epoch-mean training loss; never stops; best weights copied in memory
    return [
        EarlyStopping(
            monitor="train/loss", mode="min", patience=10**9, check_on_train_epoch_end=True, restore_best=True
        )
    ]


def _update_ratio(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import UpdateRatioMonitor

    return [UpdateRatioMonitor()]


def _divergence_guard(s: dict, bs: int, every: int = 1) -> list:
    from lightning_tricks.callbacks import DivergenceGuard

    return [DivergenceGuard(every_n_steps=every)]


def _l1(s: dict, bs: int, mode: str = "proximal") -> list:
    from lightning_tricks.callbacks import L1Regularization

    return [L1Regularization(lam=1e-5, mode=mode)]


def _mixup(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import Mixup

    return [Mixup(alpha=0.2)]


def _cutmix(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import CutMix

    return [CutMix(alpha=1.0)]


def _cutout(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import Cutout

    return [Cutout(size=0.5)]


def _floor_augment(kind: str) -> Callable[[dict, int], list]:
    """A callback doing only the floor arithmetic of Mixup, CutMix or Cutout (:func:`batch_floor_ops`, every
    draw fixed) and putting its result in the batch, so the step pays what the augmented batch costs (the
    soft-target loss): what the augmentation cannot cost less than, the paired measure's reference."""

    def make(s: dict, bs: int) -> list:
        from lightning_tricks._lightning import Callback

        class FloorAugment(Callback):
            op: Callable[[Any, Any], Any] | None = None

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                x = batch[0]
                if self.op is None:
                    self.op = batch_floor_ops(x.shape[0], tuple(x.shape[1:]), x.device)[kind]
                out = self.op(x, batch[1])
                if kind == "cutout":
                    batch[0] = out
                else:
                    batch[0], batch[1] = out

        return [FloorAugment()]

    return make


def _stack(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import LinearScaling

    return [
        LinearScaling(reference_batch_size=256, batch_size=bs),
        *_lr_schedule(s, bs),
        *_ema(s, bs),
        *_mixup(s, bs),
        *_l1(s, bs),
        *_update_ratio(s, bs),
        *_early_stopping(s, bs),
    ]


def _pl_ema(s: dict, bs: int) -> list:
    from lightning_tricks._lightning import EMAWeightAveraging

    if EMAWeightAveraging is None:
        raise ImportError("EMAWeightAveraging needs pytorch-lightning >= 2.5")
    return [EMAWeightAveraging(decay=0.999)]


def _pl_swa(s: dict, bs: int) -> list:
    from lightning_tricks._lightning import StochasticWeightAveraging

    return [StochasticWeightAveraging(swa_lrs=s["lr"], swa_epoch_start=1)]


CONFIGS: dict[str, Config] = {
    "raw": Config("raw PyTorch loop", None),
    "lightning": Config("bare Lightning", lambda s, bs: []),
    "lr_schedule": Config("+ LRSchedule (warmup + cosine)", _lr_schedule, needs="lr_schedule"),
    "lr_schedule_nolog": Config(
        "+ LRSchedule (warmup + cosine, log=False)", lambda s, bs: _lr_schedule(s, bs, log=False), needs="lr_schedule"
    ),
    "ema": Config("+ EMA (decay 0.999, every step)", _ema, needs="ema"),
    "swa": Config("+ SWA (average every epoch)", _swa("epoch"), needs="swa"),
    "swa_step": Config("+ SWA (average every step)", _swa("step"), needs="swa"),
    "early_stopping": Config("+ EarlyStopping (patience, restore best)", _early_stopping, needs="early_stopping"),
    "update_ratio": Config("+ UpdateRatioMonitor (every 50 steps)", _update_ratio, needs="sanity"),
    "l1": Config("+ L1Regularization (proximal, the default)", _l1, needs="regularize"),
    "l1_subgradient": Config(
        "+ L1Regularization (subgradient)", lambda s, bs: _l1(s, bs, mode="subgradient"), needs="regularize"
    ),
    "divergence_guard": Config(
        "+ DivergenceGuard (loss and weights every step, the train.py default)",
        _divergence_guard,
        needs="divergence_guard",
    ),
    "divergence_guard_50": Config(
        "+ DivergenceGuard (every_n_steps=50: the weights every 50 steps)",
        lambda s, bs: _divergence_guard(s, bs, every=50),
        needs="divergence_guard",
    ),
    "mixup": Config("+ Mixup", _mixup, needs="augment"),
    "cutmix": Config("+ CutMix", _cutmix, needs="augment"),
    "cutout": Config("+ Cutout", _cutout, needs="augment"),
    "mixup_floor": Config(
        "+ Mixup's floor (its arithmetic, draws given; soft targets in the loss)", _floor_augment("mixup")
    ),
    "cutmix_floor": Config(
        "+ CutMix's floor (its arithmetic, draws given; soft targets in the loss)", _floor_augment("cutmix")
    ),
    "cutout_floor": Config("+ Cutout's floor (its arithmetic, draws given)", _floor_augment("cutout")),
    "stack": Config(
        "+ whole bag-of-tricks stack",
        _stack,
        stack=True,
        needs="lr_scaling,lr_schedule,ema,augment,regularize,sanity,early_stopping",
    ),
    "lightning_ema": Config("+ Lightning EMAWeightAveraging (reference)", _pl_ema, reference=True),
    "lightning_swa": Config("+ Lightning StochasticWeightAveraging (reference)", _pl_swa, reference=True),
}


def missing_modules(config: Config) -> list[str]:
    """The ``lightning_tricks.callbacks`` submodules a configuration needs that are not there yet."""
    import importlib.util

    return [
        m
        for m in filter(None, config.needs.split(","))
        if importlib.util.find_spec(f"lightning_tricks.callbacks.{m}") is None
    ]


# -- timing ----------------------------------------------------------------------------------------
def make_timer(start: int, steps: int, device: torch.device):
    """A callback timing batches ``start .. start + steps`` from one ``on_train_batch_start`` to another."""
    import time

    from lightning_tricks._lightning import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.calls = 0
            self.t0 = self.t1 = math.nan
            self.active = False  # inside the timed window (read by the hook timers)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.calls == start:
                C.sync(device)
                self.t0 = time.perf_counter()
                self.active = True
            elif self.calls == start + steps:
                C.sync(device)
                self.t1 = time.perf_counter()
                self.active = False
            self.calls += 1

        @property
        def seconds_per_step(self) -> float:
            return (self.t1 - self.t0) / steps

    return StepTimer()


#: set to a dict to collect every timed hook call's seconds per ``Class.hook`` (development aid)
CALLS: dict[str, list[float]] | None = None


def overridden_hooks(callback: Any, hooks: tuple[str, ...]) -> list[tuple[str, Callable]]:
    """``(hook, bound method)`` for the hooks of ``hooks`` that ``callback`` overrides (not Lightning's no-ops)."""
    from lightning_tricks._lightning import Callback

    found = []
    for hook in hooks:
        fn = getattr(callback, hook, None)
        if fn is not None and getattr(type(callback), hook, None) is not getattr(Callback, hook, None):
            found.append((hook, fn))
    return found


def config_module(model: str, config: Config, s: dict):
    """The module a configuration trains: the stack's has label smoothing and no-decay groups."""
    return make_module(
        build_net(model, s),
        optimizer_cfg(s, no_decay_bias_norm=config.stack),
        label_smoothing=0.1 if config.stack else 0.0,
    )


def time_hooks(callbacks: list, timer: Any) -> dict[str, float]:
    """Wrap the per-step hooks of ``callbacks`` with a clock; returns a dict that sums, in seconds and per
    hook (``Class.hook``), the time spent inside them while ``timer`` is in its timed window.

    On a CPU the hooks' tensor work runs synchronously, so this is the callbacks' whole cost per step
    (host Python and kernels); on a GPU it is their host time (kernels are queued, not waited for).
    The wrapper itself costs well under a microsecond per call (two ``perf_counter`` reads).
    """
    import time

    totals: dict[str, float] = {}
    for callback in callbacks:
        for hook, fn in overridden_hooks(callback, _HOOKS):
            key = f"{type(callback).__name__}.{hook}"
            totals.setdefault(key, 0.0)

            def wrapped(*args: Any, _fn: Callable = fn, _key: str = key, **kw: Any) -> Any:
                if not timer.active:
                    return _fn(*args, **kw)
                t = time.perf_counter()
                try:
                    return _fn(*args, **kw)
                finally:
                    dt = time.perf_counter() - t
                    totals[_key] += dt
                    if CALLS is not None:
                        CALLS.setdefault(_key, []).append(dt)

            setattr(callback, hook, wrapped)
    return totals


def time_paired(model: str, name: str, s: dict, device: torch.device, seed: int) -> tuple[float, float]:
    """(seconds per step without configuration ``name``, seconds it adds per step), from one fit in which its
    per-step hooks run on odd steps only: the trimmed mean of (odd step - the even step before it)."""
    import time

    from lightning_tricks._lightning import Callback, seed_everything

    start, steps = s["warmup_steps"], 2 * (s["timed_steps"] // 2)
    clock: list[float] = []

    class StepClock(Callback):
        calls = 0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if start <= self.calls <= start + steps:
                C.sync(device)
                clock.append(time.perf_counter())
            self.calls += 1

    timer = StepClock()
    callbacks = CONFIGS[name].callbacks(s, s["batch_size"][model])
    for callback in callbacks:
        for hook, fn in overridden_hooks(callback, PER_STEP_HOOKS):
            # timer.calls - 1 is the step under way: its batch start has run
            setattr(callback, hook, lambda *a, _fn=fn, **k: _fn(*a, **k) if timer.calls % 2 == 0 else None)
    seed_everything(seed, verbose=False)
    module = config_module(model, CONFIGS[name], s)
    trainer = build_trainer([timer, *callbacks], s, device)
    trainer.fit(module, train_dataloaders=make_loader(model, s, device))
    if len(clock) != steps + 1:
        raise RuntimeError(f"{name}: the run ended after {timer.calls} batches, before the paired window closed")
    step = [b - a for a, b in zip(clock, clock[1:])]  # step start + i: with the hooks when start + i is odd
    with_first = start % 2  # 1: the window's first step runs the hooks
    off, on = step[with_first::2], step[1 - with_first :: 2]
    diffs = sorted(b - a for a, b in zip(off, on))  # adjacent steps, one with the hooks and one without
    cut = len(diffs) // 10
    kept = diffs[cut : len(diffs) - cut]
    return sum(sorted(off)[cut : len(off) - cut]) / max(1, len(off) - 2 * cut), sum(kept) / len(kept)


def time_raw(model: str, s: dict, device: torch.device, seed: int) -> float:
    """Seconds per step of a hand-written loop over the same resident batches."""
    return _raw_loop(model, s, device, seed)


#: the floors measured by :func:`time_floors`: one pass over the weights, and each batch augmentation's
#: arithmetic alone (every draw and mask given)
FLOORS = ("weights", "mixup", "cutmix", "cutout")
#: which floor each configuration is judged against (the others: none, i.e. 0)
FLOOR_OF = {
    "ema": "weights",
    "swa_step": "weights",
    "l1": "weights",
    "l1_subgradient": "weights",
    "divergence_guard": "weights",
    "mixup": "mixup",
    "cutmix": "cutmix",
    "cutout": "cutout",
    "update_ratio": "weights",
    "divergence_guard_50": "weights",
}
#: a configuration (or hook) whose tensor work is a fraction of its floor per step, as (fraction, why):
#: UpdateRatioMonitor measures every 50 steps, copying the weights before the step (2 streams of their
#: size: read, write) and taking the difference (3) and two norms (1 each) after it, 7 streams where the
#: floor's lerp moves 3: 7/3 floors every 50 steps; DivergenceGuard(every_n_steps=50) reads the weights once
#: (a norm) every 50 steps: 1/3 floor
FLOOR_SCALE = {
    "update_ratio": (7 / 3 / 50, "7/3 floor per 50 steps"),
    "divergence_guard_50": (1 / 3 / 50, "1/3 floor per 50 steps"),
    "UpdateRatioMonitor.on_before_optimizer_step": (2 / 3 / 50, "2/3 floor per 50 steps"),
    "UpdateRatioMonitor.on_train_batch_end": (5 / 3 / 50, "5/3 floor per 50 steps"),
}


def time_floors(model: str, s: dict, device: torch.device, seed: int) -> dict[str, float]:
    """Seconds of each floor, measured with the caches as a training step leaves them.

    ``weights``: one ``torch._foreach_lerp_`` pass over the model's parameters (into float32 copies of
    them, as an EMA update does) right after the optimizer step of the raw loop: the floor of any
    per-step pass over the weights. ``mixup`` / ``cutmix`` / ``cutout``: that augmentation's arithmetic
    on the batch with every draw given, in the ``on_train_batch_start`` of a bare Lightning fit (where
    the callbacks act, after the same Lightning code), one of them per step in turn so that each runs
    first after a step, as a callback's does (:func:`batch_floor_ops`). What the callbacks' draws, batch
    handling and Python add is on top of these. Each timed on its own, the device synchronized around it.
    """
    return {"weights": _raw_loop(model, s, device, seed, floor=True), **_batch_floors(model, s, device, seed)}


def batch_floor_ops(n: int, shape: tuple[int, ...], device: torch.device) -> dict[str, Callable[[Any, Any], Any]]:
    """The floor of each batch augmentation as ``op(x, y)``, every draw fixed in advance: Mixup's
    ``lerp(x[perm], x, lam)`` and its mixed one-hot targets (rows of an identity gathered by ``y``, then
    ``lerp(q[perm], q, lam)``); CutMix's ``lerp(x, x[perm], box)`` with a 0/1 box weight and the same
    targets; Cutout's ``lerp(x, fill, squares)`` with 0/1 square weights."""
    perm = torch.randperm(n).to(device)
    h, w = shape[-2:]
    box = torch.zeros((1, 1, h, w), device=device)
    box[..., h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = 1.0  # a box of a quarter of the image
    squares = (torch.rand((n, 1, h, w), device=device) < 0.25).float()  # 0/1 weights, a quarter set
    fill = torch.zeros((), device=device)
    eye = torch.eye(10, device=device)

    def targets(y: torch.Tensor, lam: float) -> torch.Tensor:  # one-hot, mixed with the partners'
        q = eye.index_select(0, y)
        return q.index_select(0, perm).lerp_(q, lam)

    return {
        "mixup": lambda x, y: (x.index_select(0, perm).lerp_(x, 0.3), targets(y, 0.3)),
        "cutmix": lambda x, y: (torch.lerp(x, x.index_select(0, perm), box), targets(y, 0.75)),
        "cutout": lambda x, y: torch.lerp(x, fill, squares),
    }


def _batch_floors(model: str, s: dict, device: torch.device, seed: int) -> dict[str, float]:
    import time

    from lightning_tricks._lightning import Callback, seed_everything

    ops = list(batch_floor_ops(s["batch_size"][model], s[model]["input_shape"], device).items())
    start, steps = s["warmup_steps"], s["timed_steps"]
    spent = {name: [0.0, 0] for name, _ in ops}

    class Floors(Callback):
        calls = 0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            name, op = ops[self.calls % len(ops)]
            C.sync(device)
            t = time.perf_counter()
            op(batch[0], batch[1])
            C.sync(device)
            if start <= self.calls < start + steps:
                spent[name][0] += time.perf_counter() - t
                spent[name][1] += 1
            self.calls += 1

    seed_everything(seed, verbose=False)
    module = make_module(build_net(model, s), optimizer_cfg(s))
    trainer = build_trainer([Floors()], s, device)
    trainer.fit(module, train_dataloaders=make_loader(model, s, device))
    return {name: total / max(1, count) for name, (total, count) in spent.items()}


def _raw_loop(model: str, s: dict, device: torch.device, seed: int, floor: bool = False) -> float:
    """Seconds per step of the raw loop, or (``floor``) of the weights pass timed after each of its steps."""
    import time

    from lightning_tricks.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(seed)
    net = build_net(model, s).to(device)
    net.train()
    opt = build_optimizer(net, OptimizerConfig.from_any(optimizer_cfg(s)))
    loader = make_loader(model, s, device)
    params = [p.detach() for p in net.parameters()]
    shadow = [p.clone() for p in params] if floor else []
    start, steps = s["warmup_steps"], s["timed_steps"]
    loss_sum = torch.zeros((), device=device)
    calls, t0, t1, lerp_s = 0, math.nan, math.nan, 0.0
    while math.isnan(t1):
        for x, y in loader:
            if calls == start:
                C.sync(device)
                t0 = time.perf_counter()
            elif calls == start + steps:
                C.sync(device)
                t1 = time.perf_counter()
                break
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()  # what Lightning's epoch-mean logging does, no host sync
            if floor:
                C.sync(device)
                t = time.perf_counter()
                torch._foreach_lerp_(shadow, params, 1e-3)
                C.sync(device)
                if calls >= start:
                    lerp_s += time.perf_counter() - t
            calls += 1
    return lerp_s / steps if floor else (t1 - t0) / steps


def build_trainer(callbacks: list, s: dict, device: torch.device, extra: dict | None = None):
    from lightning_tricks._lightning import Trainer

    total = s["warmup_steps"] + s["timed_steps"] + 1
    return Trainer(
        accelerator=C.accelerator(device),
        devices=1,
        max_steps=total,
        max_epochs=math.ceil(total / s["steps_per_epoch"]) + 1,
        callbacks=callbacks,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **(extra or {}),
    )


def time_lightning(
    model: str, name: str, s: dict, device: torch.device, seed: int
) -> tuple[float, float, dict[str, float]]:
    """Seconds per step of one fit of configuration ``name`` (after ``warmup_steps`` untimed steps),
    seconds per step spent inside the configuration's callback hooks, and that per hook (``Class.hook``)."""
    from lightning_tricks._lightning import seed_everything

    config = CONFIGS[name]
    seed_everything(seed, verbose=False)
    bs = s["batch_size"][model]
    module = config_module(model, config, s)
    timer = make_timer(s["warmup_steps"], s["timed_steps"], device)
    callbacks = config.callbacks(s, bs)
    hooks = time_hooks(callbacks, timer)
    trainer = build_trainer([timer, *callbacks], s, device)  # timer first: its batch start runs first
    trainer.fit(module, train_dataloaders=make_loader(model, s, device))
    if not math.isfinite(timer.seconds_per_step):
        raise RuntimeError(f"{name}: the run ended after {timer.calls} batches, before the timed window closed")
    per_hook = {k: v / s["timed_steps"] for k, v in hooks.items()}
    return timer.seconds_per_step, sum(per_hook.values()), per_hook


def time_config(
    model: str, name: str, s: dict, device: torch.device, seed: int
) -> tuple[float, float, dict[str, float]]:
    """(seconds per step, seconds per step inside the callbacks' hooks (nan for the raw loop), that per hook)."""
    if CONFIGS[name].callbacks is None:
        return time_raw(model, s, device, seed), math.nan, {}
    return time_lightning(model, name, s, device, seed)


# -- profile ---------------------------------------------------------------------------------------
_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_epoch_start",
    "on_train_epoch_end",
    # torch optimizer step post-hooks that callbacks register (wrapped before they are registered)
    "_shrink",  # L1Regularization(mode="proximal")
    "_after_step",  # DivergenceGuard's weight check
)


#: the hooks that run every step (the paired measure skips them on even steps)
PER_STEP_HOOKS = tuple(h for h in _HOOKS if "epoch" not in h)


def _label_hooks(callback: Any) -> None:
    """Wrap the callback's per-step hooks in ``record_function`` ranges named ``Class.hook``."""
    for hook, fn in overridden_hooks(callback, _HOOKS):

        def wrapped(*args: Any, _fn: Callable = fn, _name: str = f"{type(callback).__name__}.{hook}", **kw: Any):
            with torch.profiler.record_function(_name):
                return _fn(*args, **kw)

        setattr(callback, hook, wrapped)


def profile(model: str, name: str, s: dict, device: torch.device, rows: int = 25) -> str:
    """Torch profiler tables over ``profile_steps`` steps of configuration ``name`` (after the warm-up)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from lightning_tricks._lightning import Callback, seed_everything

    config = CONFIGS[name]
    if config.callbacks is None:
        raise SystemExit("--profile needs a Lightning configuration, not 'raw'")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = torch_profile(activities=activities)
    start, steps = s["warmup_steps"], s["profile_steps"]

    class ProfileWindow(Callback):
        def __init__(self) -> None:
            self.calls = 0
            self.step_range: Any = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.step_range is not None:
                self.step_range.__exit__(None, None, None)
                self.step_range = None
            if self.calls == start:
                C.sync(device)
                prof.__enter__()
            elif self.calls == start + steps:
                C.sync(device)
                prof.__exit__(None, None, None)
            if start <= self.calls < start + steps:
                self.step_range = record_function("train_step (whole)")
                self.step_range.__enter__()
            self.calls += 1

    seed_everything(s["seed"], verbose=False)
    bs = s["batch_size"][model]
    callbacks = config.callbacks(s, bs)
    for cb in callbacks:
        _label_hooks(cb)
    module = config_module(model, config, s)
    s = {**s, "timed_steps": steps}
    trainer = build_trainer([ProfileWindow(), *callbacks], s, device)
    trainer.fit(module, train_dataloaders=make_loader(model, s, device))
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    head = (
        f"torch profiler: {model}, configuration {name!r} ({config.label}), {steps} steps after "
        f"{start} warm-up steps, {C.machine(device)}, {C.stamp()}"
    )
    floors = time_floors(model, s, device, s["seed"])
    floor = floors["weights"]
    hook_names = {f"{type(cb).__name__}.{h}" for cb in callbacks for h in _HOOKS}
    body = []
    for e in sorted((e for e in events if e.key in hook_names), key=lambda e: -e.cpu_time_total):
        per_step = e.cpu_time_total / steps  # µs
        kind = HOOK_FLOOR.get(e.key)
        scale = FLOOR_SCALE.get(e.key, (1.0, ""))[0]
        own = 1e6 * scale * floors[kind] if kind else 0.0
        body.append(
            [
                f"`{e.key}`",
                f"{per_step:.0f}",
                f"{per_step / (1e6 * floor):.2f}",
                f"{own:.0f} ({kind})" if kind else "—",
                f"{per_step - own:.0f}",
            ]
        )
    hooks_table = C.markdown_table(
        ["hook", "µs per step (profiled)", "x weights floor", "its floor µs", "above its floor µs"],
        body,
        right=(1, 2, 3, 4),
    )
    return "\n\n".join(
        [
            head,
            f"Callback hooks, CPU time per step under the profiler (which adds a few µs per op and per hook) vs "
            f"the weights floor, one `_foreach_lerp_` pass over the weights = {1e6 * floor:.0f} µs measured right "
            "after, and against its own floor (a hook with tensor work: the floor of that work; every other hook: "
            "0); the timing table of a normal run has the same per hook without the profiler:",
            hooks_table,
            f"Top {rows} by total CPU time (includes the per-hook ranges `Class.hook` and the whole step):",
            events.table(sort_by="cpu_time_total", row_limit=rows),
            f"Top {rows} by {sort}:",
            events.table(sort_by=sort, row_limit=rows),
        ]
    )


# -- the table -------------------------------------------------------------------------------------
def _verdict(value: float, limit: float, spread: float, unit: str = "", fmt: str = ".3f", above: bool = False) -> str:
    """``met`` or ``missed by X`` (``within noise`` when the miss is smaller than the spread)."""
    if not math.isfinite(value):
        return "n/a"
    miss = (limit - value) if above else (value - limit)
    if miss <= 0:
        return "met"
    noise = " (within noise)" if math.isfinite(spread) and miss < spread else ""
    return f"missed by {miss:{fmt}}{unit}{noise}"


def goal_of(model: str, name: str, floor_frac: float, device: torch.device) -> tuple[str, str] | None:
    """The goal of a row as (kind, text), or ``None`` (no goal: the ResNet rows, SWA, references)."""
    if model != "mlp":
        return None
    if name in LIGHT or name in AUGMENT:
        return "light", f"≤ {GOAL_LIGHT_RATIO:.2f}x"
    if name in ONE_PASS:
        return "one_pass", f"hooks ≤ {GOAL_ONE_PASS_FLOORS} floors (≤ {1 + GOAL_ONE_PASS_FLOORS * floor_frac:.3f}x)"
    if name == "stack":
        return "stack", f"≤ {GOAL_STACK_RATIO:.2f}x"
    if name == "lightning_ema":
        return "vs_ema", (
            f"costs ≥ {GOAL_EMA_VS_LIGHTNING.get(device.type, 3.0):.0f}x our EMA "
            + ("(added ms)" if device.type == "cuda" else "(hooks)")
        )
    return None


#: the label of each floor's row
FLOOR_LABEL = {
    "weights": "floor: one `_foreach_lerp_` pass over the weights",
    "mixup": "floor of Mixup: `lerp(x[perm], x, lam)` and the mixed one-hot targets",
    "cutmix": "floor of CutMix: `lerp(x, x[perm], box)` and the mixed one-hot targets",
    "cutout": "floor of Cutout: `lerp(x, fill, squares)` on the batch",
}


def summarize(
    times: dict[tuple[str, str], list[tuple[float, float]]],
    s: dict,
    device: torch.device,
    skipped: dict[str, str],
    params: dict[str, int],
    floors: dict[str, list[dict[str, float]]] | None = None,
    hook_times: dict[tuple[str, str], list[dict[str, float]]] | None = None,
) -> tuple[list[dict], str]:
    """The tables: per configuration ms/step, x bare Lightning (mean ± std and per repeat), added ms per
    step, µs per step inside the callbacks' hooks, the floor the configuration is judged against, the
    goal and whether it is met; then the whole stack's hooks one by one against their floors."""
    rows: list[dict] = []
    floors = floors or {}
    hook_times = hook_times or {}
    header = [
        "model",
        "configuration",
        "ms/step",
        "x bare Lightning",
        "per repeat",
        "added ms/step",
        "added x floor",
        "hooks µs/step",
        "its floor µs",
        "hooks x its floor",
        "hooks − its floor µs",
        "goal",
        "verdict",
    ]
    body = []
    profiles: list[str] = []
    gpu = device.type == "cuda"
    for model in s["models"]:
        base = [t for t, _ in times.get((model, "lightning"), [])]
        per_repeat = floors.get(model) or []

        def floor_of(kind: str | None, n: int, per_repeat: list[dict[str, float]] = per_repeat) -> list[float]:
            if kind is None:
                return [0.0] * n
            return [f[kind] for f in per_repeat] if per_repeat else [math.nan] * n

        weights = floor_of("weights", len(base))
        floor_frac = C.mean_std(f / b for f, b in zip(weights, base))[0] if base else math.nan
        for kind in FLOORS:
            series = floor_of(kind, len(base))
            frac = C.mean_std(f / b for f, b in zip(series, base))[0] if base else math.nan
            body.append([model, FLOOR_LABEL[kind], C.pm(series, 3, 1e3), f"{frac:.3f} of a step"] + [""] * 9)
            for i, f in enumerate(series):
                rows.append(
                    {
                        "model": model,
                        "params": params[model],
                        "config": f"floor_{kind}",
                        "label": FLOOR_LABEL[kind],
                        "repeat": i,
                        "batch_size": s["batch_size"][model],
                        "ms_per_step": 1e3 * f,
                        "x_bare_lightning": f / base[i] if base else math.nan,
                        "device": device.type,
                    }
                )
        ema_added = ema_hooks = math.nan
        if (model, "ema") in times and base:
            ema_added = C.mean_std(t - b for (t, _), b in zip(times[(model, "ema")], base))[0]
            ema_hooks = C.mean_std(h for _, h in times[(model, "ema")])[0]
        for name in s["configs"]:
            config = CONFIGS[name]
            if name in skipped:
                body.append([model, config.label, "skipped"] + [""] * 9 + [skipped[name]])
                continue
            t = [x for x, _ in times[(model, name)]]
            hooks = [h for _, h in times[(model, name)]]
            ratios = C.paired_ratios(t, base) if base else [math.nan] * len(t)
            added = [x - b for x, b in zip(t, base)] if base else [math.nan] * len(t)
            r_mean, r_std = C.mean_std(ratios)
            a_mean, a_std = C.mean_std(added)
            h_mean, h_std = C.mean_std(hooks) if all(map(math.isfinite, hooks)) else (math.nan, math.nan)
            kind = FLOOR_OF.get(name)
            scale, why = FLOOR_SCALE.get(name, (1.0, ""))
            own = [scale * f for f in floor_of(kind, len(t))]
            excess = [h - f for h, f in zip(hooks, own)]
            e_mean, e_std = C.mean_std(excess) if all(map(math.isfinite, excess)) else (math.nan, math.nan)
            of_own = [h / f for h, f in zip(hooks, own)] if kind is not None else []
            ratio_own = C.pm(of_own, 2) if of_own and all(map(math.isfinite, of_own)) else ""
            added_floors = [a / f for a, f in zip(added, weights)]
            af_mean, af_std = C.mean_std(added_floors)
            in_floors = [h / f for h, f in zip(hooks, weights)]
            hf_mean, hf_std = C.mean_std(in_floors) if all(map(math.isfinite, in_floors)) else (math.nan, math.nan)
            goal = goal_of(model, name, floor_frac, device)
            verdict = ""
            if goal is not None:
                goal_kind, _ = goal
                if goal_kind == "light":
                    verdict = _verdict(r_mean, GOAL_LIGHT_RATIO, r_std)
                elif goal_kind == "one_pass":  # judged on the hooks' own time: the added ms carry ±0.5 floor of noise
                    verdict = f"hooks {hf_mean:.2f} ± {hf_std:.2f} floors: " + _verdict(
                        hf_mean, GOAL_ONE_PASS_FLOORS, hf_std, " floors", ".2f"
                    )
                elif goal_kind == "stack":
                    verdict = _verdict(r_mean, GOAL_STACK_RATIO, r_std)
                elif goal_kind == "vs_ema":
                    # on a CPU the hooks hold the whole cost (kernels run in them): judged on them; on a GPU
                    # the kernels are asynchronous, so on the added ms
                    by_added = a_mean / ema_added if ema_added > 0 and a_mean > 0 else math.nan
                    by_hooks = h_mean / ema_hooks if ema_hooks > 0 else math.nan
                    factor = by_added if gpu else by_hooks
                    added_text = f"added ms {by_added:.1f}x" if math.isfinite(by_added) else "added ms within noise"
                    verdict = f"hooks {by_hooks:.1f}x ours, {added_text}: " + _verdict(
                        factor, GOAL_EMA_VS_LIGHTNING.get(device.type, 3.0), math.nan, "x", ".1f", above=True
                    )
            is_base = name in ("lightning", "raw")
            body.append(
                [
                    model,
                    config.label,
                    C.pm(t, 3, 1e3),
                    f"{r_mean:.3f} ± {r_std:.3f}",
                    " ".join(f"{r:.3f}" for r in ratios),
                    "" if name == "lightning" else f"{a_mean * 1e3:+.3f} ± {a_std * 1e3:.3f}",
                    "" if is_base else f"{af_mean:.2f} ± {af_std:.2f}",
                    "" if is_base else f"{1e6 * h_mean:.0f} ± {1e6 * h_std:.0f}",
                    "" if is_base or kind is None else C.pm(own, 0, 1e6) + f" ({kind}{', ' + why if why else ''})",
                    "" if is_base else ratio_own,
                    "" if is_base or kind is None else f"{1e6 * e_mean:.0f} ± {1e6 * e_std:.0f}",
                    "" if goal is None else goal[1],
                    verdict,
                ]
            )
            for i, (sec, ratio) in enumerate(zip(t, ratios)):
                rows.append(
                    {
                        "model": model,
                        "params": params[model],
                        "config": name,
                        "label": config.label,
                        "repeat": i,
                        "batch_size": s["batch_size"][model],
                        "ms_per_step": 1e3 * sec,
                        "x_bare_lightning": ratio,
                        "added_ms": 1e3 * added[i],
                        "x_floor": added_floors[i],
                        "hook_us": 1e6 * hooks[i],
                        "floor_kind": kind or "",
                        "floor_us": 1e6 * own[i],
                        "hook_minus_floor_us": 1e6 * excess[i],
                        "device": device.type,
                    }
                )
            for i, per_hook in enumerate(hook_times.get((model, name), [])):
                for key, sec in per_hook.items():
                    rows.append(
                        {
                            "model": model,
                            "config": name,
                            "label": config.label,
                            "repeat": i,
                            "hook": key,
                            "hook_us": 1e6 * sec,
                            "device": device.type,
                        }
                    )
        if (model, "stack") in hook_times and model == "mlp":
            profiles.append(_stack_profile(model, hook_times[(model, "stack")], floor_of, len(base)))
    md = "\n".join(
        [
            f"Per-step cost, {s['repeats']} repeats x {s['timed_steps']} timed steps after {s['warmup_steps']} "
            f"warm-up steps, data resident on the device ({s['steps_per_epoch']} batches per epoch, so epoch ends "
            "are included); a step is timed from one `on_train_batch_start` to the next, the device synchronized "
            "at both clock reads. Models: "
            + ", ".join(f"{m} ({params[m]:,} params, batch {s['batch_size'][m]})" for m in s["models"])
            + ". "
            "`x bare Lightning`: the ratio to bare Lightning of the same repeat (mean ± std over repeats, and each "
            "repeat's; bare Lightning runs first and last in every repeat, and its mean is the reference); "
            "`added ms/step`: the difference to bare Lightning of the same repeat; `added x floor`: that "
            "over the floor of one pass over the weights, per repeat (it includes what a callback costs the rest "
            "of the step, e.g. evicted caches, and the step-to-step noise); `hooks µs/step`: time spent inside the "
            "configuration's callback hooks per step (on a CPU their kernels included, on a GPU host time only); "
            "`its floor`: what the configuration's tensor work cannot cost less than, measured in the same repeat "
            "at the same point of a step (one `torch._foreach_lerp_` pass over the weights after the optimizer "
            "step of the raw loop; for Mixup, CutMix and Cutout their arithmetic alone on the batch and targets, "
            "every draw given, in the `on_train_batch_start` of a bare Lightning fit); `hooks x its floor` and "
            "`hooks − its floor`: the hooks against it (what the callback adds on top: draws, batch handling, "
            "Python; reported, not judged). Goals (MLP rows): a light callback or a batch augmentation ≤ 1.02x; "
            "EMA, L1 and the every-step weight check ≤ 1.2 floors (judged on the hooks); the whole stack ≤ 1.28x; "
            "Lightning's EMAWeightAveraging costs ≥ 3x what our EMA costs "
            "(CPU, judged on the hooks) or ≥ 5x (GPU, on the added ms). `within noise`: the miss is smaller than "
            "the spread over repeats.",
            "",
            C.markdown_table(header, body, right=(2, 3, 5, 6, 7, 8, 9, 10)),
            *profiles,
            "",
            f"Machine: {C.machine(device)}; {C.stamp()}.",
        ]
    )
    if skipped:
        md += "\n\nSkipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + "."
    return rows, md


#: the floor each per-step hook that does tensor work is judged against (every other hook: none, 0)
HOOK_FLOOR = {
    "EMA.on_train_batch_end": "weights",
    "SWA.on_train_batch_end": "weights",
    "L1Regularization.on_before_optimizer_step": "weights",  # the subgradient mode
    "L1Regularization._shrink": "weights",  # the proximal mode
    "DivergenceGuard._after_step": "weights",
    "Mixup.on_train_batch_start": "mixup",
    "CutMix.on_train_batch_start": "cutmix",
    "Cutout.on_train_batch_start": "cutout",
    "UpdateRatioMonitor.on_before_optimizer_step": "weights",
    "UpdateRatioMonitor.on_train_batch_end": "weights",
}


def _stack_profile(
    model: str, per_repeat: list[dict[str, float]], floor_of: Callable[[str | None, int], list[float]], n: int
) -> str:
    """The whole stack's hooks one by one (clocked in the timed window of every repeat) against their floors."""
    body = []
    for key in sorted({k for r in per_repeat for k in r}, key=lambda k: -sum(r.get(k, 0.0) for r in per_repeat)):
        us = [1e6 * r.get(key, 0.0) for r in per_repeat]
        kind = HOOK_FLOOR.get(key)
        scale, why = FLOOR_SCALE.get(key, (1.0, ""))
        own = [1e6 * scale * f for f in floor_of(kind, n)]
        body.append(
            [
                f"`{key}`",
                C.pm(us, 0),
                " ".join(f"{u:.0f}" for u in us),
                "—" if kind is None else f"{C.pm(own, 0)} ({kind}{', ' + why if why else ''})",
                C.pm([u - f for u, f in zip(us, own)], 0),
            ]
        )
    return "\n".join(
        [
            "",
            f"Profile of the whole stack ({model}): each callback hook's time per step, clocked inside the hook in "
            "the timed window of every repeat (the clock costs under a µs), and what it spends above its floor "
            "(hooks without tensor work: a floor of 0). `EarlyStopping` acts at epoch ends, amortized over the "
            "epoch's steps.",
            "",
            C.markdown_table(
                ["hook", "µs per step", "per repeat", "its floor µs", "above its floor µs"], body, right=(1, 4)
            ),
        ]
    )


def paired_table(s: dict, device: torch.device, out: Path, args: argparse.Namespace) -> tuple[list[dict], str]:
    """Run :func:`time_paired` for every configuration but the references, ``repeats`` times, interleaved;
    print and write the table."""
    names = [c for c in s["configs"] if CONFIGS[c].callbacks is not None and c != "lightning"]
    names = [c for c in names if not missing_modules(CONFIGS[c])]
    got: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for model in s["models"]:
        time_config(model, "lightning", s, device, s["seed"])  # warm-up run
        for rep in range(s["repeats"]):
            for name in names:
                base, added = time_paired(model, name, s, device, s["seed"] + rep)
                got.setdefault((model, name), []).append((base, added))
                print(
                    f"{model:6s} repeat {rep} {name:17s} {1e3 * base:8.3f} ms/step without, {1e6 * added:+7.1f} µs",
                    file=sys.stderr,
                    flush=True,
                )
    rows, table = [], []
    for (model, name), runs in got.items():
        ratios = [1.0 + added / base for base, added in runs]
        ratio, spread = C.mean_std(ratios)
        goal = GOAL_LIGHT_RATIO if model == "mlp" and name in LIGHT + AUGMENT else None
        verdict = _verdict(ratio, goal, spread) if goal else ""
        row = {
            "model": model,
            "configuration": name,
            "ms_per_step_without": 1e3 * C.mean_std(b for b, _ in runs)[0],
            "added_us": C.mean_std(1e6 * a for _, a in runs)[0],
            "added_us_std": C.mean_std(1e6 * a for _, a in runs)[1],
            "x_without": ratio,
            "x_without_std": spread,
            "verdict": verdict,
        }
        rows.append(row)
        table.append(
            [
                model,
                CONFIGS[name].label,
                f"{row['ms_per_step_without']:.3f}",
                f"{row['added_us']:+.0f} ± {row['added_us_std']:.0f}",
                f"{ratio:.3f} ± {spread:.3f}",
                " ".join(f"{r:.3f}" for r in ratios),
                f"≤ {goal}x" if goal else "",
                verdict,
            ]
        )
    header = ["model", "configuration", "ms/step without", "added µs/step", "x without", "per repeat", "goal"]
    header.append("verdict")
    md = (
        f"Paired per-step cost, {s['repeats']} repeats x {2 * (s['timed_steps'] // 2)} steps, a fit each "
        "(`--paired` in the module docstring): the configuration's per-step hooks run on every other step; "
        "`added` is the trimmed mean of the differences between adjacent steps with and without them, "
        "`x without` is 1 + added over the step without them (mean ± std over repeats).\n\n"
        + C.markdown_table(header, table, right=(2, 3, 4))
        + f"\n\nMachine: {C.machine(device)}; {C.stamp()}.\n"
    )
    print(md)
    suffix = ("" if args.models is None else "_" + "_".join(s["models"])) + ("_tiny" if args.tiny else "")
    md_path, _ = C.write_results(f"overhead_paired_{device.type}{suffix}", rows, md, out)
    print(f"wrote {md_path} and .csv", file=sys.stderr)
    return rows, md


def main(argv: list[str] | None = None) -> tuple[list[dict], str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the GPU setting (FULL)")
    parser.add_argument("--device", help="cpu | cuda | auto (default: the setting's)")
    parser.add_argument("--models", help="comma-separated subset of mlp,resnet")
    parser.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--timed-steps", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--profile",
        metavar="CONFIG",
        help="print a torch profiler table of this configuration "
        "(on the first of --models) instead of the timing table",
    )
    parser.add_argument(
        "--paired", action="store_true", help="the paired measure of each configuration (see the module docstring)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps (smoke tests)")
    parser.add_argument("--out-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    s = C.pick_settings(
        SETTINGS,
        FULL,
        args.full,
        {
            "device": args.device,
            "repeats": args.repeats,
            "warmup_steps": args.warmup_steps,
            "timed_steps": args.timed_steps,
            "steps_per_epoch": args.steps_per_epoch,
            "threads": args.threads,
            "models": args.models.split(",") if args.models else None,
            "configs": args.configs.split(",") if args.configs else None,
        },
    )
    if args.tiny:
        s.update(
            mlp={"input_shape": (2, 4, 4), "hidden": (16,)},
            resnet={"input_shape": (3, 8, 8), "widths": (4,), "blocks_per_stage": 1},
            batch_size={"mlp": 8, "resnet": 8},
        )
    s["configs"] = list(s["configs"] or CONFIGS)
    unknown = [c for c in s["configs"] if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    if "lightning" not in s["configs"]:
        s["configs"].insert(0, "lightning")  # the reference every ratio is taken against
    device = C.resolve_device(s["device"])
    C.setup_torch(device, s["threads"])
    with C.quiet():
        out = Path(args.out_dir)

        if args.profile:
            if args.profile not in CONFIGS:
                parser.error(f"--profile: unknown configuration {args.profile!r}; known: {list(CONFIGS)}")
            time_config(s["models"][0], "lightning", s, device, s["seed"])  # warm-up run
            text = profile(s["models"][0], args.profile, s, device)
            print(text)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"overhead_profile_{args.profile}_{s['models'][0]}_{device.type}.txt"
            path.write_text(text + "\n")
            print(f"wrote {path}", file=sys.stderr)
            return [], text

        if args.paired:
            return paired_table(s, device, out, args)

        skipped: dict[str, str] = {}
        for name in s["configs"]:
            gone = missing_modules(CONFIGS[name])
            if gone:
                skipped[name] = "not written yet: " + ", ".join(f"lightning_tricks.callbacks.{m}" for m in gone)
        if "lightning_ema" in s["configs"]:
            from lightning_tricks._lightning import EMAWeightAveraging

            if EMAWeightAveraging is None:
                skipped["lightning_ema"] = "needs pytorch-lightning >= 2.5"
        run = [c for c in s["configs"] if c not in skipped]
        for name, why in skipped.items():
            print(f"skipping {name}: {why}", file=sys.stderr)

        params = {m: C.param_count(build_net(m, s)) for m in s["models"]}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        floors: dict[str, list[dict[str, float]]] = {}
        hook_times: dict[tuple[str, str], list[dict[str, float]]] = {}
        for model in s["models"]:
            time_config(model, "lightning", s, device, s["seed"])  # warm-up run: imports, allocator, kernels
            time_config(model, "raw", s, device, s["seed"])
            for rep in range(s["repeats"]):
                floor = time_floors(model, s, device, s["seed"] + rep)
                floors.setdefault(model, []).append(floor)
                print(
                    f"{model:6s} repeat {rep} floors " + " ".join(f"{k}={1e6 * v:.1f} µs" for k, v in floor.items()),
                    file=sys.stderr,
                    flush=True,
                )
                for name in run:  # interleaved, so drift in the machine's load hits every configuration alike
                    sec, hook, per_hook = time_config(model, name, s, device, s["seed"] + rep)
                    times.setdefault((model, name), []).append((sec, hook))
                    hook_times.setdefault((model, name), []).append(per_hook)
                    print(
                        f"{model:6s} repeat {rep} {name:17s} {1e3 * sec:8.3f} ms/step, hooks {1e6 * hook:7.1f} µs "
                        + " ".join(f"{k}={1e6 * v:.1f}" for k, v in per_hook.items()),
                        file=sys.stderr,
                        flush=True,
                    )
                # bare Lightning again at the end of the repeat: the reference is the mean of its first and last
                # run, so a drift of the machine during the repeat does not favour the configurations run late
                again, _, _ = time_config(model, "lightning", s, device, s["seed"] + rep)
                first, hooks0 = times[(model, "lightning")][-1]
                times[(model, "lightning")][-1] = ((first + again) / 2, hooks0)
                print(f"{model:6s} repeat {rep} lightning (again)  {1e3 * again:8.3f} ms/step", file=sys.stderr)

        rows, md = summarize(times, s, device, skipped, params, floors, hook_times)
        print(md)
        suffix = ("" if args.models is None else "_" + "_".join(s["models"])) + ("_tiny" if args.tiny else "")
        md_path, _ = C.write_results(f"overhead_{device.type}{suffix}", rows, md, out)
        print(f"wrote {md_path} and .csv", file=sys.stderr)
        return rows, md


if __name__ == "__main__":
    main()
