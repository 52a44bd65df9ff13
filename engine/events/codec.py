"""THE wire format of events: one compact JSON object per Kafka record, written with orjson.

orjson won against msgpack on our own events, for encoding and for decode+validate alike
(bench/codec.py, docs/bench-codec.md), and JSON stays readable in `kafka-console-consumer`.

Batches of impressions and clicks (the join's door) are decoded by msgspec straight into the event
dataclasses, with the contract's bounds (engine/events/schema.py) checked in the same C pass: 1.4x
the speed of orjson plus the hand-written checks on Criteo-shaped impressions (docs/bench-codec.md).
A record msgspec refuses takes the careful path (parsed by msgspec into plain objects, then the
hand-written checks), which names the reason or accepts an unusual but valid event (an older schema
version, say), so both paths give the same verdicts (tested). Ints are read exactly on every path: an
int feature value beyond int64 (``2**64``, ``-2**63 - 1``) is a ``bad_value`` at the door, never a
float (orjson's reading of such a literal; the serving wire refuses it too).

Wire shape: the dataclass fields by name (``dataclasses`` order), no whitespace, ``schema_version``
always written. Readers ignore fields they do not know (see engine/events/validation.py for the
versioning rule). Times are int ms since epoch, floats are written in their shortest exact form, so
``decode(encode(e)) == e`` for every valid event.

>>> from reloop.engine.events.schema import Click
>>> data = encode(Click(impression_id="i1", event_time_ms=1_700_000_000_000))
>>> data
b'{"impression_id":"i1","event_time_ms":1700000000000,"value":null,"schema_version":1}'
>>> decode_click(data) == Click(impression_id="i1", event_time_ms=1_700_000_000_000)
True
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import msgspec
import orjson
from reloop.engine.events.schema import SCHEMA_VERSION, Click, Impression, LabeledSample
from reloop.engine.events.validation import (
    DEFAULT_MAX_BYTES,
    EventError,
    _click,
    _impression,
    _sample,
)

CONTENT_TYPE = "application/json"
EventKind = Literal["impression", "click", "sample"]
Event = Impression | Click | LabeledSample
E = TypeVar("E")

_dumps = orjson.dumps
# Records are parsed by msgspec, not orjson: orjson reads an int literal past 64 bits (2**64, -2**63 - 1)
# as a float, so a feature value the contract refuses (an int beyond int64) came through as a float
# here while the typed fast path, the serving wire and every later reader of the same bytes (msgspec)
# saw the int: one value, two featurisations. msgspec keeps every int exact, so the contract's range
# check refuses it with its reason; it parses as fast (bench/codec.py's shapes), keys are always str
# and NaN/Infinity refused, as with orjson. ValidationError (a float literal past the double range) is
# a DecodeError; RecursionError is its answer to deep nesting.
_loads = msgspec.json.decode
_JSONDecodeError = (msgspec.DecodeError, RecursionError)
# Anything msgspec raises sends the record to the careful path, RecursionError included (msgspec
# raises it on deeply nested JSON; the careful path reports a malformed record).
MSGSPEC_REFUSED = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)
_decode_impression_fast = msgspec.json.Decoder(Impression).decode
# msgspec refuses these characters in a renamed struct field's name (``msgspec.defstruct(rename=...)``).
_NOT_A_FIELD_NAME = re.compile(r'[\\"\x00-\x1f]')
_decode_click_fast = msgspec.json.Decoder(Click).decode


def encode(event: Event, *, check: bool = False) -> bytes:
    """The wire bytes of ``event``.

    Producers build events from their own typed values, so by default nothing is re-checked (the
    scoring service logs a hundred candidates per request). ``check=True`` decodes the result with the
    consumer's rules and raises the EventError a consumer would: use it in tests and at trust boundaries.
    A value JSON cannot hold (a non-str feature key, an int over 64 bits) raises EventError("wrong_type").
    """
    kind = type(event)
    if kind is not Impression and kind is not Click and kind is not LabeledSample:
        raise TypeError(f"encode() takes an Impression, Click or LabeledSample, not {kind.__name__}")
    try:
        # orjson writes (slotted) dataclasses natively, field by field, in C.
        data = _dumps(_sample_wire(event) if kind is LabeledSample else event)
    except orjson.JSONEncodeError as exc:
        raise EventError("wrong_type", f"{kind.__name__} cannot be encoded as JSON: {exc}") from None
    # orjson >= 3.12 hands back its whole over-allocated buffer (~8 KiB for an 850 B event); an
    # exact-size copy costs ~0.2 us and keeps a batch of encoded events 10x smaller (and faster, since
    # every oversized buffer is fresh memory to fault in). See docs/bench-codec.md.
    data = bytes(memoryview(data))
    if check:
        _DECODERS[_KIND_OF[kind]](data)
    return data


def _sample_wire(s: LabeledSample) -> dict[str, Any]:
    # LabeledSample has no schema_version field; the wire carries one so readers can apply the rule.
    return {
        "sample_id": s.sample_id,
        "features": s.features,
        "label": s.label,
        "served_prediction": s.served_prediction,
        "served_version": s.served_version,
        "event_time_ms": s.event_time_ms,
        "arm": s.arm,
        "weight": s.weight,
        "is_correction": s.is_correction,
        "extra": s.extra,
        "schema_version": SCHEMA_VERSION,
    }


def _parse(data: object, max_bytes: int) -> object:
    """Size check before parsing, then the parser (msgspec); every failure is an EventError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EventError("malformed", f"record value must be bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes if type(data) is memoryview else len(data)
    if size > max_bytes:
        raise EventError("oversized", f"record of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        return _loads(data)
    except _JSONDecodeError as exc:
        raise EventError("malformed", f"not valid JSON: {exc}") from None


def decode_impression(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Impression:
    """One impression from its wire bytes; raises EventError."""
    return _impression(_parse(data, max_bytes), True)


def decode_click(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Click:
    """One click from its wire bytes; raises EventError."""
    return _click(_parse(data, max_bytes))


def decode_sample(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> LabeledSample:
    """One labeled sample from its wire bytes; raises EventError."""
    return _sample(_parse(data, max_bytes), True)


_DECODERS: dict[str, Callable[..., Event]] = {
    "impression": decode_impression,
    "click": decode_click,
    "sample": decode_sample,
}
_KIND_OF: dict[type, EventKind] = {Impression: "impression", Click: "click", LabeledSample: "sample"}


def decode_event(kind: EventKind, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Event:
    """Decode by topic kind ("impression", "click" or "sample"); raises EventError on bad data.

    An unknown ``kind`` is a programming error and raises ValueError.
    """
    try:
        decoder = _DECODERS[kind]
    except KeyError:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {sorted(_DECODERS)}") from None
    return decoder(data, max_bytes=max_bytes)


def _decode_many(
    values: Sequence[bytes], convert: Callable[[object], E], one: Callable[..., E], max_bytes: int
) -> tuple[list[E], list[tuple[int, EventError]]]:
    good: list[E] = []
    bad: list[tuple[int, EventError]] = []
    append = good.append
    loads = _loads
    # The hot loop: a plain bytes value under the limit goes straight to the parser and the fast check;
    # anything else takes the careful single-record path, which raises the right EventError.
    for i, data in enumerate(values):
        try:
            if type(data) is bytes and len(data) <= max_bytes:
                append(convert(loads(data)))
            else:
                append(one(data, max_bytes=max_bytes))
        except EventError as exc:
            bad.append((i, exc))
        except _JSONDecodeError as exc:
            bad.append((i, EventError("malformed", f"not valid JSON: {exc}")))
    return good, bad


def _decode_many_typed(
    values: Sequence[bytes], fast: Callable[[bytes], E], one: Callable[..., E], max_bytes: int
) -> tuple[list[E], list[tuple[int, EventError]]]:
    """``_decode_many`` with msgspec's typed decoder as the fast path (same contract)."""
    good: list[E] = []
    bad: list[tuple[int, EventError]] = []
    append = good.append
    refused = MSGSPEC_REFUSED
    for i, data in enumerate(values):
        if type(data) is bytes and len(data) <= max_bytes:
            try:
                append(fast(data))
                continue
            except refused:
                pass  # the careful path below names the reason, or accepts a valid unusual event
        try:
            append(one(data, max_bytes=max_bytes))
        except EventError as exc:
            bad.append((i, exc))
    return good, bad


def field_name_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """The ``keys`` that ``keyed_struct`` can take (msgspec refuses a field renamed to a key with a
    quote, a backslash or a control character). Such a key is valid JSON all the same: records holding
    one take the struct decoders' dict path."""
    return tuple(k for k in keys if not _NOT_A_FIELD_NAME.search(k))


def keyed_struct(name: str, keys: Sequence[str], types: Sequence[Any]) -> tuple[type, list[str]]:
    """A msgspec struct decoding a JSON object with one field per key (of the given type; None when
    the object lacks the key) and refusing any other key, and its field names in ``keys``' order
    (``f0``, ``f1``, ...: the keys need not be identifiers; ``field_name_keys`` says which can be
    keys). The struct-per-key-set decoders (engine/events/sample_batch.py,
    engine/features/checked_decode.py) decode features into one: no dict per record."""
    names = [f"f{i}" for i in range(len(keys))]
    struct = msgspec.defstruct(
        name, [(n, t, None) for n, t in zip(names, types, strict=True)],
        rename=dict(zip(names, keys, strict=True)), forbid_unknown_fields=True, gc=False,
    )  # fmt: skip
    return struct, names


def decode_impressions(
    values: Sequence[bytes], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[list[Impression], list[tuple[int, EventError]]]:
    """Decode a batch: the valid impressions in input order, and (index into ``values``, error) for the rest.

    Never raises on bad data: every record ends up in exactly one of the two lists.
    """
    return _decode_many_typed(values, _decode_impression_fast, decode_impression, max_bytes)


def decode_clicks(
    values: Sequence[bytes], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[list[Click], list[tuple[int, EventError]]]:
    """Batch form of decode_click; see decode_impressions."""
    return _decode_many_typed(values, _decode_click_fast, decode_click, max_bytes)


def decode_samples(
    values: Sequence[bytes], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[list[LabeledSample], list[tuple[int, EventError]]]:
    """Batch form of decode_sample; see decode_impressions."""
    return _decode_many(values, _sample, decode_sample, max_bytes)
