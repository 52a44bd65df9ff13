"""A new architecture taking over: does self-correction shorten its cold start? (issue 15 item 4)

A DeepFM serves MovieLens-100K from week 0 (streaming protocol, CE, the learner defaults); what it served
in each week is its snapshot of the week before, as ``reloop run`` would log it. From week ``--start`` a
DCN starts from scratch on the same stream, trained like a shadow model from the samples topic: its
``y_last`` is the DeepFM's logged prediction (``reloop backtest --y-last logged``), for every strategy.
Each week the DCN is scored before it learns (progressive validation) and compared with CE and with
what the DeepFM served. Nothing here is tuned: the alphas are the backtests' grid and the start week is
the first reported one.

    .venv/bin/python -m reloop.bench.takeover --data ../shared/data/movielens-100k \\
        --out docs/backtest/self-correction/takeover.csv
    .venv/bin/python -m reloop.bench.takeover --summary docs/backtest/self-correction/takeover.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reloop.bench.learner_ablation import load
from reloop.engine.metrics.offline import auc, logloss
from reloop.engine.replay.backtest import BacktestData

STRATEGIES = (("ce", 0.0), ("kd", 0.2), ("kd", 0.5), ("reloop", 0.2), ("reloop", 0.5),
              ("reloop_kl", 0.2), ("reloop_kl", 0.5), ("reloop_kd", 0.2), ("reloop_kd", 0.5))  # fmt: skip
COLUMNS = ("model", "strategy", "alpha", "seed", "period", "n", "auc", "logloss")
SHAPE = {"embedding_dim": 10, "hidden_units": (64, 64)}  # as in docs/backtest
BATCH = 512


def _learner(backbone: str, data: BacktestData, strategy: str, alpha: float, seed: int) -> Any:
    from reloop.engine.models.registry import build_learner

    torch.manual_seed(seed)
    return build_learner(backbone, data.spec, strategy, alpha, seed=seed, **SHAPE)


def served_by_incumbent(data: BacktestData, seed: int) -> np.ndarray:
    """What the DeepFM served for each sample: its snapshot of the period before (NaN in period 0)."""
    learner = _learner("deepfm", data, "ce", 0.0, seed)
    served = np.full(len(data.labels), np.nan)
    snapshot = None
    for t in range(data.n_periods):
        sl = data.period(t)
        for a in range(sl.start, sl.stop, BATCH):
            idx = slice(a, min(a + BATCH, sl.stop))
            mb = data.batch.take(idx)
            if snapshot is not None:
                served[idx] = snapshot.predict_proba(mb)
            learner.learn(mb, data.labels[idx])
        snapshot = learner.clone_frozen()
    return served


def challenger(
    data: BacktestData, logged: np.ndarray, start: int, strategy: str, alpha: float, seed: int
) -> list[dict[str, Any]]:
    """A fresh DCN from period ``start``, every batch scored then learned against the logged y_last."""
    learner = _learner("dcn", data, strategy, alpha, seed)
    rows = []
    for t in range(start, data.n_periods):
        sl = data.period(t)
        probs = np.empty(sl.stop - sl.start)
        for a in range(sl.start, sl.stop, BATCH):
            idx = slice(a, min(a + BATCH, sl.stop))
            probs[a - sl.start : idx.stop - sl.start], _ = learner.learn_scored(
                data.batch.take(idx), data.labels[idx], logged[idx]
            )
        y = data.labels[sl]
        rows.append({"period": t, "n": len(y), "auc": auc(y, probs), "logloss": logloss(y, probs)})
    return rows


def summarise(path: Path, weeks: int) -> str:
    """Δ against the CE challenger (paired by seed and week, 95% t over seeds), in its first ``weeks``
    weeks and over all of them, and the weeks until it first matches what the incumbent served."""
    from reloop.engine.replay.report import t_interval

    rows = list(csv.DictReader(path.open()))
    cell: dict[tuple[str, int, int], tuple[float, float]] = {}
    for r in rows:
        cell[(r["model"] if r["model"] == "incumbent" else f"{r['strategy']}@{float(r['alpha']):g}",
              int(r["seed"]), int(r["period"]))] = (float(r["auc"]), float(r["logloss"]))  # fmt: skip
    names = list(dict.fromkeys(k[0] for k in cell))
    seeds = sorted({k[1] for k in cell})
    periods = sorted({k[2] for k in cell if k[0] != "incumbent"})
    first = periods[:weeks]

    def delta(name: str, which: list[int], m: int) -> str:
        mean, half = t_interval(
            [np.mean([cell[(name, s, p)][m] - cell[("ce@0", s, p)][m] for p in which]) for s in seeds]
        )
        return f"{1e3 * mean:+.2f} ± {1e3 * half:.2f}"

    def catch_up(name: str) -> str:
        weeks_needed = []
        for s in seeds:
            hit = [i for i, p in enumerate(periods) if cell[(name, s, p)][0] >= cell[("incumbent", s, p)][0]]
            weeks_needed.append(hit[0] + 1 if hit else np.nan)
        return f"{np.nanmean(weeks_needed):.1f}" + (" (some never)" if np.isnan(weeks_needed).any() else "")

    out = [
        f"| challenger (DCN) | AUC / LogLoss, first {weeks} weeks | ΔAUC ×1e3 first {weeks} | "
        f"ΔLogLoss ×1e3 first {weeks} | ΔAUC ×1e3 all {len(periods)} | ΔLogLoss ×1e3 all | "
        "weeks to match the incumbent's AUC |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        mean = [np.mean([cell[(name, s, p)][m] for s in seeds for p in first]) for m in (0, 1)]
        if name == "incumbent":
            out.append(f"| incumbent DeepFM (served) | {mean[0]:.4f} / {mean[1]:.4f} | | | | | |")
            continue
        out.append(
            f"| {name} | {mean[0]:.4f} / {mean[1]:.4f} | {delta(name, first, 0)} | {delta(name, first, 1)} | "
            f"{delta(name, periods, 0)} | {delta(name, periods, 1)} | {catch_up(name)} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, help="the MovieLens-100K folder")
    p.add_argument("--start", type=int, default=11, help="the week the challenger starts")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--out", type=Path, help="CSV (overwritten)")
    p.add_argument("--summary", type=Path, help="print the table of this CSV and exit")
    p.add_argument("--weeks", type=int, default=3, help="--summary: the cold-start weeks")
    args = p.parse_args(argv)
    if args.summary:
        print(summarise(args.summary, args.weeks))
        return 0
    if args.data is None or args.out is None:
        p.error("--data and --out are required (or --summary)")
    torch.set_num_threads(1)
    data = load("movielens-100k", args.data, 10_000)
    with args.out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for seed in (int(x) for x in args.seeds.split(",")):
            t0 = time.perf_counter()
            logged = served_by_incumbent(data, seed)
            for t in range(args.start, data.n_periods):
                sl = data.period(t)
                y = data.labels[sl]
                scores = {"auc": auc(y, logged[sl]), "logloss": logloss(y, logged[sl])}
                w.writerow({"model": "incumbent", "strategy": "ce", "alpha": 0.0, "seed": seed, "period": t,
                            "n": len(y), **scores})  # fmt: skip
            for strategy, alpha in STRATEGIES:
                for r in challenger(data, logged, args.start, strategy, alpha, seed):
                    w.writerow({"model": "dcn", "strategy": strategy, "alpha": alpha, "seed": seed, **r})
            fh.flush()
            print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
