"""Shared fixtures: composing the shipped Hydra config, tiny trainers, the real-data folder."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from lightning_tricks._lightning import Callback
from lightning_tricks.train import config_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LT_SHARED_DATA", ROOT.parent / "shared" / "data"))


# optional extras of pyproject.toml -> the module each one installs (tests that need one carry
# ``needs_extra(name)``: marked ``extras`` and skipped, with the install command, when it is absent)
EXTRAS = {
    "sweep": "hydra_plugins.hydra_optuna_sweeper",
    "cluster": "hydra_plugins.hydra_submitit_launcher",
    "timm": "timm",
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported; a missing parent package (``hydra_plugins``) counts as absent."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def extra_marks(extra: str) -> list[pytest.MarkDecorator]:
    """Marks of a test (or ``pytest.param``) that needs the optional extra ``extra`` (see ``EXTRAS``)."""
    return [
        pytest.mark.extras,
        pytest.mark.skipif(
            not installed(EXTRAS[extra]), reason=f"needs the '{extra}' extra: pip install -e \".[{extra}]\""
        ),
    ]


def needs_extra(extra: str) -> Callable[[Callable], Callable]:
    """Decorator form of :func:`extra_marks`."""

    def decorate(test: Callable) -> Callable:
        for mark in extra_marks(extra):
            test = mark(test)
        return test

    return decorate


class EndProcessGroup(Callback):
    """Ends the gloo group when a DDP worker's fit ends; put it last in the callbacks. Left to process exit,
    gloo's threads sometimes abort the worker ("terminate called without an active exception", return code
    -6) after a run that finished correctly."""

    def teardown(self, trainer, pl_module, stage) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def write_fashion_like(directory: Path, n_train: int, n_test: int) -> Path:
    """Four Fashion-MNIST idx files in ``directory``: ``n_train`` training and ``n_test`` test 28x28 images
    whose class is their brightness band (so a model can learn it in a few steps)."""
    import numpy as np

    from lightning_tricks.data.files import write_idx

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = (rng.integers(0, 40, (n, 28, 28)) + 20 * y[:, None, None]).astype(np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", y)
    return directory


def compose_train(overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None) -> DictConfig:
    """The training config as ``python -m lightning_tricks.train OVERRIDES`` would see it."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contending ones (and CI has two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg("model=resnet", ...)``: a composed config writing into ``tmp_path``, quiet and tiny."""

    def make(*overrides: str) -> DictConfig:
        return compose_train(["trainer=debug", *overrides], output_dir=tmp_path)

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
