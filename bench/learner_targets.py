"""The issue-11 target table: the new streaming learner against its peers on the REPORTED periods.

Reads ``reloop backtest`` result CSVs and compares the streaming protocol with the new defaults (CE) with:
the per-event river LR peer, periodic retraining (new and previous learner) and streaming with the
previous learner. Differences are new minus peer, paired by seed and period (the river peer is one
deterministic run: paired by period), with 95% Student-t half-widths over seeds (per-seed means over
periods) and over periods (per-period means over seeds).

    .venv/bin/python -m reloop.bench.learner_targets --from-period 11 \\
        --new docs/backtest/movielens-streaming/results.csv \\
        --peer "periodic, new learner=docs/backtest/movielens-periodic/results.csv" \\
        --peer "streaming, previous learner=docs/backtest/previous-learner/movielens-streaming/results.csv"
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
from reloop.engine.replay.report import read_csv, t_interval

Cell = dict[tuple[int, int], tuple[float, float]]


def _cells(rows: list[dict[str, Any]], from_period: int, strategy: str) -> dict[tuple[str, str], Cell]:
    """(protocol, backbone) -> {(seed, period): (auc, logloss)} for one strategy (river: any)."""
    out: dict[tuple[str, str], Cell] = {}
    for r in rows:
        if r["period"] < from_period or (r["strategy"] != strategy and r["backbone"] != "river_lr"):
            continue
        out.setdefault((r["protocol"], r["backbone"]), {})[(r["seed"], r["period"])] = (
            r["auc"],
            r["logloss"],
        )
    return out


def paired(new: Cell, peer: Cell) -> dict[str, tuple[float, float, float, float]]:
    """metric -> (seeds mean, seeds half-width, periods mean, periods half-width) of new - peer."""
    single = len({s for s, _ in peer}) == 1 and len({s for s, _ in new}) > 1
    out = {}
    for m, metric in enumerate(("auc", "logloss")):
        d: dict[tuple[int, int], float] = {}
        for (s, p), v in new.items():
            key = (next(iter({k[0] for k in peer})), p) if single else (s, p)
            if key in peer:
                d[(s, p)] = v[m] - peer[key][m]
        seeds = sorted({s for s, _ in d})
        periods = sorted({p for _, p in d})
        by_seed = [float(np.mean([v for (s, _), v in d.items() if s == x])) for x in seeds]
        by_period = [float(np.mean([v for (_, p), v in d.items() if p == x])) for x in periods]
        out[metric] = (*t_interval(by_seed), *t_interval(by_period))
    return out


def _fmt(mean: float, half: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean * 1e3:+.2f}" + ("" if math.isnan(half) else f" ± {half * 1e3:.2f}")


def _side(mean: float, half: float, sign: float) -> str:
    if math.isnan(half):
        return "n/a"
    lo, hi = sign * mean - half, sign * mean + half
    return "better" if lo > 0 else "worse" if hi < 0 else "tie"


def _verdict(d: dict[str, tuple[float, float, float, float]]) -> str:
    """Per metric: better / tie / worse for the over-seeds and the over-periods interval."""
    out = []
    for metric, name, sign in (("auc", "AUC", 1.0), ("logloss", "LogLoss", -1.0)):
        m = d[metric]
        out.append(f"{name} {_side(m[0], m[1], sign)} / {_side(m[2], m[3], sign)}")
    return "; ".join(out)


def table(
    new_path: Path,
    peers: list[tuple[str, Path]],
    from_period: int,
    strategy: str = "ce",
    river_label: str = "river LR per event (peer)",
    river_peers: tuple[tuple[str, Path], ...] = (),
    protocol: str = "streaming",
) -> str:
    """``river_label`` names the river rows of ``new_path``; ``river_peers``: the river rows of other
    result files (another batching of the peer, say); ``protocol``: NEW's rows compared (a peer's
    backbone rows are those of its only protocol)."""
    new_rows = read_csv(new_path)
    new = _cells(new_rows, from_period, strategy)
    backbones = sorted({b for p, b in new if p == protocol and b != "river_lr"})
    lines = [
        f"New defaults, {protocol}, `{strategy}`, periods >= {from_period}; Δ = new − peer (×1e-3), 95% "
        "half-widths over seeds / over periods.",
        "",
        "| backbone | peer | peer AUC | peer LogLoss | new AUC | new LogLoss | ΔAUC (seeds) | ΔAUC (periods) "
        "| ΔLogLoss (seeds) | ΔLogLoss (periods) | new is (seeds / periods) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    river = {k: v for k, v in new.items() if k[1] == "river_lr"}
    others: list[tuple[str, dict[tuple[str, str], Cell], bool]] = [(river_label, river, True)]
    for label, path in river_peers:
        others.append((label, _cells(read_csv(path), from_period, strategy), True))
    for label, path in peers:
        others.append((label, _cells(read_csv(path), from_period, strategy), False))
    for b in backbones:
        mine = new[(protocol, b)]
        na = np.mean([v[0] for v in mine.values()])
        nl = np.mean([v[1] for v in mine.values()])
        for label, cells, is_river in others:
            want = "river_lr" if is_river else b
            peer = next((v for (_, bb), v in cells.items() if bb == want), None)
            if peer is None:
                continue
            d = paired(mine, peer)
            pa = np.mean([v[0] for v in peer.values()])
            pl = np.mean([v[1] for v in peer.values()])
            lines.append(
                f"| {b} | {label} | {pa:.4f} | {pl:.4f} | {na:.4f} | {nl:.4f} "
                f"| {_fmt(*d['auc'][:2])} | {_fmt(*d['auc'][2:])} | {_fmt(*d['logloss'][:2])} "
                f"| {_fmt(*d['logloss'][2:])} | {_verdict(d)} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--new", type=Path, required=True, help="results.csv of the streaming backtest, new defaults"
    )
    p.add_argument("--peer", action="append", default=[], metavar="LABEL=CSV")
    p.add_argument("--river", action="append", default=[], metavar="LABEL=CSV", help="another river peer")
    p.add_argument("--river-label", default="river LR per event (peer)", help="the name of NEW's river rows")
    p.add_argument("--from-period", type=int, default=1)
    p.add_argument("--strategy", default="ce")
    p.add_argument("--protocol", default="streaming", help="NEW's rows to compare: streaming or periodic")
    args = p.parse_args()
    peers = [(label, Path(path)) for label, _, path in (x.partition("=") for x in args.peer)]
    rivers = tuple((label, Path(path)) for label, _, path in (x.partition("=") for x in args.river))
    print(table(args.new, peers, args.from_period, args.strategy, args.river_label, rivers, args.protocol))


if __name__ == "__main__":
    main()
