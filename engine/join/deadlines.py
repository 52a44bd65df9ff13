"""A bucketed deadline index: which keys fall due when the watermark reaches a time.

A heap of one entry per key costs ~130 bytes a key; here a key costs one deque slot (~8 bytes)
because keys are grouped into buckets of ``bucket_ms`` and only bucket numbers go on the heap.
The index may hold stale keys (removed from the owner's dict since); the owner skips them.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator


class DeadlineIndex:
    def __init__(self, bucket_ms: int) -> None:
        if bucket_ms <= 0:
            raise ValueError("bucket_ms must be positive")
        self.bucket_ms = bucket_ms
        self._buckets: dict[int, deque[str]] = {}
        self._heap: list[int] = []

    def add(self, key: str, deadline_ms: int) -> None:
        b = deadline_ms // self.bucket_ms
        bucket = self._buckets.get(b)
        if bucket is None:
            bucket = self._buckets[b] = deque()
            heapq.heappush(self._heap, b)
        bucket.append(key)

    def pop_due(self, watermark_ms: int, deadline_of: Callable[[str], int | None]) -> list[str]:
        """Keys whose deadline is <= ``watermark_ms``, in deadline order (ties: insertion order).

        ``deadline_of(key)`` returns the key's live deadline, or None when the key is stale.
        """
        due: list[tuple[int, str]] = []
        last = watermark_ms // self.bucket_ms
        while self._heap and self._heap[0] <= last:
            b = self._heap[0]
            bucket = self._buckets[b]
            if b < last:
                heapq.heappop(self._heap)
                del self._buckets[b]
                for key in bucket:
                    d = deadline_of(key)
                    if d is not None and d // self.bucket_ms == b:
                        due.append((d, key))
                continue
            # The watermark's own bucket: only part of it may be due.
            keep: deque[str] = deque()
            for key in bucket:
                d = deadline_of(key)
                if d is None or d // self.bucket_ms != b:
                    continue
                if d <= watermark_ms:
                    due.append((d, key))
                else:
                    keep.append(key)
            if keep:
                self._buckets[b] = keep
            else:
                heapq.heappop(self._heap)
                del self._buckets[b]
            break
        due.sort(key=lambda item: item[0])
        return [key for _, key in due]

    def pop_earliest(self, deadline_of: Callable[[str], int | None]) -> str | None:
        """The live key with the earliest bucket (first inserted within it), removed; None when empty."""
        while self._heap:
            b = self._heap[0]
            bucket = self._buckets[b]
            while bucket:
                key = bucket.popleft()
                d = deadline_of(key)
                if d is not None and d // self.bucket_ms == b:
                    if not bucket:
                        heapq.heappop(self._heap)
                        del self._buckets[b]
                    return key
            heapq.heappop(self._heap)
            del self._buckets[b]
        return None

    def __iter__(self) -> Iterator[str]:
        for b in sorted(self._buckets):
            yield from self._buckets[b]

    def clear(self) -> None:
        self._buckets.clear()
        self._heap.clear()
