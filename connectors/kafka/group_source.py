"""KafkaGroupSource: a member of a consumer group, for the join stage's tasks.

The group (kafka-python's classic protocol, range assignment) decides which partitions this member owns;
with co-partitioned topics the range assignor gives partition p of every topic to the same member. The
member is told inside ``poll`` (``listener.on_revoked`` before a rebalance takes partitions away,
``listener.on_assigned`` after it gives some), and the engine, not Kafka, decides where to read: on
assignment the listener seeks each partition to the position in its task checkpoint (``seek``).
Offsets are committed only by ``commit`` (informational: lag monitors), never automatically.

kafka-python 3 runs rebalance callbacks on its IO thread, where a blocking consumer call (offset
lookups, commits) raises. So inside a callback ``seek`` to "the beginning" only marks the partition
(its oldest offset is looked up and sought to after the poll returns: ``_resolve``), and ``commit`` is
queued and sent after the poll.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata
from kafka import TopicPartition as KafkaTopicPartition
from kafka.coordinator.base import MemberState
from kafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError
from reloop.connectors.kafka.client_start import start_client
from reloop.connectors.kafka.fetch_records import as_records, read_records_directly
from reloop.connectors.kafka.login import login_checked
from reloop.connectors.kafka.settings import CONSUMER_RESERVED as _RESERVED
from reloop.connectors.kafka.source import client_positions, fetched_ends, poll_checked
from reloop.connectors.partition_restart import RestartsBelow
from reloop.engine.streams import Positions, Record, TopicNotFound, TopicPartition


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: KafkaGroupSource) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner._revoked([TopicPartition(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner._assigned([TopicPartition(tp.topic, tp.partition) for tp in assigned])


class KafkaGroupSource:
    def __init__(
        self,
        *,
        bootstrap: str,
        topics: list[str],
        group_id: str,
        client_config: Mapping[str, Any] | None = None,
    ) -> None:
        for key in client_config or {}:
            if key in _RESERVED:
                raise ValueError(f"client_config[{key!r}] is not allowed: {_RESERVED[key]}")
        self.topics = list(topics)
        config: dict[str, Any] = {
            "allow_auto_create_topics": False,
            "fetch_max_wait_ms": 100,
            # Partitions added to an input reach the group at a metadata refresh: every 5 min by default,
            # during which their records were not read (and a lost co-partitioning not refused).
            "metadata_max_age_ms": 30_000,
            **dict(client_config or {}),
            # No reset by the client: a position retention passed raises, and poll restarts the partition at
            # its oldest record itself, counting what was deleted unread (``take_deleted_unread``).
            "auto_offset_reset": "none",
        }
        with login_checked(bootstrap):
            self._consumer = start_client(
                KafkaConsumer,
                bootstrap_servers=bootstrap,
                group_id=group_id,
                enable_auto_commit=False,
                **config,
            )
        # A rebalance waits up to a dead member's session timeout, and for the live members to hear of it
        # at their next heartbeat (the broker's initial delay, 3 s by default, is shorter than a session).
        settings = self._consumer.config
        self._longest_join_s = (settings["session_timeout_ms"] + settings["heartbeat_interval_ms"]) / 1000
        # Whether the consumer reads fetched batches straight into Record (connectors/kafka/fetch_records.py).
        self.reads_records_directly = read_records_directly(self._consumer)
        self._listener: Any = None
        self._next: Positions = {}
        self._unresolved: set[TopicPartition] = set()  # sought to the beginning inside a callback
        self._pending_commit: dict[TopicPartition, int] = {}
        self._in_callback = False
        self._ends: Positions | None = None
        self._ends_at = 0.0
        self._deleted_unread: dict[TopicPartition, int] = {}
        self._restarts_below = RestartsBelow()

    def subscribe(self, listener: Any) -> None:
        """Join the group; ``listener`` gets ``on_assigned(list)`` / ``on_revoked(list)`` inside poll."""
        self._listener = listener
        self._consumer.subscribe(topics=self.topics, listener=_Listener(self))
        # kafka-python 3.0.12 builds its coordinator's metadata snapshot only on a metadata update after
        # subscribe. A first assignment made before one records an empty snapshot; the update then forces
        # a rejoin, and that second join was seen never to complete (not a member for good). topics()
        # always fetches metadata from the broker, so the snapshot exists before the first poll.
        self._consumer.topics()

    def joined(self) -> bool:
        """A member of the group's current generation. kafka-python has no public call for it: its
        coordinator's state is read, and a client without one counts as joined (no false stall)."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        state = getattr(coordinator, "state", None)
        return state is None or state == MemberState.STABLE

    def longest_join_s(self) -> float:
        """How long a healthy (re)join of the group may take: the session timeout plus the heartbeat
        interval (the join stage judges membership no sooner; engine/runtime/join_stage.py)."""
        return self._longest_join_s

    def partition_count(self, topic: str) -> int:
        found = self._consumer.partitions_for_topic(topic)
        if not found:
            raise TopicNotFound(f"Kafka topic {topic!r} does not exist")
        return len(found)

    def _revoked(self, tps: list[TopicPartition]) -> None:
        self._in_callback = True
        try:
            self._listener.on_revoked(tps)
        finally:
            self._in_callback = False
        for tp in tps:
            self._next.pop(tp, None)
            self._unresolved.discard(tp)
        self._ends = None

    def _assigned(self, tps: list[TopicPartition]) -> None:
        self._ends = None
        self._in_callback = True
        try:
            self._listener.on_assigned(tps)
        finally:
            self._in_callback = False

    def seek(self, positions: Mapping[TopicPartition, int | None]) -> None:
        """Read each partition from ``offset`` (None: the oldest record still stored)."""
        for tp, offset in positions.items():
            ktp = KafkaTopicPartition(tp.topic, tp.partition)
            if offset is None:
                self._consumer.seek_to_beginning(ktp)
                self._next.pop(tp, None)
                self._unresolved.add(tp)
            else:
                self._consumer.seek(ktp, int(offset))
                self._next[tp] = int(offset)
                self._unresolved.discard(tp)
        if not self._in_callback:
            self._resolve()

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        try:
            batches = poll_checked(self._consumer, timeout_s, max_records, self.topics)
        except OffsetOutOfRangeError as exc:
            self._restart_out_of_range(exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {})
            batches = {}
        except NoOffsetForPartitionError as exc:  # a listener that sought none: read from the beginning
            unsought = exc.args[0] if exc.args and isinstance(exc.args[0], set | frozenset) else set()
            self.seek({TopicPartition(k.topic, k.partition): None for k in unsought})
            batches = {}
        refetch = self._resolve(batches)
        if self._pending_commit:
            pending, self._pending_commit = self._pending_commit, {}
            self.commit(pending)
        out: list[Record] = []
        for ktp, messages in batches.items():
            tp = TopicPartition(ktp.topic, ktp.partition)
            if tp not in self._next or tp in refetch:  # revoked inside this poll; read again from its start
                continue
            out += as_records(messages)
            if messages:
                self._next[tp] = messages[-1].offset + 1
        # Past transaction markers and skipped ranges too (connectors/kafka/source.py client_positions).
        self._next.update(client_positions(self._consumer, self._next))
        return out

    def _resolve(self, batches: Mapping[Any, list[Any]] | None = None) -> set[TopicPartition]:
        """Start each partition sought to its beginning at the oldest offset the broker stores now, looked
        up (ListOffsets: blocking, so never inside a callback) and sought to explicitly, as KafkaSource
        opens: the task's start is a known offset from its first step (its lag and the stall check see
        the records waiting at once), whatever the client's own pending reset would have chosen. The
        records ``batches`` (this poll's) holds for such a partition are kept when they start at or before
        that offset; otherwise the partition is returned, its records to be dropped and fetched again from
        there."""
        if not self._unresolved:
            return set()
        refetch: set[TopicPartition] = set()
        for tp, start in self._oldest(self._unresolved).items():
            ktp = KafkaTopicPartition(tp.topic, tp.partition)
            got = (batches or {}).get(ktp)
            if not got or got[0].offset > start:
                if got:
                    refetch.add(tp)
                self._consumer.seek(ktp, start)
            self._next[tp] = start  # poll then moves it past what it returns
            self._unresolved.discard(tp)
        return refetch

    def _restart_out_of_range(self, fetched_at: Mapping[Any, int]) -> None:
        """Partitions whose position the broker no longer holds: below its log start, retention deleted
        the records in between before they were read (a task that lagged, or was down, longer than the
        topic's retention), counted here; past its log end, the topic was recreated or truncated. Either
        way the partition restarts at its oldest record, sought to explicitly."""
        at = {TopicPartition(k.topic, k.partition): int(offset) for k, offset in fetched_at.items()}
        for tp, start in self._oldest(tp for tp in at if tp in self._next).items():
            if start > at[tp]:
                self._deleted_unread[tp] = self._deleted_unread.get(tp, 0) + start - at[tp]
            elif start < at[tp]:
                self._restarts_below.restarted(tp, at[tp], start)
            self._consumer.seek(KafkaTopicPartition(tp.topic, tp.partition), start)
            self._next[tp] = start

    def _oldest(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The oldest offset the broker stores of each partition now (ListOffsets: blocking, so never
        inside a callback)."""
        wanted = [KafkaTopicPartition(tp.topic, tp.partition) for tp in sorted(tps)]
        if not wanted:
            return {}
        found = self._consumer.beginning_offsets(wanted)
        return {TopicPartition(k.topic, k.partition): int(offset) for k, offset in found.items()}

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
        parts = [KafkaTopicPartition(tp.topic, tp.partition) for tp in self._next]
        ends = self._consumer.end_offsets(parts, timeout_ms=int(timeout_s * 1000)) if parts else {}
        self._ends = {TopicPartition(tp.topic, tp.partition): int(off) for tp, off in ends.items()}
        self._ends_at = now
        return self._ends

    def fetch_state(self) -> dict[str, str]:
        """Each owned partition as kafka-python's fetcher sees it, for a stall's message: a consumer that
        fetches nothing with records waiting is held by one of these (a pending offset reset or leader
        epoch validation, a pause, a revocation in progress) or by the broker."""
        states = getattr(getattr(self._consumer, "_subscription", None), "assignment", None)
        if states is None:
            return {}
        out: dict[str, str] = {}
        for tp in self._next:
            state = states.get(KafkaTopicPartition(tp.topic, tp.partition))
            if state is None:
                out[f"{tp.topic}:{tp.partition}"] = "not assigned"
                continue
            position = getattr(state, "position", None)
            flags = [
                name
                for name, on in (
                    ("awaiting reset", getattr(state, "awaiting_reset", False)),
                    ("awaiting validation", getattr(state, "awaiting_validation", False)),
                    ("paused", getattr(state, "paused", False)),
                    ("fetchable", state.is_fetchable()),
                )
                if on
            ]
            at = "unknown" if position is None else position.offset
            flagged = ", ".join(flags)
            out[f"{tp.topic}:{tp.partition}"] = f"position {at}, highwater {state.highwater}; {flagged}"
        return out

    def fetched_ends(self) -> Positions | None:
        """``end_positions`` as the last fetch responses reported it, without a request
        (connectors/kafka/source.py ``fetched_ends``); None until every owned partition has had one."""
        owned = [KafkaTopicPartition(tp.topic, tp.partition) for tp in self._next]
        return fetched_ends(self._consumer, owned)

    def commit(self, positions: Mapping[TopicPartition, int], *, timeout_s: float = 2.0) -> None:
        if self._in_callback:
            self._pending_commit.update(positions)
            return
        offsets = {
            KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(int(off), "", -1)
            for tp, off in positions.items()
            if tp in self._next or tp in self._unresolved
        }
        if offsets:
            self._consumer.commit(offsets, timeout_ms=int(timeout_s * 1000))

    def close(self) -> None:
        """Leave the group at once (the others rebalance now, not after a session timeout)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close(autocommit=False, timeout_ms=2000)
