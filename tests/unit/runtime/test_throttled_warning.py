"""ThrottledWarning: a failure hit at every 100 ms step (end offsets while the broker is down) is logged
once per interval, and the next line says how many were left out."""

from __future__ import annotations

import logging

import pytest
from reloop.engine.runtime.jsonlog import ThrottledWarning


def test_repeats_within_the_interval_are_counted_into_the_next_line(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    warn = ThrottledWarning(logging.getLogger("t"), "offsets unavailable", every_s=10, clock=lambda: now[0])
    for step in range(100):  # 10 s of 100 ms steps
        now[0] = step / 10
        warn(error="down")
    now[0] = 10.0
    warn(error="down")  # 10 s after the first: logged, with the 99 left out
    lines = [r for r in caplog.records if r.name == "t"]
    assert [r.fields for r in lines] == [{"error": "down"}, {"error": "down", "suppressed": 99}]
    assert all(r.levelname == "WARNING" for r in lines)
