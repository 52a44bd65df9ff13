"""Two probes of the tables' Adagrad step (docs/backtest/ablation.md, "What is weak", Frappe and DeepFM).

DeepFM keeps its tables at 0.03 because 0.1 gains on Frappe and loses on MovieLens. Two ways around that
trade-off, neither of them an engine setting, so they patch the learner's table optimizer here:

* ``split``: the first-order (``linear``) table and the field embeddings at rates of their own
  (``--combos FIRST_ORDER:EMBEDDINGS,...``): which of the two tables carries the gain and the loss.
* ``accumulator``: Adagrad's initial accumulator value (torch 0, TensorFlow and Keras 0.1) at a table
  rate (``--combos RATE:ACCUMULATOR,...``): with 0 a row's first step moves each weight by the full rate.

Selection periods only, the harness's engine protocol (``learner_ablation.run_engine``), rows appended to
``--out`` in learner_ablation's CSV layout; ``--summary CSV --ref VARIANT`` prints paired differences.

    python -m reloop.bench.table_rate_probes --probe split --backbone deepfm --dataset movielens-100k \\
        --data $DATA/movielens-100k --combos 0.03:0.03,0.1:0.03,0.03:0.1,0.1:0.1 --out probes.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from reloop.bench import learner_ablation as la
from reloop.engine.models.learner import TorchLearner


@contextmanager
def split_rates(first_order: float, embeddings: float) -> Iterator[None]:
    """The table optimizer in two groups: the first-order table at ``first_order``, the rest at ``embeddings``
    (also after the learner sets its rates each step)."""
    make, set_rates = TorchLearner._make_optimizers, TorchLearner._set_rates

    def make_split(self: TorchLearner, opt: Any) -> dict[str, torch.optim.Optimizer]:
        out = make(self, opt)
        tables = out.get("embedding")
        if tables is None:
            return out
        linear = getattr(self.model, "linear", None)
        first = {id(linear.weights.table.weight)} if linear is not None else set()
        params = tables.param_groups[0]["params"]
        groups = [
            {"params": [p for p in params if id(p) in first], "lr": first_order, "probe_rate": first_order},
            {"params": [p for p in params if id(p) not in first], "lr": embeddings, "probe_rate": embeddings},
        ]
        out["embedding"] = torch.optim.Adagrad([g for g in groups if g["params"]], lr=embeddings)
        return out

    def set_split(self: TorchLearner, dense: float, tables: float) -> None:
        set_rates(self, dense, tables)
        for group in self.optimizers["embedding"].param_groups if "embedding" in self.optimizers else ():
            group["lr"] = group.get("probe_rate", group["lr"])

    TorchLearner._make_optimizers, TorchLearner._set_rates = make_split, set_split  # type: ignore[method-assign]
    try:
        yield
    finally:
        TorchLearner._make_optimizers, TorchLearner._set_rates = make, set_rates  # type: ignore[method-assign]


@contextmanager
def initial_accumulator(value: float) -> Iterator[None]:
    """The table optimizer (Adagrad) built with ``initial_accumulator_value=value``."""
    make = TorchLearner._make_optimizers

    def make_acc(self: TorchLearner, opt: Any) -> dict[str, torch.optim.Optimizer]:
        out = make(self, opt)
        tables = out.get("embedding")
        if isinstance(tables, torch.optim.Adagrad):
            group = tables.param_groups[0]
            out["embedding"] = torch.optim.Adagrad(
                group["params"], lr=group["lr"], initial_accumulator_value=value
            )
        return out

    TorchLearner._make_optimizers = make_acc  # type: ignore[method-assign]
    try:
        yield
    finally:
        TorchLearner._make_optimizers = make  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> None:
    base = {**la.BASE, **la.EMBEDDING_RATE[f"rate0.03_{args.backbone}"]}
    data = la.load(args.dataset, args.data, base["buckets"])
    last = la.selection_last_period(data)
    new_file = not args.out.exists()
    with args.out.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=la.COLUMNS)
        if new_file:
            w.writeheader()
        for combo in args.combos.split(","):
            a, b = (float(x) for x in combo.split(":"))
            if args.probe == "split":
                name, rate, patch = f"{args.backbone}_first{a:g}_emb{b:g}", b, split_rates(a, b)
            else:
                name, rate, patch = f"{args.backbone}_rate{a:g}_acc{b:g}", a, initial_accumulator(b)
            s = {**base, "opt": {"embedding_lr": rate, "small_steps_below": 0}}
            with patch:
                for seed in (int(x) for x in args.seeds.split(",")):
                    t0 = time.perf_counter()
                    rows = la.run_engine(data, s, seed, last)
                    dt = time.perf_counter() - t0
                    for r in rows:
                        w.writerow(
                            {"dataset": args.dataset, "variant": name, "seed": seed, **r, "seconds": dt}
                        )
                    fh.flush()
            print(f"{args.dataset} {name}: done", file=sys.stderr, flush=True)


def summary(path: Path, ref: str) -> str:
    """Each variant against ``ref`` per dataset: mean paired difference ×1e3, 95% half-width over seeds."""
    cells: dict[tuple[str, str], dict[tuple[int, int], tuple[float, float]]] = {}
    for r in csv.DictReader(path.open()):
        key = (int(r["seed"]), int(r["period"]))
        cells.setdefault((r["dataset"], r["variant"]), {})[key] = (float(r["auc"]), float(r["logloss"]))
    lines = ["| dataset | variant | ΔAUC ×1e3 | ΔLogLoss ×1e3 |", "| --- | --- | --- | --- |"]
    for (dataset, variant), cell in sorted(cells.items()):
        base = cells.get((dataset, ref))
        if base is None or variant == ref:
            continue
        diffs = [la._paired_interval(cell, base, m) for m in (0, 1)]
        lines.append(
            f"| {dataset} | {variant} | "
            + " | ".join(f"{mu * 1e3:+.2f} ± {h * 1e3:.2f}" for mu, h in diffs)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--probe", choices=("split", "accumulator"))
    p.add_argument("--backbone", default="deepfm", choices=la.TORCH_BACKBONES)
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--data", type=Path)
    p.add_argument("--combos", help="split: FIRST_ORDER:EMBEDDINGS,...; accumulator: RATE:ACCUMULATOR,...")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--out", type=Path)
    p.add_argument("--summary", type=Path, help="print the table of this CSV against --ref and exit")
    p.add_argument("--ref", help="--summary: the reference variant")
    args = p.parse_args(argv)
    if args.summary:
        if not args.ref:
            p.error("--summary needs --ref")
        print(summary(args.summary, args.ref))
        return 0
    if not (args.probe and args.data and args.combos and args.out):
        p.error("--probe, --data, --combos and --out are required to run a probe")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
