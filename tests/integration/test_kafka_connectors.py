"""KafkaSource / KafkaSink / admin behaviour beyond the shared contract, on the real broker."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import pytest
from kafka import TopicPartition as KafkaTopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from reloop.connectors.kafka.admin import (
    admin_client,
    create_topics,
    offsets_for_times,
    record_limit,
    topic_settings,
)
from reloop.connectors.kafka.group_source import KafkaGroupSource
from reloop.connectors.kafka.sink import KafkaSink, KafkaSinkError
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.streams import RecordTooLarge, TopicPartition

pytestmark = pytest.mark.kafka


# Recent stamps: the shared broker's time-based retention (7 days) deletes records stamped years ago at its
# next check (30 s after it starts, then every 5 minutes), before a test reads them.
RECENT_MS = int(time.time() * 1000) - 3_600_000


def fill(bootstrap: str, topic: str, n: int, ts0: int = RECENT_MS) -> None:
    sink = KafkaSink(bootstrap=bootstrap, topic=topic)
    for i in range(n):
        sink.send(b"%d" % i, key=b"k", timestamp_ms=ts0 + 1000 * i)
    sink.close()


def drain(source: KafkaSource, n: int) -> list:
    out: list = []
    for _ in range(40):
        out += source.poll(1000, 0.5)
        if len(out) >= n:
            break
    assert len(out) == n
    return out


def poll_group(source, n: int, got: list | None = None, timeout_s: float = 20.0) -> list:
    """Poll a group member until ``got`` holds ``n`` records or ``timeout_s`` passed (the caller asserts)."""
    got = [] if got is None else got
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += source.poll(100, 0.05)
    return got


def test_group_offsets_are_committed_only_on_commit(kafka_broker, unique_topic) -> None:
    topic, group = unique_topic("commit"), unique_topic("group")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    fill(kafka_broker.bootstrap, topic, 10)
    tp = TopicPartition(topic, 0)

    source = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic], group_id=group)
    source.open()
    drain(source, 10)
    assert source.committed() == {}, "reading must not commit anything"
    source.commit({tp: 6})
    assert source.committed() == {tp: 6}
    source.close()  # closing must not commit the read position (10) either

    other = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic], group_id=group)
    try:
        assert other.committed() == {tp: 6}
        other.open(other.committed())
        assert [r.value for r in drain(other, 4)] == [b"6", b"7", b"8", b"9"]
        other.commit()
        assert other.committed() == {tp: 10}
    finally:
        other.close()


def test_commit_without_group_is_refused(kafka_broker, unique_topic) -> None:
    topic = unique_topic("nogroup")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    source = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        source.open()
        with pytest.raises(RuntimeError, match="group_id"):
            source.commit()
    finally:
        source.close()


def test_offsets_for_times_starts_a_replay_at_a_time(kafka_broker, unique_topic) -> None:
    topic = unique_topic("times")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    ts0 = RECENT_MS
    fill(kafka_broker.bootstrap, topic, 10, ts0=ts0)
    tp = TopicPartition(topic, 0)

    assert offsets_for_times(kafka_broker.bootstrap, [topic], ts0 + 5_500) == {tp: 6}
    assert offsets_for_times(kafka_broker.bootstrap, [topic], ts0) == {tp: 0}
    # After the last record: the end offset, so a replay from there waits for new data.
    assert offsets_for_times(kafka_broker.bootstrap, [topic], ts0 + 60_000) == {tp: 10}

    source = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        source.open(offsets_for_times(kafka_broker.bootstrap, [topic], ts0 + 7_000))
        assert [r.timestamp_ms for r in drain(source, 3)] == [ts0 + 7_000, ts0 + 8_000, ts0 + 9_000]
    finally:
        source.close()


def test_create_topics_is_idempotent_and_checks_partitions(kafka_broker, unique_topic) -> None:
    topic = unique_topic("create")
    assert create_topics(kafka_broker.bootstrap, {topic: 3}) == [topic]
    assert create_topics(kafka_broker.bootstrap, {topic: 3}) == []
    with pytest.raises(RuntimeError, match="fewer partitions"):
        create_topics(kafka_broker.bootstrap, {topic: 5})
    source = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        assert len(source.partitions()) == 3
    finally:
        source.close()


def test_missing_topic_is_a_clear_error_and_not_created(kafka_broker, unique_topic) -> None:
    topic = unique_topic("missing")
    source = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        with pytest.raises(ValueError, match="does not exist"):
            source.partitions()
    finally:
        source.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_topics_settings_are_read_from_the_broker(kafka_broker, unique_topic, client, caplog) -> None:
    """What the join stage's checks read: the retention (its warning of records stamped longer ago than
    it) and the cleanup policy (a compacted samples topic is refused)."""
    short, default, endless = unique_topic("short"), unique_topic("default"), unique_topic("endless")
    missing = unique_topic("missing")
    create_topics(
        kafka_broker.bootstrap, {short: 1}, configs={"retention.ms": "3600000", "cleanup.policy": "compact"}
    )
    create_topics(kafka_broker.bootstrap, {endless: 1}, configs={"retention.ms": "-1"})
    create_topics(kafka_broker.bootstrap, {default: 1})
    topics = [short, default, endless, missing]
    keys = ["retention.ms", "cleanup.policy"]
    if client == "confluent":
        from reloop.connectors.confluent.admin import topic_settings as confluent_settings

        got = confluent_settings({}, kafka_broker.bootstrap, topics, keys)
    else:
        got = topic_settings(kafka_broker.bootstrap, topics, keys)
    # The broker's defaults (log.retention.hours 168, delete) for a topic without its own; the missing
    # topic is left out with a warning naming it.
    assert got == {
        short: {"retention.ms": "3600000", "cleanup.policy": "compact"},
        default: {"retention.ms": str(7 * 24 * 3_600_000), "cleanup.policy": "delete"},
        endless: {"retention.ms": "-1", "cleanup.policy": "delete"},
    }
    assert any(missing in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_failed_delivery_is_raised_by_flush(kafka_broker, unique_topic) -> None:
    topic = unique_topic("small")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    sink = KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topic)
    # The topic's limit lowered after the sink read it: the producer only learns it asynchronously.
    admin = admin_client(kafka_broker.bootstrap)
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": "1024"})])
    admin.close()
    sink.send(b"ok")
    sink.send(b"x" * 4096)
    with pytest.raises(KafkaSinkError, match="not delivered"):
        sink.flush(timeout_s=30)
    # kafka-python treats the rejection as fatal for an idempotent producer: the caller replaces the sink.
    with contextlib.suppress(KafkaSinkError):
        sink.close()
    source = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        source.open()
        assert [r.value for r in drain(source, 1)] == [b"ok"]
        assert source.poll(10, 0.5) == []
    finally:
        source.close()


def test_a_record_over_the_topics_limit_is_refused_at_send(kafka_broker, unique_topic) -> None:
    """The sink reads the topic's ``max.message.bytes`` when it opens: a record over it is refused at
    ``send`` (the caller can split or dead-letter it), not by the broker after the caller let go."""
    topic = unique_topic("small")
    create_topics(kafka_broker.bootstrap, {topic: 1}, configs={"max.message.bytes": "1024"})
    assert record_limit(kafka_broker.bootstrap, topic) == 1024
    sink = KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topic)
    assert sink.max_request_size == 1024
    with pytest.raises(RecordTooLarge, match="the topic's max.message.bytes 1024"):
        sink.send(b"x" * 1000)
    for i in range(20):  # 20 x 200 bytes: more than the limit in one batch, fine as records
        sink.send(b"%03d" % i + b"y" * 197)
    sink.close()
    source = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        source.open()
        assert [r.value[:3] for r in drain(source, 20)] == [b"%03d" % i for i in range(20)]
    finally:
        source.close()
    # A topic not created yet gets the broker's limit (the default, 1048588, above the producer's).
    absent = unique_topic("absent")
    assert record_limit(kafka_broker.bootstrap, absent) == 1_048_588
    admin = admin_client(kafka_broker.bootstrap)
    assert absent not in admin.list_topics()  # reading its limit did not create it
    admin.close()


@pytest.mark.parametrize("key", ["enable_auto_commit", "group_id", "value_deserializer", "auto_offset_reset"])
def test_source_refuses_client_config_that_breaks_the_contract(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        KafkaSource(bootstrap="127.0.0.1:1", topics=["t"], client_config={key: True})


@pytest.mark.parametrize("key", ["acks", "enable_idempotence"])
def test_sink_refuses_client_config_that_weakens_durability(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        KafkaSink(bootstrap="127.0.0.1:1", topic="t", client_config={key: 1})


def test_client_config_reaches_the_client(kafka_broker, unique_topic) -> None:
    topic = unique_topic("cfg")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    source = KafkaSource(
        bootstrap=kafka_broker.bootstrap, topics=[topic], client_config={"client_id": "reloop-test-src"}
    )
    sink = KafkaSink(
        bootstrap=kafka_broker.bootstrap, topic=topic, client_config={"client_id": "reloop-test-sink"}
    )
    try:
        source.open()
        assert source._consumer is not None and source._consumer.config["client_id"] == "reloop-test-src"
        assert sink._producer is not None and sink._producer.config["client_id"] == "reloop-test-sink"
        assert sink._producer.config["acks"] in ("all", -1)
        assert sink._producer.config["enable_idempotence"] is True
    finally:
        source.close()
        sink.close()


class _SeekToStart:
    """A join stage's listener in miniature: every partition it is given is read from its beginning."""

    def __init__(self) -> None:
        self.source: KafkaGroupSource | None = None
        self.assigned: list[list[TopicPartition]] = []
        self.revoked: list[list[TopicPartition]] = []

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        self.assigned.append(tps)
        assert self.source is not None
        self.source.seek(dict.fromkeys(tps))

    def on_revoked(self, tps: list[TopicPartition]) -> None:
        self.revoked.append(tps)


def _member(bootstrap: str, topic: str, listener: _SeekToStart, client: str = "kafka-python") -> Any:
    """A member of a group of its own on ``topic``, subscribed, whose ``listener`` seeks what it is given."""
    if client == "confluent":
        from reloop.connectors.confluent.group_source import ConfluentGroupSource

        source: Any = ConfluentGroupSource(bootstrap=bootstrap, topics=[topic], group_id=f"g-{topic}")
    else:
        source = KafkaGroupSource(bootstrap=bootstrap, topics=[topic], group_id=f"g-{topic}")
    listener.source = source
    source.subscribe(listener)
    return source


class _ClientStartsElsewhere(_SeekToStart):
    """The listener asks for each partition's beginning; the client then fetches from ``skip_to`` instead:
    the task starts where the source looked the oldest offset up, not where the client's own pending
    reset happens to put it."""

    def __init__(self, skip_to: int) -> None:
        super().__init__()
        self.skip_to = skip_to

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        super().on_assigned(tps)
        assert self.source is not None
        for tp in tps:
            self.source._consumer.seek(KafkaTopicPartition(tp.topic, tp.partition), self.skip_to)


@pytest.mark.parametrize("skip_to", [5, 20], ids=["mid-log", "log-end"])
def test_a_partition_sought_to_its_beginning_starts_there_wherever_the_client_would(
    kafka_broker, unique_topic, skip_to
):
    topic = unique_topic("start")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    fill(kafka_broker.bootstrap, topic, 20)
    source = _member(kafka_broker.bootstrap, topic, _ClientStartsElsewhere(skip_to))
    try:
        got = poll_group(source, 20)
        stay = time.monotonic() + 1  # nothing more, and nothing twice
        while time.monotonic() < stay:
            got += source.poll(100, 0.05)
        assert [r.offset for r in got] == list(range(20))
        assert source.position() == {TopicPartition(topic, 0): 20}
    finally:
        source.close()


class _SeekToCheckpoint(_SeekToStart):
    """A restored task's listener: every partition read from offset 0, where its checkpoint left it."""

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        self.assigned.append(tps)
        assert self.source is not None
        self.source.seek(dict.fromkeys(tps, 0))


class _SeekPastEnd(_SeekToStart):
    """A restored task whose topic was recreated since its checkpoint: its position, 50, is past the
    new log's end."""

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        self.assigned.append(tps)
        assert self.source is not None
        self.source.seek(dict.fromkeys(tps, 50))


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_position_past_the_log_end_restarts_at_the_oldest_record_with_a_warning(
    kafka_broker, unique_topic, client, caplog
):
    """Read again from the oldest record, nothing counted as deleted, and the restart is told: before, it
    was silent (librdkafka's own reset, or kafka-python's restart after its out-of-range error)."""
    topic = unique_topic("pastend")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    fill(kafka_broker.bootstrap, topic, 20)
    source = _member(kafka_broker.bootstrap, topic, _SeekPastEnd(), client)
    try:
        with caplog.at_level(logging.WARNING, logger="reloop.connectors"):
            got = poll_group(source, 20)
        assert [r.offset for r in got] == list(range(20))
        assert source.position() == {TopicPartition(topic, 0): 20}
        assert source.take_deleted_unread() == {}
        [warning] = [r for r in caplog.records if r.name == "reloop.connectors"]
        assert "restarted below its position" in warning.getMessage()
        assert warning.fields == {"partition": f"{topic}:0", "position": 50, "restart": 0}
        # counted once for the join stage's reloop_join_input_restarted_below_total, then taken
        assert source.take_restarted_below() == {TopicPartition(topic, 0): 1}
        assert source.take_restarted_below() == {}
    finally:
        source.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_records_retention_deleted_before_they_were_read_are_counted_and_the_rest_read(
    kafka_broker, unique_topic, client
):
    """A task whose checkpoint position retention passed (it lagged, or was down, that long): the client
    reset silently to the oldest record left, and the join stage never knew records were lost. kafka-python's
    member resets nothing itself; librdkafka resets by itself and the jump is told by the log start its
    fetches reported."""
    topic = unique_topic("retained")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    fill(kafka_broker.bootstrap, topic, 30)
    admin = admin_client(kafka_broker.bootstrap)
    try:
        admin.delete_records({KafkaTopicPartition(topic, 0): 12})  # what retention does, at once
    finally:
        admin.close()
    source = _member(kafka_broker.bootstrap, topic, _SeekToCheckpoint(), client)
    try:
        got = poll_group(source, 18)
        assert [r.offset for r in got] == list(range(12, 30))
        assert source.take_deleted_unread() == {TopicPartition(topic, 0): 12}
        assert source.take_deleted_unread() == {}  # counted once
        assert source.position() == {TopicPartition(topic, 0): 30}
        fill(kafka_broker.bootstrap, topic, 5)  # a read on without a jump counts nothing
        assert [r.offset for r in poll_group(source, 5)] == list(range(30, 35))
        assert source.take_deleted_unread() == {}
    finally:
        source.close()


def test_a_new_member_of_a_new_group_is_assigned_once_and_not_rebalanced(kafka_broker, unique_topic):
    """kafka-python 3.0.12 builds its coordinator's metadata snapshot only on a metadata update after
    subscribe. When the first assignment came before that update (from the second consumer of a process
    on), the update forced a rebalance of a group with one member: the join stage's tasks were revoked
    and restored for nothing, and that rejoin was seen never to complete ('not a member of the consumer
    group' until the stall timeout). KafkaGroupSource.subscribe now fetches metadata first."""
    for member in range(3):
        topic = unique_topic(f"grp{member}")
        create_topics(kafka_broker.bootstrap, {topic: 1})
        fill(kafka_broker.bootstrap, topic, 50)
        source = KafkaGroupSource(bootstrap=kafka_broker.bootstrap, topics=[topic], group_id=f"g-{topic}")
        listener = _SeekToStart()
        listener.source = source
        try:
            assert source.partition_count(topic) == 1  # as the join stage checks first
            source.subscribe(listener)
            got = poll_group(source, 50)
            stay = time.monotonic() + 2  # past the consumer's first metadata refresh
            while time.monotonic() < stay:
                source.poll(100, 0.05)
            assert len(got) == 50 and source.joined()
            assert listener.assigned == [[TopicPartition(topic, 0)]], f"member {member} was rebalanced"
            assert not any(listener.revoked), f"member {member} lost its partition to a rebalance"
            # What a stall's message says of each partition (join_stage.py ConsumerStalled).
            assert source.fetch_state() == {f"{topic}:0": "position 50, highwater 50; fetchable"}
        finally:
            source.close()


def test_fetched_ends_are_the_ends_the_last_fetches_reported(kafka_broker, unique_topic) -> None:
    """What the merges read instead of a ListOffsets request per step: unknown (None) before a
    partition's first fetch response, then the log end that response reported, moving only with the
    next fetch; never for a read_committed consumer (its end is the last stable offset)."""
    topic = unique_topic("ends")
    create_topics(kafka_broker.bootstrap, {topic: 2})
    fill(kafka_broker.bootstrap, topic, 30)  # one key: every record in one partition, the other empty
    source = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    committed = KafkaSource(
        bootstrap=kafka_broker.bootstrap, topics=[topic], client_config={"isolation_level": "read_committed"}
    )
    try:
        source.open()
        assert source.fetched_ends() is None  # nothing fetched yet: the caller asks the broker
        drain(source, 30)
        ends = source.end_positions()
        assert sorted(ends.values()) == [0, 30]
        assert source.fetched_ends() == ends
        fill(kafka_broker.bootstrap, topic, 5)
        assert source.fetched_ends() == ends  # no fetch since: the new records are not known yet
        assert sorted(source.end_positions(max_age_s=0).values()) == [0, 35]
        drain(source, 5)
        assert source.fetched_ends() == source.end_positions(max_age_s=0)
        committed.open()
        drain(committed, 35)
        assert committed.fetched_ends() is None
    finally:
        source.close()
        committed.close()

    group = KafkaGroupSource(bootstrap=kafka_broker.bootstrap, topics=[topic], group_id=f"g-{topic}")
    listener = _SeekToStart()
    listener.source = group
    try:
        group.subscribe(listener)
        got = poll_group(group, 35)
        assert len(got) == 35
        assert group.fetched_ends() == group.end_positions(max_age_s=0)
        assert sorted(group.fetched_ends().values()) == [0, 35]
    finally:
        group.close()


def test_sources_read_what_kafka_python_reads_from_the_broker(kafka_broker, unique_topic) -> None:
    """The sources' direct record reader (connectors/kafka/fetch_records.py) on batches the broker
    stored: gzip-compressed and plain, headers, null keys, tombstones, multi-byte lengths; the records
    equal what a plain kafka-python consumer (its own reader) returns."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka import TopicPartition as KafkaTopicPartition
    from reloop.engine.streams import Record

    bootstrap = kafka_broker.bootstrap
    topic = unique_topic("direct")
    create_topics(bootstrap, {topic: 2})
    n = 0
    for compression in ("gzip", None):
        producer = KafkaProducer(bootstrap_servers=bootstrap, compression_type=compression, linger_ms=20)
        for i in range(200):
            producer.send(
                topic,
                key=None if i % 7 == 1 and i % 50 else b"key-%d" % (i % 5),  # no record without both
                value=None if i % 50 == 0 else b"v%d-" % i * (i % 40),
                headers=[("h", b"x" * i), ("empty", b"")] if i % 3 == 0 else [],
                timestamp_ms=RECENT_MS + 997 * i,
            )
            n += 1
        producer.flush()
        producer.close()

    def by_position(records: list) -> list:
        return sorted(records, key=lambda r: (r.partition, r.offset))

    plain = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [KafkaTopicPartition(topic, p) for p in (0, 1)]
    plain.assign(parts)
    plain.seek_to_beginning(*parts)
    want: list = []
    for _ in range(40):
        for messages in plain.poll(timeout_ms=500).values():
            for m in messages:
                want.append(Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp))
        if len(want) >= n:
            break
    plain.close()
    assert len(want) == n

    source = KafkaSource(bootstrap=bootstrap, topics=[topic])
    group = KafkaGroupSource(bootstrap=bootstrap, topics=[topic], group_id=f"g-{topic}")
    listener = _SeekToStart()
    listener.source = group
    try:
        source.open()
        assert by_position(drain(source, n)) == by_position(want)
        assert source.reads_records_directly
        group.subscribe(listener)
        assert by_position(poll_group(group, n)) == by_position(want)
        assert group.reads_records_directly
    finally:
        source.close()
        group.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_partitions_now_sees_partitions_added_after_open(kafka_broker, unique_topic, client) -> None:
    # partitions() keeps what the source opened with; the train stage asks partitions_now() to notice a
    # samples topic grown while it runs (it read the old partitions only, silently, until a restart).

    topic = unique_topic("grow")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    if client == "confluent":
        from reloop.connectors.confluent.source import ConfluentSource

        source = ConfluentSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    else:  # its metadata refreshes every metadata_max_age_ms (30 s by default), on poll
        source = KafkaSource(
            bootstrap=kafka_broker.bootstrap, topics=[topic], client_config={"metadata_max_age_ms": 500}
        )
    try:
        source.open()
        assert source.partitions() == source.partitions_now() == [TopicPartition(topic, 0)]
        _grow(kafka_broker.bootstrap, topic, 3)
        deadline = time.monotonic() + 20
        while len(source.partitions_now()) < 3 and time.monotonic() < deadline:
            source.poll(10, 0.2)
        assert source.partitions_now() == [TopicPartition(topic, p) for p in range(3)]
        assert source.partitions() == [TopicPartition(topic, 0)]
    finally:
        source.close()


def _grow(bootstrap: str, topic: str, partitions: int) -> None:
    """``topic`` grown to ``partitions`` partitions."""
    from kafka.admin import NewPartitions

    admin = admin_client(bootstrap)
    try:
        admin.create_partitions({topic: NewPartitions(total_count=partitions)})
    finally:
        admin.close()


def _source(client: str, bootstrap: str, topic: str, config: dict | None = None):
    if client == "confluent":
        from reloop.connectors.confluent.source import ConfluentSource

        return ConfluentSource(bootstrap=bootstrap, topics=[topic], client_config=config)
    return KafkaSource(bootstrap=bootstrap, topics=[topic], client_config=config)


def _group_source(client: str, bootstrap: str, topic: str, config: dict | None = None):
    if client == "confluent":
        from reloop.connectors.confluent.group_source import ConfluentGroupSource

        return ConfluentGroupSource(
            bootstrap=bootstrap, topics=[topic], group_id=f"g-{topic}", client_config=config
        )
    return KafkaGroupSource(bootstrap=bootstrap, topics=[topic], group_id=f"g-{topic}", client_config=config)


class _SeekTo(_SeekToStart):
    """Every partition it is given is read from ``offset`` (a task checkpoint's position)."""

    def __init__(self, offset: int | None) -> None:
        super().__init__()
        self.offset = offset

    def on_assigned(self, tps: list[TopicPartition]) -> None:
        self.assigned.append(tps)
        assert self.source is not None
        self.source.seek(dict.fromkeys(tps, self.offset))


def _read_to_end(source, timeout_s: float = 6.0) -> tuple[list, dict, dict]:
    """Poll until the position reaches the log end (what a merge, or reading the dead-letter topic,
    waits for) or ``timeout_s`` passed; the records, the position and the ends."""
    got: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got += source.poll(100, 0.1)
        ends = source.end_positions(max_age_s=0)
        position = source.position()
        if ends and position and all(position.get(tp, -1) >= end for tp, end in ends.items()):
            break
    return got, source.position(), source.end_positions(max_age_s=0)


def _transactional_log(bootstrap: str, topic: str) -> None:
    """Offsets 0-2 committed, 3 the commit marker, 4-5 aborted, 6 the abort marker: the log end is 7."""
    import logging

    from confluent_kafka import Producer

    create_topics(bootstrap, {topic: 1})
    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": topic, "logger": logging.getLogger("librdkafka")}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, b"c%d" % i, b"k")
    producer.commit_transaction(30)
    producer.begin_transaction()
    for i in range(2):
        producer.produce(topic, b"a%d" % i, b"k")
    producer.flush(30)
    producer.abort_transaction(30)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_positions_reach_the_log_end_past_transaction_markers(kafka_broker, unique_topic, client) -> None:
    """A transactional topic's log end is one past its last control marker, a record no consumer
    returns. The sources' positions stopped at the last record returned (3 or 6 here, the end 7): a
    merge waiting for ``position >= end`` (no idle fallback once a source reports its ends) and
    reading the dead-letter topic to its end waited for ever."""
    topic = unique_topic("txn")
    _transactional_log(kafka_broker.bootstrap, topic)
    tp = TopicPartition(topic, 0)
    if client == "confluent":
        levels = {"isolation.level": "read_committed"}, {"isolation.level": "read_uncommitted"}
    else:
        levels = {"isolation_level": "read_committed"}, {"isolation_level": "read_uncommitted"}
    for config, values in zip(
        levels, ([b"c0", b"c1", b"c2"], [b"c0", b"c1", b"c2", b"a0", b"a1"]), strict=True
    ):
        source = _source(client, kafka_broker.bootstrap, topic, config)
        try:
            source.open()
            got, position, ends = _read_to_end(source)
            assert [r.value for r in got] == values, config
            assert ends == {tp: 7}
            assert position == ends, config
        finally:
            source.close()
    group = _group_source(client, kafka_broker.bootstrap, topic)
    listener = _SeekTo(None)
    listener.source = group
    try:
        group.subscribe(listener)
        got, position, ends = _read_to_end(group, timeout_s=20)
        assert len(got) >= 3 and ends == {tp: 7}
        assert position == ends
    finally:
        group.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_position_in_a_deleted_range_moves_to_the_log_start(kafka_broker, unique_topic, client) -> None:
    """A checkpoint's position below the log start (retention deleted the range; here every record):
    the consumer resets to the oldest record left, and the source's position must follow it, not stay
    below an end it never reaches."""
    from confluent_kafka import TopicPartition as ConfluentTopicPartition
    from confluent_kafka.admin import AdminClient

    topic = unique_topic("deleted")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    fill(kafka_broker.bootstrap, topic, 10)
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    for future in admin.delete_records([ConfluentTopicPartition(topic, 0, 10)]).values():
        future.result(10)
    tp = TopicPartition(topic, 0)
    source = _source(client, kafka_broker.bootstrap, topic)
    try:
        source.open({tp: 3})
        got, position, ends = _read_to_end(source)
        assert got == [] and ends == {tp: 10}
        assert position == ends
    finally:
        source.close()
    group = _group_source(client, kafka_broker.bootstrap, topic)
    listener = _SeekTo(3)
    listener.source = group
    try:
        group.subscribe(listener)
        got, position, ends = _read_to_end(group, timeout_s=20)
        assert got == [] and listener.assigned
        assert position == ends == {tp: 10}
    finally:
        group.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_group_is_given_partitions_added_while_it_runs(kafka_broker, unique_topic, client) -> None:
    # The join stage's group learnt of new input partitions at a metadata refresh, every 5 min by the
    # clients' defaults: their records went unread, and co-partitioning lost (impressions grown, clicks
    # not) went unrefused, for minutes. The group sources refresh every 30 s; 2 s here, to be quick.

    topic = unique_topic(f"grow-{client}")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    refresh = (
        {"topic.metadata.refresh.interval.ms": 2000}
        if client == "confluent"
        else {"metadata_max_age_ms": 2000}
    )
    source = _group_source(client, kafka_broker.bootstrap, topic, refresh)
    listener = _SeekToStart()
    listener.source = source
    try:
        if client == "kafka-python":
            assert source._consumer.config["metadata_max_age_ms"] == 2000
            default = KafkaGroupSource(
                bootstrap=kafka_broker.bootstrap, topics=[topic], group_id=f"d-{topic}"
            )
            assert default._consumer.config["metadata_max_age_ms"] == 30_000
            default.close()
        source.subscribe(listener)
        deadline = time.monotonic() + 30
        while not listener.assigned and time.monotonic() < deadline:
            source.poll(10, 0.1)
        assert listener.assigned == [[TopicPartition(topic, 0)]]
        _grow(kafka_broker.bootstrap, topic, 2)
        deadline = time.monotonic() + 30
        while TopicPartition(topic, 1) not in {tp for tps in listener.assigned for tp in tps}:
            assert time.monotonic() < deadline, listener.assigned
            source.poll(10, 0.1)
    finally:
        source.close()


def test_a_topic_created_again_has_another_id_and_both_clients_write_it_alike(kafka_broker, unique_topic):
    # The join tasks' checkpoints record the input topics' ids: a topic deleted and created again under its
    # name is read from its oldest record, not from the old topic's position (engine/runtime/join_stage.py).
    from reloop.connectors.confluent.admin import topic_ids as confluent_topic_ids
    from reloop.connectors.kafka.admin import delete_topics, topic_ids

    bootstrap = kafka_broker.bootstrap
    topic, missing = unique_topic("ids"), unique_topic("never-made")
    create_topics(bootstrap, {topic: 1})
    first = topic_ids(bootstrap, [topic, missing])
    assert set(first) == {topic} and len(first[topic]) == 36  # a UUID string; a missing topic has none
    assert confluent_topic_ids({}, bootstrap, [topic, missing]) == first
    delete_topics(bootstrap, [topic])
    deadline = time.monotonic() + 30
    while True:  # the deletion completes in the background
        with contextlib.suppress(Exception):
            create_topics(bootstrap, {topic: 1})
            again = topic_ids(bootstrap, [topic])
            if again.get(topic) not in (None, first[topic]):
                break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert confluent_topic_ids({}, bootstrap, [topic]) == again
