"""The service's GIL switch interval: set while it serves (a request waits at most that long for the GIL
held by the reload watcher or the log's poll thread), put back when it closes, refused when not > 0."""

from __future__ import annotations

import sys

import pytest
from reloop.engine.serve.config import ConfigError, serve_config_from_dict
from reloop.engine.serve.stack import ServingStack

SPEC = {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}


def _config(tmp_path, **serve):
    return serve_config_from_dict(
        {
            "serve": {"port": 0, "log": {"enabled": False}, **serve},
            "arms": [
                {
                    "name": "A",
                    "registry": str(tmp_path / "reg"),
                    "cold_start": {"backbone": "lr", "spec": SPEC},
                }
            ],
        }
    )


@pytest.fixture
def python_default():
    before = sys.getswitchinterval()
    yield before
    sys.setswitchinterval(before)


def test_the_service_serves_under_its_switch_interval_and_puts_python_s_back(tmp_path, python_default):
    stack = ServingStack(_config(tmp_path)).start()
    try:
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert stack.arms["A"].holder.version == 0  # it did start: the cold-start model is live
    finally:
        stack.close()
    assert sys.getswitchinterval() == pytest.approx(python_default)


def test_a_configured_interval_is_used_and_null_keeps_python_s(tmp_path, python_default):
    stack = ServingStack(_config(tmp_path, gil_switch_interval_ms=2)).start()
    try:
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        stack.close()
    stack = ServingStack(_config(tmp_path, gil_switch_interval_ms=None)).start()
    try:
        assert sys.getswitchinterval() == pytest.approx(python_default)
    finally:
        stack.close()


@pytest.mark.parametrize("bad", [0, -1])
def test_an_interval_that_is_not_positive_is_refused_naming_the_key(tmp_path, bad):
    with pytest.raises(ConfigError, match="gil_switch_interval_ms"):
        _config(tmp_path, gil_switch_interval_ms=bad)
