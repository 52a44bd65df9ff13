"""Figure 8: samples/s of the streaming trainer's learner step with the new defaults against the old ones.

What the stream trainer does per batch, on pre-featurised Criteo-shaped synthetic data (39 fields, ~1e6
embedding rows, bench/train_throughput.py), registry backbones at their defaults (BARS: MLP 400x3),
ReLoop loss with a y_last per sample:

* old defaults: ``predict_proba`` (scores before the update) then ``learn``; SparseAdam on the tables
  (``OptimizerConfig.previous_defaults()``);
* new defaults: ``learn_scored`` (one call: the training forward pass doubles as the scoring pass, then
  the backbone's step); Adagrad on the tables;
* per-event (opt-in, ``OptimizerConfig.per_event()``): the new defaults plus the per-event Bayesian wide
  part, a Python loop over the batch's events;
* the new defaults at ``train.batch_size``'s default (512 since it moved from 1024): what ``reloop run``
  now does out of the box, against the old defaults at 1024, which is what the issue's target compares.

All four run in the same process, rotated round by round (ABCD, BCDA, ...); a ratio is the median of
the per-round ratios to the old defaults. Torch runs with one thread (``--threads``).

    .venv/bin/python -m reloop.bench.suite_trainer [--backbones dcn deepfm] [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from reloop.bench.backbone_args import Backbones
from reloop.bench.suite import Context, Figure, Row, alternate_many

COMMAND = "python -m reloop.bench --only trainer"
TITLE = "8. Streaming trainer: new learner defaults vs the old ones"
TARGET = ">= 0.8x the old defaults' samples/s (issue 11)"


def _step_fn(
    learner: Any,
    data: tuple,
    batch_size: int,
    seconds: float,
    scored: bool,
    before: Callable[[Any, slice], None] | None = None,
):
    """A contender: steps over ``data`` for ``seconds``, returning samples/s; ``before(batch, rows)``
    runs ahead of each step, inside the timing."""
    batch, labels, y_last = data
    n = len(batch)
    state = {"offset": 0}

    def run() -> float:
        steps, t0 = 0, time.perf_counter()
        while True:
            i = state["offset"] % (n - batch_size)
            state["offset"] += batch_size
            sl = slice(i, i + batch_size)
            b = batch.take(sl)
            if before is not None:
                before(b, sl)
            if scored:
                learner.learn_scored(b, labels[sl], y_last[sl])
            else:
                learner.predict_proba(b)
                learner.learn(b, labels[sl], y_last[sl])
            steps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds and steps >= 3:
                return steps * batch_size / elapsed

    return run


def measure(
    backbones: list[str],
    batch_size: int,
    rounds: int,
    seconds: float,
    rows: int,
    threads: int,
    default_batch_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """``default_batch_size``: the batch of the fourth contender (default: ``train.batch_size``'s)."""
    import torch
    from reloop.bench.train_throughput import synthetic_criteo
    from reloop.engine.features.spec import criteo_spec
    from reloop.engine.models.config import OptimizerConfig
    from reloop.engine.models.registry import build_learner
    from reloop.engine.runtime.config import TrainSection

    default_batch_size = default_batch_size or TrainSection().batch_size
    torch.set_num_threads(threads)
    spec = criteo_spec()
    data = synthetic_criteo(spec, rows)
    out: dict[str, dict[str, Any]] = {}
    for name in backbones:
        old = build_learner(name, spec, "reloop", 0.5, seed=0, optimizer=OptimizerConfig.previous_defaults())
        new = build_learner(name, spec, "reloop", 0.5, seed=0)
        wide = build_learner(name, spec, "reloop", 0.5, seed=0, optimizer=OptimizerConfig.per_event())
        new_default = build_learner(name, spec, "reloop", 0.5, seed=0)
        load_before = os.getloadavg()[0]
        old_v, new_v, wide_v, default_v = alternate_many(
            [
                _step_fn(old, data, batch_size, seconds, scored=False),
                _step_fn(new, data, batch_size, seconds, scored=True),
                _step_fn(wide, data, batch_size, seconds, scored=True),
                _step_fn(new_default, data, default_batch_size, seconds, scored=True),
            ],
            rounds,
        )
        ratios = [a / b for a, b in zip(new_v, old_v, strict=True)]
        wide_ratios = [a / b for a, b in zip(wide_v, old_v, strict=True)]
        default_ratios = [a / b for a, b in zip(default_v, old_v, strict=True)]
        out[name] = {
            "default_batch_size": default_batch_size,
            "default": default_v,
            "default_ratio": statistics.median(default_ratios),
            "default_ratios": default_ratios,
            "new": new_v,
            "old": old_v,
            "per_event": wide_v,
            "ratio": statistics.median(ratios),
            "ratios": ratios,
            "per_event_ratio": statistics.median(wide_ratios),
            "per_event_ratios": wide_ratios,
            "load": (load_before, os.getloadavg()[0]),
        }
    return out


def run(ctx: Context) -> Figure:
    backbones = ctx.pick(["dcn", "deepfm", "fm", "lr"], ["dcn"])
    rounds = max(2, ctx.rounds)
    seconds = ctx.pick(3.0, 0.5)
    batch_size = 1024
    res = measure(backbones, batch_size, rounds, seconds, ctx.pick(200_000, 20_000), threads=1)
    rows: list[Row] = []
    lines = [
        "| backbone | old defaults samples/s | new defaults samples/s | per-round ratios new/old | ratio "
        "| per-event (opt-in) samples/s | per-round ratios per-event/old | ratio "
        "| new defaults at train.batch_size's default samples/s | per-round ratios to old at the batch above "
        "| ratio | load average before -> after |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for name, r in res.items():
        rows.append(
            Row(
                figure=f"trainer step, {name}, batch {batch_size}, new defaults",
                value=statistics.median(r["new"]),
                unit="samples/s",
                baseline_name="old defaults (predict_proba + learn, SparseAdam)",
                baseline_value=statistics.median(r["old"]),
                ratio=r["ratio"],
                target=TARGET,
                met=r["ratio"] >= 0.8,
                command=COMMAND,
            )
        )
        rows.append(
            Row(
                figure=f"trainer step, {name}, batch {batch_size}, + per-event wide part (opt-in)",
                value=statistics.median(r["per_event"]),
                unit="samples/s",
                baseline_name="old defaults (predict_proba + learn, SparseAdam)",
                baseline_value=statistics.median(r["old"]),
                ratio=r["per_event_ratio"],
                command=COMMAND,
            )
        )
        rows.append(
            Row(
                figure=f"trainer step, {name}, new defaults at batch {r['default_batch_size']} "
                f"(train.batch_size's default) vs old defaults at batch {batch_size}",
                value=statistics.median(r["default"]),
                unit="samples/s",
                baseline_name=f"old defaults (predict_proba + learn, SparseAdam), batch {batch_size}",
                baseline_value=statistics.median(r["old"]),
                ratio=r["default_ratio"],
                target=TARGET,
                met=r["default_ratio"] >= 0.8,
                command=COMMAND,
            )
        )
        lines.append(
            f"| {name} | {statistics.median(r['old']):,.0f} | {statistics.median(r['new']):,.0f} "
            f"| {', '.join(f'{x:.2f}' for x in r['ratios'])} | {r['ratio']:.2f} "
            f"| {statistics.median(r['per_event']):,.0f} "
            f"| {', '.join(f'{x:.2f}' for x in r['per_event_ratios'])} "
            f"| {r['per_event_ratio']:.2f} | {statistics.median(r['default']):,.0f} (batch "
            f"{r['default_batch_size']}) | {', '.join(f'{x:.2f}' for x in r['default_ratios'])} "
            f"| {r['default_ratio']:.2f} | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |"
        )
    notes = "\n".join(
        [
            f"Criteo-shaped synthetic stream (39 fields, ~1e6 embedding rows, pre-featurised), registry "
            f"backbones at their defaults, ReLoop alpha 0.5 with a y_last per sample, batch {batch_size}, "
            f"torch with 1 thread; {rounds} rounds of ~{seconds:g} s per contender, the four rotated in one "
            f"process. The new defaults save the separate scoring forward pass; the opt-in per-event wide "
            f"part adds a Python loop (~0.3 us per active row: ~12 us per sample with 40 rows), which "
            f"weighs most on the shallow backbones (FM, LR). The last contender is the new defaults at "
            f"train.batch_size's default, what reloop run does out of the box (smaller batches cost more "
            f"per sample).",
            "",
            *lines,
        ]
    )
    return Figure(key="trainer", title=TITLE, rows=rows, notes=notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", action=Backbones, default=["dcn", "deepfm", "fm", "lr"])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    res = measure(args.backbones, args.batch_size, args.rounds, args.seconds, args.rows, args.threads)
    for name, r in res.items():
        print(
            f"{name}: old {np.median(r['old']):,.0f}/s, new {np.median(r['new']):,.0f}/s (median ratio "
            f"{r['ratio']:.2f}), per-event {np.median(r['per_event']):,.0f}/s "
            f"(ratio {r['per_event_ratio']:.2f}), new at batch {r['default_batch_size']} "
            f"{np.median(r['default']):,.0f}/s (ratio {r['default_ratio']:.2f}); "
            f"load {r['load'][0]:.1f} -> {r['load'][1]:.1f}"
        )


if __name__ == "__main__":
    main()
