"""The msgspec request decoder accepts and refuses what the documented pydantic schema does."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError
from reloop.engine.events.schema import MAX_EVENT_TIME_MS
from reloop.engine.serve.schema import MAX_CANDIDATES, ScoreRequest
from reloop.engine.serve.wire import WireError, decode_request

BASE = {
    "request_id": "r1",
    "user_id": "u1",
    "context": {"device": "mobile", "n": 3, "x": 1.5, "tags": ["a"]},
    "candidates": [{"item_id": "a", "features": {"x": 0.1}}, {"item_id": "b"}],
}

CASES = [
    (BASE, None),
    ({**BASE, "top_k": 2, "event_time_ms": 5}, None),
    ({**BASE, "top_k": None, "event_time_ms": None}, None),
    ({**BASE, "candidates": []}, "candidates"),
    ({**BASE, "candidates": [{"item_id": f"i{j}"} for j in range(MAX_CANDIDATES + 1)]}, "candidates"),
    ({k: v for k, v in BASE.items() if k != "user_id"}, "user_id"),
    ({**BASE, "user_id": ""}, "user_id"),
    ({**BASE, "request_id": "x" * 257}, "request_id"),
    ({**BASE, "candidates": [{"item_id": "a"}, {"item_id": "a"}]}, "duplicate item_id"),
    ({**BASE, "candidates": [{"item_id": "a", "features": {"x": {"nested": 1}}}]}, "candidates"),
    ({**BASE, "candidates": [{"item_id": "a", "features": {"x": [1, 2]}}]}, "candidates"),
    ({**BASE, "candidates": [{"item_id": "a", "extra": 1}]}, "extra"),
    ({**BASE, "candidates": [{"item_id": 7}]}, "item_id"),
    ({**BASE, "top_k": 0}, "top_k"),
    ({**BASE, "top_k": MAX_CANDIDATES + 1}, "top_k"),
    ({**BASE, "event_time_ms": -1}, "event_time_ms"),
    # Past the event contract (year 9999): served, then refused by the joiner (max_future_ms: null).
    ({**BASE, "event_time_ms": MAX_EVENT_TIME_MS}, None),
    ({**BASE, "event_time_ms": MAX_EVENT_TIME_MS + 1}, "event_time_ms"),
    ({**BASE, "surprise": 1}, "surprise"),
    ({**BASE, "context": {"a": None}}, "context"),
]


@pytest.mark.parametrize(("body", "needle"), CASES)
def test_same_verdict_as_the_pydantic_schema(body, needle):
    raw = orjson.dumps(body)
    try:
        ScoreRequest.model_validate_json(raw)
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
    if needle is None:
        assert pydantic_ok
        req = decode_request(raw)
        assert [c.item_id for c in req.candidates] == [c["item_id"] for c in body["candidates"]]
        assert req.context == body["context"]
        return
    assert not pydantic_ok
    with pytest.raises(WireError) as info:
        decode_request(raw)
    text = orjson.dumps(info.value.errors).decode()
    assert needle in text, text
    assert all(e["loc"][0] == "body" for e in info.value.errors)


@pytest.mark.parametrize("value", [b"9223372036854775808", b"-9223372036854775809", b"1" * 40])
@pytest.mark.parametrize("where", ["context", "candidate"])
def test_integers_beyond_int64_are_refused_as_the_schema_refuses_them(value, where):
    # Scored and answered 200, the impression could then not be encoded for the log (never joined).
    features = b'{"n":' + value + b"}"
    ctx, cand = (features, b"{}") if where == "context" else (b"{}", features)
    raw = b'{"request_id":"r","user_id":"u","context":%s,"candidates":[{"item_id":"a","features":%s}]}' % (
        ctx,
        cand,
    )
    with pytest.raises(ValidationError):
        ScoreRequest.model_validate_json(raw)
    with pytest.raises(WireError) as info:
        decode_request(raw)
    assert info.value.errors[0]["loc"][1] == ("context" if where == "context" else "candidates")
    edge = raw.replace(
        value, b"9223372036854775807" if not value.startswith(b"-") else b"-9223372036854775808"
    )
    assert decode_request(edge) and ScoreRequest.model_validate_json(edge)


@pytest.mark.parametrize(
    ("where", "value", "loc"),
    [
        ("candidate", [1, 2], ["body", "candidates", 0, "features", "genres", 0]),
        ("candidate", {"y": 1}, ["body", "candidates", 0, "features", "genres"]),
        ("context", None, ["body", "context", "genres"]),
    ],
)
def test_a_bad_feature_value_is_located_by_its_key(where, value, loc):
    # msgspec writes a dict key as [...]: the 422 said only "features, 0", not which feature.
    features = {"ok": 1, "genres": value, "after": "x"}
    body = (
        {**BASE, "context": features}
        if where == "context"
        else {**BASE, "candidates": [{"item_id": "a", "features": features}]}
    )
    with pytest.raises(WireError) as info:
        decode_request(orjson.dumps(body))
    assert info.value.errors[0]["loc"] == loc


def test_locations_point_at_the_bad_value():
    body = {**BASE, "candidates": [{"item_id": "a"}, {"item_id": "b", "features": {"x": {"y": 1}}}]}
    with pytest.raises(WireError) as info:
        decode_request(orjson.dumps(body))
    assert info.value.errors[0]["loc"][:4] == ["body", "candidates", 1, "features"]
    with pytest.raises(WireError) as info:
        decode_request(b"{not json")
    assert info.value.errors[0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    ("nested", "loc"),
    [
        (b'{"item_id":"a","features":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}", "candidates"),
        (b'{"item_id":"a","features":{"x":' + b'{"y":' * 5000 + b"1" + b"}" * 5000 + b"}}", "candidates"),
    ],
)
def test_deeply_nested_values_are_a_422_not_a_recursion_error(nested, loc):
    # 10 KB of brackets: msgspec refuses them at once, then locating the error re-read the body with
    # json, whose RecursionError escaped the 422 path: a bare 500 with a traceback.
    raw = b'{"request_id":"r","user_id":"u","candidates":[%s]}' % nested
    with pytest.raises(WireError) as info:
        decode_request(raw)
    assert info.value.errors[0]["loc"][:2] == ["body", loc]
