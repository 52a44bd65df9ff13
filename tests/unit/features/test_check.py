"""SpecChecker: exactly the rows the featurizer cannot read are refused, with a reason naming the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reloop.engine.features.check import FeatureLimits, SpecChecker
from reloop.engine.features.featurizer import FeatureError, Featurizer
from reloop.engine.features.spec import CategoricalField, FeatureSpec, MultiCategoricalField, NumericField

SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="user", buckets=100),
        NumericField(name="price", transform="minmax", min=0.0, max=10.0),
        NumericField(name="count", transform="log_bucket", buckets=50),
        MultiCategoricalField(name="tags", buckets=50, max_len=4),
        NumericField(name="raw"),  # identity: the value itself reaches the model, in float32
    )
)
LIMITS = FeatureLimits(max_chars=32, max_list=8)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"price": "abc"}, "price"),
        ({"price": "1e999"}, "price"),
        ({"price": float("nan")}, "price"),
        ({"price": ["1"]}, "price"),
        ({"count": "nan"}, "count"),
        ({"user": ["a", "b"]}, "user"),
        ({"user": "x" * 33}, "user"),
        ({"tags": "solo"}, "tags"),
        ({"tags": 5}, "tags"),
        ({"tags": ["a"] * 9}, "tags"),
        ({"tags": ["a", "y" * 33]}, "tags"),
        ({"raw": 1e39}, "raw"),  # finite, but inf in float32
        ({"raw": "-3.5e38"}, "raw"),
    ],
)
def test_values_the_featurizer_cannot_read_are_refused(row, field):
    checker = SpecChecker(SPEC, LIMITS)
    found = checker.check_rows([{"user": "ok"}, row, {"price": 2}])
    assert [i for i, _ in found] == [1]
    err = found[0][1]
    assert err.reason == "bad_feature" and err.field == f"features.{field}"
    assert repr(field) in err.detail


def test_good_rows_pass_including_missing_values_and_numeric_strings():
    checker = SpecChecker(SPEC, LIMITS)
    rows = [
        {},
        {"user": "", "price": "", "count": "", "tags": ""},
        {"user": 7, "price": "3.5", "count": 12, "tags": []},
        {"user": 1.5, "price": 3, "count": 2.5, "tags": ["a", "b"]},
        {"unknown": ["whatever"], "user": "x" * 32, "tags": ["z" * 32] * 8},
        {"raw": 3.4e38, "price": 1e300, "count": -1e300},  # only identity is bound to float32
        {"raw": "-3.4e38"},
    ]
    assert checker.check_rows(rows) == []
    Featurizer(SPEC).transform(rows)


def test_one_error_per_row_even_when_several_fields_are_bad():
    found = SpecChecker(SPEC, LIMITS).check_rows([{"user": ["a"], "price": "abc"}])
    assert len(found) == 1


_value = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1.5", "-2", "1e400", "nan", " 3 ", "0x10", "1e39", 1e39, -3.4e38]),
    st.lists(st.text(max_size=40), max_size=10),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries({}, optional=dict.fromkeys(("user", "price", "count", "tags", "raw"), _value)),
        min_size=1,
        max_size=6,
    )
)
def test_checker_accepts_exactly_what_the_featurizer_reads(rows):
    checker = SpecChecker(SPEC, LIMITS)
    bad = {i for i, _ in checker.check_rows(rows)}
    good = [r for i, r in enumerate(rows) if i not in bad]
    Featurizer(SPEC).transform(good)  # never raises on rows the checker let through
    for i in bad:
        # Everything refused is either unreadable by the featurizer or beyond a bound.
        row = rows[i]
        try:
            Featurizer(SPEC).transform([row])
        except (FeatureError, ValueError, OverflowError):
            continue
        assert _beyond_a_bound(row) or _non_finite_number(row), row


def _beyond_a_bound(row) -> bool:
    for v in row.values():
        if isinstance(v, str) and len(v) > LIMITS.max_chars:
            return True
        if isinstance(v, list) and (len(v) > LIMITS.max_list or any(len(x) > LIMITS.max_chars for x in v)):
            return True
    return False


def _non_finite_number(row) -> bool:
    import math

    for name in ("price", "count", "raw"):
        v = row.get(name)
        try:
            if v is not None and v != "" and not math.isfinite(float(v)):
                return True
        except (TypeError, ValueError):
            pass
    return False


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (
            {"raw": 10**39},
            "raw",
        ),  # an int past float32 under identity (a float of the same value was refused)
        ({"raw": -(10**39)}, "raw"),
        ({"count": 10**400}, "count"),  # past any float: the featurizer's float() overflows
        ({"price": 10**400}, "price"),
    ],
)
def test_ints_the_featurizer_cannot_read_are_refused(row, field):
    for rows in ([row], [{"price": 1.5, "count": 2.5, "raw": 0.5}, row]):  # ints alone, or with floats
        found = SpecChecker(SPEC, LIMITS).check_rows(rows)
        assert [i for i, _ in found] == [len(rows) - 1] and found[0][1].field == f"features.{field}"
        with pytest.raises(FeatureError, match=repr(field)):
            Featurizer(SPEC).transform(rows)
    ok = {"raw": 3 * 10**38, "count": 10**300, "price": -(2**63)}  # in range: accepted by both
    assert SpecChecker(SPEC, LIMITS).check_rows([ok]) == []
    Featurizer(SPEC).transform([ok])
