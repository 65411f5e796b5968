"""What each trick buys: a "Bag of Tricks" ablation on Fashion-MNIST through the shipped Hydra configs.

Every run is ``lightning_tricks.train.train(cfg)`` on a config composed from ``conf/`` exactly as
``python -m lightning_tricks.train OVERRIDES`` would compose it, starting from
``experiment=baseline_fashion_mnist`` (the small ResNet, SGD with momentum 0.9 at a constant LR, weight
decay on every parameter). The tricks, in the order of He et al. 2019 ("Bag of Tricks for Image
Classification with Convolutional Neural Networks", arXiv:1812.01187), and the overrides that turn
each on:

============== ===================================================================================
warmup         linear scaling + warmup: ``+callbacks=[linear_scaling]``, LR given at batch 256
               (``optimizer.lr = lr * 256 / batch``: the same LR as the baseline at the
               benchmark's batch), ``schedule=warmup`` (5% linear warmup)
cosine         ``schedule=warmup_cosine`` (``schedule=cosine`` without warmup)
no_bias_decay  ``optimizer.no_decay_bias_norm=true``
label_smooth   ``module.label_smoothing=0.1``
ema            ``+callbacks=[ema]`` (decay 0.999 with warmup; validated and tested on the average)
augment        ``+callbacks=[cutout]`` (or ``mixup``: setting ``augment``)
ic             ``model.norm=ic model.dropout=0.1`` (IC layer: BN + dropout before each conv)
============== ===================================================================================

It trains the baseline, then adds the tricks one at a time (the last row is the full recipe), then
removes each trick from the full recipe, over N seeds at a fixed number of epochs, and reports test
accuracy mean ± std, the change against the baseline and the fit wall time. The target of issue 10:
the full recipe beats the baseline by at least 1 point at equal epochs.

    python benchmarks/ablation.py                           # CPU setting: a Fashion-MNIST subset, ~2 min
    python benchmarks/ablation.py --full --device cuda      # GPU setting: all of Fashion-MNIST, 3 seeds
    python benchmarks/ablation.py --variants baseline,full --epochs 3 --seeds 2
    python benchmarks/ablation.py --full --device cuda --seeds 1 --first-seed 1 --name full_s1   # one seed per call
    python benchmarks/ablation.py --full --merge results/ablation_full_s0.csv results/ablation_full_s1.csv ...

Writes ``benchmarks/results/ablation_<setting>.md`` (the tables) and ``.csv`` (one row per run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SETTINGS: dict[str, Any] = {
    "name": "cpu",
    "device": "cpu",
    "threads": 1,
    "data_dir": str(C.SHARED_DATA / "fashion_mnist"),
    "limit_train": 2000,  # first N training images (10% of them held out for validation)
    "limit_test": 1000,
    "batch_size": 128,
    "epochs": 2,
    "seeds": [0],
    "widths": (8, 16, 32),
    "blocks_per_stage": 1,
    "lr": 0.05,  # the baseline's LR at `batch_size` (= the experiment file's)
    "reference_batch": 256,  # linear scaling: LR given at this batch
    "augment": "cutout",  # cutout | mixup
    "ic_dropout": 0.1,
    "precision": "32-true",
    "variants": None,  # None: baseline, the cumulative additions, then the removals
}

FULL: dict[str, Any] = {
    **SETTINGS,
    "name": "full",
    "device": "cuda",
    "threads": None,
    "limit_train": None,
    "limit_test": None,
    "epochs": 10,
    "seeds": [0, 1, 2],
    "widths": (32, 64, 128),  # the shipped conf/model/resnet.yaml
    "precision": "32-true",
}

#: (key, label) in the order the tricks are added
TRICKS: list[tuple[str, str]] = [
    ("warmup", "linear scaling + warmup"),
    ("cosine", "cosine decay"),
    ("no_bias_decay", "no bias/norm weight decay"),
    ("label_smooth", "label smoothing 0.1"),
    ("ema", "EMA of the weights"),
    ("augment", "augmentation"),
    ("ic", "IC blocks"),
]
KEYS = [k for k, _ in TRICKS]


def all_variants() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (group, tricks on): ``baseline``, ``+<trick>`` cumulative (ending at ``full``), ``-<trick>``."""
    out: dict[str, tuple[str, frozenset[str]]] = {"baseline": ("add", frozenset())}
    on: list[str] = []
    for key in KEYS:
        on.append(key)
        name = "full" if len(on) == len(KEYS) else f"+{key}"
        out[name] = ("add", frozenset(on))
    for key in KEYS:
        out[f"-{key}"] = ("remove", frozenset(KEYS) - {key})
    return out


VARIANTS = all_variants()


def overrides(tricks: frozenset[str], s: dict, seed: int, output_dir: str, accelerator: str) -> list[str]:
    """The Hydra overrides of one run."""
    unknown = set(tricks) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown tricks {sorted(unknown)}; known: {KEYS}")
    o = [
        "experiment=baseline_fashion_mnist",
        "logger=none",
        f"data.data_dir={s['data_dir']}",
        f"data.batch_size={s['batch_size']}",
        f"data.limit_train={'null' if s['limit_train'] is None else s['limit_train']}",
        f"data.limit_test={'null' if s['limit_test'] is None else s['limit_test']}",
        f"model.widths=[{','.join(str(w) for w in s['widths'])}]",
        f"model.blocks_per_stage={s['blocks_per_stage']}",
        f"trainer.max_epochs={s['epochs']}",
        f"trainer.accelerator={accelerator}",
        f"trainer.precision={s['precision']}",
        "trainer.enable_progress_bar=false",
        f"seed={seed}",
        f"paths.output_dir={output_dir}",
    ]
    callbacks = []
    if "warmup" in tricks:
        callbacks.append("linear_scaling")
        o.append(f"callbacks.linear_scaling.reference_batch_size={s['reference_batch']}")
        o.append(f"optimizer.lr={s['lr'] * s['reference_batch'] / s['batch_size']:g}")
    else:
        o.append(f"optimizer.lr={s['lr']:g}")
    schedule = {(True, True): "warmup_cosine", (True, False): "warmup", (False, True): "cosine", (False, False): None}[
        ("warmup" in tricks, "cosine" in tricks)
    ]
    if schedule is not None:  # else the experiment's `schedule: null` (a constant LR) stays
        o.insert(1, f"schedule={schedule}")
    if "no_bias_decay" in tricks:
        o.append("optimizer.no_decay_bias_norm=true")
    if "label_smooth" in tricks:
        o.append("module.label_smoothing=0.1")
    if "ema" in tricks:
        callbacks.append("ema")
    if "augment" in tricks:
        if s["augment"] not in ("cutout", "mixup"):
            raise ValueError(f"augment must be 'cutout' or 'mixup', got {s['augment']!r}")
        callbacks.append(s["augment"])
    if "ic" in tricks:
        o += ["model.norm=ic", f"model.dropout={s['ic_dropout']}"]
    o.insert(1, f"callbacks=[{','.join(callbacks)}]")  # no checkpointing / plots: the default list is dropped
    return o


def compose(overrides_: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_tricks.train import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides_))


def run_one(name: str, seed: int, s: dict, accelerator: str, extra: Sequence[str] = ()) -> dict:
    from lightning_tricks.train import train

    group, tricks = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="lt_ablation_") as tmp:
        o = overrides(tricks, s, seed, tmp, accelerator)
        metrics, _ = train(compose([*o, *extra]))
    return {
        "variant": name,
        "group": group,
        "tricks": "+".join(k for k in KEYS if k in tricks) or "none",
        "seed": seed,
        "test_acc": metrics["test/acc"],
        "test_loss": metrics["test/loss"],
        "val_acc": metrics.get("val/acc", float("nan")),
        "fit_s": metrics["time/fit_s"],
        "overrides": " ".join(o),
    }


# -- the tables ------------------------------------------------------------------------------------
def summarize(rows: list[dict], s: dict, machine: str, n_train: str) -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)

    def acc(name: str) -> list[float]:
        return [100 * r["test_acc"] for r in by.get(name, [])]

    def fit(name: str) -> list[float]:
        return [r["fit_s"] for r in by.get(name, [])]

    base_acc, _ = C.mean_std(acc("baseline"))
    full_acc, _ = C.mean_std(acc("full"))
    base_t, _ = C.mean_std(fit("baseline"))
    labels = dict(TRICKS)
    aug = s["augment"]

    def label(key: str) -> str:
        return f"{labels[key]} ({aug})" if key == "augment" else labels[key]

    add_rows, prev = [], None
    for name, (group, _tricks) in VARIANTS.items():
        if group != "add" or name not in by:
            continue
        a, _ = C.mean_std(acc(name))
        t, _ = C.mean_std(fit(name))
        added = (
            "baseline (SGD + momentum, constant LR)"
            if name == "baseline"
            else ("= full recipe: + " + label(KEYS[-1]) if name == "full" else "+ " + label(name[1:]))
        )
        step = "" if prev is None else f"{a - prev:+.2f}"
        add_rows.append([added, C.pm(acc(name)), f"{a - base_acc:+.2f}", step, C.pm(fit(name), 1), f"{t / base_t:.2f}"])
        prev = a
    remove_rows = []
    for name, (group, _tricks) in VARIANTS.items():
        if group != "remove" or name not in by:
            continue
        a, _ = C.mean_std(acc(name))
        t, _ = C.mean_std(fit(name))
        remove_rows.append(
            [
                f"full − {label(name[1:])}",
                C.pm(acc(name)),
                f"{a - full_acc:+.2f}",
                f"{a - base_acc:+.2f}",
                C.pm(fit(name), 1),
                f"{t / base_t:.2f}",
            ]
        )
    seeds = len(s["seeds"])
    parts = [
        f"Trick ablation on Fashion-MNIST ({n_train}), ResNet widths {list(s['widths'])} x "
        f"{s['blocks_per_stage']} block(s) per stage, batch {s['batch_size']}, {s['epochs']} epoch(s), "
        f"{seeds} seed(s) ({', '.join(map(str, s['seeds']))}), precision {s['precision']}. Each run: "
        "`lightning_tricks.train.train` on `experiment=baseline_fashion_mnist` + the overrides of its tricks "
        "(see the CSV). Test accuracy in %, mean ± std over seeds; Δ in points; fit time includes the "
        "per-epoch validation.",
        "",
        "**Adding one trick at a time** (cumulative; the last row is the full recipe):",
        "",
        C.markdown_table(
            ["recipe", "test acc %", "Δ vs baseline", "Δ vs row above", "fit s", "time / baseline"],
            add_rows,
            right=(1, 2, 3, 4, 5),
        ),
    ]
    if remove_rows:
        parts += [
            "",
            "**Removing one trick from the full recipe:**",
            "",
            C.markdown_table(
                ["recipe", "test acc %", "Δ vs full", "Δ vs baseline", "fit s", "time / baseline"],
                remove_rows,
                right=(1, 2, 3, 4, 5),
            ),
        ]
    if "baseline" in by and "full" in by:
        gain = full_acc - base_acc
        verdict = "met" if gain >= 1.0 else f"missed by {1.0 - gain:.2f} points"
        parts += ["", f"Full recipe vs baseline: {gain:+.2f} points (target ≥ +1 point at equal epochs: {verdict})."]
    parts += ["", f"Machine: {machine}; {C.stamp()}."]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> tuple[list[dict], str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the GPU setting (FULL)")
    parser.add_argument("--device", help="cpu | cuda | auto")
    parser.add_argument(
        "--data-dir", help="folder with the four Fashion-MNIST idx .gz files (default ../shared/data/fashion_mnist)"
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int, help="number of seeds (first-seed .. first-seed + N - 1)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="with --seeds: the first seed (split a long run into calls, one seed each, then --merge their CSVs)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="CSV",
        help="no training: one table from the CSVs of earlier calls (pass the same setting flags as those calls)",
    )
    parser.add_argument("--limit-train", type=int)
    parser.add_argument("--limit-test", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--widths", help="ResNet widths, e.g. 32,64,128")
    parser.add_argument("--augment", choices=["cutout", "mixup"])
    parser.add_argument("--precision", help="Lightning precision, e.g. 32-true or bf16-mixed")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--name", help="results file suffix (default: the setting's name)")
    parser.add_argument("--extra", action="append", default=[], help="an extra Hydra override for every run")
    parser.add_argument("--out-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    s = C.pick_settings(
        SETTINGS,
        FULL,
        args.full,
        {
            "device": args.device,
            "data_dir": args.data_dir,
            "epochs": args.epochs,
            "seeds": list(range(args.first_seed, args.first_seed + args.seeds)) if args.seeds else None,
            "limit_train": args.limit_train,
            "limit_test": args.limit_test,
            "batch_size": args.batch_size,
            "widths": tuple(int(w) for w in args.widths.split(",")) if args.widths else None,
            "augment": args.augment,
            "precision": args.precision,
            "threads": args.threads,
            "name": args.name,
            "variants": args.variants.split(",") if args.variants else None,
        },
    )
    names = list(s["variants"] or VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")  # every delta is taken against the baseline of the same run
    if args.merge:
        return merge(args.merge, s, args.out_dir)
    if not Path(s["data_dir"], "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST not found in {s['data_dir']} (the four idx .gz files); pass --data-dir")
    device = C.resolve_device(s["device"])
    C.setup_torch(device, s["threads"])
    with C.quiet():
        acc = C.accelerator(device)

        warm = {**s, "epochs": 1}  # warm-up run: imports, data decoding, allocator, kernels
        run_one(
            "baseline",
            0,
            warm,
            acc,
            extra=["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"],
        )
        rows = []
        machine = C.machine(device)
        for seed in s["seeds"]:
            for name in names:  # interleaved: drift in the machine's load hits every variant alike
                r = run_one(name, seed, s, acc, extra=args.extra)
                rows.append({**r, "machine": machine})
                print(
                    f"seed {seed} {name:15s} test acc {100 * r['test_acc']:6.2f}%  fit {r['fit_s']:6.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
        return finish(rows, s, machine, args.out_dir)


def describe_data(s: dict) -> str:
    return (
        ("all 60,000 training images" if s["limit_train"] is None else f"first {s['limit_train']:,} training images")
        + ", "
        + ("10,000 test images" if s["limit_test"] is None else f"first {s['limit_test']:,} test images")
    )


def finish(rows: list[dict], s: dict, machine: str, out_dir: str) -> tuple[list[dict], str]:
    md = summarize(rows, s, machine, describe_data(s))
    print(md)
    md_path, _ = C.write_results(f"ablation_{s['name']}", rows, md, out_dir)
    print(f"wrote {md_path} and .csv", file=sys.stderr)
    return rows, md


def merge(paths: Sequence[str], s: dict, out_dir: str) -> tuple[list[dict], str]:
    """One table from the CSVs of several calls (e.g. one seed per call on a time-limited GPU); the
    machine line comes from the CSVs, so the merge can run anywhere."""
    import csv

    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                r["seed"] = int(r["seed"])
                for key in ("test_acc", "test_loss", "val_acc", "fit_s"):
                    r[key] = float(r[key])
                rows.append(r)
    s = {**s, "seeds": sorted({r["seed"] for r in rows})}
    machines = sorted({r.get("machine") or "unknown (CSV without a machine column)" for r in rows})
    return finish(rows, s, " / ".join(machines), out_dir)


if __name__ == "__main__":
    main()
