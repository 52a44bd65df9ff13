from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from reloop.engine.streams import PartitionShare, Positions, Record, RecordTooLarge, TopicPartition


class MemoryLog:
    """An append-only in-process log of topics and partitions, shared by MemorySink and MemorySource."""

    def __init__(self) -> None:
        self._data: dict[TopicPartition, list[Record]] = {}
        self._cond = threading.Condition()

    def create(self, topic: str, partitions: int = 1) -> None:
        with self._cond:
            for p in range(partitions):
                self._data.setdefault(TopicPartition(topic, p), [])

    def partitions(self, topic: str) -> list[TopicPartition]:
        with self._cond:
            return sorted(tp for tp in self._data if tp.topic == topic)

    def append(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        timestamp_ms: int | None,
        partition: int | None = None,
    ) -> Record:
        with self._cond:
            parts = [tp for tp in self._data if tp.topic == topic] or [TopicPartition(topic, 0)]
            if partition is not None:
                tp = TopicPartition(topic, partition)
                if tp not in parts:
                    raise ValueError(f"{topic!r} has no partition {partition}")
            else:
                # Same rule as Kafka's default partitioner in spirit: a key always maps to one partition.
                index = 0 if key is None else _stable_hash(key) % len(parts)
                tp = sorted(parts)[index]
            log = self._data.setdefault(tp, [])
            ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
            record = Record(tp.topic, tp.partition, len(log), key, value, ts)
            log.append(record)
            self._cond.notify_all()
            return record

    def read(self, tp: TopicPartition, offset: int, limit: int) -> list[Record]:
        with self._cond:
            return self._data.get(tp, [])[offset : offset + limit]

    def wait(self, timeout_s: float) -> None:
        with self._cond:
            self._cond.wait(timeout_s)


def _stable_hash(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


class MemorySink:
    """``max_record_bytes`` plays a broker's record size limit (key + value), for tests."""

    def __init__(self, log: MemoryLog, topic: str, *, max_record_bytes: int | None = None) -> None:
        self.log = log
        self.topic = topic
        self.max_record_bytes = max_record_bytes
        self._closed = False

    def send(
        self,
        value: bytes,
        key: bytes | None = None,
        timestamp_ms: int | None = None,
        partition: int | None = None,
    ) -> None:
        if self._closed:
            raise RuntimeError("send on a closed MemorySink")
        size = len(value) + len(key or b"")
        if self.max_record_bytes is not None and size > self.max_record_bytes:
            raise RecordTooLarge(f"record of {size} bytes exceeds {self.max_record_bytes} for {self.topic!r}")
        self.log.append(self.topic, value, key, timestamp_ms, partition)

    def flush(self, timeout_s: float | None = None) -> None:
        return None

    def close(self, timeout_s: float | None = None) -> None:  # nothing to wait for
        self._closed = True


class MemorySource:
    def __init__(self, log: MemoryLog, topics: list[str], share: PartitionShare | None = None) -> None:
        self.log = log
        self.topics = topics
        self.share = share
        self._next: Positions = {}
        self._cursor = 0

    def partitions(self) -> list[TopicPartition]:
        return [
            tp
            for topic in self.topics
            for tp in self.log.partitions(topic)
            if self.share is None or self.share.owns(tp)
        ]

    def partitions_now(self) -> list[TopicPartition]:
        return self.partitions()

    def open(self, positions: Mapping[TopicPartition, int] | None = None) -> None:
        positions = positions or {}
        self._next = {tp: int(positions.get(tp, 0)) for tp in self.partitions()}

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self._take(max_records)
            remaining = deadline - time.monotonic()
            if batch or remaining <= 0:
                return batch
            self.log.wait(min(remaining, 0.05))

    def _take(self, max_records: int) -> list[Record]:
        for tp in self.partitions():
            self._next.setdefault(tp, 0)
        out: list[Record] = []
        pairs = sorted(self._next)
        # Round-robin over partitions so one busy partition cannot starve the others.
        for i in range(len(pairs)):
            tp = pairs[(self._cursor + i) % len(pairs)]
            records = self.log.read(tp, self._next[tp], max_records - len(out))
            if records:
                out.extend(records)
                self._next[tp] = records[-1].offset + 1
            if len(out) >= max_records:
                break
        self._cursor += 1
        return out

    def position(self) -> Positions:
        return dict(self._next)

    def close(self) -> None:
        self._next = {}


class MemoryGroupSource:
    """A one-member consumer group over a MemoryLog (unit tests of the join stage): the first poll
    assigns every partition of ``topics``; ``revoke_all()`` plays a rebalance that takes them away."""

    def __init__(self, log: MemoryLog, topics: list[str]) -> None:
        self.log = log
        self.topics = topics
        self._listener: Any = None
        self._assigned: list[TopicPartition] = []
        self._next: Positions = {}
        self._committed: Positions = {}

    def subscribe(self, listener: Any) -> None:
        self._listener = listener

    def partition_count(self, topic: str) -> int:
        return len(self.log.partitions(topic))

    def joined(self) -> bool:
        return self._listener is not None

    def longest_join_s(self) -> float:
        return 0.0  # joined at subscribe

    def revoke_all(self) -> None:
        revoked, self._assigned = self._assigned, []
        self._next = {}
        if revoked:
            self._listener.on_revoked(list(revoked))

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if not self._assigned:
            self._assigned = [tp for topic in self.topics for tp in self.log.partitions(topic)]
            self._listener.on_assigned(list(self._assigned))
        out: list[Record] = []
        for tp in self._assigned:
            # Not sought (the listener failed before its seek): from the committed offset, as Kafka does.
            start = self._next.get(tp, self._committed.get(tp, 0))
            records = self.log.read(tp, start, max_records - len(out))
            if records:
                out.extend(records)
                self._next[tp] = records[-1].offset + 1
            if len(out) >= max_records:
                break
        if not out and timeout_s > 0:
            self.log.wait(min(timeout_s, 0.01))
        return out

    def seek(self, positions: Mapping[TopicPartition, int | None]) -> None:
        for tp, offset in positions.items():
            self._next[tp] = 0 if offset is None else int(offset)

    def position(self) -> Positions:
        return dict(self._next)

    def end_positions(self) -> Positions:
        return {tp: len(self.log._data[tp]) for tp in self._assigned}

    def commit(self, positions: Mapping[TopicPartition, int]) -> None:
        self._committed.update(positions)

    def close(self) -> None:
        self._assigned = []
