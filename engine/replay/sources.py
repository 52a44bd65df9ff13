"""Sources for replay: a bounded, deterministic, clock-driving wrapper around any Source, and an in-memory
source of dataset events.

``ReplaySource`` is what makes a replay reproducible whatever it reads from. It merges the wrapped
source's partitions itself by (key, topic rank, topic, partition, offset), a head's key being the
earliest time among it and the records after it (``lookahead``, as the pipeline's merge), releasing a
record only while every partition not yet finished has enough records buffered to know its key, and
hands the merged stream out in batches of a fixed size. So the sequence of ``poll`` results is a
function of the records in the range alone, not of how a Kafka fetch or a file read happened to cut
them, and a replay of the same log from Kafka and from files feeds the pipeline identically. It also
drives the simulated clock: after each poll the clock is set to the newest key handed out (event time
stands in for wall time; a replay never waits; a record stamped far ahead of its successors does not
move it).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from operator import itemgetter
from typing import Literal

import orjson
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Click, Impression
from reloop.engine.runtime.merge import DEFAULT_LOOKAHEAD
from reloop.engine.streams import Positions, Record, Source, TopicPartition

TimestampMode = Literal["record", "event"]
_TIMESTAMP = itemgetter(5)  # Record.timestamp_ms
# (key, topic rank, topic, partition, offset, partition key): a partition's head in merge order
_Head = tuple[int, int, str, int, int, TopicPartition]


class ReplayStalled(RuntimeError):
    """The wrapped source stopped delivering before the end of the replay range."""


def event_time_of(value: bytes) -> int | None:
    """The ``event_time_ms`` inside an event's JSON, or None when it has none (a malformed record)."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    t = data.get("event_time_ms") if isinstance(data, dict) else None
    return t if isinstance(t, int) and not isinstance(t, bool) else None


class ReplaySource:
    """Reads ``inner`` from ``start`` (default: where ``open`` is told, else the beginning) up to
    ``end`` (exclusive, per partition) in a deterministic merged order.

    ``timestamps="event"`` orders by the event time inside each record (files carry no record
    timestamps); ``"record"`` by the record's own timestamp, as the live pipeline does.
    ``set_clock`` receives the newest key handed out after every poll. ``first_topics`` go first
    among records of one timestamp, in the order given (the impressions topic: a click stamped with its
    impression's own time, as ``--delay immediate`` makes it, comes after the impression, not before it
    as the topic names' order would put it, which made the joiner hold every such click as early).
    """

    def __init__(
        self,
        inner: Source,
        *,
        end: Mapping[TopicPartition, int],
        start: Mapping[TopicPartition, int] | None = None,
        batch_size: int = 1024,
        timestamps: TimestampMode = "record",
        set_clock: Callable[[int], None] | None = None,
        stall_timeout_s: float = 30.0,
        first_topics: Sequence[str] = (),
        lookahead: int = DEFAULT_LOOKAHEAD,
    ) -> None:
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.inner = inner
        self.end = dict(end)
        self.start = dict(start or {})
        self.batch_size = batch_size
        self.timestamps = timestamps
        self.set_clock = set_clock
        self.stall_timeout_s = stall_timeout_s
        self._rank = {t: i for i, t in enumerate(dict.fromkeys(first_topics))}
        self.lookahead = lookahead
        self._buf: dict[TopicPartition, deque[Record]] = {}
        self._next: Positions = {}
        self._last_event_time: dict[TopicPartition, int] = {}  # per partition (``timestamps="event"``)
        self.records_out = 0
        self.first_timestamp_ms: int | None = None
        self.last_timestamp_ms: int | None = None

    def partitions(self) -> list[TopicPartition]:
        return self.inner.partitions()

    def open(self, positions: Mapping[TopicPartition, int] | None = None) -> None:
        pairs = self.inner.partitions()
        missing = [tp for tp in pairs if tp not in self.end]
        if missing:
            raise ValueError(f"replay end positions missing for {missing}")
        begin = {**self.start, **dict(positions or {})}
        self.inner.open(begin or None)
        actual = self.inner.position()
        self._next = {tp: int(actual.get(tp, begin.get(tp, 0))) for tp in pairs}
        self._buf = {tp: deque() for tp in pairs}

    def end_positions(self) -> Positions:
        return dict(self.end)

    def position(self) -> Positions:
        """Next offset the replay will hand out; the end offset once a partition is finished."""
        out = dict(self._next)
        for tp in out:
            if self._finished(tp):
                out[tp] = max(out[tp], self.end[tp])
        return out

    def done(self) -> bool:
        return all(self._finished(tp) for tp in self._buf)

    def _fetched_all(self, tp: TopicPartition) -> bool:
        return self.inner.position().get(tp, 0) >= self.end[tp]

    def _finished(self, tp: TopicPartition) -> bool:
        return not self._buf[tp] and (self._next[tp] >= self.end[tp] or self._fetched_all(tp))

    def _stamp(self, r: Record) -> Record:
        if self.timestamps == "event":
            tp = TopicPartition(r.topic, r.partition)
            t = event_time_of(r.value)
            if t is None:
                # A record without an event time (the pipeline dead-letters it) keeps its place: it takes
                # the time of the record before it. Stamped 0, it pulled the records before it ahead of
                # their time (the merge orders a record by the earliest of it and its successors): clicks
                # that reached the joiner before their impressions and lost their label.
                t = self._last_event_time.get(tp, max(r.timestamp_ms, 0))
            self._last_event_time[tp] = t
            return r._replace(timestamp_ms=t)
        return r

    def _short(self, tp: TopicPartition) -> bool:
        """Fewer than ``lookahead`` records buffered while more are to come: its key is not known yet."""
        return len(self._buf[tp]) < self.lookahead and not self._fetched_all(tp)

    def _key(self, tp: TopicPartition) -> int:
        """A partition head's merge key: the earliest time among it and the ``lookahead - 1`` records after
        it (as the pipeline's merge, engine/runtime/merge.py). A record stamped far ahead of its successors
        (a bad clock, a typo of ten years) goes out with them instead of holding its partition back while
        the others run ahead, and the clock follows the key, not the stamp, so the pipeline refuses that
        record as too far in the future instead of taking it as the new present (every valid impression
        after it was dropped as too late)."""
        return min(map(_TIMESTAMP, islice(self._buf[tp], self.lookahead)))

    def _fill(self, timeout_s: float) -> None:
        """Poll until every unfinished partition has ``lookahead`` records buffered.

        This waits for the wrapped source rather than returning early: the records of the range are
        known to exist, and a batch cut short by a slow fetch would make the replay depend on timing.
        """
        stalled_since = time.monotonic()
        while True:
            hungry = [tp for tp in self._buf if self._short(tp)]
            if not hungry:
                return
            records = self.inner.poll(max(self.batch_size, 256), min(0.1, max(timeout_s, 0.0)))
            got = False
            for r in records:
                tp = TopicPartition(r.topic, r.partition)
                if tp in self._buf and r.offset < self.end[tp]:
                    self._buf[tp].append(self._stamp(r))
                    got = True
            now = time.monotonic()
            if got:
                stalled_since = now
            elif now - stalled_since > self.stall_timeout_s:
                raise ReplayStalled(
                    f"no records for {self.stall_timeout_s}s from partitions {sorted(hungry)} before their "
                    f"replay end {[self.end[tp] for tp in sorted(hungry)]} (deleted by retention?)"
                )

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        # After _fill every unfinished partition has ``lookahead`` records buffered: the merge takes the
        # smallest (key, topic rank, topic, partition, offset) head, and refills (and re-heaps) when a
        # buffer runs short, since a partition that may still hold older records blocks the merge.
        self._fill(timeout_s)
        out: list[Record] = []
        limit = min(max_records, self.batch_size)
        heads = self._heads()
        newest = self.last_timestamp_ms if self.last_timestamp_ms is not None else -(2**63)
        while heads and len(out) < limit:
            key, *_, tp = heapq.heappop(heads)
            buf = self._buf[tp]
            r = buf.popleft()
            self._next[tp] = r.offset + 1
            out.append(r)
            newest = max(newest, key)
            if self._short(tp):
                self._fill(timeout_s)
                heads = self._heads()
            elif buf:
                heapq.heappush(heads, self._head(self._key(tp), buf[0].offset, tp))
        if out:
            self.records_out += len(out)
            if self.first_timestamp_ms is None:
                # The first record with a time: one without (stamped 0 at the head of its partition, the
                # pipeline dead-letters it) made the summary's first_time_ms 1970.
                self.first_timestamp_ms = next((r.timestamp_ms for r in out if r.timestamp_ms > 0), None)
            self.last_timestamp_ms = newest
            if self.set_clock is not None:
                self.set_clock(newest)
        elif timeout_s > 0 and self.done():
            # Block like a consumer's poll with nothing to return: a caller looping on an exhausted
            # range (the train stage's fetch thread) would otherwise spin and hold the GIL from the
            # training thread (a samples-topic replay ran at about half speed).
            time.sleep(timeout_s)
        return out

    def _head(self, timestamp_ms: int, offset: int, tp: TopicPartition) -> _Head:
        return (timestamp_ms, self._rank.get(tp.topic, len(self._rank)), tp.topic, tp.partition, offset, tp)

    def _heads(self) -> list[_Head]:
        """The buffered head of every partition as a heap in merge order (the partition last: never
        compared, as (topic, partition) already differ)."""
        heads = [self._head(self._key(tp), b[0].offset, tp) for tp, b in self._buf.items() if b]
        heapq.heapify(heads)
        return heads

    def close(self) -> None:
        self.inner.close()


class EventListSource:
    """Dataset events as a bounded in-memory log: topic ``impressions`` and ``clicks``, one partition each,
    record timestamp = event time, key = impression id (as the scoring service produces them)."""

    def __init__(
        self,
        events: Iterable[Impression | Click],
        impressions_topic: str = "impressions",
        clicks_topic: str = "clicks",
    ) -> None:
        self.imp_tp = TopicPartition(impressions_topic, 0)
        self.clk_tp = TopicPartition(clicks_topic, 0)
        self._log: dict[TopicPartition, list[Record]] = {self.imp_tp: [], self.clk_tp: []}
        for e in events:
            tp = self.imp_tp if isinstance(e, Impression) else self.clk_tp
            log = self._log[tp]
            log.append(
                Record(tp.topic, tp.partition, len(log), e.impression_id.encode(), encode(e), e.event_time_ms)
            )
        self._next: Positions = {}
        # Merged order of the whole log, computed once: poll hands it out in slices.
        # An impression before a click of the same time (ReplaySource's ``first_topics``).
        self._order = [
            (t, topic, partition, offset)
            for t, _, topic, partition, offset in heapq.merge(
                *(
                    [(r.timestamp_ms, int(tp != self.imp_tp), r.topic, r.partition, r.offset) for r in log]
                    for tp, log in self._log.items()
                )
            )
        ]
        self._cursor = 0

    def partitions(self) -> list[TopicPartition]:
        return sorted(self._log)

    def open(self, positions: Mapping[TopicPartition, int] | None = None) -> None:
        positions = positions or {}
        self._next = {tp: int(positions.get(tp, 0)) for tp in self._log}
        self._cursor = 0

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        out: list[Record] = []
        while self._cursor < len(self._order) and len(out) < max_records:
            _, topic, partition, offset = self._order[self._cursor]
            self._cursor += 1
            tp = TopicPartition(topic, partition)
            if offset >= self._next[tp]:
                out.append(self._log[tp][offset])
                self._next[tp] = offset + 1
        return out

    def position(self) -> Positions:
        return dict(self._next)

    def end_positions(self) -> Positions:
        return {tp: len(log) for tp, log in self._log.items()}

    def close(self) -> None:
        self._next = {}
