"""JSON-lines logs as a Source and a Sink: one file per topic partition, one record per line.

Layout under ``root``::

    <root>/<topic>/partition-00000.jsonl
    <root>/<topic>/partition-00001.jsonl   (one file per partition; the count is fixed when created)

A record's offset is its line index in the file and its value is the line's bytes (without the
newline). Keys and timestamps are not stored: records read back have ``key=None`` and
``timestamp_ms=-1`` (Kafka's "no timestamp"); put event time inside the JSON. The sink still routes by
key (crc32 of the key modulo the partition count, stable across processes), so one key stays on one
partition; keyless records go round-robin.

A writer may be appending while a reader tails the file: the reader delivers only lines that end with
a newline, so a partially written last line is read once it is complete, never half.
A sink that opens a file whose last line has no newline (a writer crashed mid-line) ends that line
before its first record, so the torn line reads as one malformed record and the new ones stay whole.

A write or fsync that fails (a full disk, a read-only folder) raises ``OSError`` naming the file. The
bytes of that write that did land are cut off again (the file keeps whole lines only), and the sink takes
nothing more: every later ``send`` and ``flush`` raises the same error, so no record is glued onto a
torn line and no ``flush`` claims records durable that a failed fsync may have dropped. What was sent
since the last successful ``flush`` is then not in the file: a stage restarts from its last save, made
after such a flush, and sends it again. ``abort`` releases the files without writing what is pending.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from reloop.engine.appending import append_whole
from reloop.engine.streams import Positions, Record, TopicPartition

_NO_TIMESTAMP = -1
_IDLE_SLEEP_S = 0.02
_BUFFER_BYTES = io.DEFAULT_BUFFER_SIZE  # a sink's lines are written once this many are pending


def partition_path(root: Path | str, topic: str, partition: int) -> Path:
    return Path(root) / topic / f"partition-{partition:05d}.jsonl"


def create_topic(root: Path | str, topic: str, partitions: int = 1) -> None:
    """Create the partition files (empty); an existing topic must have the same partition count."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    existing = _partition_files(Path(root), topic)
    if existing and len(existing) != partitions:
        raise ValueError(
            f"JSONL topic {topic!r} under {root} has {len(existing)} partitions, not {partitions}"
        )
    for p in range(partitions):
        path = partition_path(root, topic, p)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)


def _partition_files(root: Path, topic: str) -> list[Path]:
    folder = root / topic
    if not folder.is_dir():
        return []
    return sorted(folder.glob("partition-*.jsonl"))


class JsonlSink:
    """Appends records to ``<root>/<topic>/partition-*.jsonl``; ``partitions`` fixes the count on creation."""

    def __init__(self, *, root: Path | str, topic: str, partitions: int = 1) -> None:
        self.root = Path(root)
        self.topic = topic
        create_topic(self.root, topic, partitions)
        self.partitions = partitions
        self._files: dict[int, _Appender] = {}
        self._round_robin = 0
        self._closed = False
        self._failed: OSError | None = None  # a write or fsync that failed: the sink takes nothing more

    def send(self, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None) -> None:
        if self._closed:
            raise RuntimeError("send on a closed JsonlSink")
        self._raise_if_failed()
        if b"\n" in value or b"\r" in value:
            raise ValueError("a JSONL record value must not contain a line break")
        if key is None:
            partition = self._round_robin % self.partitions
            self._round_robin += 1
        else:
            partition = zlib.crc32(key) % self.partitions
        appender = self._files.get(partition)
        if appender is None:
            appender = self._files[partition] = _Appender(partition_path(self.root, self.topic, partition))
        with self._final_on_failure():
            appender.add(value)

    def flush(self, timeout_s: float | None = None) -> None:
        self._raise_if_failed()
        with self._final_on_failure():
            for appender in self._files.values():
                appender.write_pending()
                appender.fsync()

    def close(self, timeout_s: float | None = None) -> None:
        """Write what is pending and release the files; raises (after releasing them) when the sink
        failed, now or before: what was pending is then not written. A local write waits for no one:
        ``timeout_s`` (``Sink.close``) is not needed."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self.abort()

    def abort(self) -> None:
        """Release the files at once, without writing what is pending (a failed stage is rebuilt from
        its last save, which sends those records again)."""
        for appender in self._files.values():
            with contextlib.suppress(OSError):  # a file being thrown away
                appender.file.close()
        self._files.clear()
        self._closed = True

    @contextlib.contextmanager
    def _final_on_failure(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            self._failed = exc
            raise

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            exc = self._failed
            raise OSError(
                exc.errno, f"JSONL sink takes nothing more: a write or fsync failed ({exc.strerror})"
            )


class _Appender:
    """One partition file, unbuffered (a failed write is known to the byte), with the lines not written
    yet gathered here: written ``_BUFFER_BYTES`` at a time, or at ``write_pending``."""

    __slots__ = ("path", "file", "pending")

    def __init__(self, path: Path) -> None:
        self.path = path
        # Held open across sends and closed by the sink, hence no with-block.
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115
        self.pending = bytearray()
        if _ends_mid_line(path):
            # A writer crashed mid-line: appending would glue the next record onto that torn line (a
            # valid record lost inside a malformed one). End the torn line so it is a record of its own
            # (a reader dead-letters it, visibly) and the next one starts a line.
            self.pending += b"\n"

    def add(self, value: bytes) -> None:
        self.pending += value
        self.pending += b"\n"
        if len(self.pending) >= _BUFFER_BYTES:
            self.write_pending()

    def write_pending(self) -> None:
        """Write every pending line, or none (engine/appending.py: a write that fails midway takes what
        it wrote back, so the file ends with a whole line) and raise naming the file."""
        if not self.pending:
            return
        try:
            # One write call for them all when the OS takes it whole: a concurrent reader sees a line
            # without its newline only for as long as the OS needs to finish that write.
            append_whole(self.file, self.pending, os.fstat(self.file.fileno()).st_size)
        except OSError as exc:
            raise _naming(exc, self.path) from exc
        self.pending.clear()

    def fsync(self) -> None:
        try:
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise _naming(exc, self.path) from exc


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` as an ``OSError`` of the same kind (errno) naming ``path`` in its message (a log of
    ``repr(exc)`` drops an OSError's filename)."""
    return OSError(exc.errno, f"{exc.strerror or exc}: {path}")


class _Cursor:
    """Reading state of one partition file: next line index and the byte offset where it starts."""

    __slots__ = ("line", "byte", "handle")

    def __init__(self, line: int, byte: int, handle: BinaryIO) -> None:
        self.line = line
        self.byte = byte
        self.handle = handle


class JsonlSource:
    """Reads ``topics`` from JSONL partition files, tailing them for lines appended later."""

    def __init__(self, *, root: Path | str, topics: list[str]) -> None:
        if not topics:
            raise ValueError("JsonlSource needs at least one topic")
        self.root = Path(root)
        self.topics = list(topics)
        self._cursors: dict[TopicPartition, _Cursor] = {}
        self._rotation = 0

    def partitions(self) -> list[TopicPartition]:
        out: list[TopicPartition] = []
        for topic in self.topics:
            files = _partition_files(self.root, topic)
            if not files:
                raise ValueError(f"JSONL topic {topic!r} does not exist under {self.root}")
            out += [TopicPartition(topic, p) for p in range(len(files))]
        return out

    def open(self, positions: Mapping[TopicPartition, int] | None = None) -> None:
        positions = positions or {}
        pairs = self.partitions()
        unknown = set(positions) - set(pairs)
        if unknown:
            raise ValueError(f"positions name partitions this source does not read: {sorted(unknown)}")
        self.close()
        for tp in pairs:
            handle = open(partition_path(self.root, tp.topic, tp.partition), "rb")  # noqa: SIM115
            line = int(positions.get(tp, 0))
            self._cursors[tp] = _Cursor(line, _skip_lines(handle, line, tp), handle)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if not self._cursors:
            raise RuntimeError("JsonlSource.poll before open")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            batch = self._take(max_records)
            if batch:
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(_IDLE_SLEEP_S, remaining))

    def _take(self, max_records: int) -> list[Record]:
        pairs = sorted(self._cursors)
        out: list[Record] = []
        # Start at a different partition each poll so one long file cannot starve the others.
        for i in range(len(pairs)):
            tp = pairs[(self._rotation + i) % len(pairs)]
            out += self._read(tp, self._cursors[tp], max_records - len(out))
            if len(out) >= max_records:
                break
        self._rotation += 1
        return out

    @staticmethod
    def _read(tp: TopicPartition, cursor: _Cursor, limit: int) -> list[Record]:
        out: list[Record] = []
        cursor.handle.seek(cursor.byte)
        while len(out) < limit:
            line = cursor.handle.readline()
            if not line.endswith(b"\n"):
                break  # end of file, or a line still being written: take it on a later poll
            out.append(Record(tp.topic, tp.partition, cursor.line, None, line.rstrip(b"\r\n"), _NO_TIMESTAMP))
            cursor.line += 1
            cursor.byte += len(line)
        return out

    def position(self) -> Positions:
        return {tp: cursor.line for tp, cursor in self._cursors.items()}

    def close(self) -> None:
        for cursor in self._cursors.values():
            cursor.handle.close()
        self._cursors = {}


def _ends_mid_line(path: Path) -> bool:
    """Whether the file is non-empty and its last byte is not a newline (a torn last line)."""
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def _skip_lines(handle: BinaryIO, lines: int, tp: TopicPartition) -> int:
    """Byte offset of line ``lines`` (counting complete lines only)."""
    byte = 0
    for index in range(lines):
        line = handle.readline()
        if not line.endswith(b"\n"):
            raise ValueError(f"position {lines} for {tp} is past its last complete line ({index})")
        byte += len(line)
    return byte
