from __future__ import annotations

import doctest
import tracemalloc

import orjson
import pytest
from reloop.engine.events import codec
from reloop.engine.events.codec import (
    decode_click,
    decode_clicks,
    decode_event,
    decode_impression,
    decode_impressions,
    decode_sample,
    decode_samples,
    encode,
)
from reloop.engine.events.schema import Click, Impression, LabeledSample
from reloop.engine.events.validation import EventError


def test_round_trips(impression_dict, click_dict, sample_dict):
    imp = Impression(**impression_dict())
    click = Click(impression_id="imp-1", event_time_ms=5, value=0.75)
    sample = LabeledSample(
        sample_id="s",
        features={"x": ["a"]},
        label=0,
        served_prediction=0.1,
        served_version=2,
        event_time_ms=9,
        arm="a",
        weight=0.5,
        is_correction=True,
        extra={"k": "v"},
    )
    assert decode_impression(encode(imp)) == imp
    assert decode_click(encode(click)) == click
    assert decode_sample(encode(sample)) == sample
    assert decode_event("impression", encode(imp)) == imp
    assert decode_event("click", encode(click)) == click
    assert decode_event("sample", encode(sample)) == sample


def test_wire_carries_schema_version_and_is_compact(impression_dict):
    sample = LabeledSample("s", {}, 1, 0.5, 1, 2)
    wire = orjson.loads(encode(sample))
    assert wire["schema_version"] == 1
    data = encode(Impression(**impression_dict()))
    assert b" " not in data and b"\n" not in data
    assert orjson.loads(data) == impression_dict()


def test_encode_rejects_unencodable_and_checks_on_request(impression_dict):
    with pytest.raises(EventError) as info:
        encode(Impression(**impression_dict(features={1: "x"})))
    assert info.value.reason == "wrong_type"
    bad = Impression(**impression_dict(served_prediction=1.5))
    assert orjson.loads(encode(bad))["served_prediction"] == 1.5  # unchecked by default
    with pytest.raises(EventError) as info:
        encode(bad, check=True)
    assert info.value.reason == "bad_prediction"
    with pytest.raises(TypeError):
        encode({"impression_id": "x"})  # type: ignore[arg-type]


def test_decode_event_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown event kind"):
        decode_event("impresion", b"{}")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"{not json", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"[1, 2]", "malformed"),
        (b"null", "malformed"),
        (b'{"served_prediction": NaN}', "malformed"),
        (b"1e400", "malformed"),
        (None, "malformed"),
        ("a str", "malformed"),
    ],
)
def test_undecodable_values(data, reason):
    for decode in (decode_impression, decode_click, decode_sample):
        with pytest.raises(EventError) as info:
            decode(data)
        assert info.value.reason == reason


def test_bytes_like_values_are_accepted(impression_dict):
    data = encode(Impression(**impression_dict()))
    expected = decode_impression(data)
    assert decode_impression(bytearray(data)) == decode_impression(memoryview(data)) == expected


def test_oversized_is_rejected_before_parsing(monkeypatch, impression_dict):
    data = encode(Impression(**impression_dict()))

    def must_not_parse(_data):
        raise AssertionError("parsed an oversized record")

    monkeypatch.setattr(codec, "_loads", must_not_parse)
    with pytest.raises(EventError) as info:
        decode_impression(data, max_bytes=len(data) - 1)
    assert info.value.reason == "oversized"
    assert str(len(data)) in info.value.detail
    good, bad = decode_impressions([data, memoryview(data)], max_bytes=len(data) - 1)
    assert good == [] and [(i, e.reason) for i, e in bad] == [(0, "oversized"), (1, "oversized")]


def test_default_limit_is_one_mib(impression_dict):
    big = Impression(**impression_dict(features={"blob": "x" * (1 << 20)}))
    with pytest.raises(EventError) as info:
        decode_impression(encode(big))
    assert info.value.reason == "oversized"
    small = Impression(**impression_dict(features={"blob": "x" * ((1 << 20) - 1000)}))
    assert decode_impression(encode(small)) == small


def test_batch_keeps_order_and_indexes_failures(impression_dict):
    events = [Impression(**impression_dict(impression_id=f"imp-{i}")) for i in range(6)]
    values: list = [encode(e) for e in events]
    values.insert(1, b"garbage")
    values.insert(4, orjson.dumps(impression_dict(served_prediction=9.0)))
    values.append(None)
    values.append(bytearray(encode(events[0])))
    good, bad = decode_impressions(values)
    assert good == events + [events[0]]
    assert [(i, e.reason) for i, e in bad] == [(1, "malformed"), (4, "bad_prediction"), (8, "malformed")]


def test_batch_normalises_like_single(click_dict, sample_dict):
    clicks = [orjson.dumps(click_dict(value=1)), orjson.dumps(click_dict(value=None))]
    good, bad = decode_clicks(clicks)
    assert bad == [] and [c.value for c in good] == [1.0, None]
    samples = [orjson.dumps(sample_dict(weight=3)), orjson.dumps(sample_dict(label=5))]
    good, bad = decode_samples(samples)
    assert [s.weight for s in good] == [3.0]
    assert [(i, e.reason) for i, e in bad] == [(1, "bad_label")]


def test_empty_batch():
    assert decode_impressions([]) == ([], [])


def test_module_doctests():
    failures, tried = doctest.testmod(codec)
    assert tried > 0 and failures == 0


def test_encoded_events_hold_no_oversized_buffers(impression_dict):
    events = [Impression(**impression_dict(impression_id=f"imp-{i}")) for i in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        encoded = [encode(e) for e in events]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    payload = sum(map(len, encoded))
    assert held < 2 * payload + 64 * 1024, (held, payload)


@pytest.mark.parametrize(
    "kind, change",
    [
        ("impression", {"model_version": 2**63}),
        ("impression", {"model_version": 2**64 - 1}),
        ("impression", {"features": {"big": 2**63}}),
        ("sample", {"served_version": 2**63}),
        ("sample", {"features": {"big": 2**64 - 1}}),
    ],
)
def test_ints_beyond_int64_are_bad_values_on_both_paths(kind, change, impression_dict, sample_dict):
    # orjson reads ints up to 2**64 - 1; they travel as int64 (Arrow, numpy): one accepted here made the
    # join stage raise OverflowError at every retry of its rebuild, a poison record.
    obj = {**(impression_dict() if kind == "impression" else sample_dict()), **change}
    data = orjson.dumps(obj)
    is_imp = kind == "impression"
    single, batch = (decode_impression, decode_impressions) if is_imp else (decode_sample, decode_samples)
    with pytest.raises(EventError) as info:
        single(data)
    assert info.value.reason == "bad_value"
    decoded, errors = batch([data])
    assert decoded == [] and [(i, e.reason) for i, e in errors] == [(0, "bad_value")]


@pytest.mark.parametrize(
    "kind, name, reason",
    [
        ("impression", "event_time_ms", "bad_time"),
        ("impression", "model_version", "bad_value"),
        ("click", "event_time_ms", "bad_time"),
        ("sample", "event_time_ms", "bad_time"),
        ("sample", "served_version", "bad_value"),
    ],
)
@pytest.mark.parametrize("literal", [b"100000000000000000000", b"-100000000000000000000"])
def test_int_literals_past_64_bits_are_out_of_range_not_floats(
    kind, name, reason, literal, impression_dict, click_dict, sample_dict
):
    # orjson reads an int literal past 64 bits as a float: the record said "got float" (wrong_type) for
    # a time in picoseconds, say, which holds an int, only one out of range.
    obj = {"impression": impression_dict, "click": click_dict, "sample": sample_dict}[kind]()
    key = b'"%s":' % name.encode()
    data = orjson.dumps({**obj, name: 0}).replace(key + b"0", key + literal)
    assert literal in data
    single = {"impression": decode_impression, "click": decode_click, "sample": decode_sample}[kind]
    batch = {"impression": decode_impressions, "click": decode_clicks, "sample": decode_samples}[kind]
    with pytest.raises(EventError) as info:
        single(data)
    assert (info.value.reason, info.value.field) == (reason, name)
    assert literal.decode() in info.value.detail
    decoded, errors = batch([data])
    assert decoded == [] and [(i, e.reason) for i, e in errors] == [(0, reason)]
