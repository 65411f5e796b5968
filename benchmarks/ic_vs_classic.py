"""IC placement vs classic placement of BatchNorm/Dropout (vs none), over several seeds.

IC (Chen et al. 2019, arXiv:1905.05928): ``IC(BatchNorm -> Dropout) -> Linear/Conv -> ReLU``;
classic: ``Linear/Conv -> BatchNorm -> ReLU -> Dropout``; none: ``Linear/Conv -> ReLU -> Dropout``.
The same dropout rate is used in all three. Trains ``lightning_tricks.models.MLP`` (and the small
``ResNet``) with ``Classifier`` + SGD, reports test accuracy mean ± std over seeds and the fit wall
time relative to the classic placement measured in the same run.

    python benchmarks/ic_vs_classic.py            # SETTINGS below (Fashion-MNIST if found, else digits)
    python benchmarks/ic_vs_classic.py --quick    # digits, MLP, < 1 minute on a CPU

Writes ``benchmarks/results/ic_vs_classic[_quick].csv`` (one row per run) and ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "dataset": "fashion_mnist",  # "fashion_mnist" (falls back to digits if the files are missing) | "digits"
    "data_dir": str(ROOT.parent / "shared" / "data" / "fashion_mnist"),
    "limit_train": None,  # keep the first N training images (None = all 60k)
    "models": ["mlp", "resnet"],
    "norms": ["ic", "classic", "none"],
    "seeds": [0, 1, 2],
    "epochs": {"mlp": 5, "resnet": 3},
    "limit_train_batches": {"mlp": 1.0, "resnet": 150},  # fraction or number of batches per epoch
    "batch_size": 128,
    "lr": 0.05,  # peak LR, decayed linearly to 0 over the run (per step)
    "momentum": 0.9,
    "dropout": 0.1,
    "mlp_hidden": (256, 256),
    "resnet_widths": (8, 16, 32),
    "threads": 1,  # torch intra-op threads on CPU (small shared machines: 1)
}

QUICK = {
    **SETTINGS,
    "dataset": "digits",
    "models": ["mlp"],
    "epochs": {"mlp": 8},
    "limit_train_batches": {"mlp": 1.0},
    "batch_size": 64,
    "mlp_hidden": (128, 128),
}


def load_data(s: dict):
    from lightning_tricks.data import DigitsDataModule, FashionMNISTDataModule

    if s["dataset"] == "fashion_mnist":
        if Path(s["data_dir"], "train-images-idx3-ubyte.gz").is_file():
            dm = FashionMNISTDataModule(
                s["data_dir"], batch_size=s["batch_size"], loader="resident", limit_train=s["limit_train"]
            )
            dm.setup()
            return dm, "fashion_mnist"
        print(f"Fashion-MNIST not found in {s['data_dir']}; using digits", file=sys.stderr)
    dm = DigitsDataModule(batch_size=s["batch_size"], loader="resident")
    dm.setup()
    return dm, "digits"


def build_net(model: str, norm: str, dm, s: dict):
    from lightning_tricks.models import MLP, ResNet

    if model == "mlp":
        return MLP(dm.input_shape, dm.num_classes, hidden=s["mlp_hidden"], norm=norm, dropout=s["dropout"])
    return ResNet(dm.input_shape, dm.num_classes, widths=s["resnet_widths"], norm=norm, dropout=s["dropout"])


def make_module(net, num_classes: int, s: dict):
    """``Classifier`` with SGD + momentum and a per-step linear decay of the LR to 0."""
    import torch

    from lightning_tricks.mixins import Classifier

    class LinearDecayClassifier(Classifier):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            total = max(1, int(self.trainer.estimated_stepping_batches))
            decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    return LinearDecayClassifier(net, num_classes, {"name": "sgd", "lr": s["lr"], "momentum": s["momentum"]})


def fit_once(
    model: str, norm: str, seed: int, dm, s: dict, epochs: int | None = None, limit: float | int | None = None
) -> dict:
    import torch

    from lightning_tricks._lightning import Trainer, seed_everything

    seed_everything(seed, verbose=False)
    net = build_net(model, norm, dm, s)
    module = make_module(net, dm.num_classes, s)
    trainer = Trainer(
        max_epochs=epochs or s["epochs"][model],
        limit_train_batches=limit or s["limit_train_batches"][model],
        accelerator="auto",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {
        "model": model,
        "norm": norm,
        "seed": seed,
        "test_acc": float(test["test/acc"]),
        "test_loss": float(test["test/loss"]),
        "fit_s": fit_s,
        "params": sum(p.numel() for p in net.parameters()),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(rows: list[dict], s: dict, dataset: str, n_train: int) -> str:
    lines = [
        f"IC vs classic placement on {dataset} ({n_train} training images), {len(s['seeds'])} seeds, "
        f"dropout {s['dropout']}, SGD lr {s['lr']} (linear decay to 0) momentum {s['momentum']}, "
        f"batch {s['batch_size']}; epochs x batches per epoch: "
        + ", ".join(f"{m} {s['epochs'][m]} x {s['limit_train_batches'][m]}" for m in s["models"])
        + ".",
        "",
        "| model | norm | params | epochs | test acc % (mean ± std) | fit time (s, median) | time / classic |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model in s["models"]:
        base = [r["fit_s"] for r in rows if r["model"] == model and r["norm"] == "classic"]
        base_t = statistics.median(base) if base else float("nan")
        for norm in s["norms"]:
            rs = [r for r in rows if r["model"] == model and r["norm"] == norm]
            if not rs:
                continue
            acc, acc_sd = mean_std([100 * r["test_acc"] for r in rs])
            t = statistics.median([r["fit_s"] for r in rs])
            lines.append(
                f"| {model} | {norm} | {rs[0]['params']:,} | {s['epochs'][model]} | "
                f"{acc:.2f} ± {acc_sd:.2f} | {t:.1f} | {t / base_t:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits + MLP, under a minute on a CPU")
    parser.add_argument("--models", help="comma-separated subset of mlp,resnet")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    args = parser.parse_args(argv)
    s = dict(QUICK if args.quick else SETTINGS)
    if args.models:
        s["models"] = args.models.split(",")
    if args.seeds:
        s["seeds"] = list(range(args.seeds))

    import logging
    import warnings

    import torch

    import lightning_tricks._lightning  # noqa: F401  (sets up Lightning's loggers, quieted next)

    if not torch.cuda.is_available() and s["threads"]:
        torch.set_num_threads(s["threads"])
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    dm, dataset = load_data(s)
    n_train = len(dm.splits["train"][1])
    fit_once(s["models"][0], "classic", 0, dm, s, epochs=1, limit=5)  # warm-up: imports, allocator, kernels

    rows = []
    for model in s["models"]:
        for seed in s["seeds"]:
            for norm in s["norms"]:  # interleaved, so drift in machine load hits all placements alike
                r = fit_once(model, norm, seed, dm, s)
                rows.append(r)
                print(
                    f"{model:6s} {norm:8s} seed {seed}: test acc {100 * r['test_acc']:.2f}%  fit {r['fit_s']:.1f} s",
                    flush=True,
                )

    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    md = table(rows, s, dataset, n_train)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md += f"\n\nMachine: {device}; torch {torch.__version__}; {stamp}.\n"
    print()
    print(md)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "ic_vs_classic_quick" if args.quick else "ic_vs_classic"
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.md").write_text(md)
    print(f"wrote {out / name}.csv and .md", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
