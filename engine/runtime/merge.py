"""A deterministic merge of records from several partitions, by record timestamp.

Why: the joiner's output depends on the order impressions and clicks reach it, and a consumer's poll
interleaves partitions however its fetches happened to return. Merging by (timestamp, topic, partition,
offset) and releasing a record only while every partition has a buffered record makes the order a
function of the partitions' contents alone, so a restart from a snapshot replays exactly what an
uninterrupted run saw (the resume test depends on it).

A partition with nothing buffered blocks the others until it is known to be caught up: either the
source reports its end offsets (``end_positions``) and the partition's next offset has reached its end,
or nothing arrived for it for ``idle_ms`` of wall clock (a partition that is merely quiet, or live
traffic on only one topic, must not stop the engine).

>>> from reloop.engine.streams import Record, TopicPartition
>>> a, b = TopicPartition("imp", 0), TopicPartition("clk", 0)
>>> m = RecordMerger([a, b], idle_ms=1000, clock=lambda: 0)
>>> m.add([Record("imp", 0, 0, None, b"i1", 10), Record("imp", 0, 1, None, b"i2", 30)])
>>> m.release()          # clk has nothing yet: it might still hold something older
[]
>>> m.add([Record("clk", 0, 0, None, b"c1", 20)])
>>> [r.value for r in m.release()]    # i2 waits for the next clk record or its idleness
[b'i1', b'c1']
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from itertools import groupby

from reloop.engine.streams import Record, TopicPartition, record_partition


class RecordMerger:
    def __init__(
        self, partitions: Iterable[TopicPartition], *, idle_ms: int, clock: Callable[[], int]
    ) -> None:
        self.idle_ms = idle_ms
        self.clock = clock
        self._buf: dict[TopicPartition, deque[Record]] = {tp: deque() for tp in partitions}
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
            buf.extend(run)
            self._last_seen[tp] = now

    def buffered(self) -> int:
        return sum(len(b) for b in self._buf.values())

    def release(
        self,
        positions: Mapping[TopicPartition, int] | None = None,
        end_positions: Mapping[TopicPartition, int] | None = None,
    ) -> list[Record]:
        """Records that can go out now, in merge order.

        ``positions``: the source's next offset per partition (what it has delivered to us).
        ``end_positions``: the log end per partition, from a source that knows it; then a partition with
        nothing buffered blocks the others until it is at its end, however long that takes (an empty
        mapping: ends unknown right now, e.g. the broker is down, so every such partition blocks).
        None: the source cannot tell, and the ``idle_ms`` rule decides.
        """
        now = self.clock()
        for tp, buf in self._buf.items():
            if not buf and self._blocks(tp, now, positions, end_positions):
                return []
        heap = [
            (buf[0].timestamp_ms, tp.topic, tp.partition, buf[0].offset)
            for tp, buf in self._buf.items()
            if buf
        ]
        heapq.heapify(heap)
        out: list[Record] = []
        bufs = self._buf
        while heap:
            _, topic, partition, _ = heapq.heappop(heap)
            buf = bufs[(topic, partition)]  # type: ignore[index]  # equal to its TopicPartition
            out.append(buf.popleft())
            if buf:
                head = buf[0]
                heapq.heappush(heap, (head.timestamp_ms, topic, partition, head.offset))
            elif self._blocks(TopicPartition(topic, partition), now, positions, end_positions):
                break  # this partition ran dry: what it holds next may be older than the other heads
        return out

    def needs_ends(self) -> bool:
        """Whether some partition has nothing buffered (only then are end positions worth asking for)."""
        return any(not buf for buf in self._buf.values())

    def _blocks(
        self,
        tp: TopicPartition,
        now: int,
        positions: Mapping[TopicPartition, int] | None,
        end_positions: Mapping[TopicPartition, int] | None,
    ) -> bool:
        """Whether an empty partition ``tp`` may still deliver something older than the other heads."""
        if end_positions is not None:
            return not _at_end(tp, positions, end_positions)
        return now - self._last_seen[tp] < self.idle_ms

    def drain(self) -> list[Record]:
        """Everything buffered, in merge order, ignoring idleness (end of a bounded replay)."""
        out: list[Record] = []
        heap = [
            (r.timestamp_ms, r.topic, r.partition, r.offset, i)
            for i, r in enumerate(r for buf in self._buf.values() for r in buf)
        ]
        records = [r for buf in self._buf.values() for r in buf]
        for *_, i in sorted(heap):
            out.append(records[i])
        for buf in self._buf.values():
            buf.clear()
        return out


def _at_end(
    tp: TopicPartition,
    positions: Mapping[TopicPartition, int] | None,
    end_positions: Mapping[TopicPartition, int] | None,
) -> bool:
    if positions is None or end_positions is None or tp not in end_positions:
        return False
    return positions.get(tp, 0) >= end_positions[tp]
