"""ReLoop2's error memory on a real stream: memory on vs off, settings chosen on the first third.

    .venv/bin/python -m reloop.bench.reloop2_backtest --data ../shared/data/movielens-100k \\
        --out docs/backtest/reloop2

One streaming run (engine/replay/backtest.py) per backbone x strategy x seed; every memory variant of
the grid below is scored on the same run (the memory never touches training), so each is paired with
its base model exactly. Two base models:

* ``live``: the learner itself, the streaming protocol's model (progressive validation);
* ``snapshot``: the frozen model of the last period boundary, what ``reloop serve`` serves; its memory
  is emptied at every new snapshot, as in serving.

Per (backbone, strategy, base) the variant with the best mean AUC over the SELECTION periods (1 ..
``--select-until``; period 0 is warm-up) and seeds is chosen, and reported on the later periods only,
as a paired difference against its base with 95% Student-t half-widths over seeds (per-seed means over
periods) and over periods (per-period means over seeds). The variant best by LogLoss on the selection
periods is reported too.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from reloop.engine.memory.stream_eval import MemorySpec
from reloop.engine.replay.backtest import BacktestData, RunSpec, Strategy, run_streaming

LAMS = (0.05, 0.1, 0.2, 0.3, 0.5)
LAYOUTS = ((4, 6), (4, 10), (8, 8), (16, 12), (32, 12), (16, 16))  # (tables, bits)


def grid() -> tuple[MemorySpec, ...]:
    snapshot = [
        MemorySpec(n_tables=k, n_bits=b, prior_count=p, form=f, lams=LAMS, key="snapshot")
        for f in ("residual", "label")
        for k, b in LAYOUTS
        for p in (10.0, 50.0, 200.0)
    ]
    live = [
        MemorySpec(n_tables=k, n_bits=b, prior_count=p, form=f, lams=LAMS, key="live", reset=r)
        for f in ("residual", "label")
        for k, b in ((4, 10), (16, 12))
        for p in (10.0, 50.0)
        for r in ("snapshot", "never")
    ]
    return (*snapshot, *live)


_DATA: BacktestData | None = None


def _init(data: BacktestData) -> None:
    import torch

    global _DATA
    _DATA = data
    torch.set_num_threads(1)


def _work(run: RunSpec) -> list[dict[str, Any]]:
    assert _DATA is not None
    return run_streaming(_DATA, run)


def load(path: Path, buckets: int) -> BacktestData:
    from reloop.engine.replay.backtest_cmd import configure, load_data

    # The backtest's own parser: its defaults for every option this script does not set (a namespace
    # built by hand missed each option added to load_data since, and the script failed before reading).
    parser = argparse.ArgumentParser()
    configure(parser)
    given = ["--dataset", "movielens-100k", "--data", str(path), "--buckets", str(buckets)]
    ns = parser.parse_args([*given, "--period", "week", "--min-period-size", "500", "--out", "unused"])
    return load_data(ns)[0]


FIELDS = ("backbone", "strategy", "base", "variant", "seed", "period", "n", "auc", "logloss")


def _base_of(name: str, strategy: str) -> tuple[str, str]:
    """(base model, variant) of a row's strategy name ``<strategy>[+snapshot][+mem...]``."""
    rest = name[len(strategy) :].lstrip("+")
    if rest.startswith("snapshot"):
        return "snapshot", rest[len("snapshot") :].lstrip("+") or "off"
    return "live", rest or "off"


def run_all(args: argparse.Namespace) -> Path:
    data = load(args.data, args.buckets)
    print(f"{len(data.labels)} samples, {data.n_periods} periods", file=sys.stderr)
    if data.n_periods <= args.select_until + 1:
        raise SystemExit(
            f"reloop2_backtest: {data.n_periods} period(s): --select-until {args.select_until} leaves "
            f"none to report on (period 0 is warm-up, 1..{args.select_until} choose the settings)"
        )
    runs = [
        RunSpec(
            "streaming",
            backbone,
            Strategy(*strategy),
            seed,
            batch_size=512,
            model_options=(("hidden_units", (64, 64)), ("embedding_dim", 10)),
            memory=grid(),
        )
        for backbone in args.backbones.split(",")
        for strategy in (("ce", 0.0), ("reloop", 0.2))[: 2 if args.with_reloop else 1]
        for seed in range(args.seeds)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.csv"
    t0 = time.perf_counter()
    with (
        open(path, "w", newline="") as f,
        ProcessPoolExecutor(args.workers, initializer=_init, initargs=(data,)) as ex,
    ):
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for run, rows in zip(runs, ex.map(_work, runs), strict=True):
            for r in rows:
                base, variant = _base_of(r["strategy"], run.strategy.name)
                w.writerow(
                    {
                        "backbone": r["backbone"],
                        "strategy": run.strategy.name,
                        "base": base,
                        "variant": variant,
                        "seed": r["seed"],
                        "period": r["period"],
                        "n": r["n"],
                        "auc": f"{r['auc']:.6f}",
                        "logloss": f"{r['logloss']:.6f}",
                    }
                )
            f.flush()
            print(
                f"{run.backbone} {run.strategy.name} seed {run.seed}: {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
            )
    (args.out / "wall.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
    return path


def _half(x: np.ndarray) -> float:
    from scipy import stats

    if len(x) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def summarise(path: Path, select_until: int) -> tuple[list[dict[str, Any]], dict]:
    """Per (backbone, strategy, base): the chosen variants and their held-out paired differences."""
    # cell[(bb, strat, base)][variant][(seed, period)] = (auc, logloss)
    cell: dict = defaultdict(lambda: defaultdict(dict))
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (r["backbone"], r["strategy"], r["base"])
            cell[key][r["variant"]][(int(r["seed"]), int(r["period"]))] = (
                float(r["auc"]),
                float(r["logloss"]),
            )
    out = []
    for key, variants in sorted(cell.items()):
        off = variants["off"]

        def score(v: str, metric: int, sel: bool, variants: dict = variants) -> float:
            vals = [x[metric] for (s, p), x in variants[v].items() if (p <= select_until) == sel]
            return float(np.mean(vals))

        cands = [v for v in variants if v != "off"]
        best_auc = max(cands, key=lambda v: score(v, 0, True))
        best_ll = min(cands, key=lambda v: score(v, 1, True))
        for pick, v in (("AUC", best_auc), ("LogLoss", best_ll)):
            held = sorted(k for k in off if k[1] > select_until)
            seeds = sorted({s for s, _ in held})
            periods = sorted({p for _, p in held})
            d = {m: np.array([variants[v][k][m] - off[k][m] for k in held]) for m in (0, 1)}
            idx = {k: i for i, k in enumerate(held)}
            row = {
                "backbone": key[0],
                "strategy": key[1],
                "base": key[2],
                "chosen by": pick,
                "variant": v,
                "sel_dauc": 1e3 * (score(v, 0, True) - score("off", 0, True)),
                "base_auc": float(np.mean([off[k][0] for k in held])),
                "base_ll": float(np.mean([off[k][1] for k in held])),
            }
            for m, name in ((0, "auc"), (1, "ll")):
                per_seed = np.array([np.mean([d[m][idx[k]] for k in held if k[0] == s]) for s in seeds])
                per_period = np.array([np.mean([d[m][idx[k]] for k in held if k[1] == p]) for p in periods])
                row[f"d{name}"] = 1e3 * per_seed.mean()
                row[f"d{name}_seeds"] = 1e3 * _half(per_seed)
                row[f"d{name}_periods"] = 1e3 * _half(per_period)
                row[f"{name}_better_seeds"] = (
                    f"{int(((per_seed > 0) if m == 0 else (per_seed < 0)).sum())}/{len(seeds)}"
                )
            out.append(row)
    return out, cell


def _fmt(x: float) -> str:
    return f"{x:+.2f}"


def write_report(args: argparse.Namespace, argv: list[str]) -> None:
    rows, _ = summarise(args.out / "results.csv", args.select_until)
    wall = (args.out / "wall.txt").read_text().strip() if (args.out / "wall.txt").exists() else "?"
    lines = [
        "# ReLoop2 error memory on MovieLens-100K (streaming, weekly snapshots)",
        "",
        f"Command: `.venv/bin/python -m reloop.bench.reloop2_backtest {shlex.join(argv)}` "
        "(data path as on the machine that ran it)",
        "",
        f"- wall time {wall} s, {args.workers} worker process(es), 1 torch thread each, on a shared 2-core "
        f"machine (load average {args.load or '?'} while it ran)",
        "- DCN and DeepFM, MLP 64,64, embedding dim 10, 10,000 hash buckets per field, batch 512, learner "
        "defaults (Adam 1e-3 dense, Adagrad 0.03 embeddings); y_last = the snapshot's prediction",
        f"- memory settings chosen on periods 1-{args.select_until} (period 0 is warm-up); every number "
        f"below is on periods {args.select_until + 1}-30",
        "- grid: form residual / label, (tables, bits) in "
        + ", ".join(f"({k}, {b})" for k, b in LAYOUTS)
        + ", prior count 10 / 50 / 200 (live: 10 / 50), lambda in "
        + ", ".join(f"{x:g}" for x in LAMS)
        + "; live base also with reset never (engine/memory/sketch.py, stream_eval.py)",
        "",
        "Δ = memory on − memory off, same run (paired exactly), units of 1e-3, mean ± 95% half-width over "
        "the seeds (per-seed means over periods) and over the periods (per-period means over seeds).",
        "",
        "| backbone | strategy | base model | chosen by | variant | base AUC / LogLoss | ΔAUC (seeds) "
        "| ΔAUC (periods) | ΔLogLoss (seeds) | ΔLogLoss (periods) | seeds better AUC / LL |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['strategy']} | {r['base']} | {r['chosen by']} | {r['variant']} | "
            f"{r['base_auc']:.4f} / {r['base_ll']:.4f} | {_fmt(r['dauc'])} ± {r['dauc_seeds']:.2f} | "
            f"± {r['dauc_periods']:.2f} | {_fmt(r['dll'])} ± {r['dll_seeds']:.2f} | "
            f"± {r['dll_periods']:.2f} | "
            f"{r['auc_better_seeds']} / {r['ll_better_seeds']} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    with open(args.out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the movielens-100k folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbones", default="dcn,deepfm")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--with-reloop", action=argparse.BooleanOptionalAction, default=True,
                   help="also ReLoop alpha 0.2 (train time) + the memory (serve time)")  # fmt: skip
    p.add_argument("--buckets", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--select-until", type=int, default=10)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--load", default="", help="load average to print in the report")
    args = p.parse_args(argv)
    if not args.report_only:
        run_all(args)
    if not args.load:
        args.load = f"{os.getloadavg()[0]:.1f}"
    write_report(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
