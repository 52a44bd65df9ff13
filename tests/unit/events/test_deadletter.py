"""Bad input end to end: records from a log -> batch decode -> valid events out, the rest dead-lettered."""

from __future__ import annotations

import base64

import orjson
import pytest
from reloop.connectors.memory.memory import MemoryLog, MemorySink, MemorySource
from reloop.engine.deadletter import DeadLetterSink, decode_raw
from reloop.engine.events.codec import decode_clicks, decode_impressions, decode_samples, encode
from reloop.engine.events.schema import Click, Impression
from reloop.engine.events.validation import EventError
from reloop.engine.streams import Record

MAX_BYTES = 4096


def _bad_impressions(impression_dict) -> list[tuple[bytes | None, str]]:
    def wire(**changes) -> bytes:
        return orjson.dumps(impression_dict(**changes))

    missing = impression_dict()
    del missing["item_id"]
    return [
        (b"{not json", "malformed"),
        (b"\xff\xfe\x00garbage", "malformed"),
        (b"[1, 2, 3]", "malformed"),
        (b"", "malformed"),
        (orjson.dumps(missing), "missing_field"),
        (wire(model_version="3"), "wrong_type"),
        (wire(features={"a": {"b": 1}}), "wrong_type"),
        (wire(served_prediction=1.01), "bad_prediction"),
        (wire(event_time_ms=-10), "bad_time"),
        (wire(schema_version=2), "unknown_schema_version"),
        (wire(user_id=""), "bad_value"),
        (wire(features={"blob": "x" * MAX_BYTES}), "oversized"),
    ]


def test_every_bad_impression_is_dead_lettered_and_valid_ones_come_through(impression_dict):
    log = MemoryLog()
    log.create("impressions")
    source_sink = MemorySink(log, "impressions")
    valid = [Impression(**impression_dict(impression_id=f"imp-{i}")) for i in range(5)]
    bad = _bad_impressions(impression_dict)
    # Interleave: valid, bad, valid, bad, ... so position handling is exercised.
    order: list[tuple[bytes, str | None]] = []
    for i in range(max(len(valid), len(bad))):
        if i < len(valid):
            order.append((encode(valid[i]), None))
        if i < len(bad):
            order.append(bad[i])
    for value, _ in order:
        source_sink.send(value, key=b"k")

    source = MemorySource(log, ["impressions"])
    source.open()
    records = source.poll(1000, 0.1)
    assert len(records) == len(order)

    dead = DeadLetterSink(MemorySink(log, "dead-letters"), clock=lambda: 1234.5)
    good, errors = decode_impressions([r.value for r in records], max_bytes=MAX_BYTES)
    dead.send_many(records, errors)

    assert good == valid
    expected_reasons = [reason for _, reason in bad]
    assert [e.reason for _, e in errors] == expected_reasons
    counts: dict[str, int] = {}
    for reason in expected_reasons:
        counts[reason] = counts.get(reason, 0) + 1
    assert dead.counts == counts
    assert dead.total == len(bad)

    letters = log.read(log.partitions("dead-letters")[0], 0, 1000)
    assert len(letters) == len(bad)
    for letter, (index, error) in zip(letters, errors, strict=True):
        envelope = orjson.loads(letter.value)
        original = records[index]
        assert envelope["reason"] == error.reason
        assert envelope["detail"] == error.detail
        assert (envelope["topic"], envelope["partition"], envelope["offset"]) == (
            original.topic,
            original.partition,
            original.offset,
        )
        assert envelope["timestamp_ms"] == original.timestamp_ms
        assert envelope["dead_lettered_at_ms"] == 1_234_500
        assert decode_raw(envelope["value"]) == original.value  # nothing lost, byte for byte
        assert decode_raw(envelope["key"]) == b"k"
        assert letter.key == b"k"
    # Invalid UTF-8 travels as base64; JSON text travels as text.
    garbage = next(orjson.loads(x.value) for x in letters if orjson.loads(x.value)["offset"] == 3)
    assert garbage["value"]["encoding"] == "base64"
    assert base64.b64decode(garbage["value"]["data"]) == b"\xff\xfe\x00garbage"


def test_clicks_and_samples_route_the_same_way(click_dict, sample_dict):
    dead = DeadLetterSink()
    values = [
        orjson.dumps(click_dict()),
        orjson.dumps(click_dict(event_time_ms=-1)),
        orjson.dumps(click_dict(impression_id=None)),
    ]
    records = [Record("clicks", 0, i, None, v, 0) for i, v in enumerate(values)]
    good, errors = decode_clicks(values)
    dead.send_many(records, errors)
    assert good == [Click(**click_dict())]
    samples = [orjson.dumps(sample_dict(label=3)), orjson.dumps(sample_dict())]
    good_samples, sample_errors = decode_samples(samples)
    dead.send_many([Record("samples", 0, i, None, v, 0) for i, v in enumerate(samples)], sample_errors)
    assert [s.sample_id for s in good_samples] == ["imp-1"]
    assert dead.counts == {"bad_time": 1, "wrong_type": 1, "bad_label": 1}


@pytest.mark.parametrize(
    "record",
    [
        Record("t", 0, 1, None, None, 0),  # type: ignore[arg-type]  # a Kafka tombstone
        Record("t", 0, 1, b"\xff", b"\xc3\x28", 0),
        Record("t", 0, 1, None, "not bytes", 0),  # type: ignore[arg-type]
        Record("t\udcff", 0, 1, None, b"x", 0),
    ],
)
def test_send_never_raises_on_odd_records_or_errors(record, caplog):
    log = MemoryLog()
    dead = DeadLetterSink(MemorySink(log, "dl"))
    dead.send(record, EventError("malformed", "bad \udcff detail"))
    dead.send(record, ValueError("not an EventError"))
    assert dead.counts == {"malformed": 1, "unknown": 1}
    # The warning logged is text a UTF-8 handler can write (the bad byte escaped, not a lone surrogate).
    assert "bad \\udcff detail" in caplog.text
    caplog.text.encode("utf-8")
    letters = log.read(log.partitions("dl")[0], 0, 10)
    assert [orjson.loads(x.value)["reason"] for x in letters] == ["malformed", "unknown"]
    assert orjson.loads(letters[1].value)["detail"] == "not an EventError"


def test_without_a_sink_only_counts():
    dead = DeadLetterSink()
    dead.send(Record("t", 0, 0, None, b"x", 0), EventError("oversized", "too big"))
    dead.flush()
    dead.close()
    assert dead.counts == {"oversized": 1}


def test_wrapped_sink_failure_propagates_so_offsets_are_not_committed():
    log = MemoryLog()
    sink = MemorySink(log, "dl")
    sink.close()
    dead = DeadLetterSink(sink)
    with pytest.raises(RuntimeError):
        dead.send(Record("t", 0, 0, None, b"x", 0), EventError("malformed", "m"))


def test_decode_raw_refuses_non_bytes_envelopes():
    with pytest.raises(ValueError):
        decode_raw({"encoding": "repr", "data": "'x'"})
    assert decode_raw(None) is None


def test_decode_records_returns_valid_events_and_dead_letters_the_rest(impression_dict):
    event = Impression(**impression_dict())
    records = [
        Record("impressions", 0, 0, None, encode(event), 0),
        Record("impressions", 0, 1, None, b"nope", 0),
        Record("impressions", 0, 2, None, encode(event), 0),
    ]
    log = MemoryLog()
    dead = DeadLetterSink(MemorySink(log, "dl"))
    assert dead.decode_records(records, decode_impressions) == [event, event]
    assert dead.counts == {"malformed": 1}
    (letter,) = log.read(log.partitions("dl")[0], 0, 10)
    assert orjson.loads(letter.value)["offset"] == 1


@pytest.mark.parametrize("value", [b"\x00" * 600_000, ("\u0001" * 300_000).encode(), b"x" * 2_000_000])
def test_oversized_records_reach_the_dead_letter_sink_truncated_with_size_and_digest(value):
    import hashlib

    log = MemoryLog()
    # The sink plays Kafka's 1 MiB record limit: an untruncated envelope of these values would not fit.
    dead = DeadLetterSink(MemorySink(log, "dead", max_record_bytes=1_048_576))
    key = b"k" * 5000
    dead.send(Record("impressions", 0, 7, key, value, 1), EventError("oversized", "too big"))
    [rec] = log.read(log.partitions("dead")[0], 0, 10)
    assert len(rec.value) <= dead.max_envelope_bytes
    env = orjson.loads(rec.value)
    assert env["truncated"] is True and env["value_bytes"] == len(value)
    assert env["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert decode_raw(env["value"]) == value[:4096]
    assert (env["reason"], env["offset"], env["topic"]) == ("oversized", 7, "impressions")
    assert rec.key == hashlib.sha256(key).hexdigest().encode() == decode_raw(env["key"])
    assert dead.truncated == 1 and dead.counts == {"oversized": 1}


def test_small_records_are_kept_whole():
    log = MemoryLog()
    dead = DeadLetterSink(MemorySink(log, "dead"))
    dead.send(Record("clicks", 0, 1, b"key", b"{bad", 1), EventError("malformed", "x"))
    env = orjson.loads(log.read(log.partitions("dead")[0], 0, 1)[0].value)
    assert "truncated" not in env and decode_raw(env["value"]) == b"{bad"
