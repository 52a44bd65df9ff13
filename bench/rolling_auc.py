"""Rolling AUC cost per sample, window 100k by default, in two reading patterns.

Ways to track the AUC of the last N labelled samples:

* sorted: ``reloop.engine.metrics.online.RollingBinaryMetrics`` (exact AUC + LogLoss + calibration; sorted
  lists + Mann-Whitney U kept up to date, so update/revert are O(log N) and get is O(1));
* batch: ``reloop.engine.metrics.rolling_batch.BatchRollingMetrics`` (same results; numpy sorted arrays,
  updates buffered and applied 1024 at a time; a read flushes the buffer, O(N));
* river: ``river.metrics.RollingROCAUC`` (update buffers, get walks the window);
* numpy: a ring buffer and a full mid-rank recompute on every read.

Scenario "every": update + get after every sample (what a per-sample dashboard would cost).
Scenario "batch": update every sample, read once per 1024 samples (the engine's pattern: a
mini-batch, or a scrape every few seconds).

All are first filled to a full window, then timed in alternating rounds in this one process
(the machine's speed drifts between processes); the report gives the median per-sample cost per
method and the median of the per-round ratios against "sorted". The final AUCs are cross-checked.

    .venv/bin/python -m reloop.bench.rolling_auc                 # window 100k
    .venv/bin/python -m reloop.bench.rolling_auc --window 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from reloop.engine.metrics.offline import auc
from reloop.engine.metrics.online import RollingBinaryMetrics
from reloop.engine.metrics.rolling_batch import BatchRollingMetrics
from river.metrics import RollingROCAUC


def stream(n: int, seed: int) -> tuple[list[int], list[float]]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    # Scores rounded to 4 decimals: realistic ties, and a real signal (AUC ~0.76).
    p = np.round(1 / (1 + np.exp(-(1.0 * y + rng.normal(size=n) - 1.5))), 4)
    return y.tolist(), p.tolist()


class NumpyRecompute:
    def __init__(self, window: int) -> None:
        self.y = np.zeros(window, dtype=np.int8)
        self.p = np.zeros(window)
        self.n = 0
        self.window = window

    def update(self, y: int, p: float) -> None:
        i = self.n % self.window
        self.y[i] = y
        self.p[i] = p
        self.n += 1

    def get(self) -> float:
        k = min(self.n, self.window)
        return auc(self.y[:k], self.p[:k])  # the offline mid-rank AUC over the window


def timed(update, get, ys, ps, read_every: int) -> float:
    t0 = time.perf_counter()
    for i, (y, p) in enumerate(zip(ys, ps, strict=True)):
        update(y, p)
        if i % read_every == read_every - 1:
            get()
    return (time.perf_counter() - t0) / len(ys)


def scenario(name: str, methods: dict, ys, ps, pos: int, rounds: int, read_every: int) -> int:
    """Time each method on its own slice, alternating; feed every slice to all methods."""
    cost: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m, (obj_update, obj_get, n) in methods.items():
            sl = slice(pos, pos + n)
            cost[m].append(timed(obj_update, obj_get, ys[sl], ps[sl], read_every))
            for other, (u, _g, _n) in methods.items():
                if other != m:
                    for y, p in zip(ys[sl], ps[sl], strict=True):
                        u(y, p)
            pos += n
    print(f"\nscenario {name}: read after every {read_every} sample(s)")
    print(f"{'method':8} {'us/sample':>12} {'x sorted (median of rounds)':>29}")
    for m in methods:
        med = statistics.median(cost[m]) * 1e6
        ratio = statistics.median(c / o for c, o in zip(cost[m], cost["sorted"], strict=True))
        print(f"{m:8} {med:12.2f} {ratio:29.2f}")
    return pos


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sorted-per-round", type=int, default=20_000)
    ap.add_argument("--river-per-round", type=int, default=300)
    ap.add_argument("--numpy-per-round", type=int, default=100)
    ap.add_argument("--batch-per-round", type=int, default=50_000)
    args = ap.parse_args(argv)

    per_round_every = args.sorted_per_round + args.river_per_round + args.numpy_per_round
    per_round_batch = args.sorted_per_round + 3 * args.batch_per_round
    total = args.window + args.rounds * (per_round_every + per_round_batch)
    ys, ps = stream(total, seed=0)
    sorted_ = RollingBinaryMetrics(args.window)
    batch = BatchRollingMetrics(args.window)
    river = RollingROCAUC(window_size=args.window)
    numpy_ = NumpyRecompute(args.window)

    fill: dict[str, float] = {}
    for name, obj in (("sorted", sorted_), ("batch", batch), ("river", river), ("numpy", numpy_)):
        t0 = time.perf_counter()
        for y, p in zip(ys[: args.window], ps[: args.window], strict=True):
            obj.update(y, p)
        fill[name] = time.perf_counter() - t0
    batch.flush()
    print(f"window={args.window} rounds={args.rounds} (alternating, same process)")
    print("fill to a full window (update only, us/sample): "
          + ", ".join(f"{k}={v / args.window * 1e6:.2f}" for k, v in fill.items()))

    pos = scenario("every", {
        "sorted": (sorted_.update, sorted_.auc.get, args.sorted_per_round),
        "batch": (batch.update, lambda: batch.auc, args.numpy_per_round),
        "river": (river.update, river.get, args.river_per_round),
        "numpy": (numpy_.update, numpy_.get, args.numpy_per_round),
    }, ys, ps, args.window, args.rounds, read_every=1)
    scenario("batch", {
        "sorted": (sorted_.update, sorted_.auc.get, args.sorted_per_round),
        "batch": (batch.update, lambda: batch.auc, args.batch_per_round),
        "river": (river.update, river.get, args.batch_per_round),
        "numpy": (numpy_.update, numpy_.get, args.batch_per_round),
    }, ys, ps, pos, args.rounds, read_every=1024)

    final = {"sorted": sorted_.auc.get(), "batch": batch.auc, "river": river.get(), "numpy": numpy_.get()}
    print("\nfinal AUC: " + ", ".join(f"{k}={v:.6f}" for k, v in final.items()))
    exact = max(abs(final[k] - final["numpy"]) for k in ("sorted", "batch"))
    river_gap = abs(final["sorted"] - final["river"])
    print(f"max |ours - numpy mid-rank recompute| = {exact:.1e}; "
          f"|ours - river| = {river_gap:.1e} (river treats tied scores differently)")
    return 0 if exact < 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
