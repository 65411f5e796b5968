"""Per-step cost of an EMA update: lightning-tricks vs a Python loop, torch's AveragedModel, Lightning's callback.

For each model it times one EMA update (``avg <- d * avg + (1 - d) * w`` over all parameters) done by:

- ``ours``: :class:`lightning_tricks.callbacks.EMA`'s per-step hook (``on_train_batch_end``), i.e. the
  step check, the host-side decay and one ``torch._foreach_lerp_`` per (device, dtype) group;
- ``loop``: a naive Python loop, ``a.mul_(d).add_(w, alpha=1 - d)`` per parameter;
- ``averaged_model``: ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(d))``'s
  ``update_parameters`` (regroups tensors and checks ``n_averaged == 0`` at every call);
- ``lightning``: Lightning's ``EMAWeightAveraging`` per-step hook (``AveragedModel`` with a per-tensor
  ``avg_fn``, parameters and buffers);
- ``fused_pass``: the bandwidth reference, one ``torch.add(a, b, out=c)`` over flat buffers the size of
  the model (reads two copies, writes one: 3 x model bytes), i.e. what a perfectly fused update costs.

Models: the 1.6M-parameter MLP 512-1024-1024-10 and a 25.6M-parameter model with ResNet-50's exact
parameter and buffer shapes (161 parameter tensors; built here so torchvision is not needed).

    python benchmarks/ema_update.py                 # CPU
    python benchmarks/ema_update.py --device cuda   # GPU when available

Prints the table and writes ``benchmarks/results/ema_update_<device>.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "models": ["mlp_1.6M", "resnet50_25M"],
    "methods": ["ours", "loop", "averaged_model", "lightning", "fused_pass"],
    "decay": 0.999,
    "warmup_calls": 5,  # untimed calls before timing each method
    "calls": {"cpu": 20, "cuda": 200},  # calls per timed repeat
    "repeats": 5,  # timed repeats; mean ± std over them
    "threads": None,  # torch intra-op threads on CPU (None: torch's default)
    "out_dir": str(ROOT / "benchmarks" / "results"),
}


# -- models ----------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    """512-1024-1024-10: 1,585,162 parameters in 6 tensors."""
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50_like() -> nn.Module:
    """ResNet-50's layers (stem, bottlenecks 3-4-6-3, fc 1000): 25,557,032 parameters, 161 tensors."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(_Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp_1.6M": mlp, "resnet50_25M": resnet50_like}


# -- the updates -----------------------------------------------------------------------------------
class _Trainer:
    """The two attributes the per-step hooks read."""

    global_step = 0
    accumulate_grad_batches = 1


def _wrap(model: nn.Module):
    from lightning_tricks._lightning import LightningModule

    class Wrapped(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

    return Wrapped()


def make_update(method: str, model: nn.Module, decay: float) -> Callable[[], None]:
    """A zero-argument callable doing one EMA update (or the reference pass) of ``model``."""
    if method == "ours":
        from lightning_tricks.callbacks import EMA

        ema, trainer = EMA(decay=decay, warmup=False), _Trainer()
        module = _wrap(model)
        ema._bind(module)
        ema._start(0)
        ema._last_step = 0

        def step() -> None:
            trainer.global_step += 1
            ema.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]

        return step
    if method == "loop":
        params = [p for p in model.parameters()]
        avgs = [p.detach().clone() for p in params]

        @torch.no_grad()
        def step() -> None:
            for a, p in zip(avgs, params):
                a.mul_(decay).add_(p, alpha=1 - decay)

        return step
    if method == "averaged_model":
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        am = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        am.update_parameters(model)  # the first call copies
        return lambda: am.update_parameters(model)
    if method == "lightning":
        from lightning_tricks._lightning import EMAWeightAveraging

        if EMAWeightAveraging is None:
            raise RuntimeError("this Lightning has no EMAWeightAveraging (needs >= 2.5)")

        cb, trainer = EMAWeightAveraging(decay=decay), _Trainer()
        module = _wrap(model)
        cb.setup(trainer, module, "fit")  # type: ignore[arg-type]

        def step() -> None:
            trainer.global_step += 1
            cb.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]

        return step
    if method == "fused_pass":
        n = sum(p.numel() for p in model.parameters())
        device = next(model.parameters()).device
        a, b, c = (torch.rand(n, device=device) for _ in range(3))
        return lambda: torch.add(a, b, out=c)
    raise ValueError(f"unknown method {method!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(update: Callable[[], None], device: torch.device, s: dict) -> list[float]:
    """Seconds per call, one value per repeat (the device is synchronized around each timed block)."""
    for _ in range(s["warmup_calls"]):
        update()
    calls = s["calls"][device.type]
    out = []
    for _ in range(s["repeats"]):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            update()
        _sync(device)
        out.append((time.perf_counter() - t0) / calls)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=SETTINGS["threads"], help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=SETTINGS["repeats"])
    args = parser.parse_args(argv)
    s = {**SETTINGS, "threads": args.threads, "repeats": args.repeats}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if s["threads"]:
        torch.set_num_threads(s["threads"])

    rows = []
    for name in s["models"]:
        torch.manual_seed(0)
        model = MODELS[name]().to(device)
        numel = sum(p.numel() for p in model.parameters())
        tensors = len(list(model.parameters()))
        results = {}
        for method in s["methods"]:
            try:
                update = make_update(method, model, s["decay"])
            except ImportError as e:  # EMAWeightAveraging is in pytorch-lightning >= 2.5 only
                print(f"skipping {method}: {e}", file=sys.stderr)
                continue
            results[method] = time_method(update, device, s)
        ours = statistics.mean(results["ours"])
        fused = statistics.mean(results["fused_pass"])
        for method, times in results.items():
            mean = statistics.mean(times)
            rows.append(
                {
                    "model": name,
                    "params": numel,
                    "tensors": tensors,
                    "method": method,
                    "us_per_update": round(mean * 1e6, 1),
                    "std_us": round(statistics.stdev(times) * 1e6 if len(times) > 1 else 0.0, 1),
                    "x_ours": round(mean / ours, 2),
                    "x_fused_pass": round(mean / fused, 2),
                    "GB_per_s_3x": round(3 * 4 * numel / mean / 1e9, 1),
                }
            )
    write(rows, device, s)
    return rows


def write(rows: list[dict], device: torch.device, s: dict) -> None:
    header = [
        "model",
        "params",
        "tensors",
        "method",
        "us_per_update",
        "std_us",
        "x_ours",
        "x_fused_pass",
        "GB_per_s_3x",
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"EMA update cost, device {device.type} ({name}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"mean ± std over {s['repeats']} repeats of {s['calls'][device.type]} calls after "
        f"{s['warmup_calls']} warm-up calls; x_ours = time / ours; x_fused_pass = time / one "
        "torch.add(a, b, out=c) over model-sized flat buffers (3 x model bytes); GB_per_s_3x = 3 x 4 B x params / time",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        cells = [str(r[h]) for h in header]
        cells[4] = f"{r['us_per_update']} ± {r['std_us']}"
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = Path(s["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ema_update_{device.type}.md").write_text(text + "\n")
    with open(out / f"ema_update_{device.type}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
