from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
from reloop.engine.events.schema import SCHEMA_VERSION, Click, Impression, LabeledSample
from reloop.engine.events.validation import (
    MAX_EVENT_TIME_MS,
    REASONS,
    EventError,
    _impression,
    _impression_precise,
    _sample,
    _sample_precise,
    click_from_obj,
    impression_from_obj,
    sample_from_obj,
)

DELETE = object()


def _apply(event: dict, changes: dict) -> dict:
    out = dict(event)
    for key, value in changes.items():
        if value is DELETE:
            del out[key]
        else:
            out[key] = value
    return out


IMPRESSION_BAD = [
    ({"impression_id": DELETE}, "missing_field", "impression_id"),
    ({"request_id": DELETE}, "missing_field", "request_id"),
    ({"features": DELETE}, "missing_field", "features"),
    ({"event_time_ms": DELETE}, "missing_field", "event_time_ms"),
    ({"served_prediction": DELETE}, "missing_field", "served_prediction"),
    ({"model_version": DELETE}, "missing_field", "model_version"),
    ({"impression_id": 17}, "wrong_type", "impression_id"),
    ({"user_id": None}, "wrong_type", "user_id"),
    ({"item_id": ""}, "bad_value", "item_id"),
    ({"arm": ""}, "bad_value", "arm"),
    ({"arm": 3}, "wrong_type", "arm"),
    ({"event_time_ms": "1700000000000"}, "wrong_type", "event_time_ms"),
    ({"event_time_ms": 1.7e12}, "wrong_type", "event_time_ms"),
    ({"event_time_ms": True}, "wrong_type", "event_time_ms"),
    ({"event_time_ms": -1}, "bad_time", "event_time_ms"),
    ({"event_time_ms": MAX_EVENT_TIME_MS + 1}, "bad_time", "event_time_ms"),
    ({"served_prediction": 1.5}, "bad_prediction", "served_prediction"),
    ({"served_prediction": -0.1}, "bad_prediction", "served_prediction"),
    ({"served_prediction": math.nan}, "bad_prediction", "served_prediction"),
    ({"served_prediction": math.inf}, "bad_prediction", "served_prediction"),
    ({"served_prediction": 2}, "bad_prediction", "served_prediction"),
    ({"served_prediction": "0.5"}, "wrong_type", "served_prediction"),
    ({"served_prediction": True}, "wrong_type", "served_prediction"),
    ({"model_version": -1}, "bad_value", "model_version"),
    ({"model_version": 1.0}, "wrong_type", "model_version"),
    ({"schema_version": SCHEMA_VERSION + 1}, "unknown_schema_version", "schema_version"),
    ({"schema_version": 0}, "unknown_schema_version", "schema_version"),
    ({"schema_version": "1"}, "wrong_type", "schema_version"),
    ({"features": [1, 2]}, "wrong_type", "features"),
    ({"features": {"a": None}}, "wrong_type", "features"),
    ({"features": {"a": True}}, "wrong_type", "features"),
    ({"features": {"a": {"nested": 1}}}, "wrong_type", "features"),
    ({"features": {"a": ["x", 1]}}, "wrong_type", "features"),
    ({"features": {"a": math.nan}}, "bad_value", "features"),
    ({"features": {"a": -math.inf}}, "bad_value", "features"),
    ({"features": {1: "x"}}, "wrong_type", "features"),
    ({"features": {b"a": "x"}}, "wrong_type", "features"),
]


@pytest.mark.parametrize(("changes", "reason", "field"), IMPRESSION_BAD)
def test_bad_impression_is_rejected_with_reason_and_field(impression_dict, changes, reason, field):
    with pytest.raises(EventError) as info:
        impression_from_obj(_apply(impression_dict(), changes))
    assert info.value.reason == reason
    assert info.value.field == field
    assert field in info.value.detail
    assert reason in REASONS


def test_higher_schema_version_is_rejected_even_when_fields_look_fine(impression_dict):
    with pytest.raises(EventError) as info:
        impression_from_obj(impression_dict(schema_version=SCHEMA_VERSION + 1, new_field="x"))
    assert info.value.reason == "unknown_schema_version"
    assert str(SCHEMA_VERSION + 1) in info.value.detail


def test_schema_version_is_checked_before_other_fields(impression_dict):
    # A future major may have renamed fields: "missing" ones must not be reported instead.
    with pytest.raises(EventError) as info:
        impression_from_obj({"schema_version": 9, "impressionId": "x"})
    assert info.value.reason == "unknown_schema_version"


@pytest.mark.parametrize("obj", [None, [], "x", 3, 1.5, True])
def test_non_object_is_malformed(obj):
    for parse in (impression_from_obj, click_from_obj, sample_from_obj):
        with pytest.raises(EventError) as info:
            parse(obj)
        assert info.value.reason == "malformed"


def test_valid_impression_builds_equal_dataclass(impression_dict):
    event = impression_from_obj(impression_dict())
    assert event == Impression(**impression_dict())
    assert type(event) is Impression
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.arm = "x"  # type: ignore[misc]


def test_unknown_fields_are_ignored(impression_dict, click_dict, sample_dict):
    assert impression_from_obj(impression_dict(added_later={"x": 1})) == Impression(**impression_dict())
    assert click_from_obj(click_dict(device="ios")) == Click(**click_dict())
    sample = sample_from_obj(sample_dict(added_later=1))
    assert sample.sample_id == "imp-1" and sample.label == 1


def test_optional_fields_take_schema_defaults(impression_dict):
    event = impression_dict()
    del event["arm"], event["schema_version"]
    parsed = impression_from_obj(event)
    assert parsed.arm == "default"
    assert parsed.schema_version == SCHEMA_VERSION


def test_int_probability_and_weight_are_read_as_float(impression_dict, sample_dict):
    event = impression_from_obj(impression_dict(served_prediction=1))
    assert event.served_prediction == 1.0 and type(event.served_prediction) is float
    sample = sample_from_obj(sample_dict(weight=2, served_prediction=0))
    assert type(sample.weight) is float and sample.weight == 2.0
    assert type(sample.served_prediction) is float


CLICK_BAD = [
    ({"impression_id": DELETE}, "missing_field"),
    ({"impression_id": ""}, "bad_value"),
    ({"event_time_ms": -5}, "bad_time"),
    ({"event_time_ms": None}, "wrong_type"),
    ({"value": "1"}, "wrong_type"),
    ({"value": math.nan}, "bad_value"),
    ({"value": False}, "wrong_type"),
    ({"schema_version": 7}, "unknown_schema_version"),
]


@pytest.mark.parametrize(("changes", "reason"), CLICK_BAD)
def test_bad_click(click_dict, changes, reason):
    with pytest.raises(EventError) as info:
        click_from_obj(_apply(click_dict(), changes))
    assert info.value.reason == reason


def test_click_value_int_and_missing(click_dict):
    assert click_from_obj(click_dict(value=2)).value == 2.0
    event = click_dict()
    del event["value"]
    assert click_from_obj(event).value is None


SAMPLE_BAD = [
    ({"label": 2}, "bad_label"),
    ({"label": -1}, "bad_label"),
    ({"label": True}, "wrong_type"),
    ({"label": 1.0}, "wrong_type"),
    ({"label": DELETE}, "missing_field"),
    ({"served_version": -3}, "bad_value"),
    ({"weight": -0.5}, "bad_value"),
    ({"weight": math.inf}, "bad_value"),
    ({"is_correction": 1}, "wrong_type"),
    ({"extra": {"a": 1}}, "wrong_type"),
    ({"extra": ["a"]}, "wrong_type"),
    ({"served_prediction": 3.0}, "bad_prediction"),
    ({"schema_version": 2}, "unknown_schema_version"),
]


@pytest.mark.parametrize(("changes", "reason"), SAMPLE_BAD)
def test_bad_sample(sample_dict, changes, reason):
    with pytest.raises(EventError) as info:
        sample_from_obj(_apply(sample_dict(), changes))
    assert info.value.reason == reason


def test_sample_keeps_extra_and_correction(sample_dict):
    sample = sample_from_obj(sample_dict(extra={"k": "v"}, is_correction=True, weight=0.5))
    expected = dict(sample_dict(extra={"k": "v"}, is_correction=True, weight=0.5))
    del expected["schema_version"]
    assert sample == LabeledSample(**expected)


def test_fast_and_precise_paths_agree_on_valid_events(impression_dict, sample_dict):
    for event in (impression_dict(), impression_dict(features={}), impression_dict(served_prediction=0.0)):
        assert _impression(event, True) == _impression_precise(event)
    for event in (sample_dict(), sample_dict(extra={"a": "b"}), sample_dict(label=0, weight=0.0)):
        assert _sample(event, True) == _sample_precise(event)


def test_event_error_pickles_and_prints(impression_dict):
    with pytest.raises(EventError) as info:
        impression_from_obj(impression_dict(served_prediction=7.0))
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.reason, copy.detail, copy.field) == (info.value.reason, info.value.detail, info.value.field)
    assert str(info.value).startswith("bad_prediction: served_prediction 7.0")


def test_fast_builder_refuses_a_changed_schema():
    from reloop.engine.events.validation import _setters

    with pytest.raises(RuntimeError, match="fields changed"):
        _setters(Click, ("impression_id", "event_time_ms", "value"))


def test_an_arm_longer_than_a_label_should_be_is_refused_by_every_path(impression_dict):
    # The arm is a label of the train stage's rolling metrics: one impression with a 100 KB arm made every
    # scrape 860 KB, for good (the windows are in the snapshots).
    import orjson
    from reloop.engine.events.codec import decode_impression
    from reloop.engine.events.schema import MAX_ARM_CHARS

    longest = impression_dict(arm="a" * MAX_ARM_CHARS)
    assert impression_from_obj(longest).arm == decode_impression(orjson.dumps(longest)).arm == longest["arm"]
    too_long = impression_dict(arm="a" * (MAX_ARM_CHARS + 1))
    for check in (
        lambda: _impression(too_long),
        lambda: _impression_precise(too_long),
        lambda: decode_impression(orjson.dumps(too_long)),
        lambda: _sample({**sample_dict_like(), "arm": too_long["arm"]}),
    ):
        with pytest.raises(EventError) as raised:
            check()
        assert (raised.value.reason, raised.value.field) == ("bad_value", "arm")
        assert f"longer than {MAX_ARM_CHARS}" in str(raised.value)


def sample_dict_like() -> dict:
    from .conftest import _sample_dict

    return _sample_dict()


def test_a_served_arm_name_is_no_longer_than_the_join_takes() -> None:
    from pydantic import ValidationError
    from reloop.engine.events.schema import MAX_ARM_CHARS
    from reloop.engine.serve.config import ArmConfig

    with pytest.raises(ValidationError, match="at most 64 characters"):
        ArmConfig(name="a" * (MAX_ARM_CHARS + 1), registry="/tmp/x")
