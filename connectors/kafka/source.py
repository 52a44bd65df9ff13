"""KafkaSource: a reloop.connectors.base.Source over kafka-python.

The engine owns the positions (they live in its snapshots), so the source never subscribes and never
lets Kafka choose where to read: it assigns every partition of its topics and seeks to the positions it
is opened with. Group offsets are written only by an explicit ``commit(positions)``, which the
checkpoint loop calls after a snapshot is durable (quix-streams' order: flush, persist, commit), so
the committed offset is never ahead of what a restart can rebuild.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import KafkaConsumer, OffsetAndMetadata
from kafka import TopicPartition as KafkaTopicPartition
from kafka.errors import IllegalStateError, KafkaError, UnsupportedCodecError
from reloop.connectors.kafka.client_start import start_client
from reloop.connectors.kafka.fetch_records import as_records, read_records_directly
from reloop.connectors.kafka.login import login_checked
from reloop.connectors.kafka.settings import CONSUMER_RESERVED as _RESERVED
from reloop.engine.config_common import ConfigError
from reloop.engine.streams import (
    AuthenticationFailed,
    PartitionShare,
    Positions,
    Record,
    TopicNotFound,
    TopicPartition,
)

# What the client raises for a broker it cannot reach or a request it refuses: for the engine's commands,
# which know no Kafka client (engine/runtime/deadletters_cmd.py).
CLIENT_ERRORS: tuple[type[Exception], ...] = (KafkaError, AuthenticationFailed)


class KafkaSource:
    """Reads every partition of ``topics`` (or its ``share`` of them) from the positions given to ``open``.

    ``client_config`` goes to ``kafka.KafkaConsumer`` unchanged (SASL/SSL, timeouts, fetch sizes).
    ``group_id`` is only needed for ``commit`` (offsets visible to Kafka tooling and lag monitors).
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: list[str],
        group_id: str | None = None,
        client_config: Mapping[str, Any] | None = None,
        share: PartitionShare | None = None,
    ) -> None:
        if not topics:
            raise ValueError("KafkaSource needs at least one topic")
        for key in client_config or {}:
            if key in _RESERVED:
                raise ValueError(f"client_config[{key!r}] is not allowed: {_RESERVED[key]}")
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.group_id = group_id
        self.client_config = dict(client_config or {})
        self.share = share
        self._consumer: KafkaConsumer | None = None
        self._partitions: list[TopicPartition] | None = None
        self._next: Positions = {}
        self._closed = False
        # Whether the consumer reads fetched batches straight into Record (connectors/kafka/fetch_records.py).
        self.reads_records_directly = False
        self._ends: Positions | None = None
        self._ends_at = 0.0

    def _client(self) -> KafkaConsumer:
        if self._closed:
            raise RuntimeError("KafkaSource is closed")
        if self._consumer is None:
            config: dict[str, Any] = {
                # An out-of-range position (data deleted by retention) restarts at the oldest record left.
                "auto_offset_reset": "earliest",
                # A typo in a topic name must fail, not create an empty topic.
                "allow_auto_create_topics": False,
                "fetch_max_wait_ms": 100,
                # Cluster metadata refreshed by poll every 30 s (kafka-python: 5 min): partitions_now()
                # reads it, so partitions added to a topic are seen within that, without a blocking call.
                "metadata_max_age_ms": 30_000,
                **self.client_config,
            }
            with login_checked(self.bootstrap):
                self._consumer = start_client(
                    KafkaConsumer,
                    bootstrap_servers=self.bootstrap,
                    group_id=self.group_id,
                    enable_auto_commit=False,
                    **config,
                )
            self.reads_records_directly = read_records_directly(self._consumer)
        return self._consumer

    def partitions(self) -> list[TopicPartition]:
        if self._partitions is None:
            self._partitions = self._discover()
        return list(self._partitions)

    def partitions_now(self) -> list[TopicPartition]:
        """The partitions the topics have by the client's metadata (refreshed by poll every
        ``metadata_max_age_ms``; ``partitions()`` keeps those it opened with): a caller notices
        partitions added while it runs. No round trip of its own, so a broker outage cannot block it."""
        return self._discover()

    def _discover(self) -> list[TopicPartition]:
        consumer = self._client()
        out: list[TopicPartition] = []
        for topic in self.topics:
            found = consumer.partitions_for_topic(topic)
            if not found:
                raise TopicNotFound(f"Kafka topic {topic!r} does not exist at {self.bootstrap}")
            out += [TopicPartition(topic, p) for p in sorted(found)]
        return [tp for tp in out if self.share is None or self.share.owns(tp)]

    def open(self, positions: Mapping[TopicPartition, int] | None = None) -> None:
        positions = positions or {}
        pairs = self.partitions()
        unknown = set(positions) - set(pairs)
        if unknown:
            raise ValueError(f"positions name partitions this source does not read: {sorted(unknown)}")
        consumer = self._client()
        kafka_pairs = [KafkaTopicPartition(tp.topic, tp.partition) for tp in pairs]
        consumer.assign(kafka_pairs)
        missing = [k for k, tp in zip(kafka_pairs, pairs, strict=True) if tp not in positions]
        # "Beginning" is the oldest offset still stored, resolved now so position() is exact at once.
        starts = consumer.beginning_offsets(missing) if missing else {}
        self._next = {}
        for kafka_tp, tp in zip(kafka_pairs, pairs, strict=True):
            offset = int(positions[tp]) if tp in positions else int(starts[kafka_tp])
            if offset < 0:
                raise ValueError(f"negative position {offset} for {tp}")
            consumer.seek(kafka_tp, offset)
            self._next[tp] = offset

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if not self._next:
            raise RuntimeError("KafkaSource.poll before open")
        batches = poll_checked(self._client(), timeout_s, max_records, self.topics)
        out: list[Record] = []
        for kafka_tp, messages in batches.items():
            tp = TopicPartition(kafka_tp.topic, kafka_tp.partition)
            out += as_records(messages)  # a tombstone (null value) is b"": Record.value is always bytes
            if messages:
                self._next[tp] = messages[-1].offset + 1
        self._next.update(client_positions(self._client(), self._next))
        return out

    def position(self) -> Positions:
        return dict(self._next)

    def end_positions(self, *, max_age_s: float = 0.1, timeout_s: float = 2.0) -> Positions:
        """The log end offset of every assigned partition (cached for ``max_age_s``). The merge uses it to
        tell a partition that is caught up from one whose records are not fetched yet, so the merge
        order is exact. Bounded by ``timeout_s``: while the broker is down this raises instead of
        holding the processing thread (and a stop request) for the client's request timeout."""
        now = time.monotonic()
        if self._ends is not None and now - self._ends_at < max_age_s:
            return self._ends
        consumer = self._client()
        ends = consumer.end_offsets(list(consumer.assignment()), timeout_ms=int(timeout_s * 1000))
        self._ends = {TopicPartition(tp.topic, tp.partition): int(off) for tp, off in ends.items()}
        self._ends_at = now
        return self._ends

    def positions_at(self, timestamp_ms: int, *, timeout_s: float = 2.0) -> Positions:
        """Per partition read, the first offset whose record timestamp is >= ``timestamp_ms``, or the log
        end where no record is that recent yet. Bounded by ``timeout_s``."""
        consumer = self._client()
        pairs = [KafkaTopicPartition(tp.topic, tp.partition) for tp in self.partitions()]
        timeout_ms = int(timeout_s * 1000)
        found = consumer.offsets_for_times(dict.fromkeys(pairs, int(timestamp_ms)), timeout_ms=timeout_ms)
        ends = consumer.end_offsets(pairs, timeout_ms=timeout_ms)
        return {
            TopicPartition(tp.topic, tp.partition): int(found[tp].offset) if found.get(tp) else int(ends[tp])
            for tp in pairs
        }

    def fetched_ends(self) -> Positions | None:
        """``end_positions`` as the last fetch responses reported it, without a request (see
        ``fetched_ends`` below); None until every assigned partition has had one."""
        consumer = self._client()
        return fetched_ends(consumer, consumer.assignment())

    def commit(
        self, positions: Mapping[TopicPartition, int] | None = None, *, timeout_s: float = 2.0
    ) -> None:
        """Commit ``positions`` (default: the current position) as the group's offsets, synchronously.

        Call it only after the state that covers these positions is durable.
        """
        if self.group_id is None:
            raise RuntimeError("KafkaSource.commit needs a group_id")
        positions = self.position() if positions is None else positions
        offsets = {
            KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(int(offset), "", -1)
            for tp, offset in positions.items()
        }
        if offsets:
            # Bounded: during an outage a commit would otherwise retry for ever (and hold a stop).
            self._client().commit(offsets, timeout_ms=int(timeout_s * 1000))

    def committed(self) -> Positions:
        """The group's committed offsets for this source's partitions (absent when none)."""
        if self.group_id is None:
            raise RuntimeError("KafkaSource.committed needs a group_id")
        consumer = self._client()
        out: Positions = {}
        for tp in self.partitions():
            offset = consumer.committed(KafkaTopicPartition(tp.topic, tp.partition))
            if offset is not None:
                out[tp] = int(offset)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._consumer is not None:
            self._consumer.close(autocommit=False, timeout_ms=2000)
            self._consumer = None
        self._next = {}


# kafka-python's codecs other than gzip come from optional packages (its extras, reloop's dependencies).
_CODEC_PACKAGES = {"snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"}


def poll_checked(consumer: KafkaConsumer, timeout_s: float, max_records: int, topics: list[str]) -> Any:
    """``consumer.poll``, with a batch compressed by a codec whose package is missing raised as a
    ConfigError (exit 2, one line naming the package): kafka-python raises the same error at every poll
    from the same batch, which the supervisor rebuilt the stage for until it gave up, reading nothing."""
    try:
        return consumer.poll(timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records)
    except UnsupportedCodecError as exc:
        found = re.search(r"for (\w+) compression", str(exc))
        codec = found.group(1) if found else "?"
        package = _CODEC_PACKAGES.get(codec, f"the {codec} codec's package")
        raise ConfigError(
            f"a record batch of {', '.join(topics)} is {codec}-compressed and kafka-python cannot read it "
            f"without {package} (a dependency of reloop: pip install {package}), or set kafka.client: "
            f"confluent ({exc})"
        ) from exc


def client_positions(consumer: KafkaConsumer, parts: Positions) -> Positions:
    """Each partition's position as the consumer itself keeps it: local state, no request (the public
    ``position()`` may block on an offset reset). It is one past the last record a poll returned, or
    further where the client skipped offsets without returning a record: transaction markers (a
    transactional topic's log end is one past its last marker), aborted records under read_committed,
    records compaction removed at a batch's end, a range deleted by retention that an out-of-range reset
    jumped. Without it a source's position stopped short of the log end there, and whoever waits for
    ``position >= end_positions`` (the merges, reading the dead-letter topic) waited for ever. Partitions
    whose position is unknown (a reset pending) are left out, and so are positions not past ``parts``':
    a source's position only moves forward."""
    states = getattr(getattr(consumer, "_subscription", None), "assignment", None)
    if states is None:  # not the kafka-python this was written for: keep the sources' own positions
        return {}
    out: Positions = {}
    for tp in parts:
        state = states.get(tp)  # kafka's TopicPartition is a named tuple equal to (and hashed as) ours
        position = None if state is None else state.position
        if position is not None and int(position.offset) > parts[tp]:
            out[tp] = int(position.offset)
    return out


def fetched_ends(consumer: KafkaConsumer, parts: Iterable[KafkaTopicPartition]) -> Positions | None:
    """The log end of each partition as its last fetch response reported it (the high watermark): what
    a consumer that keeps polling knows, with no round trip to the broker (a ListOffsets request per
    step cost the join stage ~13 ms of its ~100 ms steps here). None when a partition has had no fetch
    response yet, or is no longer assigned, or the consumer reads committed records only (its end is the
    last stable offset, which kafka-python does not keep): the caller then asks the broker."""
    if consumer.config["isolation_level"] != "read_uncommitted":
        return None
    ends: Positions = {}
    for tp in parts:
        try:
            high = consumer.highwater(tp)
        except IllegalStateError:  # revoked inside the last poll
            return None
        if high is None:
            return None
        ends[TopicPartition(tp.topic, tp.partition)] = int(high)
    return ends
