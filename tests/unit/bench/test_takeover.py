"""bench/takeover.py: what the incumbent served, and the cold-start table."""

from __future__ import annotations

import csv

import numpy as np
from reloop.bench.takeover import COLUMNS, challenger, served_by_incumbent, summarise
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.replay.backtest import period_bounds_by_count, prepare


def _data(n: int = 600, periods: int = 3):
    rng = np.random.default_rng(0)
    spec = FeatureSpec(fields=tuple(CategoricalField(name=f, buckets=20) for f in ("u", "i")))
    pairs = list(zip(rng.integers(0, 10, n).tolist(), rng.integers(0, 10, n).tolist(), strict=True))
    samples = [
        LabeledSample(f"s{k}", {"u": str(u), "i": str(i)}, int(rng.random() < (0.8 if u < 5 else 0.2)),
                      served_prediction=0.5, served_version=0, event_time_ms=1000 * k)
        for k, (u, i) in enumerate(pairs)
    ]  # fmt: skip
    return prepare(samples, spec, lambda t: period_bounds_by_count(len(t), periods)), pairs


def test_the_incumbent_serves_its_snapshot_of_the_period_before_and_the_challenger_learns_against_it():
    data, pairs = _data()
    served = served_by_incumbent(data, seed=0)
    assert np.isnan(served[data.period(0)]).all()  # no production model in period 0
    assert np.isfinite(served[data.period(1).start :]).all()
    # Within a period the served model does not change: the same features get the same prediction.
    p1 = data.period(1)
    first: dict[tuple[int, int], float] = {}
    for k in range(p1.start, p1.stop):
        assert first.setdefault(pairs[k], served[k]) == served[k]
    assert len(set(first.values())) > 1
    rows = challenger(data, served, start=1, strategy="kd", alpha=0.5, seed=0)
    assert [r["period"] for r in rows] == [1, 2] and all(0.0 <= r["auc"] <= 1.0 for r in rows)


def test_summary_counts_the_weeks_until_the_challenger_matches_the_incumbent(tmp_path):
    path = tmp_path / "t.csv"
    aucs = {"incumbent": [0.70, 0.70, 0.70], ("ce", 0.0): [0.60, 0.65, 0.71], ("kd", 0.5): [0.65, 0.70, 0.72]}
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for seed in (0, 1, 2):
            for key, values in aucs.items():
                model, (strategy, alpha) = ("incumbent", ("ce", 0.0)) if key == "incumbent" else ("dcn", key)
                for period, auc in enumerate(values, start=11):
                    row = {"model": model, "strategy": strategy, "alpha": alpha, "seed": seed}
                    w.writerow({**row, "period": period, "n": 100, "auc": auc + 0.001 * seed, "logloss": 0.6})
    table = summarise(path, weeks=2)
    kd = next(line for line in table.splitlines() if line.startswith("| kd@0.5"))
    ce = next(line for line in table.splitlines() if line.startswith("| ce@0"))
    assert kd.endswith("| 2.0 |") and ce.endswith("| 3.0 |")  # week 12 for KD, week 13 for CE
    assert "+50.00 ± 0.00" in kd  # first 2 weeks: +0.05 AUC against CE
