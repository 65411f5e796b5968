"""The examples in the docstrings run and print what they say (STYLE.md: examples that run)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_tricks

MODULES = sorted(m.name for m in pkgutil.walk_packages(lightning_tricks.__path__, "lightning_tricks."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} docstring examples in {name} failed "
        f"(run: python -m doctest -v {module.__file__})"
    )
