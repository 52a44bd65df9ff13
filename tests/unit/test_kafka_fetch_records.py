"""The direct record reader (connectors/kafka/fetch_records.py) against kafka-python's own, on fetched bytes
built here: the same Records, positions, counters and errors."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.protocol.consumer import IsolationLevel
from kafka.record import MemoryRecords
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder
from kafka.record.util import calc_crc32c
from kafka.structs import TopicPartition
from reloop.connectors.kafka.fetch_records import RecordPartitionRecords, as_records, read_records_directly
from reloop.engine.streams import Record

TP = TopicPartition("events", 3)
_CRC_AT, _ATTRIBUTES_AT = 17, 21  # in a v2 batch header (base offset, length, epoch, magic, crc, attributes)
_LOG_APPEND_TIME, _CONTROL = 0x08, 0x20

RecordSpec = tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]


def v2_batch(
    base_offset: int, records: list[RecordSpec], *, compression: int = 0, flags: int = 0, epoch: int = 7
) -> bytes:
    """One v2 batch: ``records`` as (offset delta, timestamp, key, value, headers), with the header
    fields a broker sets (base offset, leader epoch, timestamp-type and control flags) set here."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=compression, is_transactional=False,
        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 24,
    )  # fmt: skip
    for delta, ts, key, value, headers in records:
        assert builder.append(delta, timestamp=ts, key=key, value=value, headers=headers) is not None
    buf = bytearray(builder.build())
    struct.pack_into(">q", buf, 0, base_offset)
    struct.pack_into(">i", buf, 12, epoch)
    if flags:
        (attributes,) = struct.unpack_from(">h", buf, _ATTRIBUTES_AT)
        struct.pack_into(">h", buf, _ATTRIBUTES_AT, attributes | flags)
    struct.pack_into(">I", buf, _CRC_AT, calc_crc32c(bytes(buf[_ATTRIBUTES_AT:])))
    return bytes(buf)


def legacy_batch(base_offset: int, values: list[bytes], magic: int = 1) -> bytes:
    builder = LegacyRecordBatchBuilder(magic=magic, compression_type=0, batch_size=1 << 20)
    for i, value in enumerate(values):
        builder.append(base_offset + i, timestamp=1_000 + i if magic else None, key=b"k%d" % i, value=value)
    return bytes(builder.build())


def read(cls: type, data: bytes, *, fetch_offset: int = 0, take: int | None = None, **kwargs: object) -> dict:
    """Everything a consumer sees of one fetch through ``cls``: the records (as Record) per take, the
    position after each take, the counters, and the error, if any."""
    part = cls(fetch_offset, TP, MemoryRecords(data), **kwargs)
    takes: list[list[Record]] = []
    positions: list[int] = []
    error = None
    while part:  # until drained (its last record read) or failed
        try:
            got = part.take(take)
        except CorruptRecordError as exc:
            error = type(exc).__name__
            break
        takes.append(as_records(got))
        positions.append(part.next_fetch_offset)
        if not got:
            break
    return {
        "takes": takes, "positions": positions, "error": error, "epoch": part.leader_epoch,
        "records_read": part.records_read, "bytes_read": part.bytes_read,
    }  # fmt: skip


class DirectOnly(RecordPartitionRecords):
    """The direct reader where every batch must be read by it (a batch it gives up on fails the test:
    kafka-python's reader taking it would hide a bug of the direct one)."""

    def _read_by_kafka_python(self, batch: object, topic: str, partition: int) -> Iterator[Record]:
        raise AssertionError("a well-formed v2 batch was left to kafka-python's reader")


def assert_same(data: bytes, *, direct: bool = True, **kwargs: object) -> dict:
    ours = read(DirectOnly if direct else RecordPartitionRecords, data, **kwargs)
    theirs = read(Fetcher.PartitionRecords, data, **kwargs)
    assert ours == theirs
    return ours


def flat(seen: dict) -> list[Record]:
    return [r for take in seen["takes"] for r in take]


def test_plain_batches_are_read_as_kafka_python_reads_them() -> None:
    first = [(i, 1_700_000_000_000 + i, b"imp-%d" % i, b'{"x": %d}' % i, []) for i in range(5)]
    second = [(i, 1_700_000_001_000 - i, None, b"v" * 300, []) for i in range(3)]
    seen = assert_same(v2_batch(100, first) + v2_batch(105, second), take=4)
    records = flat(seen)
    assert [r.offset for r in records] == [100, 101, 102, 103, 104, 105, 106, 107]
    assert records[0] == Record("events", 3, 100, b"imp-0", b'{"x": 0}', 1_700_000_000_000)
    assert records[6].key is None and records[6].timestamp_ms == 1_700_000_000_999
    assert type(records[0]) is Record and seen["epoch"] == 7


def test_null_values_headers_and_multibyte_varints() -> None:
    recs = [
        (0, 5, b"k", None, []),  # a tombstone: b"" as the sources always gave it
        (70, -10_000_000, b"K" * 200, b"V" * 20_000, [("h", b"1"), ("empty", None), ("long", b"x" * 300)]),
        (9_000, 2**40, None, b"", [("é", b"")]),
    ]
    records = flat(assert_same(v2_batch(2**33, recs)))
    assert records[0].value == b"" and records[1].value == b"V" * 20_000
    assert [r.offset for r in records] == [2**33, 2**33 + 70, 2**33 + 9_000]
    assert records[1].timestamp_ms == -10_000_000 and records[2].timestamp_ms == 2**40


def test_log_append_time_control_and_compressed_batches() -> None:
    recs = [(i, 1_000 + i, b"k", b"v%d" % i, []) for i in range(4)]
    data = (
        v2_batch(0, recs, flags=_LOG_APPEND_TIME)
        + v2_batch(4, recs[:1], flags=_CONTROL)  # a transaction marker: skipped
        + v2_batch(5, recs, compression=1)  # gzip
    )
    records = flat(assert_same(data, take=3))
    assert [r.timestamp_ms for r in records[:4]] == [1_003] * 4  # the batch's max timestamp
    assert [r.offset for r in records] == [0, 1, 2, 3, 5, 6, 7, 8]


def test_legacy_batches_take_kafka_python_reader() -> None:
    v2 = v2_batch(3, [(0, 9, b"k", b"d", [])])
    data = legacy_batch(0, [b"a", b"b"], magic=0) + legacy_batch(2, [b"c"]) + v2
    records = flat(assert_same(data, direct=False))
    assert [r.value for r in records] == [b"a", b"b", b"c", b"d"]
    assert records[0].timestamp_ms is None and records[2].timestamp_ms == 1_000


def test_a_fetch_from_inside_a_batch_skips_the_records_before_it() -> None:
    recs = [(i, 50 + i, b"k", b"v", []) for i in range(6)]
    records = flat(assert_same(v2_batch(10, recs), fetch_offset=13, take=2))
    assert [r.offset for r in records] == [13, 14, 15]


def test_a_corrupt_record_fails_as_in_kafka_python_after_the_same_good_records() -> None:
    good = v2_batch(0, [(0, 1, b"k", b"good", [])])
    bad = bytearray(v2_batch(1, [(0, 1, b"k", b"abc", []), (1, 2, b"k", b"def", [])]))
    bad[-7] = 0x7E  # the second record's key length (63): past its end
    # The batch's CRC still holds: the record itself fails.
    struct.pack_into(">I", bad, _CRC_AT, calc_crc32c(bytes(bad[_ATTRIBUTES_AT:])))
    seen = assert_same(good + bytes(bad), direct=False)
    assert seen["error"] == "CorruptRecordError"
    assert [r.value for r in flat(seen)][:2] == [b"good", b"abc"]


def test_a_batch_failing_its_crc_is_refused() -> None:
    data = bytearray(v2_batch(0, [(0, 1, b"k", b"value", [])]))
    data[-3] ^= 0xFF
    seen = assert_same(bytes(data), direct=False)
    assert seen["error"] == "CorruptRecordError" and flat(seen) == []


def test_read_committed_takes_kafka_python_reader_whole() -> None:
    data = v2_batch(0, [(i, i, b"k", b"v", []) for i in range(3)])
    seen = assert_same(data, direct=False, isolation_level=IsolationLevel.READ_COMMITTED)
    assert [type(r) for r in flat(seen)] == [Record] * 3


_payload = st.one_of(st.none(), st.binary(max_size=200))
_record = st.tuples(
    st.integers(-(2**45), 2**45), _payload, _payload,
    st.lists(st.tuples(st.text(max_size=5), _payload), max_size=2),
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(
        st.tuples(st.lists(_record, min_size=1, max_size=8), st.sampled_from([0, 1]), st.booleans()),
        min_size=1, max_size=4,
    ),
    take=st.one_of(st.none(), st.integers(1, 5)),
    gap=st.integers(0, 200),
)  # fmt: skip
def test_any_fetch_reads_as_kafka_python_reads_it(batches: list, take: int | None, gap: int) -> None:
    data, base = b"", 0
    for records, compression, log_append in batches:
        specs = [(i * (gap + 1), *record) for i, record in enumerate(records)]
        data += v2_batch(base, specs, compression=compression, flags=_LOG_APPEND_TIME if log_append else 0)
        base += specs[-1][0] + 1
    assert len(flat(assert_same(data, take=take))) == sum(len(records) for records, _, _ in batches)


def test_the_reader_is_set_on_one_consumer_only() -> None:
    class Consumer:
        def __init__(self) -> None:
            self._fetcher = type("F", (), {"PartitionRecords": Fetcher.PartitionRecords})()

    consumer, other = Consumer(), Consumer()
    assert read_records_directly(consumer)
    assert consumer._fetcher.PartitionRecords is RecordPartitionRecords
    assert other._fetcher.PartitionRecords is Fetcher.PartitionRecords
    assert Fetcher.PartitionRecords is not RecordPartitionRecords
    assert not read_records_directly(object())  # not a kafka-python consumer: left alone


@pytest.mark.parametrize("messages", [[], [Record("t", 0, 1, None, b"v", 2)]])
def test_as_records_passes_records_through(messages: list) -> None:
    assert as_records(messages) is messages
