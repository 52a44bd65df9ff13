"""The column featurizer gives exactly the rows the reference Featurizer gives for the merged rows."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.serve.columns import ColumnFeaturizer

SPEC = FeatureSpec.from_dict(
    {
        "fields": [
            {"kind": "categorical", "name": "user", "buckets": 50},
            {"kind": "categorical", "name": "item", "buckets": 97},
            {"kind": "numeric", "name": "price", "transform": "minmax", "min": 0, "max": 10},
            {"kind": "numeric", "name": "count", "transform": "log_bucket", "buckets": 20},
            {"kind": "numeric", "name": "age"},
            {"kind": "multi", "name": "tags", "buckets": 31, "max_len": 3},
            {"kind": "multi", "name": "history", "buckets": 17, "max_len": 5},
        ]
    }
)

cat_value = st.one_of(st.none(), st.text(max_size=6), st.integers(-5, 5), st.sampled_from([1.0, 2.5]))
num_value = st.one_of(st.none(), st.integers(-3, 300), st.floats(-2, 50, allow_nan=False))
multi_value = st.one_of(st.none(), st.just(""), st.lists(st.text(max_size=4), max_size=6))
values = {
    "user": cat_value,
    "item": cat_value,
    "price": num_value,
    "count": num_value,
    "age": num_value,
    "tags": multi_value,
    "history": multi_value,
}
features = st.fixed_dictionaries({}, optional=values)


def _same(a, b) -> None:
    for name in ("cat", "num", "multi", "multi_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype


@settings(max_examples=150, deadline=None)
@given(context=features, candidates=st.lists(features, min_size=1, max_size=8))
def test_same_rows_as_the_reference_featurizer(context, candidates):
    cols = ColumnFeaturizer(SPEC, memo_size=5)  # a tiny memo: cleared many times along the way
    expected = Featurizer(SPEC).transform([{**context, **c} for c in candidates])
    _same(cols.transform(context, candidates), expected)
    _same(cols.transform(context, candidates), expected)  # second time from the memo


def test_memo_stays_bounded_and_serves_repeats():
    cols = ColumnFeaturizer(SPEC, memo_size=100)
    ctx = {"user": "u1"}
    for r in range(50):
        cands = [{"item": f"i{r * 10 + j}"} for j in range(10)]
        _same(cols.transform(ctx, cands), Featurizer(SPEC).transform([{**ctx, **c} for c in cands]))
        assert cols.memo_entries() <= 2 * 100  # per hashed field
    # 1 and 1.0 and "1" hash differently (str() of each): the memo must not mix them up.
    cands = [{"item": "1"}, {"item": 1}, {"item": 1.0}, {"item": "1"}]
    _same(cols.transform({}, cands), Featurizer(SPEC).transform(cands))
