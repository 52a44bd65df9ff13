"""A dataset replay's counter inputs: what an arm would have served, clicks counted when they arrive."""

import pytest
from reloop.connectors.files.datasets import DatasetRow, FixedDelay, ImmediateDelay
from reloop.connectors.files.datasets.base import FieldInfo
from reloop.connectors.files.datasets.served_counters import with_served_counters
from reloop.connectors.files.datasets.spec import feature_spec
from reloop.engine.features.counters import CounterError, CounterSettings

SPEC = feature_spec((FieldInfo("user", "categorical"), FieldInfo("item", "categorical")), buckets=64)
SETTINGS = CounterSettings(fields=("user",))
IMMEDIATE = ImmediateDelay()


def _row(i: int, t_ms: int, label: int, user: str = "u", click_ms: int | None = None) -> DatasetRow:
    return DatasetRow(f"r{i}", f"r{i}", user, "i", t_ms, {"user": user, "item": "i"}, label, click_ms)


def _user(rows: list[DatasetRow], delay: object = IMMEDIATE) -> list[tuple[float, float]]:
    out = with_served_counters(rows, SPEC, SETTINGS, delay)
    return [(r.features["user#ctr"], r.features["user#seen"]) for r in out]


def test_a_click_counts_once_it_has_arrived_and_never_for_its_own_row() -> None:
    rows = [_row(0, 0, 1), _row(1, 1_000, 0), _row(2, 10_000, 0)]
    immediate = _user(rows)
    late = _user(rows, FixedDelay(5_000))  # the click arrives between the second and the third row
    assert immediate[0] == late[0] and immediate[0][1] == 0.0  # nothing shown before the first
    assert late[1][1] == immediate[1][1] > 0  # the first impression counted either way
    assert late[1][0] < immediate[1][0]  # its click not yet there with the delay
    assert late[2][0] == pytest.approx(immediate[2][0])  # arrived by the third row's time
    # a row's own click_time_ms wins over the delay model
    assert _user([_row(0, 0, 1, click_ms=5_000), *rows[1:]]) == late


def test_rows_of_one_time_are_served_together_and_other_users_apart() -> None:
    together = _user([_row(0, 0, 1), _row(1, 0, 0), _row(2, 0, 0, user="v")])
    assert together[0] == together[1] == together[2]  # none saw another row of its own second
    apart = _user([_row(0, 0, 1), _row(1, 1_000, 0, user="v"), _row(2, 2_000, 0)])
    assert apart[1][1] == 0.0 < apart[2][1]


def test_the_features_keep_theirs_and_a_field_the_spec_lacks_is_refused() -> None:
    (row,) = with_served_counters([_row(0, 0, 0)], SPEC, SETTINGS, ImmediateDelay())
    assert row.features["user"] == "u" and row.features["item"] == "i" and "user#seen" in row.features
    assert with_served_counters([], SPEC, SETTINGS, ImmediateDelay()) == []
    with pytest.raises(CounterError):
        with_served_counters([_row(0, 0, 0)], SPEC, CounterSettings(fields=("shop",)), ImmediateDelay())
