"""One feature value, one featurisation, whatever path it takes (docs/bring-your-own-log.md, "Feature
values"): the serving wire and its spec check; the join's door (EventIntake, fresh and with its keyed
fast path learnt) -> the joined impression's bytes -> the samples topic's Arrow columns -> the train
stage's (and the error memory feed's) featurizer; the in-process pipeline (``sample_from_joined``);
samples read back as JSON (``decode_sample``); and a value sharing its column with values of another
type (the JSON-text column). An int beyond int64 is refused on every path (orjson read ``2**64`` and
``-2**63 - 1`` as floats, so the door accepted them as floats while the samples topic kept the exact
int: ``str()`` of each hashed to different rows), and every value accepted gets the same rows."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.events.codec import decode_impression, decode_impressions, decode_sample, decode_samples
from reloop.engine.events.sample_batch import (
    batch_from_joined,
    batch_from_samples,
    decode_batch,
    encode_batch,
)
from reloop.engine.events.validation import EventError
from reloop.engine.features.check import SpecChecker
from reloop.engine.features.featurizer import FeatureBatch, FeatureError, Featurizer
from reloop.engine.features.spec import FLOAT32_MAX, CategoricalField, FeatureSpec, NumericField
from reloop.engine.join.joiner import Joined
from reloop.engine.runtime.intake import EventIntake, IntakeLimits
from reloop.engine.runtime.pipeline import sample_from_joined
from reloop.engine.serve.columns import ColumnFeaturizer
from reloop.engine.serve.wire import WireError, decode_request
from reloop.engine.streams import Record

SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="c", buckets=1_000_003),
        NumericField(name="n", transform="log_bucket", buckets=1009),
        NumericField(name="m", transform="minmax", min=-1.0, max=1.0),
    )
)
DENSE = FeatureSpec(fields=(NumericField(name="d"),))  # identity: float32's range

ACCEPTED = [2**63 - 1, -(2**63), 1e308, 1.8446744073709552e19, 1.0, 1, -0.0, 0, "7"]
REFUSED = [2**63, 2**64 - 1, 2**64, 2**64 + 1, -(2**63) - 1, -(2**70), True]
T = 1_700_000_000_000


def _impression(iid: str, feats: dict[str, Any]) -> bytes:
    # stdlib json writes ints of any size exactly (orjson refuses to write one past 64 bits)
    obj = {
        "impression_id": iid,
        "request_id": "r",
        "user_id": "u",
        "item_id": "x",
        "features": feats,
        "event_time_ms": T,
        "served_prediction": 0.5,
        "model_version": 1,
    }
    return json.dumps(obj).encode()


def _rows(batch: FeatureBatch, row: int = 0) -> tuple:
    return tuple(a[row].tolist() for a in (batch.cat, batch.num, batch.multi, batch.multi_mask))


def _featurise(spec: FeatureSpec, make) -> Any:
    try:
        return make()
    except FeatureError:
        return "refused"


def _via_samples_topic(spec: FeatureSpec, joined: list[Joined], row: int = 0) -> Any:
    batch = decode_batch(encode_batch(batch_from_joined(joined, task=0, first_seq=0)))
    return _featurise(
        spec, lambda: _rows(Featurizer(spec).transform_columns(batch.features(), rows=len(batch)), row)
    )


def _paths(spec: FeatureSpec, value: Any) -> dict[str, Any]:
    """Each path's rows for ``value`` in every field of ``spec`` (or "refused")."""
    feats = {f.name: value for f in spec.fields}
    out: dict[str, Any] = {}
    # serving: the wire's types, the spec check, the request featurizer
    body = json.dumps(
        {"request_id": "r", "user_id": "u", "candidates": [{"item_id": "i", "features": feats}]}
    )
    try:
        request = decode_request(body.encode())
    except WireError:
        out["serve"] = "refused"
    else:
        served = request.candidates[0].features
        if SpecChecker(spec).check_rows([served]):
            out["serve"] = "refused"
        else:
            out["serve"] = _featurise(spec, lambda: _rows(ColumnFeaturizer(spec).transform({}, [served])))
    data = _impression("i1", feats)
    for warm in (False, True):
        dead = DeadLetterSink()
        intake = EventIntake(
            impressions_topic="imp",
            clicks_topic="clk",
            limits=IntakeLimits(max_future_ms=None),
            clock=lambda: T,
            dead_letters=dead,
            checker=SpecChecker(spec),
        )
        if warm:  # the keyed struct fast path learnt from a batch that took the careful one
            list(
                intake.events(
                    [Record("imp", 0, 0, None, _impression("w", {f.name: 1 for f in spec.fields}), T)]
                )
            )
            assert intake._impressions.keys
        record = Record("imp", 0, 1, None, data, T)
        [(_, event)] = list(intake.events([record]))
        name = "door (keyed)" if warm else "door"
        if event is None:
            assert dead.total == 1 and set(dead.counts) <= {"bad_value", "wrong_type", "bad_feature"}
            out[name] = "refused"
            continue
        assert dead.total == 0
        joined = Joined("i1", T, record.value, 1, False)
        out[name] = _via_samples_topic(spec, [joined])  # the train stage and the memory feed
        sample = sample_from_joined(joined)  # the in-process pipeline
        out[f"{name}, in process"] = _featurise(
            spec, lambda s=sample: _rows(Featurizer(spec).transform([s.features]))
        )
        # the same key holding a value of another type in the batch: a JSON-text column
        other = Joined("i2", T, _impression("i2", {f.name: "3" for f in spec.fields}), 0, False)
        out[f"{name}, mixed column"] = _via_samples_topic(spec, [joined, other])
    # a labeled sample as JSON (the pipeline's buffer), then as the samples topic's columns
    sample_json = json.dumps(
        {
            "sample_id": "s",
            "features": feats,
            "label": 1,
            "served_prediction": 0.5,
            "served_version": 1,
            "event_time_ms": T,
        }
    ).encode()
    try:
        s = decode_sample(sample_json)
    except EventError:
        out["sample json"] = "refused"
    else:
        if SpecChecker(spec).check_rows([s.features]):
            out["sample json"] = "refused"
        else:
            batch = decode_batch(encode_batch(batch_from_samples([s], task=0, first_seq=0)))
            out["sample json"] = _featurise(
                spec, lambda: _rows(Featurizer(spec).transform_columns(batch.features(), rows=1))
            )
    return out


@pytest.mark.parametrize("value", ACCEPTED + REFUSED, ids=repr)
@pytest.mark.parametrize("spec", [SPEC, DENSE], ids=["hashed", "dense"])
def test_every_path_featurises_a_value_alike_or_refuses_it(spec, value):
    out = _paths(spec, value)
    assert len(set(map(repr, out.values()))) == 1, out
    accepted = any(v == value and type(v) is type(value) for v in ACCEPTED)
    if spec is DENSE and accepted and not isinstance(value, str):
        accepted = abs(value) <= FLOAT32_MAX  # the identity transform's bound: 1e308 is refused
    assert (out["serve"] != "refused") == accepted, out


@pytest.mark.parametrize(
    "literal",
    [
        b"18446744073709551616",
        b"18446744073709551617",
        b"-9223372036854775809",
        b"-1180591620717411303424",
        b"9223372036854775808",
    ],
)
def test_an_int_literal_beyond_int64_is_a_bad_value_at_every_door(literal):
    # orjson (the careful path's parser) read the first four as floats and accepted them.
    data = _impression("i", {"c": 0}).replace(b'"c": 0', b'"c": ' + literal)
    assert literal in data
    with pytest.raises(EventError) as info:
        decode_impression(data)
    assert info.value.reason == "bad_value" and literal.decode() in info.value.detail
    assert [(i, e.reason) for i, e in decode_impressions([data])[1]] == [(0, "bad_value")]
    sample = (
        json.dumps(
            {
                "sample_id": "s",
                "features": {"c": 0},
                "label": 0,
                "served_prediction": 0.5,
                "served_version": 1,
                "event_time_ms": T,
            }
        )
        .encode()
        .replace(b'"c": 0', b'"c": ' + literal)
    )
    assert [(i, e.reason) for i, e in decode_samples([sample])[1]] == [(0, "bad_value")]
    # a float literal of the same magnitude is a float, as it was
    as_float = _impression("i", {"c": float(int(literal))})
    assert type(decode_impression(as_float).features["c"]) is float


def test_the_rows_of_accepted_edge_values_are_those_of_their_str_and_float():
    # The rule the paths share: a categorical value is hashed by its str() (1 and 1.0 differ), a
    # numeric one read as a float.
    rows = {repr(v): _paths(SPEC, v)["door"] for v in (1, 1.0, 2**63 - 1, 1e308)}
    assert rows["1"][0][0] != rows["1.0"][0][0]  # "1" and "1.0": two categories
    assert rows["1"][0][1] == rows["1.0"][0][1]  # one number
    direct = Featurizer(SPEC).transform([{"c": str(2**63 - 1), "n": float(2**63 - 1), "m": 1.0}])
    assert rows[repr(2**63 - 1)] == _rows(direct)
    assert np.isfinite(np.asarray(rows["1e+308"][1])).all()


_EDGES = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**53 + 1]


@settings(max_examples=30, deadline=None)
@given(
    st.one_of(
        st.sampled_from(_EDGES),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_any_number_is_featurised_alike_on_every_path_or_refused_on_all(value):
    out = _paths(SPEC, value)
    assert len(set(map(repr, out.values()))) == 1, out
    in_range = not isinstance(value, int) or -(2**63) <= value < 2**63
    assert (out["serve"] != "refused") == in_range, out
