"""The confluent-kafka sources while the broker does not answer. A synchronous commit held the consumer's
poll for as long as the broker was away (librdkafka serialises them: 46 s here), and close() waited on
the commits in flight longer than the 30 s a stop may take: `reloop train` on confluent-kafka was forced
out of its stop with exit 1. Commits are asynchronous now and close returns within its bound."""

from __future__ import annotations

import threading
import time

import pytest
from reloop.connectors.confluent.group_source import ConfluentGroupSource
from reloop.connectors.confluent.source import ConfluentSource
from reloop.engine.streams import TopicPartition


class _Unanswered:
    """A consumer whose synchronous commits and close wait for a broker that never answers."""

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.commits: list[bool] = []

    def commit(self, offsets, asynchronous: bool = True) -> None:
        self.commits.append(asynchronous)
        if not asynchronous:
            self.answer.wait()

    def close(self) -> None:
        self.answer.wait()


@pytest.fixture
def consumer():
    c = _Unanswered()
    yield c
    c.answer.set()


def _source(consumer: _Unanswered) -> ConfluentSource:
    src = ConfluentSource(bootstrap="127.0.0.1:1", topics=["samples"], group_id="g")
    src._consumer = consumer  # type: ignore[assignment]
    return src


def test_a_commit_never_waits_for_the_broker(consumer) -> None:
    src = _source(consumer)
    started = time.monotonic()
    for offset in range(20):  # one per checkpoint through an outage
        src.commit({TopicPartition("samples", 0): offset})
    assert time.monotonic() - started < 0.5 and consumer.commits == [True] * 20


def test_the_source_closes_within_its_bound_when_the_broker_does_not_answer(consumer, caplog) -> None:
    src = _source(consumer)
    started = time.monotonic()
    src.close(timeout_s=0.2)
    assert time.monotonic() - started < 1.0
    assert any("left behind" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match="closed"):
        src.commit({TopicPartition("samples", 0): 1})


def test_the_group_source_closes_within_its_bound_when_the_broker_does_not_answer(consumer) -> None:
    group = ConfluentGroupSource.__new__(ConfluentGroupSource)  # no client: only close is under test
    group._consumer = consumer  # type: ignore[assignment]
    started = time.monotonic()
    group.close(timeout_s=0.2)
    assert time.monotonic() - started < 1.0 and group._consumer is None
