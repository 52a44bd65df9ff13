"""Every usage example (``>>>``) in the engine's and the connectors' docstrings runs and holds."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
import reloop.connectors
import reloop.engine


def _modules_with_examples() -> list[str]:
    found = []
    for package in (reloop.engine, reloop.connectors):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            if ">>>" in path.read_text(encoding="utf-8"):
                parts = path.relative_to(root).with_suffix("").parts
                found.append(".".join((package.__name__, *parts)).removesuffix(".__init__"))
    return found


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    # A broken discovery must not pass as "nothing to run".
    assert len(MODULES) >= 20 and "reloop.engine.events.sample_batch" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
