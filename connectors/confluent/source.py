"""ConfluentSource: a reloop.connectors.base.Source over confluent-kafka (librdkafka).

The semantics of ``reloop.connectors.kafka.source.KafkaSource``: every partition of the topics is assigned
(never subscribed) at the positions ``open`` is given, the beginning of a partition is resolved at open
time so ``position()`` is exact at once, group offsets are written only by ``commit`` (bounded by
``timeout_s``), ``end_positions`` is cached for ``max_age_s`` and bounded by ``timeout_s``. Fetching and
decompression run in librdkafka's threads (bench figure 3: ~5x kafka-python's consume rate).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTopicPartition
from reloop.connectors.confluent.login import LoginWatch
from reloop.connectors.confluent.logs import built
from reloop.connectors.confluent.settings import CONSUMER_RESERVED as _RESERVED
from reloop.engine.streams import PartitionShare, Positions, Record, TopicNotFound, TopicPartition

_log = logging.getLogger(__name__)


class ConfluentSource:
    """Reads every partition of ``topics`` (or its ``share`` of them) from the positions given to ``open``."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: list[str],
        group_id: str | None = None,
        client_config: Mapping[str, Any] | None = None,
        share: PartitionShare | None = None,
        metadata_timeout_s: float = 10.0,
    ) -> None:
        if not topics:
            raise ValueError("ConfluentSource needs at least one topic")
        for key in client_config or {}:
            if key in _RESERVED:
                raise ValueError(f"client_config[{key!r}] is not allowed: {_RESERVED[key]}")
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.group_id = group_id
        self.client_config = dict(client_config or {})
        self.share = share
        self.metadata_timeout_s = metadata_timeout_s
        self._consumer: Consumer | None = None
        self._partitions: list[TopicPartition] | None = None
        self._next: Positions = {}
        self._closed = False
        self._ends: Positions | None = None
        self._ends_at = 0.0
        self._login = LoginWatch(bootstrap)

    def _client(self) -> Consumer:
        if self._closed:
            raise RuntimeError("ConfluentSource is closed")
        if self._consumer is None:
            config: dict[str, Any] = {
                # An out-of-range position (data deleted by retention) restarts at the oldest record left.
                "auto.offset.reset": "earliest",
                "allow.auto.create.topics": False,
                "fetch.wait.max.ms": 100,
                **self.client_config,
                "bootstrap.servers": self.bootstrap,
                # librdkafka needs a group id even for assign(); without ours nothing is ever committed.
                "group.id": self.group_id or f"reloop-uncommitted-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "on_commit": log_failed_commit,
                "error_cb": self._login,
            }
            self._consumer = built(Consumer, config)
        return self._consumer

    def partitions(self) -> list[TopicPartition]:
        if self._partitions is None:
            self._partitions = self.partitions_now()
        return list(self._partitions)

    def partitions_now(self) -> list[TopicPartition]:
        """The partitions the topics have now (``list_topics`` asks the broker; ``partitions()`` keeps
        those it opened with): a caller notices partitions added while it runs. Within 2 s at most: the
        train stage asks from the thread that also commits and stops, and skips a check that failed."""
        consumer = self._client()
        out: list[TopicPartition] = []
        timeout_s = min(self.metadata_timeout_s, 2.0)
        for topic in self.topics:
            try:
                meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
            except KafkaException:
                # Serving the error callbacks polls: only safe while nothing is assigned to take a record.
                self._login.check(None if consumer.assignment() else consumer)
                raise
            if meta is None or meta.error is not None or not meta.partitions:
                raise TopicNotFound(f"Kafka topic {topic!r} does not exist at {self.bootstrap}")
            out += [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        return [tp for tp in out if self.share is None or self.share.owns(tp)]

    def open(self, positions: Mapping[TopicPartition, int] | None = None) -> None:
        positions = positions or {}
        pairs = self.partitions()
        unknown = set(positions) - set(pairs)
        if unknown:
            raise ValueError(f"positions name partitions this source does not read: {sorted(unknown)}")
        consumer = self._client()
        self._next = {}
        assignment = []
        for tp in pairs:
            if tp in positions:
                offset = int(positions[tp])
            else:  # "beginning" = the oldest offset still stored, resolved now
                low, _ = consumer.get_watermark_offsets(
                    KafkaTopicPartition(tp.topic, tp.partition), timeout=self.metadata_timeout_s
                )
                offset = int(low)
            if offset < 0:
                raise ValueError(f"negative position {offset} for {tp}")
            self._next[tp] = offset
            assignment.append(KafkaTopicPartition(tp.topic, tp.partition, offset))
        consumer.assign(assignment)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if not self._next:
            raise RuntimeError("ConfluentSource.poll before open")
        # What is fetched already, at once; when nothing is, wait (up to timeout_s) for ONE message and
        # then take what came with it: consume(n, timeout) itself waits the whole timeout unless n arrive.
        consumer = self._client()
        n = max(1, max_records)
        messages = consumer.consume(num_messages=n, timeout=0)
        if not messages:
            messages = consumer.consume(num_messages=1, timeout=max(0.0, timeout_s))
            if messages and n > 1:
                messages += consumer.consume(num_messages=n - 1, timeout=0)
        self._login.check()  # consume served the error callbacks
        out: list[Record] = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            _, ts = m.timestamp()
            out.append(Record(topic, partition, offset, m.key(), m.value() or b"", ts))
            self._next[TopicPartition(topic, partition)] = offset + 1
        advance_positions(consumer, self._next)
        return out

    def position(self) -> Positions:
        return dict(self._next)

    def positions_at(self, timestamp_ms: int, *, timeout_s: float = 2.0) -> Positions:
        """Per partition read, the first offset whose record timestamp is >= ``timestamp_ms``, or the log
        end where no record is that recent yet. Bounded by ``timeout_s``."""
        consumer = self._client()
        pairs = self.partitions()
        asked = [KafkaTopicPartition(tp.topic, tp.partition, int(timestamp_ms)) for tp in pairs]
        found = {(k.topic, k.partition): k for k in consumer.offsets_for_times(asked, timeout=timeout_s)}
        out: Positions = {}
        for tp in pairs:
            hit = found[(tp.topic, tp.partition)]
            if hit.error is not None:
                raise KafkaException(hit.error)
            offset = int(hit.offset)
            if offset < 0:  # no record that recent: the log end
                _, offset = consumer.get_watermark_offsets(
                    KafkaTopicPartition(tp.topic, tp.partition), timeout=timeout_s
                )
            out[tp] = int(offset)
        return out

    def end_positions(self, *, max_age_s: float = 0.1, timeout_s: float = 2.0) -> Positions:
        """The log end offset of every assigned partition (cached for ``max_age_s``, bounded by
        ``timeout_s``: raises KafkaException while the broker is down)."""
        now = time.monotonic()
        if self._ends is not None and now - self._ends_at < max_age_s:
            return self._ends
        consumer = self._client()
        deadline = now + timeout_s
        ends: Positions = {}
        for tp in self._next:
            _, high = consumer.get_watermark_offsets(
                KafkaTopicPartition(tp.topic, tp.partition),
                timeout=max(0.001, deadline - time.monotonic()),
                cached=False,
            )
            ends[tp] = int(high)
        self._ends = ends
        self._ends_at = now
        return ends

    def fetched_ends(self) -> Positions | None:
        """``end_positions`` as the last fetch responses reported it, without a request (see
        ``fetched_ends`` below); None until every assigned partition has had one."""
        return fetched_ends(self._client(), self._next)

    def commit(self, positions: Mapping[TopicPartition, int] | None = None) -> None:
        """Commit ``positions`` (default: the current position) as the group's offsets, asynchronously:
        librdkafka sends them in the background and a failure is logged when its answer comes (during a
        later poll). A synchronous commit held this consumer's poll for as long as the broker did not
        answer (46 s here, whatever timeout the caller waited with), and the offsets are informational:
        the snapshot holds the positions a stage restarts from. Commits go out in order, so the group's
        offsets read after this call (``committed``) include these."""
        if self.group_id is None:
            raise RuntimeError("ConfluentSource.commit needs a group_id")
        positions = self.position() if positions is None else positions
        offsets = [KafkaTopicPartition(tp.topic, tp.partition, int(off)) for tp, off in positions.items()]
        if offsets:
            self._client().commit(offsets=offsets, asynchronous=True)

    def committed(self, timeout_s: float = 10.0) -> Positions:
        """The group's committed offsets for this source's partitions (absent when none)."""
        if self.group_id is None:
            raise RuntimeError("ConfluentSource.committed needs a group_id")
        found = self._client().committed(
            [KafkaTopicPartition(tp.topic, tp.partition) for tp in self.partitions()], timeout=timeout_s
        )
        return {
            TopicPartition(k.topic, k.partition): int(k.offset) for k in found if k.offset != OFFSET_INVALID
        }

    def close(self, timeout_s: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        consumer, self._consumer = self._consumer, None
        self._next = {}
        if consumer is not None:
            close_within(consumer, timeout_s)


def close_within(consumer: Consumer, timeout_s: float) -> None:
    """Leave the group and release the client, waiting at most ``timeout_s``: with the broker down
    librdkafka's close waits on the commits in flight for up to 46 s here, longer than a stop may take.
    Past it the client is abandoned to a daemon thread (the process is usually exiting; the group's
    session timeout then frees its partitions)."""
    closing = threading.Thread(target=consumer.close, daemon=True, name="confluent-close")
    closing.start()
    closing.join(timeout_s)
    if closing.is_alive():
        _log.warning("consumer close not done within %g s (broker unreachable?); left behind", timeout_s)


def log_failed_commit(err: KafkaError | None, partitions: list[KafkaTopicPartition]) -> None:
    """librdkafka's answer to an asynchronous commit (served by a later poll on the consumer's thread)."""
    if err is not None:
        _log.warning("offset commit failed: %s (%d partitions)", err, len(partitions))


def advance_positions(consumer: Consumer, positions: Positions) -> None:
    """Move ``positions`` (one past the last record returned) to where the consumer itself stands:
    past what librdkafka skipped without returning a record (transaction markers: a transactional
    topic's log end is one past its last marker; aborted records under read_committed; a compacted
    tail). Without it a source's position stopped short of the log end there, and whoever waits for
    ``position >= end_positions`` (the merges, reading the dead-letter topic) waited for ever. Local
    state, no request. librdkafka knows no position from an assign or a seek until a record is
    consumed; a position below the log start its fetches reported (a range deleted by retention: the
    fetch resets to the oldest record left) then moves up to that start."""
    parts = list(positions)
    if not parts:
        return
    for found in consumer.position([KafkaTopicPartition(tp.topic, tp.partition) for tp in parts]):
        tp = TopicPartition(found.topic, found.partition)
        if tp not in positions or found.error is not None:
            continue
        if found.offset >= 0:
            positions[tp] = max(positions[tp], int(found.offset))  # only forward
            continue
        try:
            low, _ = consumer.get_watermark_offsets(found, cached=True)
        except KafkaException:
            continue
        if low > positions[tp]:
            positions[tp] = int(low)


def fetched_ends(consumer: Consumer, parts: Iterable[TopicPartition]) -> Positions | None:
    """The high watermark each partition's last fetch response carried (librdkafka's cached watermark):
    what a consumer that keeps polling knows, with no round trip to the broker (~65 ms per partition
    here). None while a partition has had no fetch response (or is no longer assigned): the caller then
    asks the broker. librdkafka keeps the high watermark also under read_committed (its default), where
    the position stops at the last stable offset: a partition with an open transaction then counts as
    caught up only once the merge's idle time has passed (late, never early)."""
    ends: Positions = {}
    for tp in parts:
        try:
            _, high = consumer.get_watermark_offsets(KafkaTopicPartition(tp.topic, tp.partition), cached=True)
        except KafkaException:
            return None
        if high < 0:
            return None
        ends[tp] = int(high)
    return ends
