"""The samples topic's format: joined samples as columns, one Arrow IPC stream per Kafka message.

Why columns: the train stage decodes one message per batch of samples (zero copy into numpy) instead
of building one Python object per sample, and the RAW feature values travel as they were served, so any
backbone or feature spec can train from the topic (a new architecture, a backtest at training speed).

A message is an Arrow IPC *stream* (schema, one record batch, end marker). Columns, in this order:

=====================  ==============  =====================================================
``sample_id``          utf8            the impression id
``label``              int8            0 / 1
``served_prediction``  float64         what the served model predicted (y_last when logged)
``served_version``     int64           the model version that served it
``event_time_ms``      int64           the impression's event time
``arm``                utf8
``is_correction``      bool            a late click re-emitted as a positive
``weight``             float32         per-sample loss weight
``seq``                int64           position in its join task's output (dedup, see below)
``f:<name>``           see below       one column per raw feature key present in the batch
=====================  ==============  =====================================================

A feature column keeps the JSON type of its values: utf8, int64, float64 or list<utf8>; null where a
sample lacks the key. A key whose values mix types in one batch (``1`` here, ``"a"`` there) is a utf8
column holding each value's JSON text, marked ``reloop.encoding: json`` in the field metadata. Readers
find feature columns by name: their order in a message is not part of the format.

Schema metadata: ``reloop.samples.format`` (this module's ``FORMAT``, a major version: a reader refuses
another one), ``reloop.task`` (the join task = samples partition) and ``reloop.first_seq``, both decimal
ints in [0, 2**63 - 1], and, optional, ``reloop.incarnation``: which numbering of the task the seqs belong
to, 1 to 64 ASCII letters, digits, ``-`` or ``_`` (a join task writes 32 hex digits). Without it (a join
stage from before incarnations, or a task resumed from a checkpoint written by one) the batch belongs to
the task's numbering without a name, ``""``. Column names are unique.

Identity: ``(task, incarnation, seq)`` names a sample for ever: a join task numbers what it emits 0, 1,
2, ... and, resumed from its checkpoint after a crash, emits exactly the same samples with the same
numbers (see engine/runtime/join_stage.py), so the train stage drops every sample whose seq it has trained
already. A task started without a checkpoint (its folder lost) starts a new numbering at 0 under a new
incarnation, which the train stage trains as new samples instead of dropping them as copies.

>>> from reloop.engine.events.schema import LabeledSample
>>> s = LabeledSample("i1", {"user": "u", "price": 2.5, "tags": ["a"]}, 1, 0.2, 3, 1000)
>>> batch = decode_batch(encode_batch(batch_from_samples([s], task=4, first_seq=10)))
>>> batch.task, batch.seqs().tolist(), batch.to_samples() == [s], batch.incarnation
(4, [10], True, '')
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from msgspec.structs import astuple
from reloop.engine.events.codec import field_name_keys, keyed_struct
from reloop.engine.events.schema import MAX_EVENT_TIME_MS, LabeledSample
from reloop.engine.events.validation import EventError

FORMAT = 1
FEATURE_PREFIX = "f:"
_META_FORMAT = b"reloop.samples.format"
_META_TASK = b"reloop.task"
_META_FIRST = b"reloop.first_seq"
_META_INCARNATION = b"reloop.incarnation"
_JSON_FIELD = {b"reloop.encoding": b"json"}

_FIXED = pa.schema(
    [
        ("sample_id", pa.string()),
        ("label", pa.int8()),
        ("served_prediction", pa.float64()),
        ("served_version", pa.int64()),
        ("event_time_ms", pa.int64()),
        ("arm", pa.string()),
        ("is_correction", pa.bool_()),
        ("weight", pa.float32()),
        ("seq", pa.int64()),
    ]
)
FIXED_COLUMNS = tuple(_FIXED.names)


@dataclass(frozen=True)
class SampleBatch:
    """One decoded message: ``data`` holds the columns above; ``task``, ``first_seq`` and ``incarnation``
    its identity."""

    data: pa.RecordBatch
    task: int
    first_seq: int
    incarnation: str = ""

    def __len__(self) -> int:
        return self.data.num_rows

    def numpy(self, name: str) -> np.ndarray:
        return self.data.column(name).to_numpy(zero_copy_only=False)

    def seqs(self) -> np.ndarray:
        return self.numpy("seq")

    def sample_ids(self) -> list[str]:
        return self.data.column("sample_id").to_pylist()

    def features(self) -> dict[str, pa.Array | list[Any]]:
        """Raw feature columns by name (Arrow arrays; JSON-encoded ones decoded to Python lists)."""
        out: dict[str, pa.Array | list[Any]] = {}
        schema = self.data.schema
        for i, name in enumerate(schema.names):
            if not name.startswith(FEATURE_PREFIX):
                continue
            column = self.data.column(i)
            if (schema.field(i).metadata or {}).get(b"reloop.encoding") == b"json":
                out[name[len(FEATURE_PREFIX) :]] = [
                    None if v is None else json.loads(v) for v in column.to_pylist()
                ]
            else:
                out[name[len(FEATURE_PREFIX) :]] = column
        return out

    def take(self, index: np.ndarray | slice) -> SampleBatch:
        """The rows at ``index`` (a new batch; its identity is that of the rows kept). A slice (step 1)
        is a zero-copy view, as for ``FeatureBatch.take``."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("a slice of a sample batch takes consecutive rows (step 1)")
            data = self.data.slice(start, max(0, stop - start))
        else:
            data = self.data.take(pa.array(index, type=pa.int64()))
        first = int(data.column("seq")[0].as_py()) if data.num_rows else self.first_seq
        meta = {**(data.schema.metadata or {}), **_metadata(self.task, first, self.incarnation)}
        return SampleBatch(data.replace_schema_metadata(meta), self.task, first, self.incarnation)

    def to_samples(self) -> list[LabeledSample]:
        """Python objects (slow: tests, ledgers, the dict-based paths)."""
        cols = {name: self.data.column(name).to_pylist() for name in FIXED_COLUMNS}
        feats = {
            name: (col.to_pylist() if isinstance(col, pa.Array) else col)
            for name, col in self.features().items()
        }
        out = []
        for i in range(len(self)):
            features = {k: v[i] for k, v in feats.items() if v[i] is not None}
            out.append(
                LabeledSample(
                    sample_id=cols["sample_id"][i],
                    features=features,
                    label=int(cols["label"][i]),
                    served_prediction=float(cols["served_prediction"][i]),
                    served_version=int(cols["served_version"][i]),
                    event_time_ms=int(cols["event_time_ms"][i]),
                    arm=cols["arm"][i],
                    weight=float(cols["weight"][i]),
                    is_correction=bool(cols["is_correction"][i]),
                )
            )
        return out


def batch_from_samples(
    samples: Sequence[LabeledSample], *, task: int, first_seq: int, incarnation: str = ""
) -> SampleBatch:
    """Columns from LabeledSample objects (seq = first_seq, first_seq + 1, ...)."""
    n = len(samples)
    fixed = [
        pa.array([s.sample_id for s in samples], pa.string()),
        pa.array([s.label for s in samples], pa.int8()),
        pa.array([s.served_prediction for s in samples], pa.float64()),
        pa.array([s.served_version for s in samples], pa.int64()),
        pa.array([s.event_time_ms for s in samples], pa.int64()),
        pa.array([s.arm for s in samples], pa.string()),
        pa.array([s.is_correction for s in samples], pa.bool_()),
        pa.array([s.weight for s in samples], pa.float32()),
        pa.array(np.arange(first_seq, first_seq + n, dtype=np.int64)),
    ]
    return _assemble(fixed, feature_columns([s.features for s in samples]), task, first_seq, incarnation)


def batch_from_joined(
    joined: Sequence[Any], *, task: int, first_seq: int, incarnation: str = ""
) -> SampleBatch:
    """Columns from the joiner's output (``reloop.engine.join.joiner.Joined``: impression id, event time, the
    impression's raw bytes as they were validated on the way in, label, correction flag)."""
    # One transposition each (C level) instead of a list comprehension per column.
    ids, times, payloads, labels, corrections = _transposed(joined, 5)
    objs, columns = _keyed_payloads.decode(payloads)
    n = len(objs)
    _, served, versions, arms = _transposed(map(astuple, objs), len(_PAYLOAD_FIELDS))
    fixed = [
        pa.array(ids, pa.string()),
        pa.array(labels, pa.int8()),
        pa.array(served, pa.float64()),
        pa.array(versions, pa.int64()),
        pa.array(times, pa.int64()),
        pa.array(arms, pa.string()),
        pa.array(corrections, pa.bool_()),
        pa.array(np.ones(n, dtype=np.float32)),
        pa.array(np.arange(first_seq, first_seq + n, dtype=np.int64)),
    ]
    if columns is None:
        return _assemble(fixed, feature_columns([o.features for o in objs]), task, first_seq, incarnation)
    strings = _keyed_payloads.string_keys
    built = [(key, *_column(FEATURE_PREFIX + key, values, key in strings)) for key, values in columns]
    # A column of nulls is a key absent from the batch: left out (module doc).
    built = [column for column in built if column[2].null_count != n]
    _keyed_payloads.string_keys = {
        key for key, field, _ in built if field.type == _STRING and not field.metadata
    }
    return _assemble(fixed, built, task, first_seq, incarnation)


class _Payload(msgspec.Struct):
    """What a sample needs of its impression's bytes (validated at the door: no checks here). msgspec
    skips the other fields without building them: 15% faster than ``orjson.loads`` of the whole
    record (Criteo-shaped impressions)."""

    features: dict[str, Any]
    served_prediction: float
    model_version: int
    arm: str = "default"


_decode_payload = msgspec.json.Decoder(_Payload).decode
_PAYLOAD_FIELDS = msgspec.structs.fields(_Payload)


def _transposed(rows: Iterable[tuple[Any, ...]], width: int) -> list[tuple[Any, ...]]:
    """The columns of ``rows`` (tuples of ``width`` values): ``width`` empty ones when there are none."""
    return list(zip(*rows, strict=True)) or [()] * width


class _KeyedPayloads:
    """Decodes a batch of payloads with their features as columns, through a struct with one field per
    feature key the stream has shown (learnt from the batches that took the dict path), so no dict is
    built per payload and the columns come from one C-level call per row: 0.7-0.8x the time of dicts,
    Criteo-shaped (docs/data-plane.md). Payloads passed the door, where a null feature value is refused,
    so a null in a column means the key was absent and a column of nulls is a key absent from the batch
    (left out, as the format says). A payload with a key not learnt yet sends its batch down the dict
    path, which learns it; streams with more than ``max_keys`` keys stay on the dict path."""

    def __init__(self, max_keys: int = 512) -> None:
        self.max_keys = max_keys
        self.keys: tuple[str, ...] = ()
        # The keys whose last column was utf8: their next column is built as utf8 without Arrow's type
        # inference pass (a value that is not a str makes that fail, and the column takes the rule).
        self.string_keys: set[str] = set()
        # The struct's decoder; None until keys are learnt.
        self._keyed: Callable[[bytes], Any] | None = None

    def decode(self, payloads: Sequence[bytes]) -> tuple[list[Any], list[tuple[str, Sequence[Any]]] | None]:
        """(objects, ``(key, values)`` columns of every learnt key, None where a payload lacks it) on the
        struct path; (objects with feature dicts, None) on the dict path."""
        if self._keyed is not None and payloads:
            decode = self._keyed
            try:
                objs = [decode(p) for p in payloads]
            except msgspec.ValidationError:  # a key not learnt yet
                pass
            else:
                # A struct's values in field order (the keys'): half the time of a getter by names.
                rows = map(astuple, [o.features for o in objs])
                return objs, list(zip(self.keys, zip(*rows, strict=True), strict=True))
        objs = list(map(_decode_payload, payloads))
        keys = dict.fromkeys(self.keys)
        for o in objs:
            keys.update(dict.fromkeys(o.features))
        learnable = field_name_keys(list(keys))
        if len(learnable) > len(self.keys) and 2 <= len(learnable) <= self.max_keys:
            self._learn(learnable)
        return objs, None

    def _learn(self, keys: tuple[str, ...]) -> None:
        features, _ = keyed_struct("Features", keys, [Any] * len(keys))
        fields = [(f.name, features if f.name == "features" else f.type, f.default) for f in _PAYLOAD_FIELDS]
        payload = msgspec.defstruct("KeyedPayload", fields, gc=False)  # _Payload with the struct for features
        self.keys, self._keyed = keys, msgspec.json.Decoder(payload).decode


_keyed_payloads = _KeyedPayloads()


def _assemble(
    fixed: list[pa.Array],
    features: list[tuple[str, pa.Field, pa.Array]],
    task: int,
    first_seq: int,
    incarnation: str,
) -> SampleBatch:
    fields = list(_FIXED)
    arrays = list(fixed)
    for _, field, column in features:
        fields.append(field)
        arrays.append(column)
    schema = pa.schema(fields, metadata=_metadata(task, first_seq, incarnation))
    return SampleBatch(pa.RecordBatch.from_arrays(arrays, schema=schema), task, first_seq, incarnation)


def feature_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, pa.Field, pa.Array]]:
    """One Arrow column per feature key (in first-seen order), typed by its values (module doc)."""
    if not rows:
        return []
    columns = _same_keys_columns(rows)
    if columns is not None:
        keys: dict[str, None] | list[str] = list(rows[0])
    else:
        keys = {}
        for row in rows:
            keys.update(dict.fromkeys(row))
        # One transposition at C level (map over each row's get) instead of a Python loop per key.
        columns = zip(*[list(map(row.get, keys)) for row in rows], strict=True)
    return [(key, *_column(FEATURE_PREFIX + key, values)) for key, values in zip(keys, columns, strict=True)]


_STRING, _INT64, _NULL, _STRING_LIST = pa.string(), pa.int64(), pa.null(), pa.list_(pa.string())


def _column(name: str, values: Sequence[Any], strings: bool = False) -> tuple[pa.Field, pa.Array]:
    """One feature column by the module doc's rule. Arrow's own inference (one C pass) decides the
    usual columns: it yields utf8, int64, null or list<utf8> exactly when every value is a str, an int
    (not a bool: Arrow refuses bools among ints), None, or a list of str, which is when the rule gives
    that type too. Anything else (floats, which may be ints mixed in, bools, objects, mixes) takes the
    rule itself. ``strings``: first try the column as utf8 without inference (Arrow refuses any value
    but a str, bytes or None there, and JSON gives no bytes), 0.7x the time of inferring it."""
    if strings:
        try:
            column = pa.array(values, _STRING)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
        else:
            if column.null_count != len(values):  # all nulls: the rule's own path below
                return pa.field(name, _STRING), column
    try:
        inferred = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        inferred = None
    if inferred is not None:
        kind = inferred.type
        if kind in (_STRING, _INT64, _STRING_LIST):
            return pa.field(name, kind), inferred
        if kind == _NULL:
            return pa.field(name, _STRING), pa.nulls(len(values), _STRING)
    kinds = set(map(type, values))
    kinds.discard(type(None))
    field: pa.Field | None = None
    if kinds <= {str}:
        field = pa.field(name, _STRING)
    elif kinds == {int}:
        field = pa.field(name, _INT64)
    elif kinds == {float}:
        field = pa.field(name, pa.float64())
    elif kinds == {list}:
        field = pa.field(name, _STRING_LIST)
    if field is not None:
        try:
            return field, pa.array(values, field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass  # e.g. an int over 64 bits: keep it exact as JSON text
    text = [None if v is None else json.dumps(v) for v in values]
    return pa.field(name, _STRING, metadata=_JSON_FIELD), pa.array(text, _STRING)


def _same_keys_columns(rows: Sequence[dict[str, Any]]) -> Any:
    """The columns when every row has the first row's keys and no other (the usual case: one C call per
    row); None otherwise."""
    keys = tuple(rows[0])
    if len(keys) < 2 or set(map(len, rows)) != {len(keys)}:
        return None
    try:
        # list() first: a KeyError raised inside a star-unpacked map leaks memory (CPython 3.11).
        return zip(*list(map(itemgetter(*keys), rows)), strict=True)
    except KeyError:
        return None


def encode_batch(batch: SampleBatch) -> bytes:
    """The message bytes: an Arrow IPC stream holding the one record batch."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.data.schema) as writer:
        writer.write_batch(batch.data)
    return sink.getvalue().to_pybytes()


def decode_batch(data: bytes) -> SampleBatch:
    """One message back; a message that is not a readable batch of this format raises EventError
    (the train stage dead-letters it and goes on)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EventError(
            "malformed", f"a samples message is bytes, this one {type(data).__name__} (a tombstone?)"
        )
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = list(reader)
        for batch in batches:
            # Arrow reads offsets and lengths as they come: a corrupt message would make the reads
            # that follow leave its buffers (a crash of the process, again at every restart).
            batch.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise EventError("malformed", f"not an Arrow IPC stream: {exc}") from None
    if len(batches) != 1:
        raise EventError("malformed", f"a samples message holds one record batch, this one {len(batches)}")
    rb = batches[0]
    meta = rb.schema.metadata or {}
    fmt = meta.get(_META_FORMAT)
    if fmt != str(FORMAT).encode():
        raise EventError("unknown_schema_version", _format_problem(fmt))
    task, first_seq = _identity(meta.get(_META_TASK), meta.get(_META_FIRST))
    incarnation = _incarnation(meta.get(_META_INCARNATION))
    try:
        names = rb.schema.names
    except UnicodeDecodeError:
        raise EventError("malformed", "samples message with a column name that is not UTF-8") from None
    if tuple(names[: len(FIXED_COLUMNS)]) != FIXED_COLUMNS:
        raise EventError(
            "missing_field", f"samples message columns {names[:9]} are not {list(FIXED_COLUMNS)}"
        )
    if len(set(names)) != len(names):  # a column found by name must be the only one with that name
        twice = sorted({name for name in names if names.count(name) > 1})
        raise EventError("malformed", f"samples message has more than one column named {twice}")
    for field in _FIXED:
        if rb.schema.field(field.name).type != field.type:
            raise EventError(
                "wrong_type", f"column {field.name} is {rb.schema.field(field.name).type}, not {field.type}"
            )
    for name in FIXED_COLUMNS:
        if rb.column(name).null_count:
            raise EventError("bad_value", f"column {name} holds nulls")
    _check_json_columns(rb)
    n = rb.num_rows
    labels = rb.column("label").to_numpy()
    if n and not np.isin(labels, (0, 1)).all():
        raise EventError("bad_label", "labels must be 0 or 1")
    p = rb.column("served_prediction").to_numpy()
    if n and not ((p >= 0.0) & (p <= 1.0)).all():  # NaN fails both
        raise EventError("bad_prediction", "served_prediction must be a probability in [0, 1]")
    w = rb.column("weight").to_numpy()
    if n and not (np.isfinite(w) & (w >= 0)).all():
        raise EventError("bad_value", "weight must be finite and >= 0")
    _check_contract_columns(rb)
    if first_seq > _INT64_MAX - n or not np.array_equal(
        rb.column("seq").to_numpy(), np.arange(first_seq, first_seq + n, dtype=np.int64)
    ):
        raise EventError("bad_value", f"seq must run from reloop.first_seq={first_seq} without gaps")
    return SampleBatch(rb, task, first_seq, incarnation)


def _format_problem(fmt: bytes | None) -> str:
    """The dead letter's detail for a message of another samples format."""
    if fmt is None:
        return "no reloop.samples.format in its schema metadata: not a reloop samples message"
    text = fmt.decode("utf-8", "backslashreplace")
    if text.isascii() and text.isdigit() and len(text) < 19 and int(text) > FORMAT:
        return (
            f"samples format {text} is not supported (supported: {FORMAT}): written by a newer reloop join "
            "stage; upgrade the train stage, then redrive these dead letters"
        )
    return f"samples format {text!r} is not supported (supported: {FORMAT})"


_FEATURE_TYPES = (pa.string(), pa.int64(), pa.float64(), pa.list_(pa.string()))


def _check_contract_columns(rb: pa.RecordBatch) -> None:
    """The event contract's bounds on the columns the other checks leave open: times in [0, year 9999],
    versions >= 0, non-empty ids and arms, feature columns of the format's four types with finite
    floats. A message breaking them came from no join stage (the door refuses such impressions); the
    train stage read it anyway: a NaN feature as a missing value, a time of -1 into a period."""
    if not rb.num_rows:
        return
    t = rb.column("event_time_ms").to_numpy()
    if not ((t >= 0) & (t <= MAX_EVENT_TIME_MS)).all():
        raise EventError("bad_time", f"event_time_ms must be in [0, {MAX_EVENT_TIME_MS}] ms since epoch")
    if not (rb.column("served_version").to_numpy() >= 0).all():
        raise EventError("bad_value", "served_version must be >= 0")
    for name in ("sample_id", "arm"):
        if pc.min(pc.binary_length(rb.column(name))).as_py() == 0:
            raise EventError("bad_value", f"column {name} holds an empty string")
    for i, field in enumerate(rb.schema):
        if not field.name.startswith(FEATURE_PREFIX):
            continue
        if field.type not in _FEATURE_TYPES:
            raise EventError("wrong_type", f"feature column {field.name} is {field.type}, not utf8, int64, "
                             "float64 or list<utf8>")  # fmt: skip
        if field.type == pa.float64():
            x = rb.column(i).to_numpy(zero_copy_only=False)  # null -> nan
            if np.isinf(x).any() or np.isnan(x).sum() != rb.column(i).null_count:
                raise EventError("bad_value", f"feature column {field.name} holds a value that is not finite")


def _check_json_columns(rb: pa.RecordBatch) -> None:
    """A feature column marked as JSON text must be utf8 holding JSON (``SampleBatch.features`` parses
    it; such columns are rare: a key whose values mix types in one batch)."""
    for i, field in enumerate(rb.schema):
        if (field.metadata or {}).get(b"reloop.encoding") != b"json":
            continue
        if field.type != _STRING:
            raise EventError("wrong_type", f"column {field.name} is marked as JSON text but is {field.type}")
        try:
            for value in rb.column(i).to_pylist():
                if value is not None:
                    json.loads(value)
        except ValueError as exc:
            raise EventError(
                "malformed", f"column {field.name} holds a value that is not JSON: {exc}"
            ) from None


_DECIMAL = re.compile(rb"0|[1-9][0-9]{0,18}")  # a non-negative int64 as the writer spells it
_INT64_MAX = 2**63 - 1


def _identity(task: bytes | None, first_seq: bytes | None) -> tuple[int, int]:
    """``reloop.task`` and ``reloop.first_seq`` as ints in [0, 2**63 - 1]; EventError otherwise (a task or
    seq past int64 fits no seq column, snapshot or ledger)."""
    if task is None or first_seq is None:
        raise EventError("malformed", "samples message without reloop.task / reloop.first_seq")
    out = []
    for key, value in ((_META_TASK, task), (_META_FIRST, first_seq)):
        if not _DECIMAL.fullmatch(value) or int(value) > _INT64_MAX:
            raise EventError(
                "bad_value", f"{key.decode()} must be an int in [0, 2**63 - 1], got {value[:40]!r}"
            )
        out.append(int(value))
    return out[0], out[1]


_INCARNATION = re.compile(rb"[A-Za-z0-9_-]{1,64}")


def _incarnation(value: bytes | None) -> str:
    """``reloop.incarnation`` as a str (``""`` when absent: a batch from before incarnations); EventError
    when it is not one (it names a numbering in the train stage's snapshot and logs)."""
    if value is None:
        return ""
    if not _INCARNATION.fullmatch(value):
        raise EventError(
            "bad_value", f"reloop.incarnation must be 1 to 64 of [A-Za-z0-9_-], got {value[:70]!r}"
        )
    return value.decode()


def _metadata(task: int, first_seq: int, incarnation: str = "") -> dict[bytes, bytes]:
    meta = {
        _META_FORMAT: str(FORMAT).encode(),
        _META_TASK: str(task).encode(),
        _META_FIRST: str(first_seq).encode(),
    }
    if incarnation:  # without one the message is byte for byte what a join stage before incarnations sent
        if not _INCARNATION.fullmatch(incarnation.encode()):
            raise ValueError(f"bad incarnation {incarnation!r}")
        meta[_META_INCARNATION] = incarnation.encode()
    return meta
