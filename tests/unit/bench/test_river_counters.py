"""bench/river_counters.py: the river peer reads the same counter values as the deep models."""

from __future__ import annotations

import numpy as np
import pytest
from reloop.bench import river_counters as rc
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.replay import backtest as bt


def _data(n: int = 90) -> bt.BacktestData:
    rng = np.random.default_rng(3)
    spec = FeatureSpec(fields=tuple(CategoricalField(name=f, buckets=16) for f in ("user_id", "item_id")))
    samples = [
        LabeledSample(f"s{k}", {"user_id": str(rng.integers(5)), "item_id": str(rng.integers(5))},
                      int(rng.random() < 0.4), served_prediction=0.5, served_version=0,
                      event_time_ms=1_000 * k)
        for k in range(n)
    ]  # fmt: skip
    return bt.prepare(samples, spec, lambda t: bt.period_bounds_by_count(len(t), 3))


def test_the_peer_reads_each_rows_counter_values_as_they_are() -> None:
    data = _data()
    counted = bt.with_click_counters(data, ["user_id"], 5.0, windows_s=[60.0])
    peer_data = rc.with_counters_for_the_peer(data, counted)
    row = peer_data.raw_features[40]
    assert row["user_id"] == data.raw_features[40]["user_id"]
    assert row["user_id#ctr"] == pytest.approx(float(counted.batch.num[40, 0]))
    assert row["user_id#seen@60s"] == pytest.approx(float(counted.batch.num[40, 3]))
    x = rc.InputsWithCounters()(row)
    # counter values as they are (a logit may be negative); the rest one-hot as the peer always reads it
    assert x["user_id#ctr"] == row["user_id#ctr"] and x[f"user_id={row['user_id']}"] == 1.0
    plain = rc.peer_rows(data, with_counters=False)
    counted_rows = rc.peer_rows(peer_data, with_counters=True)
    assert [r["period"] for r in plain] == [r["period"] for r in counted_rows]
    assert [r["auc"] for r in plain] != [r["auc"] for r in counted_rows]
    assert bt.RiverInputs is not rc.InputsWithCounters  # the module's class is left alone
