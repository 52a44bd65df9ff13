"""Where events that fail decoding go: an envelope per bad record, forwarded to a Sink; counts per reason.

The envelope is one compact JSON object (so a Kafka `dead-letters` topic and a JSONL file both work):

    {"topic": "impressions", "partition": 0, "offset": 42, "timestamp_ms": 1700000000000,
     "key": null | {"encoding": "utf8" | "base64", "data": "..."},
     "value": {"encoding": "utf8" | "base64", "data": "..."},
     "reason": "bad_prediction", "detail": "served_prediction 1.5 is not ...", "field": "served_prediction",
     "dead_lettered_at_ms": 1700000000123}

The raw value is kept byte for byte (as text when it is valid UTF-8, else base64), so a fixed consumer
can replay it. The dead letter keeps the original key, so it lands on the matching dead-letter partition.

Bounded: an envelope must fit the dead-letter topic (Kafka refuses records over ~1 MiB, and JSON may
escape a value to six times its size). When the whole envelope would exceed ``max_envelope_bytes`` it
keeps only the first ``TRUNCATED_VALUE_BYTES`` of the value, adds ``"truncated": true``, the value's full
size (``value_bytes``) and its ``value_sha256``, so the record can still be identified and counted. A key
over ``MAX_KEY_BYTES`` is replaced by its sha256 as the dead letter's Kafka key, and in a truncated envelope
only: a whole envelope keeps the key byte for byte, so a redrive sends the record with its own key (the
impression id's bytes, which Kafka's partitioner routes to the partition of the impression's clicks).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import orjson
from reloop.engine.streams import Record, Sink

log = logging.getLogger(__name__)
E = TypeVar("E")

DEFAULT_MAX_ENVELOPE_BYTES = 256 * 1024
TRUNCATED_VALUE_BYTES = 4096
MAX_KEY_BYTES = 1024
MAX_DETAIL_CHARS = 2000


class SampleRecord(NamedTuple):
    """A sample to dead-letter, in the shape the envelope reads a record: it has no partition or offset of
    its own (it came out of a join, or out of a samples message holding many)."""

    topic: str
    partition: None
    offset: None
    key: bytes
    value: bytes
    timestamp_ms: int


class DeadLetterSink:
    """Counts bad records per reason and forwards their envelopes to ``sink`` (when given).

    ``send`` never raises because of the record or the error it is handed. A failure of the wrapped sink
    itself (the broker is down, a dead-letter file on a full disk) does propagate, and the record is not
    counted: swallowing it would lose the record, while raising stops the pipeline before its offsets
    are committed, so the record is read again after a restart.
    """

    def __init__(
        self,
        sink: Sink | None = None,
        *,
        clock: Callable[[], float] = time.time,
        max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
    ) -> None:
        if max_envelope_bytes < 4 * TRUNCATED_VALUE_BYTES:
            raise ValueError(f"max_envelope_bytes must be at least {4 * TRUNCATED_VALUE_BYTES}")
        self.sink = sink
        self.clock = clock
        self.max_envelope_bytes = max_envelope_bytes
        self.counts: dict[str, int] = {}
        self.truncated = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def send(self, record: Record, error: BaseException) -> None:
        """Dead-letter one record with the error that rejected it (normally an EventError)."""
        reason = _text(getattr(error, "reason", None)) or "unknown"
        truncated = False
        if self.sink is not None:
            envelope = self.envelope(record, error, reason)
            # Exact-size copy: orjson's own output buffer is over-allocated (see engine/events/codec.py).
            value = bytes(memoryview(orjson.dumps(envelope)))
            if len(value) > self.max_envelope_bytes:
                truncated = True
                value = bytes(memoryview(orjson.dumps(self.envelope(record, error, reason, truncate=True))))
            # Counted only once the sink took it: a sink that cannot write (a full disk) raises here.
            self.sink.send(value, key=_bounded_key(getattr(record, "key", None)))
        self.truncated += truncated
        count = self.counts.get(reason, 0) + 1
        self.counts[reason] = count
        if count == 1:
            # Once per reason: enough to notice a new kind of bad input without flooding the log. As text
            # a UTF-8 log handler can write: a lone surrogate from bad input would lose the line.
            log.warning("dead-lettering records with reason %r (first: %s)", reason, _text(error))

    def send_many(self, records: Sequence[Record], errors: Sequence[tuple[int, BaseException]]) -> None:
        """Dead-letter the failures of a batch decode: ``errors`` holds (index into ``records``, error)."""
        for index, error in errors:
            self.send(records[index], error)

    def decode_records(
        self,
        records: Sequence[Record],
        decode_many: Callable[[list[bytes]], tuple[list[E], Sequence[tuple[int, BaseException]]]],
    ) -> list[E]:
        """Decode a polled batch with e.g. ``reloop.engine.events.codec.decode_impressions``: the valid events
        come back in order, every bad record is dead-lettered here."""
        good, errors = decode_many([record.value for record in records])
        self.send_many(records, errors)
        return good

    def envelope(
        self, record: Record, error: BaseException, reason: str, *, truncate: bool = False
    ) -> dict[str, Any]:
        detail = getattr(error, "detail", None)
        detail_text = _text(detail) if detail is not None else _text(str(error))
        value = getattr(record, "value", None)
        out = {
            "topic": _text(getattr(record, "topic", None)),
            "partition": _int(getattr(record, "partition", None)),
            "offset": _int(getattr(record, "offset", None)),
            "timestamp_ms": _int(getattr(record, "timestamp_ms", None)),
            "key": _raw(_key(getattr(record, "key", None))),
            "value": _raw(value),
            "reason": reason,
            "detail": detail_text[:MAX_DETAIL_CHARS] if detail_text else detail_text,
            "field": _text(getattr(error, "field", None)),
            "dead_lettered_at_ms": int(self.clock() * 1000),
        }
        if truncate and isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            out["value"] = _raw(raw[:TRUNCATED_VALUE_BYTES])
            out["key"] = _raw(_bounded_key(getattr(record, "key", None)))
            out["truncated"] = True
            out["value_bytes"] = len(raw)
            out["value_sha256"] = hashlib.sha256(raw).hexdigest()
        elif truncate:
            out["value"] = {"encoding": "repr", "data": repr(value)[:TRUNCATED_VALUE_BYTES]}
            out["key"] = _raw(_bounded_key(getattr(record, "key", None)))
            out["truncated"] = True
        return out

    def flush(self, timeout_s: float | None = None) -> None:
        if self.sink is not None:
            self.sink.flush(timeout_s)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def _raw(data: object) -> dict[str, str] | None:
    """Lossless text form of a raw key or value."""
    if data is None:
        return None
    if not isinstance(data, bytes | bytearray | memoryview):
        # Not what a Source should deliver; keep its repr rather than fail on the record we must keep.
        return {"encoding": "repr", "data": repr(data)}
    raw = bytes(data)
    try:
        return {"encoding": "utf8", "data": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"encoding": "base64", "data": base64.b64encode(raw).decode("ascii")}


def decode_raw(field: dict[str, str] | None) -> bytes | None:
    """The original bytes of an envelope's ``key`` or ``value`` (the inverse of the envelope encoding)."""
    if field is None:
        return None
    if not isinstance(field, dict) or not isinstance(field.get("data"), str):
        raise ValueError("envelope field is not {'encoding': ..., 'data': '...'}")
    if field["encoding"] == "utf8":
        return field["data"].encode("utf-8")
    if field["encoding"] == "base64":
        return base64.b64decode(field["data"], validate=True)  # lenient decoding made b'' of '@@@@'
    raise ValueError(f"envelope field was not bytes originally (encoding {field.get('encoding')!r})")


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if type(value) is str else str(value)
    # orjson refuses lone surrogates; an error message quoting bad input may hold one.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _int(value: object) -> int | None:
    return value if type(value) is int and -(2**63) <= value < 2**64 else None


def _key(value: object) -> bytes | None:
    """The record's key as bytes (None when it has none, or one that is not bytes)."""
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else None


def _bounded_key(value: object) -> bytes | None:
    """The key to keep: itself when it is bytes of a sane size, its sha256 (hex) when longer."""
    if not isinstance(value, bytes | bytearray | memoryview):
        return None
    raw = bytes(value)
    return raw if len(raw) <= MAX_KEY_BYTES else hashlib.sha256(raw).hexdigest().encode()
