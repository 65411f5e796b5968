"""What each trick buys: a "Bag of Tricks" ablation on Fashion-MNIST through the shipped Hydra configs.

Every run is ``lightning_tricks.train.train(cfg)`` on a config composed from ``conf/`` exactly as
``python -m lightning_tricks.train OVERRIDES`` would compose it, starting from
``experiment=baseline_fashion_mnist`` (the small ResNet, SGD with momentum 0.9 at a constant LR, weight
decay on every parameter). The tricks of the shipped recipe ``experiment=bag_of_tricks_fashion_mnist``, in
the order of He et al. 2019 ("Bag of Tricks for Image Classification with Convolutional Neural Networks",
arXiv:1812.01187), and the overrides that turn each on:

============== ===================================================================================
warmup         linear scaling + warmup: ``+callbacks=[linear_scaling]``, LR given at batch 256
               (``optimizer.lr = lr * 256 / batch``: the same LR as the baseline at the
               benchmark's batch), ``schedule=warmup`` (5% linear warmup)
cosine         ``schedule=warmup_cosine`` (``schedule=cosine`` without warmup)
no_bias_decay  ``optimizer.no_decay_bias_norm=true``
label_smooth   ``module.label_smoothing=0.1``
ema            ``+callbacks=[ema]`` (decay 0.999 with warmup; validated and tested on the average)
============== ===================================================================================

Before training it checks that its ``full`` row composes to the shipped recipe (same optimizer, schedule,
module, model, augmentation and trick callbacks) and says so, or what differs, above the tables. Tricks
left out of the recipe (flips, shifts, cutout of two sizes, mixup, IC blocks: ``EXTRAS``) are measured on
top of it by the variants ``full+<name>``, run only when asked for.

It trains the baseline, then adds the tricks one at a time (the last row is the full recipe), then
removes each trick from the full recipe (``full − ema`` is the row above ``full``: trained once), over N
seeds at a fixed number of epochs, and reports validation and test accuracy mean ± std, the per-seed
changes against the baseline and the full recipe, and the fit wall time. The target (issues 10 and 16):
the full recipe beats the baseline by at least 1 point of test accuracy at equal epochs. The recipe is
chosen on the validation split (10% of the training images); the test set is only reported.

    python benchmarks/ablation.py                           # CPU setting: a Fashion-MNIST subset, ~2 min
    python benchmarks/ablation.py --cpu-full                # all of Fashion-MNIST, 1 epoch, 3 seeds, ~30 min on 1 core
    python benchmarks/ablation.py --full --device cuda      # GPU setting: all of Fashion-MNIST, 10 epochs, 3 seeds
    python benchmarks/ablation.py --variants baseline,full --epochs 3 --seeds 2
    python benchmarks/ablation.py --variants=-ema,full+flip,full+cutout    # a name starting with '-': use '='
    python benchmarks/ablation.py --full --device cuda --seeds 1 --first-seed 1 --name full_s1   # one seed per call
    python benchmarks/ablation.py --full --merge results/ablation_full_s0.csv results/ablation_full_s1.csv ...

Writes ``benchmarks/results/ablation_<setting>.md`` (the tables) and ``.csv`` (one row per run), both
rewritten after every run, so a run stopped early leaves the rows it finished.
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

RECIPE = "bag_of_tricks_fashion_mnist"  # the shipped recipe the ``full`` row must equal (checked before training)
BASELINE = "baseline_fashion_mnist"

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
    "precision": "32-true",
    "variants": None,  # None: baseline, the cumulative additions, then the removals
}

#: the CPU setting of issue 16: all 60,000 training images, the official test set, 3 seeds, sized to
#: about 30 minutes on one core of a quiet 2-core machine (12 distinct runs per seed, ~45 s each)
CPU_FULL: dict[str, Any] = {
    **SETTINGS,
    "name": "cpu_full",
    "limit_train": None,
    "limit_test": None,
    "epochs": 1,
    "seeds": [0, 1, 2],
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

#: (key, label) in the order the tricks are added: the tricks of the shipped recipe
TRICKS: list[tuple[str, str]] = [
    ("warmup", "linear scaling + warmup"),
    ("cosine", "cosine decay"),
    ("no_bias_decay", "no bias/norm weight decay"),
    ("label_smooth", "label smoothing 0.1"),
    ("ema", "EMA of the weights"),
]
KEYS = [k for k, _ in TRICKS]

#: tricks left out of the recipe, measured on top of it (variants ``full+<name>``, run only when asked):
#: name -> (label, Hydra overrides, callbacks). Augmentation is here: at the CPU setting's budget (one
#: epoch) flips and cutout cost accuracy on the validation split (benchmarks/README.md).
EXTRAS: dict[str, tuple[str, list[str], list[str]]] = {
    "flip": ("horizontal flips", ["data.augment=crop_flip", "data.augment_options.padding=0"], []),
    "crop_flip": ("flips + shifts of ±2 px", ["data.augment=crop_flip", "data.augment_options.padding=2"], []),
    "cutout": (
        "cutout, 14 px square (conf/callbacks/cutout.yaml: size 0.5)",
        ["callbacks.cutout.size=0.5"],
        ["cutout"],
    ),
    "cutout_small": ("cutout, 7 px square (size 0.25)", ["callbacks.cutout.size=0.25"], ["cutout"]),
    "mixup": ("mixup (alpha 0.2)", [], ["mixup"]),
    "ic": ("IC blocks (BN + dropout 0.1 before each conv)", ["model.norm=ic", "model.dropout=0.1"], []),
}


def all_variants() -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (group, tricks on): ``baseline``, ``+<trick>`` cumulative (ending at ``full``), ``-<trick>``,
    then ``full+<extra>`` (a trick left out of the recipe, added to it)."""
    out: dict[str, tuple[str, frozenset[str]]] = {"baseline": ("add", frozenset())}
    on: list[str] = []
    for key in KEYS:
        on.append(key)
        name = "full" if len(on) == len(KEYS) else f"+{key}"
        out[name] = ("add", frozenset(on))
    for key in KEYS:
        out[f"-{key}"] = ("remove", frozenset(KEYS) - {key})
    for extra in EXTRAS:
        out[f"full+{extra}"] = ("extra", frozenset(KEYS) | {f"extra:{extra}"})
    return out


VARIANTS = all_variants()
#: the variants run by default: every ``add`` and ``remove`` row (``full+<extra>`` only when asked)
DEFAULT_VARIANTS = [n for n, (g, _) in VARIANTS.items() if g != "extra"]


def setting_overrides(s: dict, seed: int, output_dir: str, accelerator: str) -> list[str]:
    """The overrides every run of a setting shares (data, model size, epochs, device, seed, output)."""
    return [
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


def overrides(tricks: frozenset[str], s: dict, seed: int, output_dir: str, accelerator: str) -> list[str]:
    """The Hydra overrides of one run: ``experiment=baseline_fashion_mnist`` + the setting + its tricks."""
    extras = sorted(t.split(":", 1)[1] for t in tricks if t.startswith("extra:"))
    unknown = (set(tricks) - set(KEYS) - {f"extra:{e}" for e in extras}) | (set(extras) - set(EXTRAS))
    if unknown:
        raise ValueError(f"unknown tricks {sorted(unknown)}; known: {KEYS} and extras {list(EXTRAS)}")
    o = [f"experiment={BASELINE}", *setting_overrides(s, seed, output_dir, accelerator)]
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
    if not any(x.startswith("data.augment=") for x in o):
        o.append("data.augment=none")  # whatever conf/data/fashion_mnist.yaml says
    for extra in extras:
        _, extra_overrides, extra_callbacks = EXTRAS[extra]
        o += extra_overrides
        callbacks += [c for c in extra_callbacks if c not in callbacks]
    o.insert(1, f"callbacks=[{','.join(callbacks)}]")  # no checkpointing / plots: the default list is dropped
    return o


def recipe_overrides(s: dict, seed: int, output_dir: str, accelerator: str) -> list[str]:
    """The shipped recipe (``experiment=bag_of_tricks_fashion_mnist``) in the same setting."""
    return [f"experiment={RECIPE}", *setting_overrides(s, seed, output_dir, accelerator)]


#: the parts of a composed config where the tricks live (compared between ``full`` and the shipped recipe)
TRICK_KEYS = ("optimizer", "module", "schedule", "model", "data.augment", "data.augment_options", "data.flip")


def recipe_mismatch(s: dict) -> list[str]:
    """Where the ablation's ``full`` config differs from the shipped recipe in setting ``s`` (``[]``: nowhere).

    Compared: optimizer, module, schedule, model, the data augmentation, and the trick callbacks (those not in
    the default callback list, which the ablation drops: checkpoints, plots, RNG state, divergence guard).
    """
    from omegaconf import OmegaConf

    full = compose(overrides(VARIANTS["full"][1], s, 0, "/tmp/lt_ablation", "cpu"))
    recipe = compose(recipe_overrides(s, 0, "/tmp/lt_ablation", "cpu"))
    default = set(compose([f"experiment={BASELINE}"]).callbacks or {})

    def pick(cfg: Any, key: str) -> Any:
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value

    out = [
        f"{key}: ablation {pick(full, key)!r} vs recipe {pick(recipe, key)!r}"
        for key in TRICK_KEYS
        if pick(full, key) != pick(recipe, key)
    ]
    tricks = {k: pick(recipe, f"callbacks.{k}") for k in (recipe.callbacks or {}) if k not in default}
    mine = {k: pick(full, f"callbacks.{k}") for k in (full.callbacks or {})}
    if tricks != mine:
        out.append(f"callbacks: ablation {sorted(mine)} vs recipe {sorted(tricks)} (or their values differ)")
    return out


def compose(overrides_: Sequence[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_tricks.train import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides_))


def describe_tricks(tricks: frozenset[str]) -> str:
    keys = [k for k in KEYS if k in tricks] + sorted(t for t in tricks if t.startswith("extra:"))
    return "+".join(keys) or "none"


def run_one(name: str, seed: int, s: dict, accelerator: str, extra: Sequence[str] = ()) -> dict:
    from lightning_tricks.train import train

    group, tricks = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="lt_ablation_") as tmp:
        o = overrides(tricks, s, seed, tmp, accelerator)
        metrics, _ = train(compose([*o, *extra]))
    return {
        "variant": name,
        "group": group,
        "tricks": describe_tricks(tricks),
        "seed": seed,
        "test_acc": metrics["test/acc"],
        "test_loss": metrics["test/loss"],
        "val_acc": metrics.get("val/acc", float("nan")),
        "train_acc": metrics.get("train/acc", float("nan")),  # the last epoch's, on augmented batches
        "fit_s": metrics["time/fit_s"],
        "same_run_as": "",
        "overrides": " ".join([*o, *extra]),
    }


def run_plan(names: Sequence[str]) -> list[tuple[str, str | None]]:
    """``(variant, earlier variant with the same tricks or None)``: a configuration that two rows share
    (``full − <last trick>`` is the row above ``full``) is trained once and reported in both rows."""
    seen: dict[frozenset[str], str] = {}
    plan = []
    for name in names:
        tricks = VARIANTS[name][1]
        plan.append((name, seen.get(tricks)))
        seen.setdefault(tricks, name)
    return plan


# -- the tables ------------------------------------------------------------------------------------
def summarize(rows: list[dict], s: dict, machine: str, n_train: str, recipe_note: str = "") -> str:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)

    def acc(name: str, key: str = "test_acc") -> list[float]:
        return [100 * float(r[key]) for r in by.get(name, [])]

    def fit(name: str) -> list[float]:
        return [float(r["fit_s"]) for r in by.get(name, [])]

    def delta(name: str, ref: str, key: str = "test_acc") -> str:
        """mean ± std over seeds of the per-seed difference (both runs of a pair share the seed)."""
        other = {r["seed"]: float(r[key]) for r in by.get(ref, [])}
        d = [100 * (float(r[key]) - other[r["seed"]]) for r in by.get(name, []) if r["seed"] in other]
        if not d:
            return ""
        m, sd = C.mean_std(d)
        return f"{m:+.2f}" if len(d) == 1 else f"{m:+.2f} ± {sd:.2f}"

    base_t, _ = C.mean_std(fit("baseline"))
    labels = dict(TRICKS)

    def label(key: str) -> str:
        return labels[key]

    def timing(name: str) -> list[str]:
        t, _ = C.mean_std(fit(name))
        return [C.pm(fit(name), 1), f"{t / base_t:.2f}"]

    add_rows, prev = [], None
    for name, (group, _tricks) in VARIANTS.items():
        if group != "add" or name not in by:
            continue
        added = (
            "baseline (SGD + momentum, constant LR)"
            if name == "baseline"
            else ("= full recipe: + " + label(KEYS[-1]) if name == "full" else "+ " + label(name[1:]))
        )
        add_rows.append(
            [
                added,
                C.pm(acc(name, "val_acc")),
                C.pm(acc(name)),
                delta(name, "baseline"),
                "" if prev is None else delta(name, prev),
                *timing(name),
            ]
        )
        prev = name

    def vs_full(title: str, name: str) -> list[str]:  # a row of the remove / extra tables
        return [
            title,
            C.pm(acc(name, "val_acc")),
            C.pm(acc(name)),
            delta(name, "full", "val_acc"),
            delta(name, "full"),
            delta(name, "baseline"),
            *timing(name),
        ]

    remove_rows = [
        vs_full(f"full − {label(name[1:])}", name)
        for name, (group, _tricks) in VARIANTS.items()
        if group == "remove" and name in by
    ]
    extra_rows = [
        vs_full(f"full + {EXTRAS[name.split('+', 1)[1]][0]}", name)
        for name, (group, _tricks) in VARIANTS.items()
        if group == "extra" and name in by
    ]
    seeds = sorted({r["seed"] for r in rows})
    parts = [
        f"Trick ablation on Fashion-MNIST ({n_train}; 10% of the training images held out for "
        f"validation), ResNet widths {list(s['widths'])} x {s['blocks_per_stage']} block(s) per stage, batch "
        f"{s['batch_size']}, {s['epochs']} epoch(s) for every row, {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}), precision {s['precision']}. Each run: `lightning_tricks.train.train` on "
        f"`experiment={BASELINE}` + the overrides of its tricks (see the CSV). Accuracy in %, mean ± std over "
        "seeds; Δ in points, mean ± std of the per-seed differences (test accuracy unless marked val); val: "
        "the held-out split after the last epoch (what a recipe is chosen on), test: the official test set. "
        "Fit time includes the per-epoch validation.",
    ]
    if recipe_note:
        parts += ["", recipe_note]
    parts += [
        "",
        "**Adding one trick at a time** (cumulative; the last row is the full recipe):",
        "",
        C.markdown_table(
            ["recipe", "val acc %", "test acc %", "Δ vs baseline", "Δ vs row above", "fit s", "time / baseline"],
            add_rows,
            right=(1, 2, 3, 4, 5, 6),
        ),
    ]
    vs_full_header = [
        "recipe",
        "val acc %",
        "test acc %",
        "Δ val vs full",
        "Δ vs full",
        "Δ vs baseline",
        "fit s",
        "time / baseline",
    ]
    for title, table_rows in (
        ("**Removing one trick from the full recipe:**", remove_rows),
        ("**Tricks left out of the recipe, added to it:**", extra_rows),
    ):
        if table_rows:
            parts += ["", title, "", C.markdown_table(vs_full_header, table_rows, right=(1, 2, 3, 4, 5, 6, 7))]
    if "baseline" in by and "full" in by:
        gain = C.mean_std(acc("full"))[0] - C.mean_std(acc("baseline"))[0]
        verdict = "met" if gain >= 1.0 else f"missed by {1.0 - gain:.2f} points"
        parts += [
            "",
            f"Full recipe vs baseline: {gain:+.2f} points of test accuracy (per seed: {delta('full', 'baseline')}; "
            f"target ≥ +1 point at equal epochs: {verdict}).",
        ]
    parts += ["", f"Machine: {machine}; {C.stamp()}."]
    return "\n".join(parts)


def recipe_line(s: dict) -> str:
    """Whether the ``full`` row is the shipped recipe (one line for the table's header)."""
    diff = recipe_mismatch(s)
    if not diff:
        return (
            f"The full recipe is the shipped `experiment={RECIPE}` (checked before training: the same optimizer, "
            "schedule, module, model, augmentation and trick callbacks in this setting)."
        )
    return f"**The full row differs from the shipped `experiment={RECIPE}`**: {'; '.join(diff)}."


def main(argv: list[str] | None = None) -> tuple[list[dict], str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the GPU setting (FULL)")
    parser.add_argument(
        "--cpu-full", action="store_true", help="the CPU setting on all of Fashion-MNIST (CPU_FULL, ~30 min)"
    )
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
    parser.add_argument("--precision", help="Lightning precision, e.g. 32-true or bf16-mixed")
    parser.add_argument(
        "--variants",
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all but the full+<extra> ones)",
    )
    parser.add_argument("--threads", type=int)
    parser.add_argument("--name", help="results file suffix (default: the setting's name)")
    parser.add_argument("--extra", action="append", default=[], help="an extra Hydra override for every run")
    parser.add_argument("--out-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    if args.full and args.cpu_full:
        parser.error("--full and --cpu-full are two settings: pick one")
    s = C.pick_settings(
        CPU_FULL if args.cpu_full else SETTINGS,
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
            "precision": args.precision,
            "threads": args.threads,
            "name": args.name,
            "variants": args.variants.split(",") if args.variants else None,
        },
    )
    names = list(s["variants"] or DEFAULT_VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")  # every delta is taken against the baseline of the same run
    if args.merge:
        return merge(args.merge, s, args.out_dir)
    recipe_note = recipe_line(s)
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
        plan = run_plan(names)
        for seed in s["seeds"]:
            done: dict[str, dict] = {}
            for name, same_as in plan:  # interleaved: drift in the machine's load hits every variant alike
                if same_as is not None:
                    r = {**done[same_as], "variant": name, "group": VARIANTS[name][0], "same_run_as": same_as}
                else:
                    r = {**run_one(name, seed, s, acc, extra=args.extra), "machine": machine}
                    done[name] = r
                rows.append(r)
                finish(rows, s, machine, args.out_dir, recipe_note, echo=False)  # a stopped run leaves its rows
                print(
                    f"seed {seed} {name:18s} val acc {100 * r['val_acc']:6.2f}%  test acc {100 * r['test_acc']:6.2f}%"
                    f"  fit {r['fit_s']:6.1f} s" + (f"  (the run of {same_as})" if same_as else ""),
                    file=sys.stderr,
                    flush=True,
                )
        return finish(rows, s, machine, args.out_dir, recipe_note)


def describe_data(s: dict) -> str:
    return (
        ("all 60,000 training images" if s["limit_train"] is None else f"first {s['limit_train']:,} training images")
        + ", "
        + ("10,000 test images" if s["limit_test"] is None else f"first {s['limit_test']:,} test images")
    )


def finish(
    rows: list[dict], s: dict, machine: str, out_dir: str, recipe_note: str = "", echo: bool = True
) -> tuple[list[dict], str]:
    md = summarize(rows, s, machine, describe_data(s), recipe_note)
    if echo:
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
                for key in ("test_acc", "test_loss", "val_acc", "train_acc", "fit_s"):
                    if key in r:
                        r[key] = float(r[key])
                rows.append(r)
    s = {**s, "seeds": sorted({r["seed"] for r in rows})}
    machines = sorted({r.get("machine") or "unknown (CSV without a machine column)" for r in rows})
    return finish(rows, s, " / ".join(machines), out_dir, recipe_line(s))


if __name__ == "__main__":
    main()
