"""One contract every Source/Sink pair passes: memory, JSONL files and the real Kafka broker (through
kafka-python and through confluent-kafka).

Each backend creates topics, sinks and sources; the tests only speak reloop.connectors.base.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reloop.connectors.files.jsonl import JsonlSink, JsonlSource
from reloop.connectors.files.jsonl import create_topic as create_jsonl_topic
from reloop.connectors.memory import MemoryLog, MemorySink, MemorySource
from reloop.engine.streams import Record, Sink, Source, TopicPartition

IDLE_TIMEOUT_S = 0.3


class MemoryBackend:
    keeps_keys = True
    keeps_timestamps = True

    def __init__(self) -> None:
        self.log = MemoryLog()

    def create_topic(self, topic: str, partitions: int) -> None:
        self.log.create(topic, partitions)

    def sink(self, topic: str) -> Sink:
        return MemorySink(self.log, topic)

    def source(self, topics: list[str]) -> Source:
        return MemorySource(self.log, topics)


class JsonlBackend:
    keeps_keys = False
    keeps_timestamps = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.counts: dict[str, int] = {}

    def create_topic(self, topic: str, partitions: int) -> None:
        create_jsonl_topic(self.root, topic, partitions)
        self.counts[topic] = partitions

    def sink(self, topic: str) -> Sink:
        return JsonlSink(root=self.root, topic=topic, partitions=self.counts[topic])

    def source(self, topics: list[str]) -> Source:
        return JsonlSource(root=self.root, topics=topics)


class KafkaBackend:
    keeps_keys = True
    keeps_timestamps = True

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def create_topic(self, topic: str, partitions: int) -> None:
        from reloop.connectors.kafka.admin import create_topics

        create_topics(self.bootstrap, {topic: partitions})

    def sink(self, topic: str) -> Sink:
        from reloop.connectors.kafka.sink import KafkaSink

        return KafkaSink(bootstrap=self.bootstrap, topic=topic)

    def source(self, topics: list[str]) -> Source:
        from reloop.connectors.kafka.source import KafkaSource

        return KafkaSource(bootstrap=self.bootstrap, topics=topics)


class ConfluentBackend(KafkaBackend):
    """The confluent-kafka (librdkafka) Source and Sink on the same real broker."""

    def sink(self, topic: str) -> Sink:
        from reloop.connectors.confluent.sink import ConfluentSink

        return ConfluentSink(bootstrap=self.bootstrap, topic=topic)

    def source(self, topics: list[str]) -> Source:
        from reloop.connectors.confluent.source import ConfluentSource

        return ConfluentSource(bootstrap=self.bootstrap, topics=topics)


Backend = MemoryBackend | JsonlBackend | KafkaBackend | ConfluentBackend


@pytest.fixture(
    params=[
        "memory",
        "jsonl",
        pytest.param("kafka", marks=pytest.mark.kafka),
        pytest.param("confluent", marks=pytest.mark.kafka),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend()
    elif request.param == "jsonl":
        yield JsonlBackend(tmp_path / "jsonl")
    elif request.param == "kafka":
        yield KafkaBackend(request.getfixturevalue("kafka_broker").bootstrap)
    else:
        yield ConfluentBackend(request.getfixturevalue("kafka_broker").bootstrap)


@pytest.fixture
def sources() -> Iterator[Callable[[Source], Source]]:
    """Registers sources so each is closed even when an assertion fails."""
    opened: list[Source] = []
    yield lambda s: opened.append(s) or s
    for s in opened:
        s.close()


# Recent stamps: a real broker's time-based retention (7 days) deletes records stamped years ago at its next
# check (30 s after it starts, then every 5 minutes), before a test reads them.
RECENT_MS = int(time.time() * 1000) - 3_600_000


def produce(backend: Backend, topic: str, items: list[tuple[bytes | None, bytes]], ts0: int = RECENT_MS):
    sink = backend.sink(topic)
    for i, (key, value) in enumerate(items):
        sink.send(value, key=key, timestamp_ms=ts0 + i)
    sink.flush()
    sink.close()


def drain(source: Source, count: int, max_records: int = 1000, deadline_s: float = 20.0) -> list[Record]:
    """Poll until ``count`` records arrived (Kafka fetches are asynchronous) or fail after ``deadline_s``."""
    out: list[Record] = []
    deadline = time.monotonic() + deadline_s
    while len(out) < count and time.monotonic() < deadline:
        # Never ask for more than is still wanted: a poll may return fewer than it is allowed to.
        out += source.poll(min(max_records, count - len(out)), 0.5)
    assert len(out) == count, f"expected {count} records, got {len(out)}"
    return out


def test_implements_the_protocols(backend: Backend, unique_topic) -> None:
    topic = unique_topic("proto")
    backend.create_topic(topic, 1)
    sink = backend.sink(topic)
    source = backend.source([topic])
    assert isinstance(sink, Sink)
    assert isinstance(source, Source)
    sink.close()
    source.close()


def test_order_within_a_partition(backend: Backend, unique_topic, sources) -> None:
    topic = unique_topic("order")
    backend.create_topic(topic, 1)
    sent = [(b"k%d" % (i % 7), b'{"n": %d}' % i) for i in range(60)]
    produce(backend, topic, sent)

    source = sources(backend.source([topic]))
    assert source.partitions() == [TopicPartition(topic, 0)]
    source.open()
    assert source.position() == {TopicPartition(topic, 0): 0}
    got = drain(source, len(sent))

    assert [r.value for r in got] == [v for _, v in sent]
    assert [r.offset for r in got] == list(range(len(sent)))
    assert all(r.topic == topic and r.partition == 0 for r in got)
    if backend.keeps_keys:
        assert [r.key for r in got] == [k for k, _ in sent]
    if backend.keeps_timestamps:
        assert [r.timestamp_ms for r in got] == [RECENT_MS + i for i in range(len(sent))]
    assert source.position() == {TopicPartition(topic, 0): len(sent)}


def test_poll_respects_max_records(backend: Backend, unique_topic, sources) -> None:
    topic = unique_topic("max")
    backend.create_topic(topic, 1)
    produce(backend, topic, [(None, b"%d" % i) for i in range(25)])
    source = sources(backend.source([topic]))
    source.open()
    got: list[Record] = []
    deadline = time.monotonic() + 20
    while len(got) < 25 and time.monotonic() < deadline:
        batch = source.poll(4, 0.5)
        assert len(batch) <= 4
        got += batch
    assert [r.value for r in got] == [b"%d" % i for i in range(25)]


def test_resume_from_position_yields_exactly_the_rest(backend: Backend, unique_topic, sources) -> None:
    topic = unique_topic("resume")
    backend.create_topic(topic, 1)
    values = [b'{"i": %d}' % i for i in range(40)]
    produce(backend, topic, [(None, v) for v in values])

    first = sources(backend.source([topic]))
    first.open()
    head = drain(first, 13, max_records=13)
    saved = first.position()
    first.close()
    assert saved == {TopicPartition(topic, 0): 13}

    second = sources(backend.source([topic]))
    second.open(saved)
    rest = drain(second, len(values) - 13)
    assert [r.value for r in head + rest] == values
    assert [r.offset for r in rest] == list(range(13, 40))
    # Nothing after the end: the resumed source is idle, not replaying.
    assert second.poll(100, IDLE_TIMEOUT_S) == []


def test_idle_poll_returns_empty_quickly(backend: Backend, unique_topic, sources) -> None:
    topic = unique_topic("idle")
    backend.create_topic(topic, 1)
    source = sources(backend.source([topic]))
    source.open()
    source.poll(10, IDLE_TIMEOUT_S)  # first poll may spend its time on connection setup
    for _ in range(3):
        began = time.monotonic()
        batch = source.poll(10, IDLE_TIMEOUT_S)
        elapsed = time.monotonic() - began
        assert batch == []
        assert elapsed < 2 * IDLE_TIMEOUT_S, (
            f"idle poll took {elapsed:.3f} s for a {IDLE_TIMEOUT_S} s timeout"
        )

    # Data that arrives after an idle poll is delivered by the next ones.
    produce(backend, topic, [(None, b"late")])
    assert [r.value for r in drain(source, 1)] == [b"late"]


def test_close_is_idempotent(backend: Backend, unique_topic) -> None:
    topic = unique_topic("close")
    backend.create_topic(topic, 1)
    sink = backend.sink(topic)
    sink.send(b"x")
    sink.close()
    sink.close()
    source = backend.source([topic])
    source.open()
    drain(source, 1)
    source.close()
    source.close()


def test_multi_partition_reads_every_partition_in_order(backend: Backend, unique_topic, sources) -> None:
    topic = unique_topic("multi")
    backend.create_topic(topic, 3)
    sent = [(b"user-%d" % (i % 11), b"%d" % i) for i in range(120)]
    produce(backend, topic, sent)

    source = sources(backend.source([topic]))
    assert source.partitions() == [TopicPartition(topic, p) for p in range(3)]
    source.open()
    got = drain(source, len(sent))

    assert sorted(r.value for r in got) == sorted(v for _, v in sent)
    by_partition: dict[int, list[Record]] = {}
    for r in got:
        by_partition.setdefault(r.partition, []).append(r)
    assert len(by_partition) > 1, "11 keys over 3 partitions all landed on one"
    for records in by_partition.values():
        # Within a partition: consecutive offsets and the order they were sent in.
        assert [r.offset for r in records] == list(range(len(records)))
        assert [int(r.value) for r in records] == sorted(int(r.value) for r in records)
    assert source.position() == {TopicPartition(topic, p): len(by_partition.get(p, [])) for p in range(3)}


def test_resume_across_partitions(backend: Backend, unique_topic, sources) -> None:
    topic = unique_topic("mresume")
    backend.create_topic(topic, 3)
    sent = [(b"k%d" % (i % 5), b"%d" % i) for i in range(90)]
    produce(backend, topic, sent)

    first = sources(backend.source([topic]))
    first.open()
    head = drain(first, 30, max_records=30)
    saved = first.position()
    first.close()
    assert sum(saved.values()) == 30

    second = sources(backend.source([topic]))
    second.open(saved)
    rest = drain(second, 60)
    assert sorted(r.value for r in head + rest) == sorted(v for _, v in sent)
    for r in rest:
        assert r.offset >= saved[TopicPartition(topic, r.partition)]


def test_same_key_same_partition(backend: Backend, unique_topic, sources) -> None:
    topic = unique_topic("keys")
    backend.create_topic(topic, 4)
    keys = [b"imp-%d" % i for i in range(20)]
    sent = [(keys[i % len(keys)], b"%d:%d" % (i % len(keys), i)) for i in range(100)]
    produce(backend, topic, sent)

    source = sources(backend.source([topic]))
    source.open()
    got = drain(source, len(sent))
    partition_of: dict[bytes, set[int]] = {}
    for r in got:
        key_index = r.value.split(b":")[0]
        partition_of.setdefault(key_index, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in partition_of.values()), partition_of
    assert len({p for parts in partition_of.values() for p in parts}) > 1
