"""The counting pass of a backtest or a dataset replay: every row's click-counter inputs as served, all
rows at once (``streamed_counter_values``) against a live counter fed the log one timestamp at a time
(``live_counter_values``, its definition and the implementation before 2026-12-06).

    .venv/bin/python -m reloop.bench.counters_streamed --data $DATA/movielens-100k \\
        --out docs/bench-counters-streamed.md

MovieLens-100K's rows in time order (its default counters: ``user_id``, ``item_id``, ``user_id*genres``,
lifetime and a 600-s window; clicks known at their event time, as the backtest has them), else, without
``--data``, a synthetic log of ``--rows`` rows. Rounds alternate the two, so load on the machine hits
both alike; numpy only, one thread. The report gives both rates, their ratio in the same rounds, and
the largest difference between the two's float32 inputs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from reloop.bench.report import publish
from reloop.engine.features.counters import ClickCounters
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.features.streamed_counters import CHUNK_ROWS, live_counter_values, streamed_counter_values


def _movielens(path: Path) -> tuple[FeatureSpec, list[dict], np.ndarray, np.ndarray, tuple[str, ...]]:
    from reloop.connectors.files.datasets import open_dataset
    from reloop.connectors.files.datasets.spec import feature_spec

    ds = open_dataset("movielens-100k", path)
    rows = list(ds.rows())
    labels = np.array([r.label for r in rows], dtype=np.float64)
    times = np.array([r.event_time_ms for r in rows], dtype=np.int64)
    return feature_spec(ds.fields), [r.features for r in rows], labels, times, tuple(ds.counters)


def _synthetic(n: int) -> tuple[FeatureSpec, list[dict], np.ndarray, np.ndarray, tuple[str, ...]]:
    rng = np.random.default_rng(0)
    spec = FeatureSpec.model_validate(
        {
            "fields": [
                {"kind": "categorical", "name": "user_id", "buckets": 10_000},
                {"kind": "categorical", "name": "item_id", "buckets": 10_000},
                {"kind": "multi", "name": "genres", "buckets": 64, "max_len": 4},
            ]
        }
    )
    rows = [
        {
            "user_id": f"u{rng.zipf(1.3) % 5_000}",
            "item_id": f"i{rng.zipf(1.2) % 3_000}",
            "genres": [f"g{g}" for g in rng.choice(20, size=rng.integers(1, 4), replace=False)],
        }
        for _ in range(n)
    ]
    times = np.cumsum(rng.choice([0, 1_000, 30_000], size=n)).astype(np.int64)
    labels = (rng.random(n) < 0.3).astype(np.float64)
    return spec, rows, labels, times, ("user_id", "item_id", "user_id*genres")


def _shown(argv: list[str], data: Path | None) -> str:
    """The command line, the data folder as ``$DATA/<its name>`` (where the datasets live differs)."""
    return " ".join(f"$DATA/{data.name}" if data and a == str(data) else shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a MovieLens-100K folder (else a synthetic log)")
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the synthetic log")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=600.0, help="the one window, seconds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    spec, rows, labels, times, fields = _movielens(args.data) if args.data else _synthetic(args.rows)
    batch = Featurizer(spec).transform(rows)
    n = len(rows)
    rates: dict[str, list[float]] = {"live": [], "at once": []}
    outputs: dict[str, np.ndarray] = {}
    load_start = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, run in (("live", live_counter_values), ("at once", streamed_counter_values)):
            counters = ClickCounters(spec, fields, 5.0, (args.window,))
            t0 = time.perf_counter()
            outputs[name] = run(counters, batch, labels, times)
            rates[name].append(n / (time.perf_counter() - t0))
    ratio = float(np.median([a / b for a, b in zip(rates["at once"], rates["live"], strict=True)]))
    diff = float(np.max(np.abs(outputs["at once"] - outputs["live"]))) if n else 0.0
    load = os.getloadavg()
    data = "MovieLens-100K" if args.data else f"a synthetic log ({n:,} rows)"
    lines = [
        "# The counting pass: every row's counter inputs at once",
        "",
        f"Command: `.venv/bin/python -m reloop.bench.counters_streamed {_shown(argv, args.data)}`",
        "",
        f"- {data}: {n:,} rows, {len(np.unique(times)):,} distinct event times; counters of "
        f"{', '.join(fields)}, lifetime and a {args.window:g}-s window ({2 * 2 * len(fields)} inputs); "
        "clicks known at their event time",
        f"- {args.rounds} rounds, alternating; numpy, one thread; shared 2-core machine, load average "
        f"{load_start:.1f} at the start, {load[0]:.1f} at the end",
        "",
        "| path | rows/s per round | median |",
        "| --- | --- | --- |",
    ]
    at_once = f"all rows at once (sorted scans, chunks of {CHUNK_ROWS:,} rows)"
    for name, label in (("live", "a live counter, one timestamp at a time"), ("at once", at_once)):
        x = rates[name]
        lines.append(f"| {label} | {', '.join(f'{r:,.0f}' for r in x)} | {np.median(x):,.0f} |")
    lines += [
        "",
        f"All rows at once: **{ratio:.1f}x** the live counter's rate (median of the rounds' ratios). "
        f"Largest difference between the two's inputs (float32): {diff:.3g}.",
    ]
    return publish(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
