"""What the served-metrics book costs the trainer per sample, against one rolling window.

``OnlineMetricsBook.update_columns`` (what the train stage calls for every trained batch) feeds each
sample to its version's window and to its arm's window over every version (slot ``all``); before the
arm's window the book cost about one ``BatchRollingMetrics.update_many``. Both are timed in alternating
rounds in this one process on the same samples (1M by default, batches of 512, windows of 100,000):
the report gives each round's cost per sample and their ratio.

    .venv/bin/python -m reloop.bench.metrics_book
    .venv/bin/python -m reloop.bench.metrics_book --samples 200000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reloop.bench.metrics_book")
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--window", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from reloop.engine.metrics.online import OnlineMetricsBook
    from reloop.engine.metrics.rolling_batch import BatchRollingMetrics

    rng = np.random.default_rng(0)
    n, b = args.samples, args.batch
    ys = (rng.random(n) < 0.2).astype(np.int64)
    ps = rng.random(n)
    arms = np.array(["a"] * b, dtype=object)
    versions = np.full(b, 3)
    corrections = np.zeros(b, dtype=bool)

    def book() -> float:
        metrics = OnlineMetricsBook(window_size=args.window)
        start = time.perf_counter()
        for i in range(0, n, b):
            k = min(b, n - i)
            metrics.update_columns(arms[:k], versions[:k], ys[i : i + k], ps[i : i + k], corrections[:k])
        metrics.get("a", 3), metrics.get_arm("a")
        return (time.perf_counter() - start) / n * 1e6

    def one_window() -> float:
        window = BatchRollingMetrics(args.window)
        start = time.perf_counter()
        for i in range(0, n, b):
            window.update_many(ys[i : i + b], ps[i : i + b])
        window.get()
        return (time.perf_counter() - start) / n * 1e6

    load = os.getloadavg()[0]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    ratios = []
    for r in range(args.rounds):
        a, w = book(), one_window()
        ratios.append(a / w)
        print(f"round {r}: book {a:.3f} us/sample, one window {w:.3f} us/sample, ratio {a / w:.2f}")
    print(
        f"median ratio {statistics.median(ratios):.2f} ({n:,} samples, batches of {b}, windows of "
        f"{args.window:,}; load {load:.1f} at the start; OMP_NUM_THREADS={threads})"
    )


if __name__ == "__main__":
    main()
