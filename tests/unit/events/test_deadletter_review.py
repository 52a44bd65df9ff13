"""Dead letters read back (engine/deadletter_review.py): which records can be sent again, byte for byte."""

from __future__ import annotations

import orjson
from reloop.connectors.memory.memory import MemoryLog, MemorySink
from reloop.engine.deadletter import TRUNCATED_VALUE_BYTES, DeadLetterSink
from reloop.engine.deadletter_review import DeadLetter, Resend, parse_envelope, resend, select, summary
from reloop.engine.events.validation import EventError
from reloop.engine.streams import Record, TopicPartition

INPUTS = {"impressions", "clicks"}


def _letters(records: list[tuple[Record, str]], max_envelope_bytes: int = 256 * 1024) -> list[DeadLetter]:
    """``records`` dead-lettered through the real sink, then read back as the CLI reads them."""
    log = MemoryLog()
    dead = DeadLetterSink(MemorySink(log, "dead"), clock=iter(range(100, 10**6)).__next__,
                          max_envelope_bytes=max_envelope_bytes)  # fmt: skip
    for record, reason in records:
        dead.send(record, EventError(reason, f"{reason} detail"))
    out = []
    for r in log.read(TopicPartition("dead", 0), 0, 10**6):
        envelope = parse_envelope(r.value)
        assert envelope is not None
        out.append(DeadLetter(envelope, r.partition, r.offset))
    return out


def _record(
    topic: str, value: bytes, key: bytes | None = b"imp-1", ts: int = 1_700_000_000_000, offset: int = 7
) -> Record:
    return Record(topic, 0, offset, key, value, ts)


def test_a_dead_letter_is_sent_again_byte_for_byte_to_its_topic() -> None:
    binary = b"\xff\xfe\x00not utf-8"  # kept as base64 in the envelope
    letters = _letters(
        [
            (_record("impressions", b'{"features": {"price": "abc"}}'), "bad_feature"),
            (_record("clicks", binary, key=None), "malformed"),
        ]
    )
    first, second = (resend(letter, inputs=INPUTS) for letter in letters)
    assert first == Resend("impressions", b"imp-1", b'{"features": {"price": "abc"}}', None)
    assert second == Resend("clicks", None, binary, None)
    kept = resend(letters[0], inputs=INPUTS, keep_timestamp=True)
    assert isinstance(kept, Resend) and kept.timestamp_ms == 1_700_000_000_000
    moved = resend(letters[0], inputs=INPUTS, to="impressions-fixed")
    assert isinstance(moved, Resend) and moved.topic == "impressions-fixed"


def test_what_the_envelope_does_not_hold_is_not_sent() -> None:
    big = b"x" * (4 * TRUNCATED_VALUE_BYTES + 100)
    letters = _letters(
        [
            (_record("impressions", big), "oversized"),
            (_record("samples", b'{"sample_id": "s"}'), "unlearnable"),
        ],
        max_envelope_bytes=4 * TRUNCATED_VALUE_BYTES,
    )
    truncated, sample = (resend(letter, inputs=INPUTS) for letter in letters)
    assert isinstance(truncated, str) and truncated.startswith("truncated")
    assert isinstance(sample, str) and "not from an input topic" in sample
    # Named explicitly, a record from elsewhere goes where it is told.
    assert resend(letters[1], inputs=INPUTS, to="impressions") == Resend(
        "impressions", b"imp-1", b'{"sample_id": "s"}', None
    )


def test_select_and_summary() -> None:
    letters = _letters(
        [
            (_record("impressions", b"{", offset=1), "malformed"),
            (_record("impressions", b"{}", offset=2), "missing_field"),
            (_record("clicks", b"{", offset=1), "malformed"),
            (_record("impressions", b"[", offset=3), "malformed"),
        ]
    )
    assert summary(letters) == [
        ("malformed", "impressions", 2, 2),
        ("missing_field", "impressions", 1, 1),
        ("malformed", "clicks", 1, 1),
    ]
    assert [x.offset for x in select(letters, reasons={"malformed"})] == [0, 2, 3]
    assert [x.offset for x in select(letters, reasons={"malformed"}, topics={"clicks"})] == [2]
    # dead_lettered_at_ms: the test clock gives 100 s, 101 s, ... for the four
    assert [x.offset for x in select(letters, since_ms=102_000)] == [2, 3]


def test_a_record_that_is_not_an_envelope_is_skipped() -> None:
    assert parse_envelope(b"not json") is None
    assert parse_envelope(orjson.dumps({"some": "thing"})) is None
    assert parse_envelope(orjson.dumps([1, 2])) is None


def test_an_envelope_with_bad_bytes_fields_is_refused_not_sent_or_crashed() -> None:
    # A 'data' that is not a string raised AttributeError out of the redrive (after part of it was sent),
    # and lenient base64 made b"" of "@@@@": an empty record would have been sent.
    [letter] = _letters([(_record("impressions", b'{"features": {}}'), "bad_feature")])
    for value in ({"encoding": "utf8", "data": 5}, {"encoding": "base64", "data": "@@@@"}, ["x"]):
        bad = DeadLetter({**letter.envelope, "value": value}, letter.partition, letter.offset)
        why = resend(bad, inputs=INPUTS)
        assert isinstance(why, str) and why.startswith("the envelope does not hold the record's bytes"), value
    bad_key = DeadLetter({**letter.envelope, "key": {"encoding": "utf8", "data": ["k"]}}, 0, 0)
    assert isinstance(resend(bad_key, inputs=INPUTS), str)


def test_a_kept_timestamp_outside_int64_is_left_to_the_producer() -> None:
    [letter] = _letters([(_record("impressions", b'{"features": {}}'), "bad_feature")])
    for stamp, kept in ((1_700_000_000_000, 1_700_000_000_000), (10**19, None), (-5, None), (1.5e12, None)):
        moved = DeadLetter({**letter.envelope, "timestamp_ms": stamp}, 0, 0)
        plan = resend(moved, inputs=INPUTS, keep_timestamp=True)
        assert isinstance(plan, Resend) and plan.timestamp_ms == kept, stamp


def test_a_record_keyed_by_a_long_id_is_sent_again_with_its_own_key() -> None:
    # The contract takes an impression id of any length, and producers key its impression and its
    # clicks by its UTF-8 bytes: one over 1 KiB came back keyed by its sha256, so Kafka's partitioner put
    # it on another partition than its clicks and the join never paired them.
    long_id = "imp-😀" * 400  # 3,600 bytes of UTF-8
    value = orjson.dumps({"impression_id": long_id, "features": {"price": "abc"}})
    (letter,) = _letters([(_record("impressions", value, key=long_id.encode()), "bad_feature")])
    assert resend(letter, inputs=INPUTS) == Resend("impressions", long_id.encode(), value, None)


def test_a_record_dead_lettered_again_counts_once_among_the_distinct_ones() -> None:
    # A join stage rebuilt from its last checkpoint reads its input again and dead-letters the same
    # records again: "10 oversized" were 2 records, 5 times each, and nothing said so.
    again = [(_record("impressions", b"{", offset=o), "malformed") for o in (4, 5)] * 5
    letters = _letters([*again, (_record("clicks", b"[", offset=4), "malformed")])
    assert summary(letters) == [("malformed", "impressions", 10, 2), ("malformed", "clicks", 1, 1)]
    assert {letter.origin[:3] for letter in letters if letter.origin} == {
        ("impressions", 0, 4),
        ("impressions", 0, 5),
        ("clicks", 0, 4),
    }
    # One place, other content (written by hand, a tool numbering its own records): not the same record.
    same_place = _letters([(_record("impressions", v), "malformed") for v in (b"{", b"[")])
    assert summary(same_place) == [("malformed", "impressions", 2, 2)]
