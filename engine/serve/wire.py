"""``POST /score`` bytes in, bytes out: parsing + validation in C (msgspec), the response by orjson.

Measured on the benchmark's 100-candidate bodies (7 KB, docs/bench-serve.md): pydantic-core's
``model_validate_json`` 136 us, ``orjson.loads`` (no validation at all) 23 us, msgspec decoding into
typed structs with every bound checked 21 us. msgspec is kept. The structs mirror
``reloop.engine.serve.schema.ScoreRequest`` (the pydantic model stays the documented OpenAPI schema; a test
checks that both accept and refuse the same bodies), and a refusal is a 422 in FastAPI's error shape:
``{"loc": ["body", "candidates", 3, "item_id"], "msg": ..., "type": ...}``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import msgspec
import orjson
from reloop.engine.events.schema import MAX_EVENT_TIME_MS
from reloop.engine.serve.schema import MAX_CANDIDATES

# Integers within int64, as the impression's event contract takes them: a larger one was scored and
# answered with a 200, then its impression could not be encoded for the log and its clicks went unjoined.
FeatureValue = str | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | float | list[str]
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class WireCandidate(msgspec.Struct, forbid_unknown_fields=True):
    item_id: _Id
    features: dict[str, FeatureValue] = {}


class WireRequest(msgspec.Struct, forbid_unknown_fields=True):
    request_id: _Id
    user_id: _Id
    candidates: Annotated[list[WireCandidate], msgspec.Meta(min_length=1, max_length=MAX_CANDIDATES)]
    context: dict[str, FeatureValue] = {}
    top_k: Annotated[int, msgspec.Meta(ge=1, le=MAX_CANDIDATES)] | None = None
    event_time_ms: Annotated[int, msgspec.Meta(ge=0, le=MAX_EVENT_TIME_MS)] | None = None


_DECODER = msgspec.json.Decoder(WireRequest)
_PATH = re.compile(r"\s+- at `\$(.*)`$")
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[(\"(?:[^\"\\]|\\.)*\")\]|(\[\.\.\.\])")


class WireError(ValueError):
    """A body refused before scoring: ``errors`` in FastAPI's 422 shape."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


def _loc(path: str, body: bytes) -> list[str | int]:
    """FastAPI's ``loc`` from msgspec's path. msgspec writes a dict key as ``[...]``: the key is found
    again in the body (the first value there the wire types refuse), else the path stops at the dict."""
    out: list[str | int] = ["body"]
    node: Any = _parsed(body)
    for m in _STEP.finditer(path):
        name, index, key, unnamed = m.groups()
        if unnamed is not None:
            bad = (
                next((k for k, v in node.items() if not _is_feature_value(v)), None)
                if isinstance(node, dict)
                else None
            )
            if bad is None:
                return out
            step: str | int = bad
        elif name is not None:
            step = name
        elif index is not None:
            step = int(index)
        else:
            step = orjson.loads(key)
        out.append(step)
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            node = None
    return out


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)  # the error path only; json, unlike orjson, reads integers of any size
    except (ValueError, RecursionError):  # deep nesting msgspec refused at once: a 500 from here
        return None


def _is_feature_value(value: Any) -> bool:
    try:
        msgspec.convert(value, FeatureValue, strict=True)
    except msgspec.ValidationError:
        return False
    return True


def _error(exc: msgspec.ValidationError | msgspec.DecodeError, body: bytes) -> dict[str, Any]:
    text = str(exc)
    m = _PATH.search(text)
    msg = text[: m.start()] if m else text
    if isinstance(exc, msgspec.ValidationError):
        loc = _loc(m.group(1), body) if m else ["body"]
        # msgspec names a missing or unknown field in the message, not the path: put it in loc too.
        named = re.search(r"(?:missing required|unknown) field `([^`]+)`", msg)
        if named:
            loc.append(named.group(1))
        return {"loc": loc, "msg": msg, "type": "value_error"}
    return {"loc": ["body"], "msg": f"invalid JSON: {msg}", "type": "json_invalid"}


def decode_request(body: bytes) -> WireRequest:
    """The validated request, or ``WireError`` (422) naming where and what is wrong."""
    try:
        request = _DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise WireError([_error(exc, body)]) from None
    ids = [c.item_id for c in request.candidates]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupes = sorted({i for i in ids if i in seen or seen.add(i)})
        raise WireError(
            [
                {
                    "loc": ["body", "candidates"],
                    "msg": f"candidates: duplicate item_id {dupes[:5]}",
                    "type": "value_error",
                }
            ]
        )
    return request


def error_body(errors: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"detail": errors})
