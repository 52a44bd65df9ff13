"""The samples topic's columnar format: exact round trips, refused bad messages, and features from
Arrow columns identical to features from the same values as Python dicts."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reloop.engine.events.codec import encode
from reloop.engine.events.sample_batch import (
    FIXED_COLUMNS,
    FORMAT,
    batch_from_joined,
    batch_from_samples,
    decode_batch,
    encode_batch,
    feature_columns,
)
from reloop.engine.events.schema import Impression, LabeledSample
from reloop.engine.events.validation import EventError
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import CategoricalField, FeatureSpec, MultiCategoricalField, NumericField
from reloop.engine.join.joiner import Joined

SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="user", buckets=1000),
        CategoricalField(name="cnt", buckets=50),
        NumericField(name="price", transform="minmax", min=0.0, max=10.0),
        NumericField(name="i1", transform="log_bucket", buckets=100),
        MultiCategoricalField(name="tags", buckets=50, max_len=3),
    )
)

_text = st.text(max_size=12)
_row = st.fixed_dictionaries(
    {},
    optional={
        "user": st.one_of(_text, st.integers(-(10**12), 10**12)),
        "cnt": st.one_of(st.integers(-5, 10**6), st.floats(-1e6, 1e6), _text),
        "price": st.one_of(st.floats(-20, 20), st.integers(-20, 20)),
        "i1": st.one_of(st.integers(0, 10**9), st.floats(0, 1e9)),
        "tags": st.lists(_text, max_size=6),
        "unknown": st.one_of(_text, st.integers(), st.lists(_text, max_size=2)),
    },
)


def _samples(rows) -> list[LabeledSample]:
    return [
        LabeledSample(f"s{i}", row, i % 2, 0.5, 3, 1_000 + i, arm="a", weight=1.0, is_correction=i % 5 == 0)
        for i, row in enumerate(rows)
    ]


@settings(max_examples=300, deadline=None)
@given(st.lists(_row, min_size=1, max_size=12))
def test_round_trip_and_arrow_features_equal_dict_features(rows):
    samples = _samples(rows)
    batch = decode_batch(encode_batch(batch_from_samples(samples, task=2, first_seq=40)))
    assert batch.task == 2 and batch.seqs().tolist() == list(range(40, 40 + len(rows)))
    assert batch.to_samples() == samples
    fz = Featurizer(SPEC)
    from_dicts = fz.transform([s.features for s in samples])
    from_arrow = fz.transform_columns(batch.features(), rows=len(batch))
    for part in ("cat", "num", "multi", "multi_mask"):
        np.testing.assert_array_equal(getattr(from_arrow, part), getattr(from_dicts, part), err_msg=part)


_value = st.one_of(
    st.none(), st.text(max_size=6), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.lists(st.one_of(st.none(), st.text(max_size=4)), max_size=3),
    st.lists(st.integers(0, 9), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)  # fmt: skip


def _rule(values) -> tuple[pa.DataType, bool]:
    """The module doc's typing rule, written out: (column type, JSON-text encoded)."""
    kinds = {type(v) for v in values} - {type(None)}
    if kinds <= {str}:
        return pa.string(), False
    if kinds == {int} and all(-(2**63) <= v < 2**63 for v in values if v is not None):
        return pa.int64(), False
    if kinds == {float}:
        return pa.float64(), False
    if kinds == {list} and all(type(x) in (str, type(None)) for v in values if v is not None for x in v):
        return pa.list_(pa.string()), False
    return pa.string(), True


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_value, min_size=1, max_size=5), min_size=1, max_size=4))
def test_each_column_is_typed_by_the_rule_and_keeps_every_value_and_its_type(columns):
    # One column per drawn list: int and float, bool and int, huge ints, nested values, all nulls.
    n = max(map(len, columns))
    rows = [{f"k{c}": col[i] for c, col in enumerate(columns) if i < len(col)} for i in range(n)]
    for key, field, array in feature_columns(rows):
        values = [row.get(key) for row in rows]
        kind, as_json = _rule(values)
        assert (field.type, bool(field.metadata)) == (kind, as_json), (key, values)
        assert len(array) == n and array.type == kind
    batch = decode_batch(encode_batch(batch_from_samples(_samples(rows), task=0, first_seq=0)))
    back = [s.features for s in batch.to_samples()]
    present = [{k: v for k, v in row.items() if v is not None} for row in rows]  # null = key absent
    assert back == present

    def typed(v):  # 1 == 1.0 == True in Python: compare the types too
        return type(v), [typed(x) for x in v] if isinstance(v, list) else v

    assert [{k: typed(v) for k, v in r.items()} for r in back] == [
        {k: typed(v) for k, v in r.items()} for r in present
    ]


def test_mixed_types_and_huge_ints_stay_exact():
    rows = [{"cnt": 5, "user": 2**70}, {"cnt": "5"}, {"cnt": 5.0}, {}]
    batch = decode_batch(encode_batch(batch_from_samples(_samples(rows), task=0, first_seq=0)))
    assert [s.features for s in batch.to_samples()] == rows
    fz = Featurizer(SPEC)
    np.testing.assert_array_equal(fz.transform_columns(batch.features()).cat, fz.transform(rows).cat)


@pytest.mark.parametrize(
    "rows",
    [
        [{"user": "a", "cnt": 1}, {"user": "b", "price": 2.5}],  # as many keys, not the same ones
        [{"user": "a", "cnt": 1}, {"cnt": 2, "user": "b"}],  # the same keys in another order
        [{"user": "a", "cnt": 1}, {"user": "b", "cnt": 2, "tags": ["t"]}],
    ],
)
def test_rows_with_different_key_sets_keep_every_value(rows):
    batch = decode_batch(encode_batch(batch_from_samples(_samples(rows), task=0, first_seq=0)))
    assert [s.features for s in batch.to_samples()] == rows
    assert batch.data.schema.names[len(FIXED_COLUMNS) :][:2] == ["f:user", "f:cnt"]  # first-seen order


def test_rows_with_other_keys_leak_nothing():
    # The same-keys shortcut gives up on a KeyError; raised inside a star-unpacked map it leaked ~180 B
    # per batch on CPython 3.11.
    rows = [{"user": "a", "cnt": 1}, {"user": "b", "price": 2.5}]
    for _ in range(50):
        feature_columns(rows)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2_000):
            feature_columns(rows)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def test_batch_from_joined_equals_batch_from_samples():
    feats = [{"user": "u0", "cnt": 0}, {"user": "u1", "cnt": 1.5}, {"cnt": 2, "user": "u2", "tags": ["t"]}]
    imps = [Impression(f"i{k}", "r", "u", "it", f, 1_000 + k, 0.25, 7, "b") for k, f in enumerate(feats)]
    joined = [Joined(e.impression_id, e.event_time_ms, encode(e), k % 2, k == 2) for k, e in enumerate(imps)]
    got = batch_from_joined(joined, task=1, first_seq=5).to_samples()
    want = [
        LabeledSample(j.impression_id, e.features, j.label, 0.25, 7, e.event_time_ms, arm="b",
                      is_correction=j.is_correction)
        for j, e in zip(joined, imps, strict=True)
    ]  # fmt: skip
    assert got == want


def test_batch_from_joined_of_nothing_is_an_empty_batch():
    batch = decode_batch(encode_batch(batch_from_joined([], task=2, first_seq=9)))
    assert (batch.task, batch.first_seq, batch.data.num_rows) == (2, 9, 0)
    assert batch.data.schema.names == list(FIXED_COLUMNS)


def _joined_and_samples(feats):
    imps = [Impression(f"i{k}", "r", "u", "it", f, 1_000 + k, 0.25, 7, "b") for k, f in enumerate(feats)]
    joined = [
        Joined(e.impression_id, e.event_time_ms, encode(e), k % 2, k % 3 == 0) for k, e in enumerate(imps)
    ]
    samples = [
        LabeledSample(j.impression_id, e.features, j.label, 0.25, 7, e.event_time_ms, arm="b",
                      is_correction=j.is_correction)
        for j, e in zip(joined, imps, strict=True)
    ]  # fmt: skip
    return joined, samples


# What an impression that passed the door can hold: JSON-encodable, no null feature values (refused).
_wire_value = st.one_of(
    st.text(max_size=6),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.text(max_size=4), max_size=3),
)
_key_sets = st.lists(
    st.sampled_from(["user", "cnt", "a-b", "class", ""]), min_size=1, max_size=5, unique=True
)
_rows_over_one_key_set = _key_sets.flatmap(
    lambda keys: st.lists(
        st.permutations(keys).flatmap(
            lambda order: st.fixed_dictionaries({}, optional=dict.fromkeys(order, _wire_value))
        ),
        min_size=1,
        max_size=6,
    )
)
_rows_over_any_keys = st.lists(
    # Keys msgspec cannot name a struct field after (a quote, a backslash, a control character) are
    # valid JSON keys all the same: their batches take the dict path instead of failing.
    st.dictionaries(
        st.sampled_from(["user", "cnt", "tags", "x", 'q"uote', "back\\slash", "tab\tkey"]),
        _wire_value,
        max_size=4,
    ),  # fmt: skip
    min_size=1,
    max_size=6,
)


def _by_name(data: pa.RecordBatch) -> dict:
    """Fixed columns in their order; feature columns by name (their order in a batch is not part of the
    format: a batch from joined bytes orders them as its stream first showed them)."""
    schema, n = data.schema, len(FIXED_COLUMNS)
    features = {f.name: (f.type, f.metadata, data.column(f.name)) for f in list(schema)[n:]}  # json marks too
    return {
        "fixed": data.columns[:n],
        "names": schema.names[:n],
        "features": features,
        "meta": schema.metadata,
    }


@settings(max_examples=300, deadline=None)
@given(st.one_of(_rows_over_one_key_set, _rows_over_any_keys))
def test_batches_from_joined_bytes_and_from_samples_hold_the_same_columns(feats):
    # The first call may take the dict path (keys not seen yet) and teach the struct the keys; the second
    # takes the struct path: both hold the columns batch_from_samples builds from the same features, by
    # name, with the same types and values (keys in any order, missing, or not identifiers).
    joined, samples = _joined_and_samples(feats)
    want = _by_name(batch_from_samples(samples, task=1, first_seq=5).data)
    for _ in range(2):
        assert _by_name(batch_from_joined(joined, task=1, first_seq=5).data) == want


def _corrupt(data: bytes, **meta) -> bytes:
    batch = pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch()
    schema = batch.schema.with_metadata(
        {**batch.schema.metadata, **{k.encode(): v.encode() for k, v in meta.items()}}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as w:
        w.write_batch(batch.replace_schema_metadata(schema.metadata))
    return sink.getvalue().to_pybytes()


def _rebuilt(data: bytes, change) -> bytes:
    batch = change(pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _negative_seqs(batch: pa.RecordBatch) -> pa.RecordBatch:
    seq = pa.array(range(-5, -5 + batch.num_rows), pa.int64())
    batch = batch.set_column(batch.schema.get_field_index("seq"), "seq", seq)
    return batch.replace_schema_metadata({**batch.schema.metadata, b"reloop.first_seq": b"-5"})


def _fixed(name: str, values: list):
    def change(batch: pa.RecordBatch) -> pa.RecordBatch:
        i = batch.schema.get_field_index(name)
        return batch.set_column(i, batch.schema.field(i), pa.array(values, batch.schema.field(i).type))

    return change


def _feature(values: pa.Array):
    return lambda batch: batch.append_column(pa.field("f:x", values.type), values)


def _json_column(values: pa.Array):
    field = pa.field("f:mixed", values.type, metadata={b"reloop.encoding": b"json"})
    return lambda batch: batch.append_column(field, values)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda good: good[: len(good) // 2], "malformed"),
        (lambda good: b"not arrow at all", "malformed"),
        (lambda good: b"", "malformed"),
        (lambda good: None, "malformed"),  # a tombstone (a record without a value)
        (lambda good: _corrupt(good, **{"reloop.samples.format": str(FORMAT + 1)}), "unknown_schema_version"),
        (lambda good: _corrupt(good, **{"reloop.first_seq": "7"}), "bad_value"),
        (lambda good: _corrupt(good, **{"reloop.task": "x"}), "bad_value"),
        (lambda good: _corrupt(good, **{"reloop.task": "-1"}), "bad_value"),
        (lambda good: _corrupt(good, **{"reloop.task": str(2**70)}), "bad_value"),  # no int64, no JSON int
        (lambda good: _corrupt(good, **{"reloop.task": " 1"}), "bad_value"),
        (lambda good: _corrupt(good, **{"reloop.first_seq": str(2**70)}), "bad_value"),
        (lambda good: _corrupt(good, **{"reloop.first_seq": str(2**63 - 1)}), "bad_value"),  # seq overflows
        (lambda good: _rebuilt(good, _negative_seqs), "bad_value"),
        (
            lambda good: _rebuilt(good, lambda b: b.append_column("label", pa.array([0, 1], pa.int8()))),
            "malformed",  # a second column named like a fixed one: which would be the label?
        ),
        (lambda good: _rebuilt(good, _json_column(pa.array(['{"a": 1}', "{"]))), "malformed"),
        (lambda good: _rebuilt(good, _json_column(pa.array([1, 2]))), "wrong_type"),
        # The contract's bounds, which the door applies to every impression (a message breaking them
        # was read: a time of -1 into a period, a NaN feature as a missing value).
        (lambda good: _rebuilt(good, _fixed("event_time_ms", [5, -1])), "bad_time"),
        (lambda good: _rebuilt(good, _fixed("event_time_ms", [2**62, 5])), "bad_time"),
        (lambda good: _rebuilt(good, _fixed("served_version", [-1, 0])), "bad_value"),
        (lambda good: _rebuilt(good, _fixed("sample_id", ["a", ""])), "bad_value"),
        (lambda good: _rebuilt(good, _fixed("arm", ["", "a"])), "bad_value"),
        (lambda good: _rebuilt(good, _feature(pa.array([1.0, float("nan")]))), "bad_value"),
        (lambda good: _rebuilt(good, _feature(pa.array([float("-inf"), None]))), "bad_value"),
        (lambda good: _rebuilt(good, _feature(pa.array([True, False]))), "wrong_type"),
        (lambda good: _rebuilt(good, _feature(pa.array([1, 2], pa.int32()))), "wrong_type"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(make, reason):
    good = encode_batch(batch_from_samples(_samples([{"user": "u"}, {}]), task=1, first_seq=0))
    with pytest.raises(EventError) as err:
        decode_batch(make(good))
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "values",
    [
        pa.array([1.5, None]),
        pa.array(["a", None]),
        pa.array([2**63 - 1, None]),
        pa.array([["a"], None]),
        pa.array([None, None], pa.string()),
    ],
)
def test_feature_columns_of_the_format_with_nulls_are_read(values):
    good = encode_batch(batch_from_samples(_samples([{"user": "u"}, {}]), task=1, first_seq=0))
    batch = decode_batch(_rebuilt(good, _feature(values)))
    assert batch.data.column("f:x").to_pylist() == values.to_pylist()


def test_corrupt_bytes_are_refused_or_read_but_never_crash_the_reader():
    """Random byte changes to a message (a broken disk, a bad producer): decode_batch refuses it with a
    reason, or every read the train stage makes of the batch works (features that no longer fit the
    spec raise FeatureError, which the stage dead-letters). Before Arrow's full validation, some of
    these made the process crash (SIGSEGV) on every restart."""
    import contextlib
    import random

    from reloop.engine.features.featurizer import FeatureError

    rows = [
        {"user": f"u{i}", "price": 2.5 * i, "tags": ["a", "bb"][: i % 3], "mix": i if i % 2 else "s"}
        for i in range(6)
    ]
    good = encode_batch(batch_from_samples(_samples(rows), task=4, first_seq=10))
    spec = FeatureSpec(
        fields=(
            CategoricalField(name="user", buckets=9),
            NumericField(name="price"),
            MultiCategoricalField(name="tags", buckets=9, max_len=3),
            CategoricalField(name="mix", buckets=9),
        )
    )
    featurizer = Featurizer(spec)
    rng = random.Random(0)
    outcomes = {"refused": 0, "read": 0}
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.choice((1, 1, 2, 4))):
            at = rng.randrange(len(data))
            data[at] = rng.randrange(256) if rng.random() < 0.7 else data[at] ^ (1 << rng.randrange(8))
        try:
            batch = decode_batch(bytes(data))
        except EventError:
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        # A changed number may be huge (numpy warns): that is the spec's business, not the reader's.
        with np.errstate(all="ignore"), contextlib.suppress(FeatureError):
            featurizer.transform_columns(batch.features(), rows=len(batch))
        batch.to_samples()
        batch.seqs()
        batch.take(slice(0, len(batch) // 2))
    assert outcomes["refused"] > 1000 and outcomes["read"] > 300  # both ways were exercised


def test_a_slice_takes_the_same_rows_as_an_index_without_copying():
    samples = [
        LabeledSample(f"i{i}", {"user": f"u{i}", "price": float(i)}, i % 2, 0.1, 3, 1000 + i)
        for i in range(10)
    ]
    batch = batch_from_samples(samples, task=2, first_seq=40)
    for start, stop in ((0, 4), (4, 10), (3, 3)):
        view, copy = batch.take(slice(start, stop)), batch.take(np.arange(start, stop))
        assert view.to_samples() == copy.to_samples() == samples[start:stop]
        assert (view.task, view.first_seq) == (copy.task, copy.first_seq)
        assert view.data.schema.metadata == copy.data.schema.metadata
        assert decode_batch(encode_batch(view)).to_samples() == samples[start:stop]
    tail = batch.take(slice(4, None))
    assert tail.first_seq == 44 and tail.seqs().tolist() == list(range(44, 50))
    # a view shares the parent's buffers
    assert tail.data.column("seq").buffers()[1].address == batch.data.column("seq").buffers()[1].address
    with pytest.raises(ValueError, match="step 1"):
        batch.take(slice(0, 10, 2))


def test_a_batchs_incarnation_round_trips_and_a_batch_without_one_is_as_before():
    samples = _samples([{"user": "u"}, {}, {"tags": ["a"]}])
    named = decode_batch(
        encode_batch(batch_from_samples(samples, task=3, first_seq=7, incarnation="ab12_-Z"))
    )
    assert (named.task, named.first_seq, named.incarnation) == (3, 7, "ab12_-Z")
    assert named.to_samples() == samples
    tail = named.take(slice(1, 3))  # pieces of a buffered batch keep it (the train stage's snapshot)
    assert decode_batch(encode_batch(tail)).incarnation == "ab12_-Z" and tail.first_seq == 8
    assert decode_batch(encode_batch(named.take(np.array([1, 2])))).incarnation == "ab12_-Z"
    plain = batch_from_samples(samples, task=3, first_seq=7)
    assert decode_batch(encode_batch(plain)).incarnation == ""
    assert set(plain.data.schema.metadata) == {b"reloop.samples.format", b"reloop.task", b"reloop.first_seq"}
    assert set(named.data.schema.metadata) - set(plain.data.schema.metadata) == {b"reloop.incarnation"}


@pytest.mark.parametrize("value", ["", "a b", "é", "x" * 65, "a/b"])
def test_a_bad_incarnation_is_refused(value):
    good = encode_batch(batch_from_samples(_samples([{}]), task=0, first_seq=0))
    with pytest.raises(EventError) as info:
        decode_batch(_corrupt(good, **{"reloop.incarnation": value}))
    assert info.value.reason == "bad_value"
    with pytest.raises(ValueError):
        batch_from_samples(_samples([{}]), task=0, first_seq=0, incarnation=value or "\n")
