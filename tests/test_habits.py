"""The habits CI enforces: the linters find what they should, and the release files ship."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest
from conftest import ROOT


def _run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_ruff_finds_a_lint_and_a_format_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=[1,\n  2]\n")
    config = str(ROOT / "pyproject.toml")
    lint = _run("ruff", "check", "--config", config, str(bad))
    assert lint.returncode != 0 and "F401" in lint.stdout
    fmt = _run("ruff", "format", "--check", "--config", config, str(bad))
    assert fmt.returncode != 0
    assert _run("ruff", "check", "lightning_tricks", "tests", "benchmarks").returncode == 0
    assert _run("ruff", "format", "--check", "lightning_tricks", "tests", "benchmarks").returncode == 0


def test_mypy_finds_a_type_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: int) -> str:\n    return x\n")
    r = _run("mypy", "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental", str(bad), cwd=tmp_path)
    assert r.returncode != 0 and "Incompatible return value type" in r.stdout


@pytest.mark.slow
def test_sdist_ships_license_and_changelog(tmp_path):
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (sdist,) = tmp_path.glob("lightning_tricks-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"LICENSE", "CHANGELOG.md", "lightning_tricks/py.typed"} <= names
