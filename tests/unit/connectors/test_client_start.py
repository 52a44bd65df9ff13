"""kafka-python clients that fail to start leave no network thread behind (connectors/kafka/client_start.py):
kafka-python 3.0.12 raised from a failed bootstrap with the thread still retrying the broker, for the life
of the process (one per readiness probe of a starting broker, say)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from kafka.errors import KafkaError
from reloop.connectors.kafka.admin import admin_client, offsets_for_times
from reloop.connectors.kafka.group_source import KafkaGroupSource
from reloop.connectors.kafka.local_broker import _metadata_ok
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource

NOBODY = "127.0.0.1:9"  # discard: nothing listens
FAST = {"bootstrap_timeout_ms": 500}


def _source_open() -> None:
    source = KafkaSource(bootstrap=NOBODY, topics=["t"], client_config=FAST)
    try:
        source.open()
    finally:
        source.close()


STARTS: dict[str, Callable[[], object]] = {
    "admin": lambda: admin_client(NOBODY, FAST),
    "source": _source_open,
    "group source": lambda: KafkaGroupSource(
        bootstrap=NOBODY, topics=["t"], group_id="g", client_config=FAST
    ),
    "sink": lambda: KafkaSink(bootstrap=NOBODY, topic="t", client_config=FAST),
    "offsets for a time": lambda: offsets_for_times(NOBODY, ["t"], 0, client_config=FAST),
}


@pytest.mark.parametrize("start", sorted(STARTS))
def test_a_client_that_cannot_bootstrap_leaves_no_thread_behind(start: str) -> None:
    before = set(threading.enumerate())
    with pytest.raises(KafkaError):
        STARTS[start]()
    assert _left(before) == []


def test_a_failed_readiness_probe_leaves_no_thread_behind() -> None:
    before = set(threading.enumerate())
    ok, why = _metadata_ok(NOBODY, 0.5)
    assert not ok and "cannot connect" in why
    assert _left(before) == []


def _left(before: set[threading.Thread]) -> list[str]:
    deadline = time.monotonic() + 5
    while (left := [t.name for t in set(threading.enumerate()) - before if t.is_alive()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    return left
