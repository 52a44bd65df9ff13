"""Does the opt-in per-event part gain from learning a row before it scores the rows of the same moment?

In the streaming protocol at batches of 512 the backbone scores a whole batch before learning it, but the
per-event part (``--optimizer wide=bayes``) scores each row after learning every earlier row of the batch,
also the rows of the same event time: on Frappe the other two rows of a request (one used app and two
sampled negatives share a pseudo-time, a user and a context), on MovieLens the ratings of one second. The
river peer learns the same way (one event at a time), and scored an event time at a time it loses 15e-3
AUC on Frappe and gains 9e-3 on MovieLens's held-out weeks (docs/backtest/README.md).

This harness runs ``reloop backtest`` (streaming, CE, per-event part) twice on the same data and seeds:
``rowwise``, the engine as it ships, and ``by-time``, where the part scores every row of an event time
before it learns any of them (then learns them one at a time, as the peer does under ``--batch-by time``);
the backbone is the same in both (batches of 512). It pairs each with the other and with the river peer
scored an event time at a time, by seed and period, on the selection and the held-out periods.

    .venv/bin/python -m reloop.bench.per_event_by_time --dataset frappe --data $DATA/frappe/raw \\
        --period chunks:10 --report-from 4 --out /tmp/per-event-by-time/frappe
    .venv/bin/python -m reloop.bench.per_event_by_time --dataset movielens-100k \\
        --data $DATA/movielens-100k --period week --report-from 11 --out /tmp/per-event-by-time/movielens
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from reloop.engine.models.wide import OnlineWide
from reloop.engine.replay import backtest, backtest_cmd
from reloop.engine.replay.report import read_csv, t_interval
from reloop.engine.runtime.cli import main as reloop

_TIMES: dict[str, np.ndarray] = {}


@contextmanager
def _part_scores_by_time() -> Iterator[None]:
    """The per-event part scores each event time's rows before learning any of them (patched in)."""
    batches, learn = backtest.stream_batches, OnlineWide.learn

    def stream_batches(times_ms: np.ndarray, size: int, by: str = "count") -> Iterator[slice]:
        for b in batches(times_ms, size, by):
            _TIMES["batch"] = times_ms[b]
            yield b

    def by_time(self: OnlineWide, batch: Any, deep: Any, labels: Any, loss: Any, y_last: Any = None,
                weights: Any = None, score_deep: Any = None) -> np.ndarray:  # fmt: skip
        times = _TIMES["batch"]
        assert len(times) == len(batch), "the part learns a batch the stream did not cut"
        cuts = [0, *(np.flatnonzero(np.diff(times)) + 1).tolist(), len(times)]
        scored = np.asarray(deep if score_deep is None else score_deep)
        out = np.empty(len(batch))

        def part(x: Any, sl: slice) -> Any:
            return None if x is None else np.asarray(x)[sl]

        for a, e in pairwise(cuts):
            sl = slice(a, e)
            rows = batch.take(sl)
            out[sl] = self.logits(rows, scored[sl])  # every row of this moment, before any is learned
            learn(self, rows, part(deep, sl), part(labels, sl), loss, part(y_last, sl), part(weights, sl),
                  part(score_deep, sl))  # fmt: skip
        return out

    backtest.stream_batches, OnlineWide.learn = stream_batches, by_time  # type: ignore[method-assign]
    try:
        yield
    finally:
        backtest.stream_batches, OnlineWide.learn = batches, learn  # type: ignore[method-assign]


def _cells(path: Path) -> dict[tuple[str, int, int], tuple[float, float]]:
    return {(r["backbone"], r["seed"], r["period"]): (r["auc"], r["logloss"]) for r in read_csv(path)}


def _pair(a: dict, b: dict, backbone: str, periods: range) -> str:
    """a's AUC / LogLoss, then a − b: mean ×1e3 ± 95% half-width over seeds / over periods, each metric."""
    keys = [k for k in a if k[0] == backbone and k[2] in periods]
    level = [float(np.mean([a[k][m] for k in keys])) for m in (0, 1)]
    out = [f"{level[0]:.4f} / {level[1]:.4f}"]
    for m in (0, 1):
        d = {k: a[k][m] - _of(b, k)[m] for k in keys}
        by_seed = [np.mean([v for k, v in d.items() if k[1] == s]) for s in sorted({k[1] for k in keys})]
        by_period = [np.mean([v for k, v in d.items() if k[2] == p]) for p in sorted({k[2] for k in keys})]
        (mean, hs), (_, hp) = t_interval(by_seed), t_interval(by_period)
        out.append(f"{mean * 1e3:+.2f} ± {hs * 1e3:.2f} / {hp * 1e3:.2f}")
    return " | ".join(out)


def _of(b: dict, k: tuple[str, int, int]) -> tuple[float, float]:
    """b's cell for key k; the peer (one run, backbone "peer", seed 0) pairs by period alone."""
    return b[k] if k in b else b[("peer", 0, k[2])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--period", required=True)
    ap.add_argument("--report-from", type=int, required=True, help="the first held-out period")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    common = [
        *("backtest", "--dataset", args.dataset, "--data", args.data, "--period", args.period),
        *("--report-from", str(args.report_from), "--protocols", "streaming", "--strategies", "ce"),
        *("--backbones", "dcn,deepfm", "--seeds", str(args.seeds), "--optimizer", "wide=bayes"),
        *("--buckets", "10000", "--embedding-dim", "10", "--hidden-units", "64,64", "--batch-size", "512"),
        "--no-river",
    ]
    for mode in ("rowwise", "by-time"):
        out = args.out / mode
        if (out / "results.csv").exists():
            continue
        if mode == "by-time":
            with _part_scores_by_time():
                assert reloop([*common, "--out", str(out), "--title", mode]) == 0
        else:
            assert reloop([*common, "--out", str(out), "--title", mode]) == 0
    parser = argparse.ArgumentParser()
    backtest_cmd.configure(parser)
    data, _ = backtest_cmd.load_data(parser.parse_args(common[1:] + ["--out", str(args.out)]))
    peer = {
        ("peer", 0, r["period"]): (r["auc"], r["logloss"])
        for r in backtest.run_river_baseline(data, batch_by="time", batch_size=512)
    }
    rowwise = _cells(args.out / "rowwise" / "results.csv")
    by_time = _cells(args.out / "by-time" / "results.csv")
    print("first's AUC / LogLoss | ΔAUC | ΔLogLoss (×1e3, mean ± 95% half-width over seeds / over periods)")
    held_out = range(args.report_from, data.n_periods)
    for name, periods in (("selection", range(1, args.report_from)), ("held-out", held_out)):
        for bb in ("dcn", "deepfm"):
            print(f"{name} {bb}: by-time − rowwise {_pair(by_time, rowwise, bb, periods)}")
            print(f"{name} {bb}: by-time − peer by time {_pair(by_time, peer, bb, periods)}")
            print(f"{name} {bb}: rowwise − peer by time {_pair(rowwise, peer, bb, periods)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
