"""Property tests: valid events round-trip exactly; no input makes decoding raise anything but EventError."""

from __future__ import annotations

import json
import math

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reloop.engine.events.codec import (
    decode_click,
    decode_clicks,
    decode_impression,
    decode_impressions,
    decode_sample,
    decode_samples,
    encode,
)
from reloop.engine.events.schema import Click, Impression, LabeledSample
from reloop.engine.events.validation import (
    MAX_EVENT_TIME_MS,
    REASONS,
    EventError,
    _impression,
    _impression_precise,
    _sample,
    _sample_precise,
    impression_from_obj,
    sample_from_obj,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.text(min_size=1, max_size=12)
times = st.integers(0, MAX_EVENT_TIME_MS)
probabilities = st.floats(0.0, 1.0)
versions = st.integers(0, 2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
feature_values = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**63), 2**63 - 1),
    finite,
    st.lists(st.text(max_size=6), max_size=4),
)
features = st.dictionaries(st.text(max_size=8), feature_values, max_size=8)

impressions = st.builds(
    Impression,
    impression_id=ids,
    request_id=ids,
    user_id=ids,
    item_id=ids,
    features=features,
    event_time_ms=times,
    served_prediction=probabilities,
    model_version=versions,
    arm=ids,
)
clicks = st.builds(Click, impression_id=ids, event_time_ms=times, value=st.none() | finite)
samples = st.builds(
    LabeledSample,
    sample_id=ids,
    features=features,
    label=st.sampled_from([0, 1]),
    served_prediction=probabilities,
    served_version=versions,
    event_time_ms=times,
    arm=ids,
    weight=st.floats(0.0, allow_infinity=False),
    is_correction=st.booleans(),
    extra=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
IMPRESSION_KEYS = [
    "impression_id",
    "request_id",
    "user_id",
    "item_id",
    "features",
    "event_time_ms",
    "served_prediction",
    "model_version",
    "arm",
    "schema_version",
]
SAMPLE_KEYS = [
    "sample_id",
    "features",
    "label",
    "served_prediction",
    "served_version",
    "event_time_ms",
    "arm",
    "weight",
    "is_correction",
    "extra",
    "schema_version",
]


def assert_valid_impression(e: Impression) -> None:
    """The rules, restated independently of the validator."""
    for value in (e.impression_id, e.request_id, e.user_id, e.item_id, e.arm):
        assert type(value) is str and value
    assert type(e.event_time_ms) is int and 0 <= e.event_time_ms <= MAX_EVENT_TIME_MS
    assert type(e.served_prediction) is float and 0.0 <= e.served_prediction <= 1.0
    assert type(e.model_version) is int and e.model_version >= 0
    assert type(e.features) is dict
    for key, value in e.features.items():
        assert type(key) is str
        assert type(value) in (str, int, float, list)
        if type(value) is float:
            assert math.isfinite(value)
        if type(value) is list:
            assert all(type(item) is str for item in value)


@SETTINGS
@given(impressions)
def test_impressions_round_trip_exactly(event):
    data = encode(event, check=True)
    assert decode_impression(data) == event
    assert decode_impressions([data, data]) == ([event, event], [])


@SETTINGS
@given(clicks)
def test_clicks_round_trip_exactly(event):
    assert decode_click(encode(event)) == event
    assert decode_clicks([encode(event)]) == ([event], [])


@SETTINGS
@given(samples)
def test_samples_round_trip_exactly(event):
    assert decode_sample(encode(event)) == event
    assert decode_samples([encode(event)]) == ([event], [])


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_event_error(data):
    for decode in (decode_impression, decode_click, decode_sample):
        try:
            decode(data)
        except EventError as exc:
            assert exc.reason in REASONS
    for batch in (decode_impressions, decode_clicks, decode_samples):
        good, bad = batch([data])
        assert len(good) + len(bad) == 1


@SETTINGS
@given(json_values)
def test_arbitrary_json_only_raises_event_error(value):
    # stdlib json writes big ints and NaN/Infinity tokens, which orjson must refuse or convert safely.
    data = json.dumps(value).encode()
    for decode in (decode_impression, decode_click, decode_sample):
        try:
            decode(data)
        except EventError as exc:
            assert exc.reason in REASONS


@SETTINGS
@given(st.dictionaries(st.sampled_from(IMPRESSION_KEYS) | st.text(max_size=6), json_values, max_size=12))
def test_arbitrary_objects_with_our_field_names(obj):
    data = json.dumps(obj).encode()
    try:
        event = decode_impression(data)
    except EventError as exc:
        assert exc.reason in REASONS
    else:
        assert_valid_impression(event)


@st.composite
def mutated_impression(draw):
    base = orjson.loads(encode(draw(impressions)))
    key = draw(st.sampled_from(IMPRESSION_KEYS + ["unknown_field"]))
    action = draw(st.sampled_from(["delete", "replace", "add"]))
    if action == "delete":
        base.pop(key, None)
    elif action == "replace":
        base[key] = draw(json_values)
    else:
        base[draw(st.text(max_size=8).filter(lambda k: k not in IMPRESSION_KEYS))] = draw(json_values)
    return base, key, action


@SETTINGS
@given(mutated_impression())
def test_mutated_impressions_are_accepted_or_rejected_with_a_reason(case):
    obj, key, action = case
    data = orjson.dumps(obj) if _json_safe(obj) else json.dumps(obj).encode()
    try:
        event = decode_impression(data)
    except EventError as exc:
        assert exc.reason in REASONS
        if action == "delete" and key not in ("arm", "schema_version", "unknown_field"):
            assert exc.reason == "missing_field" and exc.field == key
    else:
        assert_valid_impression(event)
        if action == "add":
            # Unknown fields change nothing.
            known = {k: obj[k] for k in IMPRESSION_KEYS if k in obj}
            assert event == Impression(**known)


def _json_safe(obj) -> bool:
    try:
        orjson.dumps(obj)
    except TypeError:
        return False
    return True


def _outcome(parse, obj):
    try:
        return parse(obj)
    except EventError as exc:
        return exc.reason


@SETTINGS
@given(mutated_impression())
def test_fast_path_agrees_with_the_precise_path(case):
    obj = orjson.loads(orjson.dumps(case[0])) if _json_safe(case[0]) else case[0]
    precise = _outcome(_impression_precise, obj)
    # The JSON fast path may only be used on what orjson produced (str keys, finite floats).
    if _json_safe(case[0]):
        assert _outcome(lambda o: _impression(o, True), obj) == precise
    assert _outcome(impression_from_obj, obj) == precise


def _single_outcome(decode, data):
    try:
        return decode(data)
    except EventError as exc:
        return exc.reason


def _batch_outcome(decode_batch, data):
    good, bad = decode_batch([data])
    return good[0] if good else bad[0][1].reason


@SETTINGS
@given(mutated_impression())
def test_batch_decoder_agrees_with_the_single_record_decoder(case):
    # The batch path decodes with msgspec's typed decoder, the single-record path parses into plain objects
    # and checks by hand: same verdict, same event.
    data = json.dumps(case[0]).encode()  # stdlib json: big ints, NaN tokens and all
    expected = _single_outcome(decode_impression, data)
    got = _batch_outcome(decode_impressions, data)
    assert got == expected
    if isinstance(got, Impression):
        assert [type(v) for v in got.features.values()] == [type(v) for v in expected.features.values()]


@SETTINGS
@given(st.dictionaries(st.sampled_from(["impression_id", "event_time_ms", "value", "schema_version"])
                       | st.text(max_size=6), json_values, max_size=6))  # fmt: skip
def test_click_batch_decoder_agrees_with_the_single_record_decoder(obj):
    data = json.dumps(obj).encode()
    assert _batch_outcome(decode_clicks, data) == _single_outcome(decode_click, data)


@pytest.mark.parametrize(
    "value",
    [
        {"features": {"big": 2**64}},  # orjson read it as a float; the codec now keeps the int (refused)
        {"features": {"big": -(2**63) - 1}},
        {"model_version": 2**63},
        {"served_prediction": 1},  # an int probability is read as a float
        {"schema_version": 0},
        {"arm": ""},
        {"features": {"x": None}},
        {"features": {"x": [1]}},
        {"unknown": [[[[[]]]]] },
    ],
)
def test_batch_decoder_edge_cases_agree(value, impression_dict):
    data = json.dumps({**impression_dict(), **value}).encode()
    assert _batch_outcome(decode_impressions, data) == _single_outcome(decode_impression, data)


def test_deeply_nested_json_is_a_dead_letter_not_a_crash(impression_dict):
    # msgspec raises RecursionError on deep nesting; the batch path must still name a reason.
    deep = json.dumps(impression_dict())[:-1].encode() + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert _batch_outcome(decode_impressions, deep) == "malformed"
    assert _batch_outcome(decode_clicks, deep) == "malformed"


@SETTINGS
@given(st.dictionaries(st.sampled_from(SAMPLE_KEYS), json_values, max_size=12), samples)
def test_sample_paths_agree(partial, sample):
    obj = orjson.loads(encode(sample))
    obj.update(partial)
    obj = json.loads(json.dumps(obj))
    precise = _outcome(_sample_precise, obj)
    assert _outcome(sample_from_obj, obj) == precise
    if _json_safe(obj) and not _has_nonfinite(obj):
        assert _outcome(lambda o: _sample(o, True), obj) == precise


def _has_nonfinite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nonfinite(v) for v in value)
    return False


@SETTINGS
@given(impressions, st.sampled_from(["nan", "bytes_key", "int_key"]))
def test_msgpack_shaped_input_is_fully_checked(event, poison):
    # Data that did not come from orjson (msgpack here) can hold NaN and non-str keys: the public
    # validator must catch them.
    obj = msgpack.unpackb(msgpack.packb(orjson.loads(encode(event))), raw=False)
    assert impression_from_obj(obj) == event
    if poison == "nan":
        obj["features"]["x"] = math.nan
        expected = "bad_value"
    elif poison == "bytes_key":
        obj["features"][b"x"] = "v"
        expected = "wrong_type"
    else:
        obj["features"][7] = "v"
        expected = "wrong_type"
    assert _outcome(impression_from_obj, obj) == expected
