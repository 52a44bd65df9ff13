"""All rows' counter inputs at once equal those of a live ClickCounters fed the log one timestamp at a
time (``live_counter_values``, the definition)."""

from __future__ import annotations

import numpy as np
import pytest
from reloop.engine.features.counters import ClickCounters
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.features.streamed_counters import CHUNK_ROWS, live_counter_values, streamed_counter_values

SPEC = FeatureSpec.model_validate(
    {
        "fields": [
            {"kind": "categorical", "name": "user", "buckets": 40},
            {"kind": "categorical", "name": "item", "buckets": 25},
            {"kind": "multi", "name": "genres", "buckets": 20, "max_len": 3},
        ]
    }
)


def _log(seed: int, n: int):
    rng = np.random.default_rng(seed)
    genres = [f"g{i}" for i in range(8)]
    rows = [
        {
            "user": f"u{rng.zipf(1.6) % 30}",
            "item": f"i{rng.integers(12)}",
            "genres": list(rng.choice(genres, size=rng.integers(0, 4), replace=False)),
        }
        for _ in range(n)
    ]
    times = np.cumsum(rng.choice([0, 0, 1, 500, 4_000, 30_000], size=n)).astype(np.int64)
    labels = (rng.random(n) < 0.3).astype(np.float64)
    # delays of none to minutes: some clicks arrive after later rows, some after the last row
    arrived = times + rng.choice([0, 1, 2_000, 60_000, 10**6], size=n)
    return Featurizer(SPEC).transform(rows), labels, times, arrived


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("windows", [(), (5.0, 120.0)])
@pytest.mark.parametrize("chunk_rows", [CHUNK_ROWS, 37, 1])
def test_every_rows_inputs_and_the_final_counts_equal_a_live_counters(seed: int, windows, chunk_rows) -> None:
    """In one chunk or many (the counts carried from one to the next, clicks counted chunks after their
    rows, timestamps never split), as the live counter serves them."""
    fields = ["user", "item", "user*genres", "user*item"]
    batch, labels, times, arrived = _log(seed, 600)
    live = ClickCounters(SPEC, fields, prior_strength=3.0, windows_s=windows)
    expected = live_counter_values(live, batch, labels, times, arrived)
    at_once = ClickCounters(SPEC, fields, prior_strength=3.0, windows_s=windows)
    got = streamed_counter_values(at_once, batch, labels, times, arrived, chunk_rows=chunk_rows)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)
    # the counters end as the live one does, so they can go on counting (or be saved) from there
    a, b = live.state_dict(), at_once.state_dict()
    for name in ("shown", "clicked", "stamp_ms"):
        np.testing.assert_allclose(b[name], a[name], rtol=1e-9, atol=1e-12)
    assert (b["total_shown"], b["total_clicked"]) == (a["total_shown"], a["total_clicked"])


def test_labels_known_at_their_own_time_by_default() -> None:
    batch, labels, times, _ = _log(3, 300)
    expected = live_counter_values(
        ClickCounters(SPEC, ["user"], windows_s=(60.0,)), batch, labels, times, times
    )
    got = streamed_counter_values(ClickCounters(SPEC, ["user"], windows_s=(60.0,)), batch, labels, times)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)


def test_a_click_that_arrives_at_the_last_rows_time_is_not_read_by_it() -> None:
    batch, _, _, _ = _log(4, 3)
    times = np.array([0, 10, 20])
    labels = np.array([1.0, 0.0, 0.0])
    # the click arrives exactly when the last row is served: it is counted after that row is read
    arrived = np.array([20, 0, 0])
    expected = live_counter_values(ClickCounters(SPEC, ["user"]), batch, labels, times, arrived)
    counters = ClickCounters(SPEC, ["user"])
    got = streamed_counter_values(counters, batch, labels, times, arrived, chunk_rows=1)
    np.testing.assert_array_equal(got, expected)
    assert counters.total_clicked == 1.0


def test_refuses_rows_out_of_time_order_and_counters_that_counted_already() -> None:
    batch, labels, times, _ = _log(5, 10)
    with pytest.raises(ValueError, match="time order"):
        streamed_counter_values(ClickCounters(SPEC, ["user"]), batch, labels, times[::-1].copy())
    used = ClickCounters(SPEC, ["user"])
    used.count_shown(batch.cat[:1])
    with pytest.raises(ValueError, match="counted nothing"):
        streamed_counter_values(used, batch, labels, times)
    empty = streamed_counter_values(
        ClickCounters(SPEC, ["user"]), batch.take(slice(0, 0)), labels[:0], times[:0]
    )
    assert empty.shape == (0, 2)


def test_a_cross_no_row_has_a_pair_of_reads_the_prior_unseen() -> None:
    rows = [{"user": "a", "item": "x", "genres": []}] * 4
    batch = Featurizer(SPEC).transform(rows)
    labels, times = np.array([1.0, 0.0, 1.0, 0.0]), np.array([0, 10, 20, 30])
    counters = ClickCounters(SPEC, ["user*genres"], windows_s=(60.0,))
    got = streamed_counter_values(counters, batch, labels, times)
    expected = live_counter_values(
        ClickCounters(SPEC, ["user*genres"], windows_s=(60.0,)), batch, labels, times
    )
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)
    assert (got[:, 1] == 0).all() and (got[:, 3] == 0).all()
