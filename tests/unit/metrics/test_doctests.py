"""The usage examples in the metrics modules' docstrings run."""

from __future__ import annotations

import doctest

import pytest

import connectors.metrics.prometheus
import engine.metrics.online
import engine.metrics.registry
import engine.metrics.rolling_batch

MODULES = [
    engine.metrics.registry,
    engine.metrics.online,
    engine.metrics.rolling_batch,
    connectors.metrics.prometheus,
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0
