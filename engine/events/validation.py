"""Turn a parsed event (a dict from the codec) into a checked Impression, Click or LabeledSample.

Every problem raises :class:`EventError` with a short machine ``reason`` (one of :data:`REASONS`, a
bounded set, so it is safe as a metric label) and a human ``detail`` that names the field.

Rules
-----
- ids (``impression_id``, ``request_id``, ``user_id``, ``item_id``, ``sample_id``) and ``arm``: non-empty str.
- ``event_time_ms``: int in ``[0, MAX_EVENT_TIME_MS]`` (year 9999), else ``bad_time``.
- ``served_prediction``: finite number in ``[0, 1]``, else ``bad_prediction`` (an int 0/1 is read as float).
- ``model_version`` / ``served_version``: int >= 0.  ``label``: int 0 or 1 (``bad_label``).
- ``features``: dict of str -> str | int | float (finite) | list[str].  ``extra``: dict of str -> str.
- ``weight``: finite float >= 0.  ``value`` (click): finite float or null.  ``is_correction``: bool.
- bools are never accepted where an int or float is expected (``true`` is not a label).
- Schema versions (forward compatibility): ``schema_version`` is the MAJOR version of the event contract
  (an int; absent means 1, the version before the field existed). Additive changes (a new optional field)
  do NOT bump it, and decoders ignore fields they do not know, so old consumers keep reading new producers.
  A change that alters the meaning of an existing field bumps the major; a consumer accepts only the majors
  in :data:`SUPPORTED_SCHEMA_VERSIONS` and rejects anything else (a higher, unknown major included) with
  ``unknown_schema_version`` rather than guessing what the fields mean.

Speed: the common case (a well-formed event) is checked by one straight-line expression per event type,
and objects are built through their slot descriptors (5x cheaper than a frozen dataclass ``__init__``).
Anything that fails the fast check goes through the precise, field-by-field path, which either
normalises it (ints where floats are expected, missing optional fields) or finds the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from reloop.engine.events.schema import (
    MAX_ARM_CHARS,
    MAX_EVENT_TIME_MS,
    SCHEMA_VERSION,
    Click,
    Impression,
    LabeledSample,
)

REASONS = frozenset(
    {
        "oversized",
        "malformed",
        "missing_field",
        "wrong_type",
        "bad_value",
        "bad_prediction",
        "bad_time",
        "bad_label",
        "bad_feature",
        "unknown_schema_version",
    }
)
SUPPORTED_SCHEMA_VERSIONS = frozenset({SCHEMA_VERSION})
DEFAULT_MAX_BYTES = 1 << 20
# MAX_EVENT_TIME_MS (schema.py), 9999-12-31: anything later is a unit mistake (micro/nanoseconds).


class EventError(Exception):
    """A bad event: ``reason`` is a short machine code from REASONS, ``detail`` says what and where."""

    def __init__(self, reason: str, detail: str, field: str | None = None) -> None:
        super().__init__(reason, detail, field)
        self.reason = reason
        self.detail = detail
        self.field = field

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def impression_from_obj(obj: object) -> Impression:
    """Check a parsed impression (any object) and build it; raises EventError."""
    return _impression(obj, False)


def click_from_obj(obj: object) -> Click:
    """Check a parsed click (any object) and build it; raises EventError."""
    return _click(obj)


def sample_from_obj(obj: object) -> LabeledSample:
    """Check a parsed labeled sample (any object) and build it; raises EventError."""
    return _sample(obj, False)


# --- building frozen slotted dataclasses without their __init__ --------------------------------------


def _setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of a frozen slotted dataclass, bypassing its __init__ and frozen __setattr__.

    Objects built this way must set every field, so the field list is pinned here: if schema.py gains
    a field, this fails at import instead of producing objects with an unset slot.
    """
    actual = tuple(f.name for f in fields(cls))
    if actual != names:
        raise RuntimeError(f"{cls.__name__} fields changed to {actual}; update engine/events/validation.py")
    return tuple(cls.__dict__[name].__set__ for name in names)


_IMPRESSION_FIELDS = (
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
)
_CLICK_FIELDS = ("impression_id", "event_time_ms", "value", "schema_version")
_SAMPLE_FIELDS = (
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
)


def _impression_builder() -> Callable[..., Impression]:
    # Written out per field: a loop over the setters costs as much again as the sets themselves.
    new = object.__new__
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _setters(Impression, _IMPRESSION_FIELDS)

    def build(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9):
        o = new(Impression)
        s0(o, a0)
        s1(o, a1)
        s2(o, a2)
        s3(o, a3)
        s4(o, a4)
        s5(o, a5)
        s6(o, a6)
        s7(o, a7)
        s8(o, a8)
        s9(o, a9)
        return o

    return build


def _click_builder() -> Callable[..., Click]:
    new = object.__new__
    s0, s1, s2, s3 = _setters(Click, _CLICK_FIELDS)

    def build(a0, a1, a2, a3):
        o = new(Click)
        s0(o, a0)
        s1(o, a1)
        s2(o, a2)
        s3(o, a3)
        return o

    return build


def _sample_builder() -> Callable[..., LabeledSample]:
    new = object.__new__
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = _setters(LabeledSample, _SAMPLE_FIELDS)

    def build(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9):
        o = new(LabeledSample)
        s0(o, a0)
        s1(o, a1)
        s2(o, a2)
        s3(o, a3)
        s4(o, a4)
        s5(o, a5)
        s6(o, a6)
        s7(o, a7)
        s8(o, a8)
        s9(o, a9)
        return o

    return build


_new_impression = _impression_builder()
_new_click = _click_builder()
_new_sample = _sample_builder()

_DEFAULT_ARM = next(f.default for f in fields(Impression) if f.name == "arm")
# An event without the field predates it: it is major 1 whatever the current major is.
_ABSENT_SCHEMA_VERSION = 1
_FEATURE_TYPES = frozenset({str, int, float, list})
_V = SCHEMA_VERSION
_T = MAX_EVENT_TIME_MS
# Ints travel as int64 (Arrow, numpy, the snapshot's versions): the parser gives ints of any size, and
# one beyond int64 crashed the join stage at every retry (a poison record), so it is a bad value.
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


# --- fast checks ------------------------------------------------------------------------------------


def _features_ok(feats: dict, json_safe: bool) -> bool:
    """True when ``feats`` is a valid feature dict (a False only sends the event to the precise path).

    ``json_safe``: the dict came from the codec's JSON parser, whose object keys are always str and
    which rejects NaN/Infinity, so the key and finiteness checks are skipped.
    """
    vals = feats.values()
    kinds = set(map(type, vals))
    if not kinds <= _FEATURE_TYPES:
        return False
    if not json_safe:
        # str.join raises TypeError on any non-str item: a C-speed "all keys are str".
        try:
            "".join(feats)
        except TypeError:
            return False
        if float in kinds and not all(map(math.isfinite, [v for v in vals if type(v) is float])):
            return False
    if int in kinds:
        ints = [v for v in vals if type(v) is int]
        if max(ints) > _I64_MAX or min(ints) < _I64_MIN:
            return False
    if list in kinds:
        try:
            for v in vals:
                if type(v) is list:
                    "".join(v)
        except TypeError:
            return False
    return True


# json_safe defaults to True so the codec's hot loop can call these with one argument (one call frame
# less per event); the public *_from_obj functions, which take any dict, pass False.
def _impression(obj: object, json_safe: bool = True) -> Impression:
    if type(obj) is dict:
        g = obj.get
        iid = g("impression_id")
        rid = g("request_id")
        uid = g("user_id")
        item = g("item_id")
        feats = g("features")
        t = g("event_time_ms")
        p = g("served_prediction")
        mv = g("model_version")
        arm = g("arm", _DEFAULT_ARM)
        sv = g("schema_version", _ABSENT_SCHEMA_VERSION)
        if (
            type(iid) is str
            and iid
            and type(rid) is str
            and rid
            and type(uid) is str
            and uid
            and type(item) is str
            and item
            and type(t) is int
            and 0 <= t <= _T
            and type(p) is float
            and 0.0 <= p <= 1.0
            and type(mv) is int
            and 0 <= mv <= _I64_MAX
            and type(arm) is str
            and 0 < len(arm) <= MAX_ARM_CHARS
            and type(sv) is int
            and sv == _V
            and type(feats) is dict
            and _features_ok(feats, json_safe)
        ):
            return _new_impression(iid, rid, uid, item, feats, t, p, mv, arm, sv)
    return _impression_precise(obj)


def _click(obj: object) -> Click:
    if type(obj) is dict:
        g = obj.get
        iid = g("impression_id")
        t = g("event_time_ms")
        value = g("value")
        sv = g("schema_version", _ABSENT_SCHEMA_VERSION)
        if (
            type(iid) is str
            and iid
            and type(t) is int
            and 0 <= t <= _T
            and (value is None or (type(value) is float and math.isfinite(value)))
            and type(sv) is int
            and sv == _V
        ):
            return _new_click(iid, t, value, sv)
    return _click_precise(obj)


def _sample(obj: object, json_safe: bool = True) -> LabeledSample:
    if type(obj) is dict:
        g = obj.get
        sid = g("sample_id")
        feats = g("features")
        y = g("label")
        p = g("served_prediction")
        ver = g("served_version")
        t = g("event_time_ms")
        arm = g("arm", _DEFAULT_ARM)
        w = g("weight", 1.0)
        corr = g("is_correction", False)
        extra = g("extra")
        sv = g("schema_version", _ABSENT_SCHEMA_VERSION)
        if (
            type(sid) is str
            and sid
            and type(y) is int
            and (y == 0 or y == 1)
            and type(p) is float
            and 0.0 <= p <= 1.0
            and type(ver) is int
            and 0 <= ver <= _I64_MAX
            and type(t) is int
            and 0 <= t <= _T
            and type(arm) is str
            and 0 < len(arm) <= MAX_ARM_CHARS
            and type(w) is float
            and 0.0 <= w < math.inf
            and type(corr) is bool
            and (extra is None or (type(extra) is dict and not extra))
            and type(sv) is int
            and sv == _V
            and type(feats) is dict
            and _features_ok(feats, json_safe)
        ):
            return _new_sample(sid, feats, y, p, ver, t, arm, w, corr, {})
    return _sample_precise(obj)


# --- the precise path: finds the first problem, or normalises an unusual but valid event --------------


def _mapping(obj: object, kind: str) -> dict:
    if type(obj) is not dict:
        raise EventError("malformed", f"{kind} must be a JSON object, got {_type_name(obj)}")
    return obj


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _wrong_type(name: str, expected: str, value: object) -> EventError:
    return EventError("wrong_type", f"{name} must be {expected}, got {_type_name(value)}", name)


def _required(obj: dict, name: str) -> Any:
    if name not in obj:
        raise EventError("missing_field", f"{name} is required", name)
    return obj[name]


def _schema_version(obj: dict) -> int:
    sv = obj.get("schema_version", _ABSENT_SCHEMA_VERSION)
    if type(sv) is not int:
        raise _wrong_type("schema_version", "an int", sv)
    if sv not in SUPPORTED_SCHEMA_VERSIONS:
        raise EventError(
            "unknown_schema_version",
            f"schema_version {sv} is not supported (supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)})",
            "schema_version",
        )
    return sv


def _id(obj: dict, name: str) -> str:
    value = _required(obj, name)
    if type(value) is not str:
        raise _wrong_type(name, "a string", value)
    if not value:
        raise EventError("bad_value", f"{name} must not be empty", name)
    return value


def _arm(obj: dict) -> str:
    arm = obj.get("arm", _DEFAULT_ARM)
    if type(arm) is not str:
        raise _wrong_type("arm", "a string", arm)
    if not arm:
        raise EventError("bad_value", "arm must not be empty", "arm")
    if len(arm) > MAX_ARM_CHARS:
        raise EventError("bad_value", f"arm is {len(arm)} characters, longer than {MAX_ARM_CHARS}", "arm")
    return arm


def _overflowed_int(value: object) -> bool:
    """A float orjson made of an int literal past 64 bits (it reads ints in [-2**63, 2**64) exactly and
    bigger ones as floats; the codec parses with msgspec, which keeps them ints, but ``*_from_obj``
    callers may hand in orjson's dicts): such a record holds an int out of range, not a float."""
    return type(value) is float and value.is_integer() and not _I64_MIN <= value < 2.0**64


def _time(obj: dict, name: str) -> int:
    value = _required(obj, name)
    if _overflowed_int(value):  # a time in picoseconds, say: out of range, not "got float"
        raise EventError("bad_time", f"{name} {value:.0f} is outside [0, {_T}] ms since epoch", name)
    if type(value) is not int:
        raise _wrong_type(name, "an int (ms since epoch)", value)
    if not 0 <= value <= _T:
        raise EventError("bad_time", f"{name} {value} is outside [0, {_T}] ms since epoch", name)
    return value


def _number(obj: dict, name: str, value: object) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        # An int can be too large for a float; that is a bad value, not a crash.
        try:
            return float(value)
        except OverflowError:
            raise EventError("bad_value", f"{name} is too large", name) from None
    raise _wrong_type(name, "a number", value)


def _prediction(obj: dict, name: str) -> float:
    p = _number(obj, name, _required(obj, name))
    if not 0.0 <= p <= 1.0:
        raise EventError("bad_prediction", f"{name} {p!r} is not a finite probability in [0, 1]", name)
    return p


def _version(obj: dict, name: str) -> int:
    value = _required(obj, name)
    if _overflowed_int(value):
        raise EventError("bad_value", f"{name} {value:.0f} must be in [0, 2**63 - 1]", name)
    if type(value) is not int:
        raise _wrong_type(name, "an int", value)
    if not 0 <= value <= _I64_MAX:
        raise EventError("bad_value", f"{name} {value} must be in [0, 2**63 - 1]", name)
    return value


def _features(obj: dict) -> dict:
    feats = _required(obj, "features")
    if type(feats) is not dict:
        raise _wrong_type("features", "an object", feats)
    for key, value in feats.items():
        if type(key) is not str:
            detail = f"features keys must be strings, got {_type_name(key)}"
            raise EventError("wrong_type", detail, "features")
        kind = type(value)
        if kind is str:
            continue
        name = f"features[{key!r}]"
        if kind is int:
            if not _I64_MIN <= value <= _I64_MAX:
                raise EventError("bad_value", f"{name} {value} is beyond the signed 64-bit range", "features")
            continue
        if kind is float:
            if not math.isfinite(value):
                raise EventError("bad_value", f"{name} must be finite, got {value!r}", "features")
        elif kind is list:
            for item in value:
                if type(item) is not str:
                    raise EventError(
                        "wrong_type", f"{name} lists must hold strings, got {_type_name(item)}", "features"
                    )
        else:
            detail = f"{name} must be a string, int, float or list of strings, got {_type_name(value)}"
            raise EventError("wrong_type", detail, "features")
    return feats


def _impression_precise(obj: object) -> Impression:
    obj = _mapping(obj, "impression")
    sv = _schema_version(obj)
    iid = _id(obj, "impression_id")
    rid = _id(obj, "request_id")
    uid = _id(obj, "user_id")
    item = _id(obj, "item_id")
    feats = _features(obj)
    t = _time(obj, "event_time_ms")
    p = _prediction(obj, "served_prediction")
    mv = _version(obj, "model_version")
    arm = _arm(obj)
    return _new_impression(iid, rid, uid, item, feats, t, p, mv, arm, sv)


def _click_precise(obj: object) -> Click:
    obj = _mapping(obj, "click")
    sv = _schema_version(obj)
    iid = _id(obj, "impression_id")
    t = _time(obj, "event_time_ms")
    value = obj.get("value")
    if value is not None:
        value = _number(obj, "value", value)
        if not math.isfinite(value):
            raise EventError("bad_value", f"value must be finite, got {value!r}", "value")
    return _new_click(iid, t, value, sv)


def _sample_precise(obj: object) -> LabeledSample:
    obj = _mapping(obj, "labeled sample")
    _schema_version(obj)
    sid = _id(obj, "sample_id")
    feats = _features(obj)
    y = _required(obj, "label")
    if type(y) is not int:
        raise _wrong_type("label", "an int", y)
    if y != 0 and y != 1:
        raise EventError("bad_label", f"label must be 0 or 1, got {y}", "label")
    p = _prediction(obj, "served_prediction")
    ver = _version(obj, "served_version")
    t = _time(obj, "event_time_ms")
    arm = _arm(obj)
    w = _number(obj, "weight", obj.get("weight", 1.0))
    if not 0.0 <= w < math.inf:
        raise EventError("bad_value", f"weight must be finite and >= 0, got {w!r}", "weight")
    corr = obj.get("is_correction", False)
    if type(corr) is not bool:
        raise _wrong_type("is_correction", "a bool", corr)
    extra = obj.get("extra")
    if extra is None:
        extra = {}
    elif type(extra) is not dict:
        raise _wrong_type("extra", "an object", extra)
    else:
        for key, value in extra.items():
            if type(key) is not str or type(value) is not str:
                raise EventError("wrong_type", "extra must map strings to strings", "extra")
    return _new_sample(sid, feats, y, p, ver, t, arm, w, corr, extra)
