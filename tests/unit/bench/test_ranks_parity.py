"""bench/ranks_parity.py's report: its verdict line with one seed and with several."""

from __future__ import annotations

from reloop.bench.ranks_parity import report


def _result(ranks: int, seed: int, auc: float) -> dict:
    return {"ranks": ranks, "seed": seed, "samples": 1000, "auc": auc, "logloss": 0.6, "seconds": 1.0}


def test_one_seed_says_there_is_no_spread_to_judge_by():
    # It printed "a seed standard deviation of nane-3 at M = 1 (OUTSIDE 2 sd)".
    text = report([_result(1, 0, 0.70), _result(2, 0, 0.71)], rows=1000, batch=512, command="x")
    assert "nan" not in text and "OUTSIDE" not in text
    assert "+10.00e-3; one seed" in text


def test_several_seeds_are_judged_against_their_spread():
    results = [_result(1, 0, 0.700), _result(1, 1, 0.702), _result(2, 0, 0.701), _result(2, 1, 0.701)]
    text = report(results, rows=1000, batch=512, command="x")
    assert "+0.00e-3 against a seed standard deviation of 1.41e-3 at M = 1 (within 2 sd)" in text
