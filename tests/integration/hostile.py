"""A seeded generator of hostile records: every malformed kind we know, each with the dead-letter reason
the processor must give it. Test support only (the fuzz test and the defect tests of the nothing-lost
issue share it).

Every bad impression uses an id of its own (``bad-...``), so none of them can change a valid sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Click, Impression

YEAR_3000_MS = 32_503_680_000_000


@dataclass(frozen=True, slots=True)
class Hostile:
    topic_kind: str  # "impression" or "click"
    key: bytes
    value: bytes
    reason: str  # the dead-letter reason the processor must give it
    case: str  # which generator made it


def _impression(iid: str, t: int, **changes: object) -> dict:
    base = {
        "impression_id": iid,
        "request_id": f"r-{iid}",
        "user_id": "u1",
        "item_id": "it1",
        "features": {"user": "u1", "item": "it1", "ctx": 3},
        "event_time_ms": t,
        "served_prediction": 0.25,
        "model_version": 0,
        "arm": "default",
        "schema_version": 1,
    }
    base.update(changes)
    return base


def _click(iid: str, t: int, **changes: object) -> dict:
    return {"impression_id": iid, "event_time_ms": t, "value": None, "schema_version": 1, **changes}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def generate_hostile(n: int, *, now_ms: int, seed: int = 0, oversized: int = 3) -> list[Hostile]:
    """``n`` fuzzed bad records (plus ``oversized`` records of 600-800 KB) around event time ``now_ms``."""
    rng = random.Random(seed)
    out: list[Hostile] = []
    seq = [0]

    def iid() -> str:
        seq[0] += 1
        return f"bad-{seq[0]:06d}"

    def imp(case: str, reason: str, obj: object) -> None:
        i = iid()
        out.append(
            Hostile(
                "impression",
                i.encode(),
                orjson.dumps(obj) if not isinstance(obj, bytes) else obj,
                reason,
                case,
            )
        )

    def clk(case: str, reason: str, obj: object) -> None:
        i = iid()
        out.append(
            Hostile(
                "click", i.encode(), orjson.dumps(obj) if not isinstance(obj, bytes) else obj, reason, case
            )
        )

    t = now_ms
    cases: list[Callable[[], None]] = [
        lambda: imp("random-bytes", "malformed", rng.randbytes(rng.randint(1, 300))),
        lambda: imp("truncated-json", "malformed", orjson.dumps(_impression(iid(), t))[: rng.randint(1, 60)]),
        lambda: imp(
            "not-an-object", "malformed", rng.choice([b"[1,2,3]", b"42", b'"text"', b"null", b"true"])
        ),
        lambda: imp("empty", "malformed", b""),
        lambda: imp("nan-literal", "malformed", orjson.dumps(_impression(iid(), t)).replace(b"0.25", b"NaN")),
        lambda: imp("deep-nesting", "malformed", b'{"features":' + b"[" * 2000 + b"]" * 2000 + b"}"),
        lambda: imp(
            "missing-field",
            "missing_field",
            _without(
                _impression(iid(), t),
                rng.choice(
                    [
                        "impression_id",
                        "request_id",
                        "user_id",
                        "item_id",
                        "features",
                        "event_time_ms",
                        "served_prediction",
                        "model_version",
                    ]
                ),
            ),
        ),
        lambda: imp("wrong-type-id", "wrong_type", _impression(rng.randint(1, 9), t)),
        lambda: imp("wrong-type-version", "wrong_type", _impression(iid(), t, model_version="3")),
        lambda: imp("bool-time", "wrong_type", _impression(iid(), t, event_time_ms=True)),
        lambda: imp("float-time", "wrong_type", _impression(iid(), t, event_time_ms=float(t))),
        lambda: imp("nested-feature", "wrong_type", _impression(iid(), t, features={"user": {"a": 1}})),
        lambda: imp("list-of-ints", "wrong_type", _impression(iid(), t, features={"user": [1, 2]})),
        lambda: imp("null-feature", "wrong_type", _impression(iid(), t, features={"user": None})),
        lambda: imp(
            "bad-prediction",
            "bad_prediction",
            _impression(iid(), t, served_prediction=rng.choice([1.5, -0.1, 7])),
        ),
        lambda: imp("negative-time", "bad_time", _impression(iid(), t, event_time_ms=-rng.randint(1, 10**6))),
        lambda: imp("year-3000", "bad_time", _impression(iid(), t, event_time_ms=YEAR_3000_MS)),
        lambda: imp("an-hour-ahead", "bad_time", _impression(iid(), t, event_time_ms=now_ms + 3_600_000)),
        lambda: imp("schema-v2", "unknown_schema_version", _impression(iid(), t, schema_version=2)),
        lambda: imp("empty-id", "bad_value", _impression("", t)),
        lambda: imp(
            "categorical-list",
            "bad_feature",
            _impression(iid(), t, features={"user": ["a", "b"], "item": "i"}),
        ),
        lambda: imp("numeric-text", "bad_feature", _impression(iid(), t, features={"price": "abc"})),
        lambda: imp("numeric-overflow", "bad_feature", _impression(iid(), t, features={"price": "1e999"})),
        # Finite JSON, infinite in float32: refused for a numeric field under the identity transform.
        lambda: imp("numeric-beyond-float32", "bad_feature", _impression(iid(), t, features={"price": 1e39})),
        lambda: imp(
            "long-value",
            "bad_feature",
            _impression(iid(), t, features={"item": "x" * rng.randint(5000, 20_000)}),
        ),
        lambda: clk("click-random-bytes", "malformed", rng.randbytes(rng.randint(1, 100))),
        lambda: clk("click-missing-id", "missing_field", _without(_click("x", t), "impression_id")),
        lambda: clk("click-bad-value", "wrong_type", _click(iid(), t, value="1")),
        lambda: clk("click-year-3000", "bad_time", _click(iid(), YEAR_3000_MS)),
        lambda: clk("click-negative-time", "bad_time", _click(iid(), -5)),
    ]
    for _ in range(n):
        rng.choice(cases)()
    for k in range(oversized):
        size = rng.randint(600_000, 800_000)
        if k % 3 == 0:
            imp("oversized-garbage", "oversized", b"{" + b"x" * size)
        elif k % 3 == 1:
            imp("oversized-valid", "oversized", _impression(iid(), t, features={"item": "y" * size}))
        else:
            clk("oversized-click", "oversized", _click(iid(), t, pad="z" * size))
    return out


def valid_impression_bytes(iid: str, t: int) -> bytes:
    """A contract- and spec-valid impression (for tests that need one next to the hostile ones)."""
    return encode(
        Impression(
            impression_id=iid,
            request_id=f"r{iid}",
            user_id="u",
            item_id="i",
            features={"user": "u", "item": "i", "ctx": 1},
            event_time_ms=t,
            served_prediction=0.5,
            model_version=0,
        )
    )


def click_bytes(iid: str, t: int) -> bytes:
    return encode(Click(impression_id=iid, event_time_ms=t))
