"""``Sink.close(timeout_s)`` on the real broker, stalled (SIGSTOP: connections open, nothing answered):
the close returns within its timeout and says how many records it gave up on.

kafka-python's sink closed with no bound of its own: with the broker unresponsive it waited for every
batch to expire (``delivery_timeout_ms``, 120 s), and ``reloop serve`` took as long to stop. Its
``abort`` (``close(timeout=0)``) raised from kafka-python's flush and closed nothing: the producer and
its sender thread went on running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka

N = 20


def _all_threads_stopped(pid: int) -> bool:
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            stat = (task / "stat").read_text()
            states.append(stat.rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state in ("T", "t") for state in states)


@contextlib.contextmanager
def stalled(broker) -> Iterator[None]:
    os.kill(broker.pid, signal.SIGSTOP)
    try:
        # The signal is delivered thread by thread: on busy cores a broker thread could still answer a
        # request sent at once (a run at load 6 saw the stalled broker take every record).
        deadline = time.monotonic() + 10.0
        while not _all_threads_stopped(broker.pid):
            assert time.monotonic() < deadline, "the broker did not stop on SIGSTOP"
            time.sleep(0.01)
        yield
    finally:
        os.kill(broker.pid, signal.SIGCONT)


def _kafka_python(bootstrap: str, topic: str):
    from reloop.connectors.kafka.sink import KafkaSink

    return KafkaSink(bootstrap=bootstrap, topic=topic, client_config={"request_timeout_ms": 30_000})


def _confluent(bootstrap: str, topic: str):
    from reloop.connectors.confluent.sink import ConfluentSink

    return ConfluentSink(bootstrap=bootstrap, topic=topic, client_config={"message.timeout.ms": 0})


@pytest.mark.parametrize("make", [_kafka_python, _confluent], ids=["kafka-python", "confluent"])
def test_close_with_a_timeout_gives_up_in_time_and_counts_what_it_gave_up(kafka_broker, unique_topic, make):
    from reloop.connectors.kafka.admin import create_topics

    topic = unique_topic("close")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    sink = make(kafka_broker.bootstrap, topic)
    sink.send(b"first", key=b"k")
    sink.flush(30)  # connected, metadata known: later sends are queued without waiting
    with stalled(kafka_broker):
        for i in range(N):
            sink.send(b"v%d" % i, key=b"k")
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=f"{N} record"):
            sink.close(timeout_s=1.0)
        took = time.monotonic() - started
        sink.close(timeout_s=1.0)  # twice is harmless
    assert took < 5.0, took


def test_kafka_python_abort_releases_a_producer_that_holds_records(kafka_broker, unique_topic):
    from reloop.connectors.kafka.admin import create_topics

    topic = unique_topic("abort")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    sink = _kafka_python(kafka_broker.bootstrap, topic)
    producer = sink._producer
    sink.send(b"first", key=b"k")
    sink.flush(30)
    given_up: list[BaseException] = []
    with stalled(kafka_broker):
        sink.send(b"second", key=b"k", on_failure=given_up.append)
        started = time.monotonic()
        sink.abort()
        assert time.monotonic() - started < 5.0
        deadline = time.monotonic() + 5.0
        while producer._sender.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not producer._sender.is_alive()  # the sender thread stopped: nothing left running
    assert len(given_up) == 1  # the record's own on_failure ran: a sender can send exactly it again
