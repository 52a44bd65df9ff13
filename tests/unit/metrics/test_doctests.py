"""The usage examples in the metrics modules' docstrings run."""

from __future__ import annotations

import doctest

import pytest
import reloop.connectors.metrics.prometheus
import reloop.engine.metrics.online
import reloop.engine.metrics.rolling_batch
import reloop.engine.metrics.stats

MODULES = [
    reloop.engine.metrics.stats,
    reloop.engine.metrics.online,
    reloop.engine.metrics.rolling_batch,
    reloop.connectors.metrics.prometheus,
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0
