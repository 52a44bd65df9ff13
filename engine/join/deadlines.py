"""A bucketed deadline index: which keys fall due when the watermark reaches a time.

A heap of one entry per key costs ~130 bytes a key; here a key costs one list slot (~8 bytes) because
keys are grouped into buckets of ``bucket_ms`` and only bucket numbers go on the heap. The bucket the
watermark is inside (the *active* bucket) is sorted by deadline once, when the watermark enters it, and
then consumed from the front, so a watermark that advances a millisecond per event costs O(1) per event
instead of a scan of the bucket. The index may hold stale keys (removed from the owner's dict since);
the owner's ``deadline_of`` returns None for them and they are skipped.

Order: due keys come out by deadline, ties in insertion order; iteration yields the same order, so an
index rebuilt by re-adding the keys in iteration order behaves identically (snapshot/restore).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator

DeadlineOf = Callable[[str], int | None]
_INF = 2**63


class DeadlineIndex:
    def __init__(self, bucket_ms: int) -> None:
        if bucket_ms <= 0:
            raise ValueError("bucket_ms must be positive")
        self.bucket_ms = bucket_ms
        self._buckets: dict[int, list[str]] = {}
        self._heap: list[int] = []
        self._active_b: int | None = None
        self._active: list[tuple[int, int, str]] = []  # (deadline, seq, key), sorted
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

    def add(self, key: str, deadline_ms: int) -> None:
        if deadline_ms < self.horizon:
            self.horizon = deadline_ms
        b = deadline_ms // self.bucket_ms
        if b == self._active_b:
            self._seq += 1
            bisect.insort(self._active, (deadline_ms, self._seq, key), lo=self._pos)
            return
        bucket = self._buckets.get(b)
        if bucket is None:
            bucket = self._buckets[b] = []
            heapq.heappush(self._heap, b)
        bucket.append(key)

    def _activate(self, b: int, deadline_of: DeadlineOf) -> None:
        """Sort bucket ``b`` by deadline and make it the active bucket (it must be the smallest)."""
        keys = self._buckets.pop(b)
        heapq.heappop(self._heap)
        live = []
        for i, key in enumerate(keys):
            d = deadline_of(key)
            if d is not None and d // self.bucket_ms == b:
                live.append((d, i, key))
        live.sort()
        self._active_b, self._active, self._pos, self._seq = b, live, 0, len(keys)

    def _take_active(self, limit: int | None, deadline_of: DeadlineOf, due: list[tuple[int, str]]) -> None:
        active, pos = self._active, self._pos
        while pos < len(active) and (limit is None or active[pos][0] <= limit):
            d, _, key = active[pos]
            pos += 1
            if deadline_of(key) == d:
                due.append((d, key))
        if pos >= len(active):
            self._active_b, self._active, self._pos = None, [], 0
        else:
            self._pos = pos
            if pos > 4096 and pos * 2 > len(active):  # drop the consumed prefix now and then
                self._active, self._pos = active[pos:], 0

    def pop_due(self, watermark_ms: int, deadline_of: DeadlineOf) -> list[str]:
        """Keys whose deadline is <= ``watermark_ms``, in deadline order (ties: insertion order)."""
        due: list[tuple[int, str]] = []
        last = watermark_ms // self.bucket_ms
        if self._active_b is not None:
            if self._active_b < last:
                self._take_active(None, deadline_of, due)
            else:
                self._take_active(watermark_ms, deadline_of, due)
                self._update_horizon()
                return [key for _, key in due]
        while self._heap and self._heap[0] <= last:
            b = self._heap[0]
            self._activate(b, deadline_of)
            if b < last:
                self._take_active(None, deadline_of, due)
            else:
                self._take_active(watermark_ms, deadline_of, due)
                break
        self._update_horizon()
        return [key for _, key in due]

    def pop_earliest(self, deadline_of: DeadlineOf) -> str | None:
        """The live key of the earliest bucket (the active one first), removed; None when empty."""
        while True:
            if self._active_b is None:
                if not self._heap:
                    self.horizon = _INF
                    return None
                self._activate(self._heap[0], deadline_of)
            active = self._active
            while self._pos < len(active):
                d, _, key = active[self._pos]
                self._pos += 1
                if deadline_of(key) == d:
                    if self._pos >= len(active):
                        self._active_b, self._active, self._pos = None, [], 0
                    self._update_horizon()
                    return key
            self._active_b, self._active, self._pos = None, [], 0

    def __iter__(self) -> Iterator[str]:
        for _, _, key in self._active[self._pos :]:
            yield key
        for b in sorted(self._buckets):
            yield from self._buckets[b]

    def clear(self) -> None:
        self._buckets.clear()
        self._heap.clear()
        self._active_b, self._active, self._pos = None, [], 0
        self.horizon = _INF
