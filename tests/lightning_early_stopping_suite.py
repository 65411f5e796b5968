"""Run Lightning's own ``test_early_stopping.py`` with our ``EarlyStopping`` swapped in for Lightning's.

Usage::

    python tests/lightning_early_stopping_suite.py LIGHTNING_CHECKOUT [--ref 2.6.5] [pytest args...]

``LIGHTNING_CHECKOUT`` is a clone of https://github.com/Lightning-AI/pytorch-lightning (a git directory,
bare or not; ``--ref`` picks the tag matching the installed Lightning) or an unpacked source tree. The
test file and the helpers it imports are copied into a temporary directory, their imports moved from
``lightning.pytorch`` / ``lightning.fabric`` to ``pytorch_lightning`` / ``lightning_fabric`` (our declared
dependency), and a ``conftest.py`` there replaces ``EarlyStopping`` in ``pytorch_lightning.callbacks``
(and its module) by ``lightning_tricks.callbacks.EarlyStopping`` before the tests import it, so every
test, mock and subclass in the file meets ours. Nothing of Lightning's is kept in this repository.
``tests/test_early_stopping.py`` runs this when ``LIGHTNING_SRC`` names a checkout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FILES = (
    "tests/tests_pytorch/__init__.py",
    "tests/tests_pytorch/conftest.py",
    "tests/tests_pytorch/callbacks/__init__.py",
    "tests/tests_pytorch/callbacks/test_early_stopping.py",
)
HELPERS = "tests/tests_pytorch/helpers"

SWAP = '''"""Every import of Lightning's EarlyStopping gets lightning_tricks' (a subclass of it)."""
import pytorch_lightning.callbacks
import pytorch_lightning.callbacks.early_stopping

from lightning_tricks.callbacks import EarlyStopping

pytorch_lightning.callbacks.EarlyStopping = EarlyStopping
pytorch_lightning.callbacks.early_stopping.EarlyStopping = EarlyStopping


def pytest_collection_modifyitems(items):
    for item in items:
        assert item.module.EarlyStopping is EarlyStopping, f"{item.nodeid} did not get lightning_tricks' EarlyStopping"
'''


def _read(source: Path, ref: str | None, path: str) -> str:
    if ref is None:
        return (source / path).read_text()
    return subprocess.run(
        ["git", "--git-dir", str(_git_dir(source)), "show", f"{ref}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _git_dir(source: Path) -> Path:
    return source / ".git" if (source / ".git").exists() else source


def _helpers(source: Path, ref: str | None) -> list[str]:
    if ref is None:
        return [str(p.relative_to(source)) for p in (source / HELPERS).glob("*.py")]
    out = subprocess.run(
        ["git", "--git-dir", str(_git_dir(source)), "ls-tree", "--name-only", f"{ref}:{HELPERS}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [f"{HELPERS}/{name}" for name in out.split() if name.endswith(".py")]


def _to_standalone(text: str) -> str:
    return text.replace("lightning.pytorch", "pytorch_lightning").replace("lightning.fabric", "lightning_fabric")


def build(source: Path, ref: str | None, into: Path) -> Path:
    """Write the swapped test tree under ``into``; returns the test file's path."""
    for path in (*FILES, *_helpers(source, ref)):
        target = into / Path(path).relative_to("tests")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_to_standalone(_read(source, ref, path)))
    (into / "conftest.py").write_text(SWAP)
    return into / "tests_pytorch" / "callbacks" / "test_early_stopping.py"


def run(source: Path, ref: str | None, pytest_args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="lightning_es_suite_") as tmp:
        root = Path(tmp)
        test_file = build(source, ref, root)
        (root / "pytest.ini").write_text("[pytest]\n")  # none of this project's pytest settings
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(root / "pytest.ini")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([*cmd, str(test_file), *pytest_args], cwd=root, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a Lightning checkout (git) or source tree")
    parser.add_argument("--ref", default=None, help="a tag or commit of the checkout (default: the files as they are)")
    args, pytest_args = parser.parse_known_args(argv)
    return run(args.source, args.ref, pytest_args)


if __name__ == "__main__":
    sys.exit(main())
