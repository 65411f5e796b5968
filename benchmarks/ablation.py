"""What each trick buys: the "Bag of Tricks" ablation on Fashion-MNIST, run by ``lightning_tricks.ablate``.

This script only chooses the settings and names the tricks; ``python -m lightning_tricks.ablate`` runs the
rows (one Hydra multirun), skips the jobs already finished in the sweep directory and writes the report.
The base run is ``experiment=baseline_fashion_mnist`` (the small ResNet, SGD with momentum 0.9 at a constant
LR, weight decay on every parameter, no augmentation) in the chosen setting; the tricks are those of the
shipped recipe ``experiment=bag_of_tricks_fashion_mnist``, in the order of He et al. 2019 ("Bag of Tricks
for Image Classification with Convolutional Neural Networks", arXiv:1812.01187):

================ ================================================================================
warmup           linear scaling with the LR given at batch 256 (``optimizer.lr = lr * 256 / batch``:
                 the baseline's LR at the benchmark's batch) + ``schedule=warmup`` (5% linear warmup)
cosine           cosine decay (with warmup: ``schedule=warmup_cosine``)
no_bias_decay    no weight decay on biases and norm parameters
label_smoothing  ``module.label_smoothing=0.1``
ema              EMA of the weights (validated and tested on the average)
================ ================================================================================

Further names (``EXTRAS``) for tricks left out of the recipe: ``flip``, ``crop_flip``, ``cutout`` (14 px),
``cutout_small`` (7 px), ``mixup``, ``ic``; ``--on-recipe --tricks flip,cutout --mode both`` measures
them on top of the recipe (rows ``baseline+flip``, ...: the baseline there is the recipe). Before training
it checks that the ``full`` row of the recipe's tricks composes to the shipped recipe, and says so (or
what differs) at the top of its table.

    python benchmarks/ablation.py                        # CPU: a Fashion-MNIST subset, 1 seed, ~2 min
    python benchmarks/ablation.py --cpu-full             # all of Fashion-MNIST, 1 epoch, 3 seeds (~30 min on 1 core)
    python benchmarks/ablation.py --full --device cuda   # all of Fashion-MNIST, 10 epochs, 3 seeds
    python benchmarks/ablation.py --full --device cuda --seeds 1   # then --seeds 2, 3: one more seed per call
    python benchmarks/ablation.py --on-recipe --tricks flip,cutout,mixup --mode both

The sweep directory is ``benchmarks/results/ablation_<name>/`` (``ablation.md``, ``.csv``, ``.png`` and one
folder per job); a second call with the same ``--name`` reruns nothing finished there, so a long run is
split over calls by raising ``--seeds``. ``benchmarks/results/ablation_<name>.md`` is the table with the
setting, the recipe check and the machine above it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from lightning_tricks import ablate  # noqa: E402

RECIPE = "bag_of_tricks_fashion_mnist"  # the shipped recipe the ``full`` row must equal (checked before training)
BASELINE = "baseline_fashion_mnist"
REFERENCE_BATCH = 256  # linear scaling: the LR is given at this batch

SETTINGS: dict[str, Any] = {
    "name": "cpu",
    "device": "cpu",
    "threads": 1,
    "data_dir": str(C.SHARED_DATA / "fashion_mnist"),
    "limit_train": 2000,  # first N training images (10% of them held out for validation)
    "limit_test": 1000,
    "batch_size": 128,
    "epochs": 2,
    "seeds": 1,
    "widths": (8, 16, 32),
    "blocks_per_stage": 1,
    "precision": "32-true",
}
#: all 60,000 training images, the official test set, 3 seeds: about 30 minutes on one core
CPU_FULL: dict[str, Any] = {
    **SETTINGS,
    "name": "cpu_full",
    "limit_train": None,
    "limit_test": None,
    "epochs": 1,
    "seeds": 3,
}
FULL: dict[str, Any] = {
    **CPU_FULL,
    "name": "full",
    "device": "cuda",
    "threads": None,
    "epochs": 10,
    "widths": (32, 64, 128),  # the shipped conf/model/resnet.yaml
}

#: the recipe's tricks, in the order they are added; each not defined here is the library's (ablate.TRICKS)
TRICKS = ["warmup", "cosine", "no_bias_decay", "label_smoothing", "ema"]
#: tricks left out of the recipe (augmentation costs accuracy at the CPU budget: benchmarks/README.md)
EXTRAS: dict[str, dict[str, list[str]]] = {
    "flip": {"overrides": ["data.augment=crop_flip", "data.augment_options.padding=0"]},
    "crop_flip": {"overrides": ["data.augment=crop_flip", "data.augment_options.padding=2"]},
    "cutout": {"callbacks": ["cutout"], "overrides": ["callbacks.cutout.size=0.5"]},
    "cutout_small": {"callbacks": ["cutout"], "overrides": ["callbacks.cutout.size=0.25"]},
    "mixup": {"callbacks": ["mixup"]},
    "ic": {"overrides": ["model.norm=ic", "model.dropout=0.1"]},
}
#: the parts of a composed config where the tricks live (compared between ``full`` and the shipped recipe)
TRICK_KEYS = ("optimizer", "module", "schedule", "model", "data.augment", "data.augment_options", "callbacks")


def base_overrides(s: dict, accelerator: str = "cpu") -> list[str]:
    """The setting as overrides of ``experiment=baseline_fashion_mnist`` (shared by every row)."""

    def null(v: Any) -> str:
        return "null" if v is None else str(v)

    return [
        f"experiment={BASELINE}",
        "logger=none",
        "~callbacks.curve_plot",
        "~callbacks.model_checkpoint",
        "+trainer.enable_checkpointing=false",
        "data.augment=none",
        f"data.data_dir={s['data_dir']}",
        f"data.batch_size={s['batch_size']}",
        f"data.limit_train={null(s['limit_train'])}",
        f"data.limit_test={null(s['limit_test'])}",
        f"model.widths=[{','.join(str(w) for w in s['widths'])}]",
        f"model.blocks_per_stage={s['blocks_per_stage']}",
        f"trainer.max_epochs={s['epochs']}",
        f"trainer.accelerator={accelerator}",
        f"trainer.precision={s['precision']}",
        "trainer.enable_progress_bar=false",
    ]


def definitions(base: Sequence[str], batch_size: int) -> dict[str, dict[str, list[str]]]:
    """``ablate.define``: ``warmup`` with linear scaling of the baseline's LR given at batch 256, and the extras."""
    lr = float(compose(base).optimizer.lr)
    warmup = [
        "schedule=warmup",
        f"callbacks.linear_scaling.reference_batch_size={REFERENCE_BATCH}",
        f"optimizer.lr={lr * REFERENCE_BATCH / batch_size:g}",
    ]
    return {"warmup": {"callbacks": ["linear_scaling"], "overrides": warmup}, **EXTRAS}


def full_overrides(define: dict) -> list[str]:
    return ablate.row_overrides(ablate.Row(ablate.FULL, tuple(TRICKS), "full"), define)


def compose(overrides: Sequence[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_tricks.train import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def recipe_mismatch(base: Sequence[str], define: dict) -> list[str]:
    """Where the ``full`` row of :data:`TRICKS` differs from the shipped recipe in the same setting."""
    from omegaconf import OmegaConf

    full = compose([*base, *full_overrides(define)])
    recipe = compose([f"experiment={RECIPE}", *base[1:]])

    def pick(cfg: Any, key: str) -> Any:
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value

    return [
        f"{k}: ablation {pick(full, k)!r} vs recipe {pick(recipe, k)!r}"
        for k in TRICK_KEYS
        if pick(full, k) != pick(recipe, k)
    ]


def recipe_line(base: Sequence[str], define: dict) -> str:
    diff = recipe_mismatch(base, define)
    if diff:
        return f"**The full recipe ({'+'.join(TRICKS)}) differs from `experiment={RECIPE}`**: {'; '.join(diff)}."
    return f"The full recipe ({'+'.join(TRICKS)}) is the shipped `experiment={RECIPE}` (checked before training)."


def warm_up(base: Sequence[str]) -> None:
    """Two training steps in this process before the timed jobs: imports, data decoding, allocator, kernels."""
    import tempfile

    from lightning_tricks.train import train

    limits = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    with tempfile.TemporaryDirectory(prefix="lt_ablation_") as tmp:
        train(compose([*base, "trainer.max_epochs=1", f"paths.output_dir={tmp}", *limits]))


def main(argv: list[str] | None = None) -> tuple[int, str]:
    """Run the ablation; returns its exit code (0: every job finished) and the Markdown written."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the GPU setting (FULL)")
    p.add_argument("--cpu-full", action="store_true", help="all of Fashion-MNIST on the CPU (CPU_FULL, ~30 min)")
    p.add_argument("--device", help="cpu | cuda | auto")
    p.add_argument("--data-dir", help="folder with the four Fashion-MNIST idx .gz files")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seeds", type=int, help="number of seeds, from --first-seed on")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-test", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--widths", help="ResNet widths, e.g. 32,64,128")
    p.add_argument("--precision", help="Lightning precision, e.g. 32-true or bf16-mixed")
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--tricks",
        default=",".join(TRICKS),
        help=f"comma-separated (default: the recipe's); extras: {','.join(EXTRAS)}",
    )
    p.add_argument(
        "--mode", default="cumulative", choices=ablate.MODES, help="rows besides baseline, full and full-<trick>"
    )
    p.add_argument(
        "--on-recipe", action="store_true", help="the baseline row is the full recipe (to measure extras on it)"
    )
    p.add_argument("--name", help="results name (default: the setting's name)")
    p.add_argument("--extra", action="append", default=[], help="one more Hydra override for every run")
    p.add_argument("--out-dir", default=str(C.RESULTS))
    args = p.parse_args(argv)
    if args.full and args.cpu_full:
        p.error("--full and --cpu-full are two settings: pick one")
    s = C.pick_settings(
        CPU_FULL if args.cpu_full else SETTINGS,
        FULL,
        args.full,
        {
            "device": args.device,
            "data_dir": args.data_dir,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "limit_train": args.limit_train,
            "limit_test": args.limit_test,
            "batch_size": args.batch_size,
            "widths": tuple(int(w) for w in args.widths.split(",")) if args.widths else None,
            "precision": args.precision,
            "threads": args.threads,
            "name": args.name,
        },
    )
    if not Path(s["data_dir"], "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST not found in {s['data_dir']} (the four idx .gz files); pass --data-dir")
    device = C.resolve_device(s["device"])
    C.setup_torch(device, s["threads"])
    base = [*base_overrides(s, C.accelerator(device)), f"seed={args.first_seed}", *args.extra]
    define = definitions(base, s["batch_size"])
    header = [recipe_line(base, define)]
    if args.on_recipe:
        base += full_overrides(define)
        header.append(f"The baseline row here is the full recipe ({'+'.join(TRICKS)}).")
    sweep = Path(args.out_dir).resolve() / f"ablation_{s['name']}"
    code = 0
    with C.quiet():
        warm_up(base)
        try:
            ablate.main(
                [
                    *base,
                    f"hydra.sweep.dir={sweep}",
                    f"ablate.tricks=[{args.tricks}]",
                    f"ablate.seeds={s['seeds']}",
                    f"ablate.mode={args.mode}",
                    f"+ablate.define={_hydra_value(define)}",
                ]
            )
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    data = "all training images" if s["limit_train"] is None else f"first {s['limit_train']:,} training images"
    data += ", the official test set" if s["limit_test"] is None else f", first {s['limit_test']:,} test images"
    md = "\n\n".join(
        [
            f"Trick ablation on Fashion-MNIST ({data}; 10% of the training images held out for validation), ResNet "
            f"widths {list(s['widths'])} x {s['blocks_per_stage']} block(s) per stage, batch {s['batch_size']}, "
            f"{s['epochs']} epoch(s) for every row, precision {s['precision']}; jobs, CSV and plot in `{sweep.name}/`.",
            *header,
            (sweep / "ablation.md").read_text().strip() if (sweep / "ablation.md").is_file() else "(no report)",
            f"Machine: {C.machine(device)}; {C.stamp()}.",
        ]
    )
    (sweep.parent / f"{sweep.name}.md").write_text(md + "\n")
    print(f"wrote {sweep.parent / f'{sweep.name}.md'}", file=sys.stderr)
    return code, md


def _hydra_value(define: dict) -> str:
    """``define`` in Hydra's override grammar (every override quoted: it contains ``=``)."""

    def items(d: dict) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"

    return items(
        {
            n: items({g: "[" + ", ".join(f'"{o}"' for o in group) + "]" for g, group in d.items()})
            for n, d in define.items()
        }
    )


if __name__ == "__main__":
    sys.exit(main()[0])
