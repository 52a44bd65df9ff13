"""ThrottledWarning: a failure hit at every 100 ms step (end offsets while the broker is down) is logged
once per interval, and the next line says how many were left out."""

from __future__ import annotations

import logging

import orjson
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


def test_kafka_pythons_records_pass_once_per_template_every_10_s_and_say_how_many_were_left_out():
    # With the broker down kafka-python logged "Connection failed" ~4 times a second at ERROR: 170 of a
    # run's 198 lines in 45 s.
    import io

    from reloop.engine.runtime.jsonlog import JsonFormatter, ThrottledRecords, quiet_kafka_python

    now = [0.0]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    quiet_kafka_python(handler)
    (throttle,) = [f for f in handler.filters if isinstance(f, ThrottledRecords)]
    throttle._clock = lambda: now[0]
    quiet_kafka_python(handler)  # once per handler
    assert len(handler.filters) == 3  # the throttle, the demotion of its non-errors, its close race
    manager, ours = logging.getLogger("kafka.net.manager"), logging.getLogger("reloop.test.throttle")
    for logger in (manager, ours):
        logger.addHandler(handler)
        logger.propagate = False
    try:
        for i in range(8):
            manager.error("Connection failed: %s", f"ECONNREFUSED {i}")
            ours.error("ours %s", i)
            now[0] += 1.0
        manager.error("Metadata refresh: failed")  # another template passes at once
        now[0] += 3.0
        manager.error("Connection failed: %s", "ECONNREFUSED 8")
    finally:
        for logger in (manager, ours):
            logger.removeHandler(handler)
            logger.propagate = True
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    theirs = [line["msg"] for line in lines if line["logger"] == "kafka.net.manager"]
    assert theirs == [
        "Connection failed: ECONNREFUSED 0",
        "Metadata refresh: failed",
        "Connection failed: ECONNREFUSED 8 [7 more like it in 10 s not logged]",
    ]
    assert len([line for line in lines if line["logger"] == "reloop.test.throttle"]) == 8  # ours untouched
    assert logging.getLogger("kafka").level == logging.ERROR
