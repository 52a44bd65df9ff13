"""The river per-event LR peer given the same click counters as the deep models, MovieLens or Frappe.

``reloop backtest --counters`` gives the counters to the deep models only; this asks whether the peer
gains as much from them. Each row's counter values (``with_click_counters``: labels known once their
event time has passed) join its raw features, and the peer reads them as they are (they are already
logits and scaled logs); everything else is ``run_river_baseline``'s. Prints AUC / LogLoss on the
selection periods and on the later ones, with and without the counters.

    .venv/bin/python -m reloop.bench.river_counters --data $DATA/movielens-100k [--dataset movielens-100k]
        [--counters user_id,item_id] [--windows 600] [--later-from 11]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from reloop.engine.replay import backtest as bt

MARK = "#"  # every counter input's name has it (engine/features/counters.py: FIELD#ctr, FIELD#seen@600s)


class InputsWithCounters(bt.RiverInputs):
    """The peer's inputs, with each counter value taken as it is rather than as a count to log-scale."""

    def __call__(self, features: dict[str, Any]) -> dict[str, float]:
        x = super().__call__({k: v for k, v in features.items() if MARK not in k})
        x.update((k, float(v)) for k, v in features.items() if MARK in k)
        return x


def with_counters_for_the_peer(data: bt.BacktestData, counted: bt.BacktestData) -> bt.BacktestData:
    """``counted``, whose raw features also hold each row's counter values (its extra dense columns)."""
    names = [f.name for f in counted.spec.dense_fields[len(data.spec.dense_fields) :]]
    values = counted.batch.num[:, len(data.spec.dense_fields) :]
    raw = [
        {**f, **dict(zip(names, map(float, row), strict=True))}
        for f, row in zip(data.raw_features, values, strict=True)
    ]
    return replace(counted, raw_features=raw)


def peer_rows(data: bt.BacktestData, with_counters: bool) -> list[dict[str, Any]]:
    return bt.run_river_baseline(data, inputs=InputsWithCounters if with_counters else bt.RiverInputs)


def main(argv: list[str] | None = None) -> int:
    from reloop.bench.learner_ablation import load, selection_last_period

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--counters", default="user_id,item_id")
    p.add_argument("--prior", type=float, default=5.0)
    p.add_argument("--windows", default="600")
    p.add_argument("--later-from", type=int, default=11, help="the first reported period (Frappe: 4)")
    args = p.parse_args(argv)
    data = load(args.dataset, args.data, 10_000)
    windows = [float(w) for w in args.windows.split(",") if w]
    counted = bt.with_click_counters(data, args.counters.split(","), args.prior, windows_s=windows)
    last = selection_last_period(data)
    for label, d, on in (
        ("river LR", data, False),
        ("river LR + counters", with_counters_for_the_peer(data, counted), True),
    ):
        rows = peer_rows(d, on)
        sel = [r for r in rows if 1 <= r["period"] <= last]
        later = [r for r in rows if r["period"] >= args.later_from]
        print(
            f"{args.dataset} {label}: selection periods 1-{last} AUC {np.mean([r['auc'] for r in sel]):.4f} "
            f"LogLoss {np.mean([r['logloss'] for r in sel]):.4f}; periods {args.later_from}+ AUC "
            f"{np.mean([r['auc'] for r in later]):.4f} LogLoss {np.mean([r['logloss'] for r in later]):.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
