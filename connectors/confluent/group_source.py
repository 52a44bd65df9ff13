"""ConfluentGroupSource: the join stage's consumer-group member over confluent-kafka (librdkafka).

The semantics of ``reloop.connectors.kafka.group_source.KafkaGroupSource``: the group assigns partitions
(range assignment: partition p of co-partitioned topics to one member), the listener hears
``on_revoked`` / ``on_assigned`` and seeks every assigned partition to the position in its task
checkpoint, offsets are committed only by ``commit``. librdkafka calls the rebalance callbacks from
``consume`` on the calling thread, so they may block (checkpoint files, flushes) without stalling its
network threads, which fetch and decompress in C (bench figure 3: ~5x kafka-python's consume rate).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTopicPartition
from reloop.connectors.confluent.login import LoginWatch
from reloop.connectors.confluent.logs import built
from reloop.connectors.confluent.settings import CONSUMER_RESERVED as _RESERVED
from reloop.connectors.confluent.source import (
    advance_positions,
    close_within,
    fetched_ends,
    log_failed_commit,
)
from reloop.connectors.partition_restart import RestartsBelow
from reloop.engine.streams import Positions, Record, TopicNotFound, TopicPartition


class ConfluentGroupSource:
    def __init__(
        self,
        *,
        bootstrap: str,
        topics: list[str],
        group_id: str,
        client_config: Mapping[str, Any] | None = None,
        metadata_timeout_s: float = 10.0,
    ) -> None:
        for key in client_config or {}:
            if key in _RESERVED:
                raise ValueError(f"client_config[{key!r}] is not allowed: {_RESERVED[key]}")
        self.topics = list(topics)
        self.metadata_timeout_s = metadata_timeout_s
        # librdkafka's defaults: a 45 s session, a heartbeat every 3 s (connectors/kafka/group_source.py).
        given = dict(client_config or {})
        self._longest_join_s = (
            int(given.get("session.timeout.ms", 45_000)) + int(given.get("heartbeat.interval.ms", 3_000))
        ) / 1000
        self._login = LoginWatch(bootstrap)
        self._consumer = built(
            Consumer,
            {
                "auto.offset.reset": "earliest",
                "allow.auto.create.topics": False,
                "fetch.wait.max.ms": 100,
                "partition.assignment.strategy": "range",
                "topic.metadata.refresh.interval.ms": 30_000,  # as the kafka-python group source (its note)
                **dict(client_config or {}),
                "bootstrap.servers": bootstrap,
                "group.id": group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "on_commit": log_failed_commit,
                "error_cb": self._login,
            },
        )
        self._listener: Any = None
        self._next: Positions = {}
        self._pending_seek: dict[TopicPartition, int | None] = {}
        self._in_callback = False
        self._ends: Positions | None = None
        self._ends_at = 0.0
        self._deleted_unread: dict[TopicPartition, int] = {}
        self._restarts_below = RestartsBelow()

    def subscribe(self, listener: Any) -> None:
        self._listener = listener
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    def joined(self) -> bool:
        """A member of the group's current generation: librdkafka has given this consumer a member id."""
        return bool(self._consumer.memberid())

    def longest_join_s(self) -> float:
        """How long a healthy (re)join of the group may take: the session timeout plus the heartbeat
        interval (the join stage judges membership no sooner)."""
        return self._longest_join_s

    def partition_count(self, topic: str) -> int:
        try:
            meta = self._consumer.list_topics(topic, timeout=self.metadata_timeout_s).topics.get(topic)
        except KafkaException:
            # No poll to serve the error callbacks here: inside a subscription it can run a rebalance.
            self._login.check()
            raise
        if meta is None or meta.error is not None or not meta.partitions:
            raise TopicNotFound(f"Kafka topic {topic!r} does not exist")
        return len(meta.partitions)

    # -- rebalance callbacks (inside consume, on this thread) -------------------------------------------
    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        self._listener.on_revoked(tps)
        for tp in tps:
            self._next.pop(tp, None)
        self._ends = None

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self._ends = None
        self._pending_seek = {}
        self._in_callback = True
        try:
            self._listener.on_assigned([TopicPartition(p.topic, p.partition) for p in partitions])
        finally:
            self._in_callback = False
        # The listener chose the positions (seek): the assignment starts there.
        assignment = []
        for p in partitions:
            tp = TopicPartition(p.topic, p.partition)
            offset = self._pending_seek.get(tp)
            assignment.append(
                KafkaTopicPartition(p.topic, p.partition, OFFSET_BEGINNING if offset is None else offset)
            )
            if offset is None:
                low, _ = consumer.get_watermark_offsets(
                    KafkaTopicPartition(p.topic, p.partition), timeout=self.metadata_timeout_s
                )
                offset = int(low)
            self._next[tp] = int(offset)
        consumer.assign(assignment)

    def seek(self, positions: Mapping[TopicPartition, int | None]) -> None:
        """Read each partition from ``offset`` (None: the oldest record still stored)."""
        if self._in_callback:
            self._pending_seek.update(positions)
            return
        for tp, offset in positions.items():
            if offset is None:
                low, _ = self._consumer.get_watermark_offsets(
                    KafkaTopicPartition(tp.topic, tp.partition), timeout=self.metadata_timeout_s
                )
                offset = int(low)
            self._consumer.seek(KafkaTopicPartition(tp.topic, tp.partition, int(offset)))
            self._next[tp] = int(offset)

    # -- reading ---------------------------------------------------------------------------------------
    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        # What is fetched already, at once; when nothing is, wait (up to timeout_s) for ONE message and
        # then take what came with it: consume(n, timeout) itself waits the whole timeout unless n arrive.
        n = max(1, max_records)
        messages = self._consumer.consume(num_messages=n, timeout=0)
        if not messages:
            messages = self._consumer.consume(num_messages=1, timeout=max(0.0, timeout_s))
            if messages and n > 1:
                messages += self._consumer.consume(num_messages=n - 1, timeout=0)
        self._login.check()  # consume served the error callbacks
        out: list[Record] = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            tp = TopicPartition(m.topic(), m.partition())
            expected = self._next.get(tp)
            if expected is None:  # revoked meanwhile
                continue
            if m.offset() > expected:
                self._count_deleted_unread(tp, expected)
            elif m.offset() < expected:  # librdkafka's reset to the oldest record, from past the log end
                self._restarts_below.restarted(tp, expected, m.offset())
            _, ts = m.timestamp()
            out.append(Record(tp.topic, tp.partition, m.offset(), m.key(), m.value() or b"", ts))
            self._next[tp] = m.offset() + 1
        # Past transaction markers and deleted ranges too (connectors/confluent/source.py).
        before = dict(self._next)
        advance_positions(self._consumer, self._next)
        for tp, at in before.items():
            if self._next[tp] > at:
                self._count_deleted_unread(tp, at)
        return out

    def _count_deleted_unread(self, tp: TopicPartition, expected: int) -> None:
        """The position jumped from ``expected``: past transaction markers or a compacted range (nothing
        lost), or past records retention deleted before they were read (librdkafka's reset to the oldest
        record left, ``auto.offset.reset``), which are counted. The log start the fetch responses reported
        (cached, no request) tells which: records below it are gone."""
        try:
            low, _ = self._consumer.get_watermark_offsets(
                KafkaTopicPartition(tp.topic, tp.partition), cached=True
            )
        except KafkaException:
            return
        if low > expected:
            self._deleted_unread[tp] = self._deleted_unread.get(tp, 0) + int(low) - expected

    def take_deleted_unread(self) -> dict[TopicPartition, int]:
        """Records deleted (by retention) before they were read, per partition, since the last call."""
        taken, self._deleted_unread = self._deleted_unread, {}
        return taken

    def take_restarted_below(self) -> dict[TopicPartition, int]:
        """Partitions read again from below their position (each warned of), per partition, since the
        last call."""
        return self._restarts_below.take()

    def position(self) -> Positions:
        return dict(self._next)

    def end_positions(self, *, max_age_s: float = 0.1, timeout_s: float = 2.0) -> Positions:
        now = time.monotonic()
        if self._ends is not None and now - self._ends_at < max_age_s:
            return self._ends
        deadline = now + timeout_s
        ends: Positions = {}
        for tp in self._next:
            _, high = self._consumer.get_watermark_offsets(
                KafkaTopicPartition(tp.topic, tp.partition),
                timeout=max(0.001, deadline - time.monotonic()),
                cached=False,
            )
            ends[tp] = int(high)
        self._ends, self._ends_at = ends, now
        return ends

    def fetched_ends(self) -> Positions | None:
        """``end_positions`` as the last fetch responses reported it, without a request
        (connectors/confluent/source.py ``fetched_ends``); None until every owned partition has had one."""
        return fetched_ends(self._consumer, self._next)

    def commit(self, positions: Mapping[TopicPartition, int], *, timeout_s: float = 2.0) -> None:
        offsets = [
            KafkaTopicPartition(tp.topic, tp.partition, int(off))
            for tp, off in positions.items()
            if tp in self._next
        ]
        if offsets and self._consumer is not None:
            # Asynchronous: informational offsets must never hold the join (a broker outage, a rebalance).
            self._consumer.commit(offsets=offsets, asynchronous=True)

    def close(self, timeout_s: float = 5.0) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            close_within(consumer, timeout_s)
