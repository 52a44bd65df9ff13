"""A deterministic merge of records from several partitions, by record timestamp.

Why: the joiner's output depends on the order impressions and clicks reach it, and a consumer's poll
interleaves partitions however its fetches happened to return. Merging by (timestamp, topic rank, topic,
partition, offset) and releasing a record only while every partition has a buffered record makes the order a
function of the partitions' contents alone, so a restart from a snapshot replays exactly what an
uninterrupted run saw (the resume test depends on it). Among records of one timestamp the
``first_topics`` go first (the impressions topic: a click stamped in its impression's millisecond would
otherwise reach the joiner first whenever its topic's name sorts first, and be held as early).

A partition with nothing buffered blocks the others until it is known to be caught up: either the
source reports its end offsets (``end_positions``) and the partition's next offset has reached its end,
or nothing arrived for it for ``idle_ms`` of wall clock (a partition that is merely quiet, or live
traffic on only one topic, must not stop the engine).

Record timestamps are set by producers (CreateTime) and a partition's records keep their offset order,
so one record stamped ahead of its successors (a producer whose clock is off) would hold back every
later record of its partition until the other partitions ran dry: through a backlog, an hour of clicks
then reaches the joiner before their impressions and is lost as orphans (5 s ahead cost 131 of 560
samples in a test). So a record merges at the earliest timestamp among itself and the ``lookahead - 1``
records after it in its partition: a record stamped ahead of its successors goes with them. A
partition with fewer than ``lookahead`` records buffered blocks like an empty one while another
partition has records buffered (their keys may still fall), so the order stays a function of the
partitions' contents. Partitions whose timestamps never
go back (LogAppendTime, or one producer with a sane clock) merge exactly by timestamp, as before; a run
of more than ``lookahead - 1`` records stamped ahead is not covered (set the input topics'
``message.timestamp.type`` to ``LogAppendTime`` where producers' clocks cannot be trusted).

>>> from reloop.engine.streams import Record, TopicPartition
>>> a, b = TopicPartition("imp", 0), TopicPartition("clk", 0)
>>> m = RecordMerger([a, b], idle_ms=1000, clock=lambda: 0, lookahead=1)
>>> m.add([Record("imp", 0, 0, None, b"i1", 10), Record("imp", 0, 1, None, b"i2", 30)])
>>> m.release()          # clk has nothing yet: it might still hold something older
[]
>>> m.add([Record("clk", 0, 0, None, b"c1", 20)])
>>> [r.value for r in m.release()]    # i2 waits for the next clk record or its idleness
[b'i1', b'c1']
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from itertools import groupby, islice, pairwise
from operator import itemgetter, le

from reloop.engine.streams import Record, TopicPartition, record_partition

log = logging.getLogger(__name__)
DEFAULT_LOOKAHEAD = 8
AHEAD_MS = 1_000  # a record stamped this far ahead of a successor is counted (``stamped_ahead``)
_TIMESTAMP = itemgetter(5)  # Record.timestamp_ms (a named tuple: itemgetter is the fastest read)


class RecordMerger:
    def __init__(
        self,
        partitions: Iterable[TopicPartition],
        *,
        idle_ms: int,
        clock: Callable[[], int],
        lookahead: int = DEFAULT_LOOKAHEAD,
        first_topics: Sequence[str] = (),
    ) -> None:
        if lookahead < 1:
            raise ValueError(f"lookahead must be at least 1, got {lookahead}")
        self.idle_ms = idle_ms
        self.clock = clock
        self.lookahead = lookahead
        self._topic_rank = {t: i for i, t in enumerate(dict.fromkeys(first_topics))}
        self.stamped_ahead = 0  # records released before their own timestamp: stamped ahead of a successor
        self._buf: dict[TopicPartition, deque[Record]] = {tp: deque() for tp in partitions}
        # Per partition, the offsets of buffered records stamped later than the record after them, in
        # order: while there is none (the usual case) a head's key is its own timestamp, read in O(1).
        self._descents: dict[TopicPartition, deque[int]] = {tp: deque() for tp in self._buf}
        # one lookup a record: (records, descents, topic rank)
        self._parts = {tp: (self._buf[tp], self._descents[tp], self._rank(tp)) for tp in self._buf}
        now = clock()
        self._last_seen: dict[TopicPartition, int] = {tp: now for tp in self._buf}
        self._next_offset: dict[TopicPartition, int | None] = {tp: None for tp in self._buf}

    def add(self, records: Iterable[Record]) -> None:
        now = self.clock()
        # A poll returns each partition's records together: one dict step per run, not per record.
        for key, run in groupby(records, record_partition):
            tp = TopicPartition(*key)
            buf = self._buf.get(tp)
            if buf is None:
                buf = self._buf[tp] = deque()
                self._descents[tp] = deque()
                self._parts[tp] = (buf, self._descents[tp], self._rank(tp))
            run = list(run)
            stamps = list(map(_TIMESTAMP, run))
            # C-level checks; only a run that goes back in time is walked.
            previous = buf[-1] if buf else None
            if (previous is not None and previous.timestamp_ms > stamps[0]) or not all(
                map(le, stamps, islice(stamps, 1, None))
            ):
                self._descents[tp].extend(_descents(previous, run))
            buf.extend(run)
            self._last_seen[tp] = now

    def buffered(self) -> int:
        return sum(len(b) for b in self._buf.values())

    def first_offset(self, tp: TopicPartition, *, default: int) -> int:
        """The offset of the first record of ``tp`` still buffered (``default``: none is)."""
        buf = self._buf.get(tp)
        return buf[0].offset if buf else default

    def release(
        self,
        positions: Mapping[TopicPartition, int] | None = None,
        end_positions: Mapping[TopicPartition, int] | None = None,
        *,
        complete: Collection[TopicPartition] | None = None,
    ) -> list[Record]:
        """Records that can go out now, in merge order.

        ``positions``: the source's next offset per partition (what it has delivered to us).
        ``end_positions``: the log end per partition, from a source that knows it; then a partition with
        fewer than ``lookahead`` records buffered blocks the others until it is at its end, however long
        that takes (an empty mapping: ends unknown right now, e.g. the broker is down, so every such
        partition blocks).
        None: the source cannot tell, and the ``idle_ms`` rule decides.
        ``complete``: instead of the above, the partitions judged complete for this call (``complete()``
        of an earlier call, replayed): the release is then a function of the buffer and this set alone.
        """
        if complete is None:
            complete = self.complete(positions, end_positions)
        lookahead = self.lookahead
        busy = sum(1 for buf in self._buf.values() if buf)  # partitions with records buffered
        for tp, buf in self._buf.items():
            if self._short(len(buf), busy) and tp not in complete:
                return []
        heap = self._heap()
        out: list[Record] = []
        parts = self._parts
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            k, rank, topic, partition, _ = pop(heap)
            buf, ahead, _ = parts[(topic, partition)]  # type: ignore[index]  # equal to its TopicPartition
            record = buf.popleft()
            if ahead and ahead[0] == record.offset:
                ahead.popleft()
                if k < record.timestamp_ms - AHEAD_MS:
                    self._ahead(record, k)
            out.append(record)
            n = len(buf)
            busy -= not n
            if n < lookahead and self._short(n, busy) and (topic, partition) not in complete:
                break  # what this partition holds next may be older than the other heads, or lower its key
            if n:
                head = buf[0]
                key = self._lowest(buf) if ahead else head.timestamp_ms
                push(heap, (key, rank, topic, partition, head.offset))
        return out

    def _rank(self, tp: TopicPartition) -> int:
        return self._topic_rank.get(tp.topic, len(self._topic_rank))

    def _heap(self) -> list[tuple[int, int, str, int, int]]:
        """Every buffered partition's head as (merge key, topic rank, topic, partition, offset), a heap."""
        key, parts = self._key, self._parts
        heap = [(key(tp, buf), parts[tp][2], *tp, buf[0].offset) for tp, buf in self._buf.items() if buf]
        heapq.heapify(heap)
        return heap

    def _short(self, n: int, busy: int) -> bool:
        """Whether a partition with ``n`` records buffered cannot yet say where its head goes: it has
        none, or fewer than ``lookahead`` while another partition has records to be ordered against."""
        return n == 0 or (n < self.lookahead and busy > 1)

    def _key(self, tp: tuple[str, int], buf: deque[Record]) -> int:
        """The merge key of a partition's head: the earliest timestamp among it and its successors."""
        if not self._descents[tp]:  # type: ignore[index]
            return buf[0].timestamp_ms
        return self._lowest(buf)

    def _lowest(self, buf: deque[Record]) -> int:
        return min(map(_TIMESTAMP, islice(buf, self.lookahead)))

    def _ahead(self, record: Record, key: int) -> None:
        self.stamped_ahead += 1
        n = self.stamped_ahead
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, ... time
            log.warning(
                "record %s[%d]@%d is stamped %d ms ahead of a record after it in its partition (%d so far);"
                " merged with its successors. A producer's clock off, or records stamped with their events'"
                " own times (reloop serve stamps an impression with its request's event_time_ms; JSONL"
                " replays with the payload's)? Where producers stamp a topic, LogAppendTime orders it",
                record.topic,
                record.partition,
                record.offset,
                record.timestamp_ms - key,
                n,
            )

    def needs_ends(self) -> bool:
        """Whether some partition has fewer than ``lookahead`` records buffered (only then are end positions
        worth asking for)."""
        lookahead = self.lookahead
        return any(len(buf) < lookahead for buf in self._buf.values())

    def complete(
        self,
        positions: Mapping[TopicPartition, int] | None = None,
        end_positions: Mapping[TopicPartition, int] | None = None,
    ) -> frozenset[TopicPartition]:
        """The partitions that can deliver nothing more right now (``release``'s arguments): at their end
        offset, or idle for ``idle_ms`` when ends are unknown (None). A partition with fewer than
        ``lookahead`` records buffered blocks the others unless it is complete. The one input of a
        release that depends on more than the partitions' contents: the broker's state, the wall clock."""
        if end_positions is not None:
            return frozenset(tp for tp in self._buf if _at_end(tp, positions, end_positions))
        now = self.clock()
        return frozenset(tp for tp in self._buf if now - self._last_seen[tp] >= self.idle_ms)

    def drain(self) -> list[Record]:
        """Everything buffered, in merge order, ignoring idleness (end of a bounded replay): each
        partition's records in their order, merged by their keys as ``release`` would."""
        key = self._key
        heap = self._heap()
        out: list[Record] = []
        while heap:
            _, rank, topic, partition, _ = heapq.heappop(heap)
            tp = (topic, partition)
            buf = self._buf[tp]  # type: ignore[index]
            record = buf.popleft()
            ahead = self._descents[tp]  # type: ignore[index]
            if ahead and ahead[0] == record.offset:
                ahead.popleft()
            out.append(record)
            if buf:
                heapq.heappush(heap, (key(tp, buf), rank, topic, partition, buf[0].offset))
        return out


def _at_end(
    tp: TopicPartition,
    positions: Mapping[TopicPartition, int] | None,
    end_positions: Mapping[TopicPartition, int] | None,
) -> bool:
    if positions is None or end_positions is None or tp not in end_positions:
        return False
    return positions.get(tp, 0) >= end_positions[tp]


def _descents(previous: Record | None, run: list[Record]) -> Iterator[int]:
    """The offsets of the records stamped later than the record after them (``previous``: the record
    buffered before ``run``, if any)."""
    records = run if previous is None else [previous, *run]
    return (a.offset for a, b in pairwise(records) if a.timestamp_ms > b.timestamp_ms)
