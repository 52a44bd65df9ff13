"""Feature spec round trips and the featurizer's rows: offsets, missing values, bucketing, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from reloop.engine.features import (
    CategoricalField,
    FeatureBatch,
    FeatureError,
    FeatureSpec,
    Featurizer,
    MultiCategoricalField,
    NumericField,
    criteo_spec,
)
from reloop.engine.features.featurizer import log_bucket
from reloop.engine.features.hashing import arrow_spans, fnv1a_arrow, fnv1a_many, fnv1a_utf8, utf8_spans

SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="user", buckets=50),
        NumericField(name="count", transform="log_bucket", buckets=30),
        NumericField(name="age", transform="minmax", min=10.0, max=60.0),
        NumericField(name="price"),
        MultiCategoricalField(name="tags", buckets=40, max_len=3),
        CategoricalField(name="item", buckets=20),
    )
)


def test_spec_json_round_trip_keeps_every_field_and_the_layout():
    restored = FeatureSpec.from_json(SPEC.to_json())
    assert restored == SPEC
    assert FeatureSpec.from_dict(json.loads(SPEC.to_json())) == SPEC
    assert restored.field_names == ("user", "count", "item", "age", "price", "tags")
    assert restored.cat_offsets == (0, 50, 80) and restored.dense_rows == (100, 101)
    assert restored.multi_offsets == (102,) and restored.total_rows == 142


def test_bad_specs_fail_naming_the_problem():
    with pytest.raises(ValidationError, match="duplicate field names"):
        FeatureSpec(fields=(CategoricalField(name="a", buckets=4), CategoricalField(name="a", buckets=4)))
    with pytest.raises(ValidationError, match="minmax needs min and max"):
        NumericField(name="x", transform="minmax")
    with pytest.raises(ValidationError, match="buckets"):
        CategoricalField(name="x", buckets=1)
    with pytest.raises(ValidationError, match="extra"):
        FeatureSpec.from_json('{"fields": [{"kind": "categorical", "name": "a", "buckets": 4, "bukets": 2}]}')


def test_ids_stay_in_their_field_block_and_missing_values_use_row_zero():
    rng = np.random.default_rng(0)
    rows = [
        {
            "user": f"u{rng.integers(1000)}",
            "item": int(rng.integers(100)),
            "count": float(rng.integers(0, 500)),
        }
        for _ in range(300)
    ]
    rows += [{}, {"user": None, "item": "", "count": None}]
    b = Featurizer(SPEC).transform(rows)
    assert b.cat.dtype == np.int64 and b.cat.shape == (302, 3)
    for j, (f, off) in enumerate(zip(SPEC.cat_fields, SPEC.cat_offsets, strict=True)):
        assert np.all((b.cat[:300, j] > off) & (b.cat[:300, j] < off + f.buckets))
        assert np.all(b.cat[300:, j] == off)  # missing -> row 0 of the block
    assert len(np.unique(b.cat[:300, 0])) > 40  # hashing spreads values


def test_same_value_same_row_whatever_else_is_in_the_batch():
    f = Featurizer(SPEC)
    alone = f.transform([{"user": "ab", "item": 3}])
    mixed = f.transform([{"user": "a much longer user name é", "item": "x" * 50}, {"user": "ab", "item": 3}])
    np.testing.assert_array_equal(alone.cat[0], mixed.cat[1])
    assert f.transform([{"item": "3"}]).cat[0, 2] == alone.cat[0, 2]  # categorical values hash by str()
    assert f.transform([{"user": "ba"}]).cat[0, 0] != alone.cat[0, 0]


def test_log_bucketing_follows_the_criteo_rule():
    x = np.array([np.nan, -1.0, 0.0, 1.0, 2.0, 2.5, 3.0, 100.0, 1e6])
    expected = [0, -1, 0, 1, 2, int(np.floor(np.log(2.5) ** 2)), 1, 21, 190]
    assert log_bucket(x).tolist() == expected
    f = Featurizer(SPEC)
    rows = f.transform([{"count": 3.0}, {"count": 1.0}, {"count": 100.0}, {"count": 105.0}]).cat[:, 1]
    assert rows[0] == rows[1]  # both bucket 1
    assert rows[2] == rows[3]  # floor(log(100)^2) = floor(log(105)^2) = 21
    assert rows[0] != rows[2]


def test_dense_values_identity_and_minmax_with_fill():
    b = Featurizer(SPEC).transform([{"age": 35.0, "price": 2.5}, {"age": 100.0, "price": None}, {"age": 0}])
    np.testing.assert_allclose(b.num, [[0.5, 2.5], [1.0, 0.0], [0.0, 0.0]])
    assert b.num.dtype == np.float32


def test_identity_values_beyond_float32_are_refused_others_transformed():
    """float32 would make 1e39 inf, and an inf input turns the model's logit NaN: under the identity
    transform such a value is a FeatureError naming the field (from dicts and from Arrow columns alike),
    under minmax it clips and under log_bucket it buckets."""
    f = Featurizer(SPEC)
    for value in (1e39, -3.5e38, "1e39"):
        with pytest.raises(FeatureError, match="'price'.*beyond float32"):
            f.transform([{"price": 1.0}, {"price": value}])
    with pytest.raises(FeatureError, match="'price'"):
        f.transform_columns({"price": pa.array([1.0, None, 1e39])})
    b = f.transform([{"price": 3.4e38, "age": 1e39, "count": 1e39}, {"price": float("nan")}])
    assert np.isfinite(b.num).all() and b.num[0].tolist() == [1.0, np.float32(3.4e38)]


def test_multi_valued_fields_are_padded_truncated_and_masked():
    b = Featurizer(SPEC).transform([{"tags": ["a", "b", "c", "d"]}, {"tags": []}, {"tags": ["a", ""]}, {}])
    assert b.multi.shape == (4, 1, 3) and b.multi_mask.shape == (4, 1, 3)
    np.testing.assert_array_equal(b.multi_mask[:, 0], [[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    assert b.multi[0, 0, 0] == b.multi[2, 0, 0]  # "a" -> same row
    off = SPEC.multi_offsets[0]
    assert np.all((b.multi >= off) & (b.multi < off + 40))


def test_bad_values_fail_naming_the_field():
    f = Featurizer(SPEC)
    with pytest.raises(FeatureError, match="'price'"):
        f.transform([{"price": "cheap"}])
    with pytest.raises(FeatureError, match="'tags'"):
        f.transform([{"tags": "not-a-list"}])
    with pytest.raises(FeatureError, match="'user'.*dict"):
        f.transform([{"user": "ok"}, {"user": {"nested": 1}}])
    with pytest.raises(FeatureError, match="different lengths"):
        f.transform_columns({"user": ["a", "b"], "item": ["c"]})


def test_fnv1a_known_vectors_and_non_ascii():
    h, missing = fnv1a_utf8(["", "a", "foobar", None, "é", 7])
    assert [hex(int(v)) for v in h[:3]] == ["0xcbf29ce484222325", "0xaf63dc4c8601ec8c", "0x85944171f73967e8"]
    assert missing.tolist() == [True, False, False, True, False, False]
    assert h[5] == fnv1a_utf8(["7"])[0][0]
    # UTF-8 bytes of "é" are c3 a9: FNV-1a by hand.
    expected = 0xCBF29CE484222325
    for byte in "é".encode():
        expected = ((expected ^ byte) * 0x100000001B3) % 2**64
    assert int(h[4]) == expected


def test_columnar_input_equals_row_input():
    rows = [{"user": "u1", "count": 5, "age": 20.0, "tags": ["x"]}, {"item": 4, "price": 1.5}]
    cols = {name: [r.get(name) for r in rows] for name in SPEC.field_names}
    a, b = Featurizer(SPEC).transform(rows), Featurizer(SPEC).transform_columns(cols)
    for x, y in zip(
        (a.cat, a.num, a.multi, a.multi_mask), (b.cat, b.num, b.multi, b.multi_mask), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    assert len(Featurizer(SPEC).transform([])) == 0


_ANY_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),  # past int64 and past 2**53 (an int64 column a double cannot hold)
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.sampled_from(["1.5", "", "7", "abc", 1e39, -3.5e38, "1e39"]),  # past float32: refused for identity
)
_ANY_VALUE = st.recursive(
    _ANY_SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
    max_leaves=4,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(SPEC.field_names), _ANY_VALUE, max_size=6), max_size=4))
def test_any_values_featurise_or_raise_feature_error_alike_from_rows_and_from_the_samples_topic(rows):
    """Whatever a feature holds, the featurizer returns rows or raises FeatureError (never another
    error: the train stage dead-letters on FeatureError), and the samples topic's Arrow columns give
    the same verdict and the same rows as the dicts they were built from."""
    from reloop.engine.events.sample_batch import batch_from_samples, decode_batch, encode_batch
    from reloop.engine.events.schema import LabeledSample

    rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
    samples = [LabeledSample(f"s{i}", row, 0, 0.5, 0, 1) for i, row in enumerate(rows)]
    batch = decode_batch(encode_batch(batch_from_samples(samples, task=0, first_seq=0)))
    featurizer = Featurizer(SPEC)
    verdicts = []
    for featurise in (
        lambda: featurizer.transform(rows),
        lambda: featurizer.transform_columns(batch.features(), rows=len(batch)),
    ):
        try:
            verdicts.append(featurise())
        except FeatureError:
            verdicts.append(None)
    from_rows, from_columns = verdicts
    assert (from_rows is None) == (from_columns is None)
    if from_rows is not None:
        for name in ("cat", "num", "multi", "multi_mask"):
            np.testing.assert_array_equal(getattr(from_rows, name), getattr(from_columns, name))


def test_numeric_int64_values_beyond_2_53_read_from_arrow_as_float_does():
    big = 2**61 + 1  # the door accepts any int; a safe Arrow cast to double refused this one
    column = pa.array([big, None, -big], pa.int64())
    batch = Featurizer(SPEC).transform_columns({"price": column})
    price = [f.name for f in SPEC.dense_fields].index("price")
    assert batch.num[:, price].tolist() == [np.float32(float(big)), 0.0, np.float32(float(-big))]


def test_arrow_spans_read_only_the_offsets_an_array_needs():
    # A valid array whose offsets buffer is longer than it needs, by a part of an offset (a message's
    # buffers are padded as its writer chose): the spans are those of the values.
    offsets = np.array([0, 1, 3], dtype=np.int32).tobytes() + b"\x00\x00\x00"
    array = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(offsets), pa.py_buffer(b"abc")])
    array.validate(full=True)
    buf, starts, lengths = arrow_spans(array)
    assert (buf.tobytes(), starts.tolist(), lengths.tolist()) == (b"abc", [0, 1], [1, 2])


def test_batch_helpers_and_torch_view():
    b = Featurizer(SPEC).transform([{"user": str(i), "tags": ["t"]} for i in range(5)])
    both = FeatureBatch.concat([b.take(slice(0, 2)), b.take(np.array([4]))])
    np.testing.assert_array_equal(both.cat, b.cat[[0, 1, 4]])
    t = both.to_torch()
    assert len(t) == 3 and t.cat.dtype == torch.int64 and t.multi_mask.dtype == torch.float32


_CHILD = """
import json, sys
from reloop.engine.features import FeatureSpec, Featurizer
spec = FeatureSpec.from_json(sys.argv[1])
rows = json.loads(sys.argv[2])
b = Featurizer(spec).transform(rows)
print(json.dumps([b.cat.tolist(), b.multi.tolist()]))
"""


def test_rows_are_identical_in_another_process_with_another_hash_seed():
    spec = criteo_spec(buckets=10_000)
    rng = np.random.default_rng(3)
    rows = [
        {
            **{f"C{i}": format(int(rng.integers(2**32)), "08x") for i in range(1, 27)},
            **{f"I{i}": float(rng.integers(0, 10_000)) for i in range(1, 14)},
        }
        for _ in range(20)
    ]
    here = Featurizer(spec).transform(rows)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, spec.to_json(), json.dumps(rows)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=os.getcwd(),
    )
    cat, multi = json.loads(out.stdout)
    assert cat == here.cat.tolist() and multi == here.multi.tolist()


_texts = st.lists(st.one_of(st.none(), st.text(max_size=9)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(_texts, min_size=1, max_size=5), st.integers(0, 3), st.booleans())
def test_block_hashing_equals_column_by_column_hashing(columns, cut, same_length):
    """Hashing a batch's string columns as one block gives each column's own hashes: sliced arrays (a
    view into a larger buffer), nulls, empty and non-ASCII strings, and the one-length fast path."""
    if same_length:  # every value the same byte length: the path without a sort
        columns = [[None if v is None else f"{len(v.encode()):03d}" for v in col] for col in columns]
    n = min(map(len, columns))
    arrays = [pa.array(["pad"] * cut + col[:n], pa.string())[cut:] for col in columns]
    h, missing = fnv1a_many([arrow_spans(a) for a in arrays])
    pairs = enumerate(zip(arrays, columns, strict=True))
    spans = [utf8_spans(c[:n]) if j % 2 else arrow_spans(a) for j, (a, c) in pairs]
    mixed = fnv1a_many(spans)  # Python columns and Arrow columns in one block
    for j, (array, col) in enumerate(zip(arrays, columns, strict=True)):
        expected, expected_missing = fnv1a_utf8(col[:n])
        np.testing.assert_array_equal(h[j], expected)
        np.testing.assert_array_equal(mixed[0][j], expected)
        np.testing.assert_array_equal(missing[j], expected_missing)
        np.testing.assert_array_equal(fnv1a_arrow(array)[0], expected)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), "inf", "-Infinity"])
@pytest.mark.parametrize("field", ["count", "age"])
def test_infinite_numbers_are_refused_naming_the_field(field, value):
    """The door refuses +-inf for every numeric field; the featurizer bucketed it under log_bucket by
    an undefined float -> int64 cast (+inf got INT64_MIN's row on x86, INT64_MAX's on ARM) and clipped
    it under minmax. From dicts and from Arrow columns alike."""
    f = Featurizer(SPEC)
    with pytest.raises(FeatureError, match=repr(field)):
        f.transform([{field: 1.0}, {field: value}])
    with pytest.raises(FeatureError, match=repr(field)):
        f.transform_columns({field: pa.array([1.0, None, float(value)])})


def test_log_buckets_of_numbers_past_int64_are_defined_and_silent():
    import warnings

    x = np.array([-1e300, -(2.0**63), -1e19, float("nan"), 1e300])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "invalid value encountered in cast": C's undefined behaviour
        got = log_bucket(x)
    assert got.tolist() == [-(2**63), -(2**63), -(2**63), 0, int(np.floor(np.log(1e300) ** 2))]


def test_a_lone_surrogate_is_a_feature_error_naming_the_field():
    # json.loads gives "\ud800" for the escape; it has no UTF-8 bytes to hash (UnicodeEncodeError).
    f = Featurizer(SPEC)
    with pytest.raises(FeatureError, match="'user'"):
        f.transform([{"user": "ok"}, {"user": "a\ud800"}])
    with pytest.raises(FeatureError, match="'tags'"):
        f.transform([{"tags": ["ok", "\udfff"]}])


def test_a_dataframes_missing_values_are_missing_not_categories(monkeypatch) -> None:
    # A NaN in a column of strings (what pandas writes for None) was hashed as the category "nan", pandas'
    # NA was refused ("a scalar value expected, got NAType" / "boolean value of NA is ambiguous"), and a
    # list cell as pandas.read_parquet gives it (a numpy array) raised an unnamed ValueError.
    from types import SimpleNamespace

    na = type("NAType", (), {"__bool__": lambda self: (_ for _ in ()).throw(TypeError("ambiguous"))})()
    monkeypatch.setitem(sys.modules, "pandas", SimpleNamespace(NA=na))
    spec = FeatureSpec(
        fields=(
            CategoricalField(name="u", buckets=64),
            NumericField(name="x"),
            MultiCategoricalField(name="tags", buckets=64, max_len=2),
        )
    )
    f = Featurizer(spec)
    batch = f.transform_columns(
        {
            "u": ["a", float("nan"), np.float32("nan"), na, "nan"],
            "x": [1.0, na, float("nan"), None, 2.0],
            "tags": [np.array(["p", "q", "r"]), float("nan"), na, None, ["p"]],
        }
    )
    same = f.transform(
        [{"u": "a", "x": 1.0, "tags": ["p", "q"]}, {}, {}, {}, {"u": "nan", "x": 2.0, "tags": ["p"]}]
    )
    np.testing.assert_array_equal(batch.cat, same.cat)  # the string "nan" stays a category
    np.testing.assert_array_equal(batch.num, same.num)
    np.testing.assert_array_equal(batch.multi, same.multi)
    np.testing.assert_array_equal(batch.multi_mask, same.multi_mask)
    assert batch.cat[1:4, 0].tolist() == [0, 0, 0] and batch.cat[4, 0] != 0


@pytest.mark.parametrize("backbone", ["lr", "fm", "dcn", "ftrl", "river_lr"])
def test_an_empty_batch_scores_to_nothing_with_a_multi_valued_field(backbone: str) -> None:
    # "cannot reshape tensor of 0 elements into shape [0, -1]" for every backbone with a multi field.
    from reloop.engine.models.registry import build_learner

    spec = FeatureSpec(
        fields=(CategoricalField(name="u", buckets=8), MultiCategoricalField(name="t", buckets=8, max_len=3))
    )
    learner = build_learner(backbone, spec, "ce", 0.0)
    assert learner.predict_proba(Featurizer(spec).transform([])).shape == (0,)


def test_a_dataframe_is_taken_by_its_columns() -> None:
    # transform_columns(df) failed with "'numpy.ndarray' object is not callable" (df.values is an array).
    class Frame:  # what the featurizer reads of a pandas DataFrame: .columns and frame[name]
        def __init__(self, data: dict) -> None:
            self._data = data
            self.columns = list(data)
            self.values = np.zeros((1, 1))  # as pandas has it: not the Mapping method

        def __getitem__(self, name: str) -> list:
            return self._data[name]

    spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=64), NumericField(name="x")))
    f = Featurizer(spec)
    data = {"u": ["a", "b"], "x": [1.0, 2.0], "other": [0, 0]}
    got = f.transform_columns(Frame(data))  # type: ignore[arg-type]
    np.testing.assert_array_equal(got.cat, f.transform_columns(data).cat)
