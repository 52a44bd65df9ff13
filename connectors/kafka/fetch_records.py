"""kafka-python's fetched records, read straight into the engine's ``Record``.

kafka-python 3 parses every fetched record in pure Python through two objects of its own (a
``DefaultRecord``, then a 13-field ``ConsumerRecord``), and a source then builds a third, the engine's
``Record``: ~7-10 us a record on a 2-core machine, a quarter to a third as much as the join stage's
own work per sample. ``read_records_directly(consumer)`` gives one consumer a reader that takes the
records of a message-format v2 batch (Kafka >= 0.11) straight into ``Record`` in one loop (~2.5-3 us a
record, docs/performance.md). kafka-python's fetcher builds its per-partition record holder through
``self.PartitionRecords``; the subclass is set there, on that one consumer's fetcher, so the library is
not patched for any other consumer in the process.

kafka-python keeps everything else: fetching, decompression, the batch CRC check (``check_crcs``),
leader epochs and skipping control batches as its reader does. It still reads, record by record and
converted to ``Record``: legacy (v0/v1) batches, consumers with ``isolation_level: read_committed``
(aborted transactions), and any v2 batch that does not parse cleanly here, so a corrupt batch raises
kafka-python's own ``CorruptRecordError`` after the same good records. tests/unit/test_kafka_fetch_records.py
holds the reader to kafka-python's own on built batches (headers, null keys and values, multi-byte
varints, log-append time, compression, control and legacy batches, corrupt bytes). kafka-python is
pinned below 4; where the fetcher lacks what this relies on, the consumer keeps kafka-python's reader
(``read_records_directly`` returns False) and the sources convert its records as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.protocol.consumer import IsolationLevel
from kafka.record.util import decode_varint
from reloop.engine.streams import Record

log = logging.getLogger(__name__)

_LOG_APPEND_TIME = 1
_new_record = tuple.__new__  # Record(...) runs a Python-level __new__: twice the cost per record


class _BatchUnreadable(Exception):
    """This reader could not read a batch: kafka-python's reader takes it (and names the error)."""


def read_v2_records(
    buf: bytes, pos: int, count: int, base_offset: int, timestamp: int, fixed_timestamp: bool,
    topic: str, partition: int,
) -> tuple[list[Record], int]:  # fmt: skip
    """The ``count`` records of a v2 batch's (decompressed) record section ``buf[pos:]`` and the sum of
    their sizes as kafka-python counts them (each record's length field). A record's timestamp is
    ``timestamp`` plus its delta, or ``timestamp`` itself when ``fixed_timestamp`` (log-append time: the
    batch's max timestamp). Raises ``_BatchUnreadable`` on anything not exactly as the format says."""
    out: list[Record] = []
    append = out.append
    size = 0
    try:
        for _ in range(count):
            # Varints are zigzag-encoded: a value in -64..63 is one byte, one in -8192..8191 two (a record's
            # length and its value's, for most events); those are read inline, longer ones by kafka-python's
            # decoder. The record attributes are one unused int8.
            b = buf[pos]
            if b < 128:
                length = (b >> 1) ^ -(b & 1)
                pos += 1
            elif buf[pos + 1] < 128:
                b = (b & 127) | (buf[pos + 1] << 7)
                length = (b >> 1) ^ -(b & 1)
                pos += 2
            else:
                length, pos = decode_varint(buf, pos)
            start = pos
            pos += 1
            b = buf[pos]
            if b < 128:
                delta = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                delta, pos = decode_varint(buf, pos)
            b = buf[pos]
            if b < 128:
                offset_delta = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                offset_delta, pos = decode_varint(buf, pos)
            b = buf[pos]
            if b < 128:
                n = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                n, pos = decode_varint(buf, pos)
            if n >= 0:
                key: bytes | None = buf[pos : pos + n]
                pos += n
            else:
                key = None
            b = buf[pos]
            if b < 128:
                n = (b >> 1) ^ -(b & 1)
                pos += 1
            elif buf[pos + 1] < 128:
                b = (b & 127) | (buf[pos + 1] << 7)
                n = (b >> 1) ^ -(b & 1)
                pos += 2
            else:
                n, pos = decode_varint(buf, pos)
            if n >= 0:
                value = buf[pos : pos + n]
                pos += n
            else:
                value = b""  # a tombstone: Record.value is always bytes
            if buf[pos]:
                pos = _skip_headers(buf, pos)
            else:
                pos += 1
            if pos - start != length:
                raise _BatchUnreadable("record size")
            size += length
            at = timestamp if fixed_timestamp else timestamp + delta
            append(_new_record(Record, (topic, partition, base_offset + offset_delta, key, value, at)))
    except (IndexError, ValueError) as exc:
        raise _BatchUnreadable(str(exc)) from None
    if pos != len(buf):
        raise _BatchUnreadable("bytes after the last record")
    return out, size


def _skip_headers(buf: bytes, pos: int) -> int:
    """Past a record's headers (the engine's Record carries none)."""
    count, pos = decode_varint(buf, pos)
    if count < 0:
        raise _BatchUnreadable("negative header count")
    for _ in range(count):
        n, pos = decode_varint(buf, pos)
        if n < 0:
            raise _BatchUnreadable("negative header key size")
        pos += n
        n, pos = decode_varint(buf, pos)
        if n > 0:
            pos += n
    return pos


class RecordPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's per-partition fetch holder, yielding the engine's ``Record`` (module doc)."""

    def _unpack_records(
        self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[Record]:
        if (
            self.isolation_level != IsolationLevel.READ_UNCOMMITTED
            or key_deserializer is not None
            or value_deserializer is not None
        ):
            theirs = super()._unpack_records(tp, records, key_deserializer, value_deserializer)
            yield from map(_record_of, theirs)
            return
        topic, partition = tp.topic, tp.partition
        batch = records.next_batch()
        last_batch = None
        while batch is not None:
            last_batch = batch
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(
                    f"Record batch for partition {self.topic_partition} at offset {batch.base_offset} "
                    "failed crc check"
                )
            read: list[Record] | None = None
            if batch.magic == 2:
                self.leader_epoch = batch.leader_epoch
                if batch.is_control_batch:  # transaction markers: never returned to the consumer
                    self.next_fetch_offset = batch.next_offset
                    batch = records.next_batch()
                    continue
                read = self._read_v2(batch, topic, partition)
            if read is not None:
                for record in read:
                    self.next_fetch_offset = record[2] + 1
                    yield record
            else:
                yield from self._read_by_kafka_python(batch, topic, partition)
            batch = records.next_batch()
        if last_batch is not None and last_batch.magic == 2:
            # As kafka-python: past the batch's last offset even where compaction removed that record.
            self.next_fetch_offset = last_batch.next_offset
        self.drain()

    def _read_v2(self, batch: Any, topic: str, partition: int) -> list[Record] | None:
        iter(batch)  # decompresses the record section, as kafka-python's own iteration does first
        fixed = batch.timestamp_type == _LOG_APPEND_TIME
        try:
            read, size = read_v2_records(
                bytes(batch._buffer), batch._pos, batch.records_count, batch.base_offset,
                batch.max_timestamp if fixed else batch.first_timestamp, fixed, topic, partition,
            )  # fmt: skip
        except _BatchUnreadable:
            return None
        self.records_read += len(read)
        self.bytes_read += size
        return read

    def _read_by_kafka_python(self, batch: Any, topic: str, partition: int) -> Iterator[Record]:
        for record in batch:
            if self.check_crcs and not record.validate_crc():
                raise CorruptRecordError(
                    f"Record for partition {self.topic_partition} at offset {record.offset} failed crc check"
                )
            self.records_read += 1
            self.bytes_read += record.size_in_bytes
            self.next_fetch_offset = record.offset + 1
            yield Record(topic, partition, record.offset, record.key, record.value or b"", record.timestamp)


_NEEDED = ("_buffer", "_pos", "records_count", "first_timestamp", "max_timestamp", "timestamp_type")


def read_records_directly(consumer: Any) -> bool:
    """Give ``consumer`` (a ``kafka.KafkaConsumer``) the direct reader; False where its fetcher is not
    the kind this was written for (it then keeps kafka-python's reader)."""
    from kafka.record.default_records import DefaultRecordBatch

    fetcher = getattr(consumer, "_fetcher", None)
    known = getattr(fetcher, "PartitionRecords", None) is Fetcher.PartitionRecords and all(
        hasattr(DefaultRecordBatch, name) for name in _NEEDED
    )
    if not known:
        log.warning("kafka-python's fetcher is not the expected one: records are read by kafka-python")
        return False
    fetcher.PartitionRecords = RecordPartitionRecords
    return True


def as_records(messages: Sequence[Any]) -> list[Record]:
    """A poll's records of one partition as ``Record`` (as they come where the direct reader is on)."""
    if not messages or type(messages[0]) is Record:
        return messages if isinstance(messages, list) else list(messages)
    return list(map(_record_of, messages))


def _record_of(m: Any) -> Record:
    """A kafka-python ``ConsumerRecord`` as ``Record`` (a tombstone's null value as b"")."""
    return Record(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp)
