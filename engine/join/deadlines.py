"""A bucketed deadline index: which keys fall due when the watermark reaches a time.

A heap of one entry per key costs ~130 bytes a key; here a key costs one list slot (~8 bytes) because
keys are grouped into buckets of ``bucket_ms`` and only bucket numbers go on the heap. The bucket the
watermark is inside (the *active* bucket) is sorted by deadline once, when the watermark enters it, and
then consumed from the front, so a watermark that advances a millisecond per event costs O(1) per event
instead of a scan of the bucket.

Each key is added with a *time* (an int the owner already holds, so storing it costs a list slot, not
an int object) and its deadline is ``time + offset_ms``: sorting a bucket then needs no lookup in the
owner's dict, which on a large dict is a cache miss per key.

The index may hold stale entries: keys the owner removed since, or re-added with another deadline, or
re-added with the same one (a redelivered record after a bound dropped it). ``pop_due`` returns
candidates ``(deadline, seq, key)``: the owner takes one only if the key is still there with that
deadline, which also drops the second of two same-deadline entries. ``deadline_of`` (the owner's current
deadline of a key, None when gone) serves the rare paths: eviction and snapshots.

Order: due entries come out by deadline, ties in insertion order; ``live_keys`` yields each live key
once, in an order that makes an index rebuilt from it behave identically (snapshot/restore).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator

DeadlineOf = Callable[[str], int | None]
Entry = tuple[int, int, str]  # (deadline, seq, key)
_INF = 2**63


class DeadlineIndex:
    def __init__(self, bucket_ms: int, offset_ms: int, deadline_of: DeadlineOf) -> None:
        if bucket_ms <= 0:
            raise ValueError("bucket_ms must be positive")
        self.bucket_ms = bucket_ms
        self.offset_ms = offset_ms
        self._deadline_of = deadline_of
        self._buckets: dict[int, list[str | int]] = {}  # bucket -> [key, time, key, time, ...]
        self._heap: list[int] = []
        self._active_b: int | None = None
        self._active: list[Entry] = []  # sorted; entries before _pos are consumed
        self._pos = 0
        self._seq = 0
        # A lower bound of the next deadline: callers skip pop_due while the watermark is below it.
        self.horizon = _INF

    def _update_horizon(self) -> None:
        if self._pos < len(self._active):
            self.horizon = self._active[self._pos][0]
        elif self._heap:
            self.horizon = self._heap[0] * self.bucket_ms
        else:
            self.horizon = _INF

    def add(self, key: str, time_ms: int) -> None:
        """Index ``key`` with deadline ``time_ms + offset_ms``."""
        deadline_ms = time_ms + self.offset_ms
        if deadline_ms < self.horizon:
            self.horizon = deadline_ms
        b = deadline_ms // self.bucket_ms
        active_b = self._active_b
        if active_b is not None and b <= active_b:
            if b == active_b:
                self._seq += 1
                bisect.insort(self._active, (deadline_ms, self._seq, key), lo=self._pos)
                return
            # Before the active bucket (``pop_earliest`` activates the first bucket however far past the
            # watermark): ``pop_due`` and ``pop_earliest`` read the active bucket before the heap, so it
            # goes back among the buckets, in its order, and this key's bucket comes out first.
            self._deactivate()
        bucket = self._buckets.get(b)
        if bucket is None:
            self._buckets[b] = [key, time_ms]
            heapq.heappush(self._heap, b)
        else:
            bucket.append(key)
            bucket.append(time_ms)

    def _activate(self, b: int) -> None:
        """Sort bucket ``b`` by deadline and make it the active bucket (it must be the smallest)."""
        flat = self._buckets.pop(b)
        heapq.heappop(self._heap)
        offset = self.offset_ms
        pairs = zip(flat[0::2], flat[1::2], strict=True)
        entries = [(t + offset, i, key) for i, (key, t) in enumerate(pairs)]
        entries.sort()
        self._active_b, self._active, self._pos, self._seq = b, entries, 0, len(entries)

    def _deactivate(self) -> None:
        """Put the active bucket's unconsumed entries back as an ordinary bucket, in their sorted order
        (``_activate`` sorts by deadline, then position: ties keep their order)."""
        b = self._active_b
        assert b is not None and b not in self._buckets
        offset = self.offset_ms
        flat: list[str | int] = []
        for d, _, key in self._active[self._pos :]:
            flat.append(key)
            flat.append(d - offset)
        self._active_b, self._active, self._pos = None, [], 0
        if flat:
            self._buckets[b] = flat
            heapq.heappush(self._heap, b)

    def _take(self, end: int) -> list[Entry]:
        """Consume the active bucket's entries up to index ``end``."""
        active, pos = self._active, self._pos
        taken = active[pos:end]
        if end >= len(active):
            self._active_b, self._active, self._pos = None, [], 0
        else:
            self._pos = end
            if end > 4096 and end * 2 > len(active):  # drop the consumed prefix now and then
                self._active, self._pos = active[end:], 0
        return taken

    def pop_due(self, watermark_ms: int) -> list[Entry]:
        """Candidates with deadline <= ``watermark_ms``, by deadline (ties: insertion order), consumed."""
        last = watermark_ms // self.bucket_ms
        active_b = self._active_b
        if active_b is not None and active_b >= last:
            # The common case, inlined: the watermark moved inside its bucket, past an entry or two.
            active = self._active
            pos = end = self._pos
            n = len(active)
            while end < n and active[end][0] <= watermark_ms:
                end += 1
            if end == pos:
                return []
            due = active[pos:end]
            if end < n:
                self._pos = end
                self.horizon = active[end][0]
                if end > 4096 and end * 2 > n:  # drop the consumed prefix now and then
                    self._active, self._pos = active[end:], 0
            else:
                self._active_b, self._active, self._pos = None, [], 0
                self.horizon = self._heap[0] * self.bucket_ms if self._heap else _INF
            return due
        due = self._take(len(self._active)) if active_b is not None else []
        heap = self._heap
        while heap and heap[0] <= last:
            b = heap[0]
            self._activate(b)
            if b < last:
                due += self._take(len(self._active))
            else:
                due += self._take(bisect.bisect_right(self._active, (watermark_ms, _INF), self._pos))
                break
        self._update_horizon()
        return due

    def pop_buckets_before(self, watermark_ms: int) -> list[str | int]:
        """Every entry of the buckets wholly before the watermark's own, unsorted, as candidates
        ``[key, time, key, time, ...]`` (times, not deadlines): a sweep that need not be exact to the
        millisecond skips the sorting and the per-event calls of ``pop_due``."""
        last = watermark_ms // self.bucket_ms
        flat: list[str | int] = []
        if self._active_b is not None and self._active_b < last:
            offset = self.offset_ms
            for d, _, key in self._active[self._pos :]:
                flat.append(key)
                flat.append(d - offset)
            self._active_b, self._active, self._pos = None, [], 0
        heap, buckets = self._heap, self._buckets
        while heap and heap[0] < last:
            flat += buckets.pop(heapq.heappop(heap))
        self._update_horizon()
        return flat

    def pop_earliest(self) -> str | None:
        """The earliest live key (the active bucket first), removed; None when empty."""
        while True:
            if self._active_b is None:
                if not self._heap:
                    self.horizon = _INF
                    return None
                self._activate(self._heap[0])
            active = self._active
            while self._pos < len(active):
                entry = active[self._pos]
                self._pos += 1
                if self._deadline_of(entry[2]) == entry[0]:
                    if self._pos >= len(active):
                        self._active_b, self._active, self._pos = None, [], 0
                    self._update_horizon()
                    return entry[2]
            self._active_b, self._active, self._pos = None, [], 0

    def live_keys(self) -> Iterator[str]:
        """Each live key once: the active bucket's in their order, then every other bucket's in insertion
        order, so an index rebuilt by adding them in this order pops them as this one would."""
        seen: set[str] = set()
        deadline_of, offset = self._deadline_of, self.offset_ms
        keys, times = self.candidates()
        for key, t in zip(keys, times, strict=True):
            if key not in seen and deadline_of(key) == t + offset:
                seen.add(key)
                yield key

    def candidates(self) -> tuple[list[str], list[int]]:
        """Every entry's ``(key, time)``, stale ones included, in ``live_keys``' order (two lists): an
        owner that can test liveness in bulk (``time == its own time of key``: the deadline is time +
        offset on both sides) filters them without a Python call per key (snapshots of large states)."""
        offset = self.offset_ms
        active = self._active[self._pos :]
        keys = [key for _, _, key in active]
        times = [d - offset for d, _, _ in active]
        for b in sorted(self._buckets):
            flat = self._buckets[b]
            keys += flat[0::2]  # type: ignore[arg-type]
            times += flat[1::2]  # type: ignore[arg-type]
        return keys, times

    def clear(self) -> None:
        self._buckets.clear()
        self._heap.clear()
        self._active_b, self._active, self._pos = None, [], 0
        self.horizon = _INF
