"""ConfluentSource / ConfluentSink beyond the shared contract, on the real broker: the same semantics as
the kafka-python connectors (tests/integration/test_kafka_connectors.py)."""

from __future__ import annotations

import pytest
from reloop.connectors.confluent.admin import record_limit
from reloop.connectors.confluent.group_source import ConfluentGroupSource
from reloop.connectors.confluent.sink import ConfluentSink
from reloop.connectors.confluent.source import ConfluentSource
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.streams import RecordTooLarge, TopicPartition

from .test_kafka_connectors import RECENT_MS, _SeekToStart, poll_group

pytestmark = pytest.mark.kafka


def fill(bootstrap: str, topic: str, n: int) -> None:
    sink = ConfluentSink(bootstrap=bootstrap, topic=topic)
    for i in range(n):
        sink.send(b"%d" % i, key=b"k", timestamp_ms=RECENT_MS + i)
    sink.close()


def drain(source, n: int) -> list:
    out: list = []
    for _ in range(40):
        out += source.poll(1000, 0.5)
        if len(out) >= n:
            break
    assert len(out) == n
    return out


def test_group_offsets_are_committed_only_on_commit(kafka_broker, unique_topic) -> None:
    topic, group = unique_topic("commit"), unique_topic("group")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    fill(kafka_broker.bootstrap, topic, 10)
    tp = TopicPartition(topic, 0)
    source = ConfluentSource(bootstrap=kafka_broker.bootstrap, topics=[topic], group_id=group)
    source.open()
    drain(source, 10)
    assert source.committed() == {}, "reading must not commit anything"
    assert source.end_positions() == {tp: 10}
    source.commit({tp: 6})
    assert source.committed() == {tp: 6}
    source.close()
    # The kafka-python source of the same group sees the same committed offset, and vice versa.
    other = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic], group_id=group)
    try:
        assert other.committed() == {tp: 6}
        other.open(other.committed())
        assert [r.value for r in drain(other, 4)] == [b"6", b"7", b"8", b"9"]
    finally:
        other.close()


def test_commit_without_group_is_refused(kafka_broker, unique_topic) -> None:
    topic = unique_topic("nogroup")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    source = ConfluentSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        source.open()
        with pytest.raises(RuntimeError, match="group_id"):
            source.commit()
    finally:
        source.close()


def test_missing_topic_is_a_clear_error(kafka_broker, unique_topic) -> None:
    source = ConfluentSource(bootstrap=kafka_broker.bootstrap, topics=[unique_topic("absent")])
    try:
        with pytest.raises(ValueError, match="does not exist"):
            source.partitions()
    finally:
        source.close()


def test_one_record_too_large_is_refused_and_the_sink_still_works(kafka_broker, unique_topic) -> None:
    topic = unique_topic("large")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    sink = ConfluentSink(bootstrap=kafka_broker.bootstrap, topic=topic)
    with pytest.raises(RecordTooLarge):
        sink.send(b"x" * 2_000_000)
    sink.send(b"ok")
    sink.close()
    source = ConfluentSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    source.open()
    assert [r.value for r in drain(source, 1)] == [b"ok"]
    source.close()


def test_a_record_over_the_topics_limit_is_refused_at_send(kafka_broker, unique_topic) -> None:
    """As KafkaSink: the topic's ``max.message.bytes`` caps records at ``send`` and caps librdkafka's
    batches (it does not split a batch the broker refused), so small records still go through."""
    topic = unique_topic("small")
    create_topics(kafka_broker.bootstrap, {topic: 1}, configs={"max.message.bytes": "1024"})
    assert record_limit({}, kafka_broker.bootstrap, topic) == 1024
    assert record_limit({}, kafka_broker.bootstrap, unique_topic("absent")) == 1_048_588
    sink = ConfluentSink(bootstrap=kafka_broker.bootstrap, topic=topic)
    with pytest.raises(RecordTooLarge, match="the topic's max.message.bytes 1024"):
        sink.send(b"x" * 1000)
    for i in range(20):
        sink.send(b"%03d" % i + b"y" * 197)
    sink.close()
    source = ConfluentSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    source.open()
    assert [r.value[:3] for r in drain(source, 20)] == [b"%03d" % i for i in range(20)]
    source.close()


def test_same_key_same_partition_as_kafka_python(kafka_broker, unique_topic) -> None:
    """An impression logged by one client and its click by the other must meet on one partition."""
    a, b = unique_topic("a"), unique_topic("b")
    create_topics(kafka_broker.bootstrap, {a: 4, b: 4})
    keys = [b"imp-%d" % i for i in range(40)]
    for topic, sink in (
        (a, ConfluentSink(bootstrap=kafka_broker.bootstrap, topic=a)),
        (b, KafkaSink(bootstrap=kafka_broker.bootstrap, topic=b)),
    ):
        for k in keys:
            sink.send(topic.encode(), key=k)
        sink.close()
    where = {}
    for topic in (a, b):
        source = ConfluentSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
        source.open()
        where[topic] = {r.key: r.partition for r in drain(source, len(keys))}
        source.close()
    assert where[a] == where[b]
    assert len(set(where[a].values())) > 1


@pytest.mark.parametrize("key", ["group.id", "enable.auto.commit", "bootstrap.servers", "auto.offset.reset"])
def test_source_refuses_client_config_that_breaks_the_contract(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ConfluentSource(bootstrap="x:1", topics=["t"], client_config={key: "x"})


@pytest.mark.parametrize("key", ["acks", "enable.idempotence", "partitioner"])
def test_sink_refuses_client_config_that_weakens_the_contract(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ConfluentSink(bootstrap="x:1", topic="t", client_config={key: "x"})


def test_fetched_ends_are_the_ends_the_last_fetches_reported(kafka_broker, unique_topic) -> None:
    """As with kafka-python (test_kafka_connectors.py): the log end the last fetch response reported,
    without a request; the group source's ``end_positions`` asks the broker. Unlike kafka-python,
    librdkafka starts fetching in its own thread on assign, so right after ``open`` the first responses
    may already be in: the ends are then unknown (None) or already right, never wrong (None before any
    response: tests/unit/connectors/test_confluent_fetched_ends.py)."""
    topic = unique_topic("ends")
    create_topics(kafka_broker.bootstrap, {topic: 2})
    fill(kafka_broker.bootstrap, topic, 30)  # one key: every record in one partition, the other empty
    source = ConfluentSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        source.open()
        first = source.fetched_ends()
        assert first is None or sorted(first.values()) == [0, 30]
        drain(source, 30)
        ends = source.end_positions()
        assert sorted(ends.values()) == [0, 30]
        assert source.fetched_ends() == ends
    finally:
        source.close()

    group = ConfluentGroupSource(bootstrap=kafka_broker.bootstrap, topics=[topic], group_id=f"g-{topic}")
    listener = _SeekToStart()
    listener.source = group
    try:
        group.subscribe(listener)
        got = poll_group(group, 30)
        assert len(got) == 30 and listener.assigned
        fill(kafka_broker.bootstrap, topic, 5)
        assert sorted(group.end_positions(max_age_s=0).values()) == [0, 35]  # the broker, asked
        poll_group(group, 35, got)
        assert len(got) == 35
        assert group.fetched_ends() == group.end_positions(max_age_s=0)
    finally:
        group.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_topic_copying_a_missing_input_topic_names_the_input(kafka_broker, unique_topic, client) -> None:
    # It failed naming the samples topic ("Number of partitions was set to an invalid non-positive value",
    # or a KeyError), and the missing input topic went unnamed.
    from reloop.connectors.confluent.admin import ensure_topic_like as confluent_like
    from reloop.connectors.kafka.admin import ensure_topic_like as kafka_like
    from reloop.engine.streams import MissingTopic

    missing, samples, present = unique_topic("imp"), unique_topic("samples"), unique_topic("imp-ok")
    if client == "confluent":
        ensure = lambda topic, like: confluent_like({}, kafka_broker.bootstrap, topic, like)  # noqa: E731
    else:
        ensure = lambda topic, like: kafka_like({}, kafka_broker.bootstrap, topic, like)  # noqa: E731
    with pytest.raises(MissingTopic, match=repr(missing)):
        ensure(samples, missing)
    create_topics(kafka_broker.bootstrap, {present: 3})
    ensure(samples, present)
    ensure(samples, present)  # an existing one is left as it is
