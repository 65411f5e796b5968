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
averaged. Absolute ms/step are only meaningful on a GPU; on a CPU read the ratios.

    python benchmarks/overhead.py                          # small CPU setting (SETTINGS)
    python benchmarks/overhead.py --full --device cuda     # GPU setting (FULL)
    python benchmarks/overhead.py --configs lightning,ema,lightning_ema --models mlp
    python benchmarks/overhead.py --profile stack          # torch profiler table of one configuration

Writes ``benchmarks/results/overhead_<device>[_<models>].md`` / ``.csv`` (and
``overhead_profile_<config>_<model>_<device>.txt``).
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
    "threads": 1,                      # CPU intra-op threads (the 2-core CI machine is shared)
    "models": ["mlp", "resnet"],
    "configs": None,                   # None: all of CONFIGS, in order
    "batch_size": {"mlp": 64, "resnet": 32},
    "steps_per_epoch": 50,             # batches per epoch of the random resident data
    "warmup_steps": 10,                # untimed steps at the start of every fit
    "timed_steps": 60,
    "repeats": 3,
    "mlp": {"input_shape": (2, 16, 16), "hidden": (1024, 1024)},          # 512-1024-1024-10, 1.6M params
    "resnet": {"input_shape": (3, 32, 32), "widths": (16, 32, 64), "blocks_per_stage": 1},
    "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
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

#: Targets of issue 10 (on a GPU, vs bare Lightning on the MLP).
TARGET_PER_CALLBACK = 1.03
TARGET_STACK = 1.10


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
    return {"name": "sgd", "lr": s["lr"], "momentum": s["momentum"], "weight_decay": s["weight_decay"],
            "no_decay_bias_norm": no_decay_bias_norm}


# -- configurations --------------------------------------------------------------------------------
@dataclass
class Config:
    """One row: ``callbacks(s, batch_size)`` builds its callbacks (``None``: the raw PyTorch loop)."""

    label: str
    callbacks: Callable[[dict, int], list] | None
    stack: bool = False           # the whole bag of tricks: label smoothing + no-decay groups in the module
    reference: bool = False       # a Lightning callback, for comparison
    needs: str = ""               # module that must exist (skipped with a note if it does not)


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
    return [EarlyStopping(monitor="train/loss", mode="min", patience=10**9, check_on_train_epoch_end=True,
                          restore_best=True)]


def _update_ratio(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import UpdateRatioMonitor

    return [UpdateRatioMonitor()]


def _l1(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import L1Regularization

    return [L1Regularization(lam=1e-5)]


def _mixup(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import Mixup

    return [Mixup(alpha=0.2)]


def _cutmix(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import CutMix

    return [CutMix(alpha=1.0)]


def _cutout(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import Cutout

    return [Cutout(size=0.5)]


def _stack(s: dict, bs: int) -> list:
    from lightning_tricks.callbacks import LinearScaling

    return [LinearScaling(reference_batch_size=256, batch_size=bs), *_lr_schedule(s, bs), *_ema(s, bs),
            *_mixup(s, bs), *_l1(s, bs), *_update_ratio(s, bs), *_early_stopping(s, bs)]


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
    "lr_schedule_nolog": Config("+ LRSchedule (warmup + cosine, log=False)",
                                lambda s, bs: _lr_schedule(s, bs, log=False), needs="lr_schedule"),
    "ema": Config("+ EMA (decay 0.999, every step)", _ema, needs="ema"),
    "swa": Config("+ SWA (average every epoch)", _swa("epoch"), needs="swa"),
    "swa_step": Config("+ SWA (average every step)", _swa("step"), needs="swa"),
    "early_stopping": Config("+ EarlyStopping (patience, restore best)", _early_stopping, needs="early_stopping"),
    "update_ratio": Config("+ UpdateRatioMonitor (every 50 steps)", _update_ratio, needs="sanity"),
    "l1": Config("+ L1Regularization", _l1, needs="regularize"),
    "mixup": Config("+ Mixup", _mixup, needs="augment"),
    "cutmix": Config("+ CutMix", _cutmix, needs="augment"),
    "cutout": Config("+ Cutout", _cutout, needs="augment"),
    "stack": Config("+ whole bag-of-tricks stack", _stack, stack=True,
                    needs="lr_scaling,lr_schedule,ema,augment,regularize,sanity,early_stopping"),
    "lightning_ema": Config("+ Lightning EMAWeightAveraging (reference)", _pl_ema, reference=True),
    "lightning_swa": Config("+ Lightning StochasticWeightAveraging (reference)", _pl_swa, reference=True),
}


def missing_modules(config: Config) -> list[str]:
    """The ``lightning_tricks.callbacks`` submodules a configuration needs that are not there yet."""
    import importlib.util

    return [m for m in filter(None, config.needs.split(","))
            if importlib.util.find_spec(f"lightning_tricks.callbacks.{m}") is None]


# -- timing ----------------------------------------------------------------------------------------
def make_timer(start: int, steps: int, device: torch.device):
    """A callback timing batches ``start .. start + steps`` from one ``on_train_batch_start`` to another."""
    import time

    from lightning_tricks._lightning import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.calls = 0
            self.t0 = self.t1 = math.nan

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.calls == start:
                C.sync(device)
                self.t0 = time.perf_counter()
            elif self.calls == start + steps:
                C.sync(device)
                self.t1 = time.perf_counter()
            self.calls += 1

        @property
        def seconds_per_step(self) -> float:
            return (self.t1 - self.t0) / steps

    return StepTimer()


def time_raw(model: str, s: dict, device: torch.device, seed: int) -> float:
    """Seconds per step of a hand-written loop over the same resident batches."""
    import time

    from lightning_tricks.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(seed)
    net = build_net(model, s).to(device)
    net.train()
    opt = build_optimizer(net, OptimizerConfig.from_any(optimizer_cfg(s)))
    loader = make_loader(model, s, device)
    start, steps = s["warmup_steps"], s["timed_steps"]
    loss_sum = torch.zeros((), device=device)
    calls, t0, t1 = 0, math.nan, math.nan
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
            calls += 1
    return (t1 - t0) / steps


def build_trainer(callbacks: list, s: dict, device: torch.device, extra: dict | None = None):
    from lightning_tricks._lightning import Trainer

    total = s["warmup_steps"] + s["timed_steps"] + 1
    return Trainer(
        accelerator=C.accelerator(device), devices=1, max_steps=total,
        max_epochs=math.ceil(total / s["steps_per_epoch"]) + 1, callbacks=callbacks,
        enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, **(extra or {}),
    )


def time_lightning(model: str, name: str, s: dict, device: torch.device, seed: int) -> float:
    """Seconds per step of one fit of configuration ``name`` (after ``warmup_steps`` untimed steps)."""
    from lightning_tricks._lightning import seed_everything

    config = CONFIGS[name]
    seed_everything(seed, verbose=False)
    bs = s["batch_size"][model]
    module = make_module(build_net(model, s), optimizer_cfg(s, no_decay_bias_norm=config.stack),
                         label_smoothing=0.1 if config.stack else 0.0)
    timer = make_timer(s["warmup_steps"], s["timed_steps"], device)
    trainer = build_trainer([timer, *config.callbacks(s, bs)], s, device)  # timer first: its batch start runs first
    trainer.fit(module, train_dataloaders=make_loader(model, s, device))
    if not math.isfinite(timer.seconds_per_step):
        raise RuntimeError(f"{name}: the run ended after {timer.calls} batches, before the timed window closed")
    return timer.seconds_per_step


def time_config(model: str, name: str, s: dict, device: torch.device, seed: int) -> float:
    if CONFIGS[name].callbacks is None:
        return time_raw(model, s, device, seed)
    return time_lightning(model, name, s, device, seed)


# -- profile ---------------------------------------------------------------------------------------
_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
          "on_before_optimizer_step", "on_before_zero_grad", "on_train_epoch_start", "on_train_epoch_end")


def _label_hooks(callback: Any) -> None:
    """Wrap the callback's per-step hooks in ``record_function`` ranges named ``Class.hook``."""
    from lightning_tricks._lightning import Callback

    for hook in _HOOKS:
        fn = getattr(callback, hook, None)
        if fn is None or getattr(type(callback), hook, None) is getattr(Callback, hook, None):
            continue  # not overridden: Lightning's no-op

        def wrapped(*args: Any, _fn: Callable = fn, _name: str = f"{type(callback).__name__}.{hook}", **kw: Any):
            with torch.profiler.record_function(_name):
                return _fn(*args, **kw)

        setattr(callback, hook, wrapped)


def profile(model: str, name: str, s: dict, device: torch.device, rows: int = 25) -> str:
    """Torch profiler tables over ``profile_steps`` steps of configuration ``name`` (after the warm-up)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

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
    module = make_module(build_net(model, s), optimizer_cfg(s, no_decay_bias_norm=config.stack),
                         label_smoothing=0.1 if config.stack else 0.0)
    s = {**s, "timed_steps": steps}
    trainer = build_trainer([ProfileWindow(), *callbacks], s, device)
    trainer.fit(module, train_dataloaders=make_loader(model, s, device))
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    head = (f"torch profiler: {model}, configuration {name!r} ({config.label}), {steps} steps after "
            f"{start} warm-up steps, {C.machine(device)}, {C.stamp()}")
    return "\n\n".join([
        head,
        f"Top {rows} by total CPU time (includes the per-hook ranges `Class.hook` and the whole step):",
        events.table(sort_by="cpu_time_total", row_limit=rows),
        f"Top {rows} by {sort}:",
        events.table(sort_by=sort, row_limit=rows),
    ])


# -- the table -------------------------------------------------------------------------------------
def summarize(times: dict[tuple[str, str], list[float]], s: dict, device: torch.device,
              skipped: dict[str, str], params: dict[str, int]) -> tuple[list[dict], str]:
    rows: list[dict] = []
    header = ["model", "configuration", "ms/step (mean ± std)", "x bare Lightning (mean ± std)", "overhead %",
              "GPU target"]
    body = []
    gpu = device.type == "cuda"
    for model in s["models"]:
        base = times.get((model, "lightning"))
        for name in s["configs"]:
            config = CONFIGS[name]
            if name in skipped:
                body.append([model, config.label, "skipped", "", "", skipped[name]])
                continue
            t = times[(model, name)]
            ratios = C.paired_ratios(t, base) if base else [math.nan] * len(t)
            r_mean, r_std = C.mean_std(ratios)
            target = ""
            if model == "mlp" and name not in ("raw", "lightning") and not config.reference:
                limit = TARGET_STACK if config.stack else TARGET_PER_CALLBACK
                target = f"≤ {100 * (limit - 1):.0f}%"
                if gpu:
                    target += ": met" if r_mean <= limit else f": missed by {100 * (r_mean - limit):.1f} pts"
            body.append([model, config.label, C.pm(t, 3 if gpu else 2, 1e3), f"{r_mean:.3f} ± {r_std:.3f}",
                         f"{100 * (r_mean - 1):+.1f}", target])
            for i, (sec, ratio) in enumerate(zip(t, ratios)):
                rows.append({"model": model, "params": params[model], "config": name, "label": config.label,
                             "repeat": i, "batch_size": s["batch_size"][model], "ms_per_step": 1e3 * sec,
                             "x_bare_lightning": ratio, "device": device.type})
    md = "\n".join([
        f"Per-step cost, {s['repeats']} repeats x {s['timed_steps']} timed steps after {s['warmup_steps']} "
        f"warm-up steps, data resident on the device ({s['steps_per_epoch']} batches per epoch, so epoch ends "
        "are included); a step is timed from one `on_train_batch_start` to the next, the device synchronized "
        "at both clock reads. Models: "
        + ", ".join(f"{m} ({params[m]:,} params, batch {s['batch_size'][m]})" for m in s["models"]) + ". "
        "`x bare Lightning` is the per-repeat ratio to bare Lightning of the same repeat, averaged.",
        "",
        C.markdown_table(header, body, right=(2, 3, 4)),
        "",
        f"Machine: {C.machine(device)}; {C.stamp()}.",
    ])
    if not gpu:
        md += ("\n\nOn a CPU the absolute ms/step depend on the machine's load; the targets (≤ 3% per callback, "
               "≤ 10% for the stack, vs bare Lightning on the MLP) are GPU targets and are not judged here.")
    if skipped:
        md += "\n\nSkipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + "."
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
    parser.add_argument("--profile", metavar="CONFIG", help="print a torch profiler table of this configuration "
                        "(on the first of --models) instead of the timing table")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps (smoke tests)")
    parser.add_argument("--out-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    s = C.pick_settings(SETTINGS, FULL, args.full, {
        "device": args.device, "repeats": args.repeats, "warmup_steps": args.warmup_steps,
        "timed_steps": args.timed_steps, "steps_per_epoch": args.steps_per_epoch, "threads": args.threads,
        "models": args.models.split(",") if args.models else None,
        "configs": args.configs.split(",") if args.configs else None,
    })
    if args.tiny:
        s.update(mlp={"input_shape": (2, 4, 4), "hidden": (16,)},
                 resnet={"input_shape": (3, 8, 8), "widths": (4,), "blocks_per_stage": 1},
                 batch_size={"mlp": 8, "resnet": 8})
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
        times: dict[tuple[str, str], list[float]] = {}
        for model in s["models"]:
            time_config(model, "lightning", s, device, s["seed"])  # warm-up run: imports, allocator, kernels
            time_config(model, "raw", s, device, s["seed"])
            for rep in range(s["repeats"]):
                for name in run:  # interleaved, so drift in the machine's load hits every configuration alike
                    sec = time_config(model, name, s, device, s["seed"] + rep)
                    times.setdefault((model, name), []).append(sec)
                    print(f"{model:6s} repeat {rep} {name:15s} {1e3 * sec:8.3f} ms/step", file=sys.stderr, flush=True)

        rows, md = summarize(times, s, device, skipped, params)
        print(md)
        suffix = ("" if args.models is None else "_" + "_".join(s["models"])) + ("_tiny" if args.tiny else "")
        md_path, _ = C.write_results(f"overhead_{device.type}{suffix}", rows, md, out)
        print(f"wrote {md_path} and .csv", file=sys.stderr)
        return rows, md


if __name__ == "__main__":
    main()
