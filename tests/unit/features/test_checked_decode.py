"""CheckedImpressionDecoder gives the verdicts of decode_impression + SpecChecker, on either of its paths."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reloop.engine.events.codec import decode_impression
from reloop.engine.events.validation import EventError
from reloop.engine.features import checked_decode
from reloop.engine.features.check import FeatureLimits, SpecChecker
from reloop.engine.features.checked_decode import CheckedImpressionDecoder
from reloop.engine.features.spec import CategoricalField, FeatureSpec, MultiCategoricalField, NumericField

SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="user", buckets=100),
        CategoricalField(name="item", buckets=50),
        NumericField(name="price"),
        NumericField(name="count", transform="log_bucket", buckets=50),
        MultiCategoricalField(name="tags", buckets=50, max_len=4),
    )
)
LIMITS = FeatureLimits(max_chars=6, max_list=3)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

short_text = st.text(max_size=8)
values = st.one_of(
    short_text,
    st.sampled_from(["", "1.5", "-2", "nan", "inf", "1e999", "abc", "1e39", 1e39, -3.5e38, 3.4e38]),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308 * 10, -1e308 * 10]),  # written by json.dumps as Infinity: malformed JSON
    st.booleans(),
    st.none(),
    st.lists(short_text, max_size=5),
    st.lists(st.integers(0, 3), max_size=2),
)
feature_dicts = st.dictionaries(
    st.sampled_from(["user", "item", "price", "count", "tags"]) | short_text, values, max_size=6
)


def _impression(i: int, features: dict) -> dict:
    return {
        "impression_id": f"imp-{i}",
        "request_id": "r",
        "user_id": "u",
        "item_id": "it",
        "features": features,
        "event_time_ms": 1_000 + i,
        "served_prediction": 0.25,
        "model_version": 3,
    }


def _reference(data: bytes, checker: SpecChecker | None) -> object:
    try:
        ev = decode_impression(data)
    except EventError as exc:
        return exc.reason, exc.field
    if checker is not None:
        found = checker.check_rows([ev.features])
        if found:
            return found[0][1].reason, found[0][1].field
    return _fields(ev)


def _fields(ev: object) -> tuple:
    feats = ev.features  # type: ignore[attr-defined]
    if not isinstance(feats, dict):  # the fast path's struct: back to a dict of the present keys
        feats = {f.encode_name: getattr(feats, f.name) for f in msgspec.structs.fields(feats)}
        feats = {k: v for k, v in feats.items() if v is not None}
    typed = sorted((k, type(v).__name__, json.dumps(v)) for k, v in feats.items())
    names = ("impression_id", "request_id", "user_id", "item_id", "event_time_ms", "served_prediction")
    return (*(getattr(ev, n) for n in names), ev.model_version, ev.arm, ev.schema_version, typed)  # type: ignore[attr-defined]


def _outcomes(decoder: CheckedImpressionDecoder, batch: list[bytes]) -> list[object]:
    events, errors = decoder.decode(batch, max_bytes=1 << 20)
    assert set(errors).isdisjoint(i for i, ev in enumerate(events) if ev is not None)
    assert all(ev is not None or i in errors for i, ev in enumerate(events))
    return [
        _fields(ev) if ev is not None else (errors[i].reason, errors[i].field) for i, ev in enumerate(events)
    ]


TOP_KEYS = ["impression_id", "request_id", "features", "event_time_ms", "served_prediction", "model_version",
            "arm", "schema_version", "unknown_field"]  # fmt: skip
# Changes to the record around the features: none mostly, else one field deleted or given another value.
top_changes = st.one_of(
    st.just(None),
    st.tuples(st.sampled_from(TOP_KEYS), st.sampled_from(["delete"]) | values.map(lambda v: ("set", v))),
)


def _record(i: int, features: dict, change: object) -> bytes:
    obj = _impression(i, features)
    if change is not None:
        key, action = change  # type: ignore[misc]
        if action == "delete":
            obj.pop(key, None)
        else:
            obj[key] = action[1]
    return json.dumps(obj).encode()  # stdlib json: big ints and Infinity tokens as they come


@pytest.mark.parametrize("with_spec", [True, False])
@SETTINGS
@given(rows=st.lists(st.tuples(feature_dicts, top_changes), min_size=1, max_size=8))
def test_same_verdicts_as_the_contract_decoder_and_the_spec_check(rows, with_spec):
    checker = SpecChecker(SPEC, LIMITS) if with_spec else None
    batch = [_record(i, f, change) for i, (f, change) in enumerate(rows)]
    expected = [_reference(data, checker) for data in batch]
    decoder = CheckedImpressionDecoder(checker)
    assert _outcomes(decoder, batch) == expected  # first pass: the careful path learns the keys
    assert _outcomes(decoder, batch) == expected  # second: the struct of the learnt keys


def test_learnt_keys_take_the_fast_path(monkeypatch):
    checker = SpecChecker(SPEC, LIMITS)
    decoder = CheckedImpressionDecoder(checker)
    good = [
        json.dumps(_impression(i, {"user": "a", "price": 1.5, "count": 3, "tags": ["x"], "extra": i}))
        .encode() for i in range(4)
    ]  # fmt: skip
    decoder.decode(good, max_bytes=1 << 20)
    assert "extra" in decoder.keys
    calls = []
    monkeypatch.setattr(checked_decode, "decode_impression", lambda *a, **k: calls.append(a))
    events, errors = decoder.decode(good, max_bytes=1 << 20)
    assert (
        calls == [] and errors == {} and [e.impression_id for e in events] == [f"imp-{i}" for i in range(4)]
    )


def test_values_the_spec_refuses_are_dead_lettered_with_the_field_on_a_warm_decoder():
    checker = SpecChecker(SPEC, LIMITS)
    decoder = CheckedImpressionDecoder(checker)
    ok = {"user": "a", "price": 1.5, "count": 3, "tags": ["x"]}
    decoder.decode([json.dumps(_impression(0, ok)).encode()], max_bytes=1 << 20)
    bad = [
        {**ok, "price": "abc"},
        {**ok, "user": "x" * 7},
        {**ok, "tags": ["a"] * 4},
        {**ok, "tags": "solo"},
        {**ok, "user": ["a"]},
        {**ok, "price": "2.5"},  # a numeric string: the careful path accepts it
    ]
    events, errors = decoder.decode(
        [json.dumps(_impression(i, f)).encode() for i, f in enumerate(bad)], max_bytes=1 << 20
    )
    assert {i: e.field for i, e in errors.items()} == {
        0: "features.price", 1: "features.user", 2: "features.tags", 3: "features.tags", 4: "features.user"
    }  # fmt: skip
    assert events[5] is not None and events[5].features["price"] == "2.5"


def test_oversized_and_non_bytes_values_are_refused_like_the_contract():
    decoder = CheckedImpressionDecoder(None)
    data = json.dumps(_impression(0, {"a": 1})).encode()
    events, errors = decoder.decode([data, memoryview(data), None], max_bytes=len(data) - 1)
    assert events == [None, None, None]
    assert [errors[i].reason for i in range(3)] == ["oversized", "oversized", "malformed"]
