"""What click counters cost the trainer step: samples/s with and without them, in the same process.

Criteo-shaped synthetic stream (bench/train_throughput.py: 39 fields, pre-featurised), registry
backbones at their defaults, ReLoop alpha 0.5, ``learn_scored`` as the stream trainer calls it. Three
contenders, rotated round by round (ABC, BCA, ...):

* ``plain``: the learner on the spec as it is;
* ``counter inputs``: the spec with the counters' dense fields appended (by default two counted fields,
  lifetime and one window: 8 more inputs; ``--counters C1,C2,C1*C2`` adds their cross: 12), their
  values precomputed: what the model pays for reading them;
* ``counter inputs + counting``: the same, plus what keeping the counts costs per batch (reading the
  batch's values, then counting its impressions and its clicks, ``engine/features/counters.py``): what
  a loop that counts as it trains would add.

    .venv/bin/python -m reloop.bench.counters_throughput [--backbones dcn deepfm] [--rounds 5] [--seconds 3]
        [--counters C1,C2]
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import numpy as np
from reloop.bench.backbone_args import Backbones
from reloop.bench.suite import alternate_many
from reloop.bench.suite_trainer import _step_fn

COUNTED = ("C1", "C2")  # two high-cardinality fields of the Criteo layout
WINDOWS_S = (600.0,)


def _with_counter_inputs(
    spec: Any, data: tuple, seed: int = 0, counted: tuple[str, ...] = COUNTED
) -> tuple[Any, tuple, Any]:
    """The spec with the counters' fields, the data with plausible values for them, and the counters."""
    from reloop.engine.features.counters import ClickCounters
    from reloop.engine.features.featurizer import FeatureBatch
    from reloop.engine.features.spec import FeatureSpec

    counters = ClickCounters(spec, counted, 5.0, WINDOWS_S)
    batch, labels, y_last = data
    values = np.random.default_rng(seed).normal(0.0, 1.0, (len(batch), counters.n_columns)).astype(np.float32)
    wider = FeatureBatch(
        cat=batch.cat,
        num=np.concatenate([batch.num, values], 1),
        multi=batch.multi,
        multi_mask=batch.multi_mask,
    )
    return FeatureSpec(fields=(*spec.fields, *counters.spec_fields())), (wider, labels, y_last), counters


def _counting(counters: Any, labels: np.ndarray) -> Any:
    """What a loop that counts as it trains adds ahead of each step: read the batch's counter values,
    then count its impressions and its clicks (a second of event time per step)."""
    state = {"now": 0.0}

    def count(batch: Any, rows: slice) -> None:
        state["now"] += 1_000.0
        counters.values(batch, state["now"])
        counters.count_shown(batch, state["now"])
        counters.count_clicks(batch, labels[rows], state["now"])

    return count


def measure(
    backbones: list[str],
    batch_size: int,
    rounds: int,
    seconds: float,
    rows: int,
    counted: tuple[str, ...] = COUNTED,
) -> dict[str, Any]:
    import torch
    from reloop.bench.train_throughput import synthetic_criteo
    from reloop.engine.features.spec import criteo_spec
    from reloop.engine.models.registry import build_learner

    torch.set_num_threads(1)
    spec = criteo_spec()
    data = synthetic_criteo(spec, rows)
    wide_spec, wide_data, counters = _with_counter_inputs(spec, data, counted=counted)
    out: dict[str, Any] = {}
    for name in backbones:
        plain = build_learner(name, spec, "reloop", 0.5, seed=0)
        inputs = build_learner(name, wide_spec, "reloop", 0.5, seed=0)
        counted = build_learner(name, wide_spec, "reloop", 0.5, seed=0)
        load = os.getloadavg()[0]
        a, b, c = alternate_many(
            [
                _step_fn(plain, data, batch_size, seconds, scored=True),
                _step_fn(inputs, wide_data, batch_size, seconds, scored=True),
                _step_fn(counted, wide_data, batch_size, seconds, True, _counting(counters, wide_data[1])),
            ],
            rounds,
        )
        out[name] = {
            "plain": a,
            "inputs": b,
            "counting": c,
            "inputs_ratio": statistics.median(x / y for x, y in zip(b, a, strict=True)),
            "counting_ratio": statistics.median(x / y for x, y in zip(c, a, strict=True)),
            "load": (load, os.getloadavg()[0]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", action=Backbones, default=["dcn", "deepfm"])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--counters", default=",".join(COUNTED), help="counted fields and crosses (F or A*B)")
    args = parser.parse_args()
    counted = tuple(args.counters.split(","))
    res = measure(args.backbones, args.batch_size, args.rounds, args.seconds, args.rows, counted)
    print("| backbone | plain samples/s | + counter inputs | ratio | + inputs and counting | ratio | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in res.items():
        print(
            f"| {name} | {statistics.median(r['plain']):,.0f} | {statistics.median(r['inputs']):,.0f} "
            f"| {r['inputs_ratio']:.2f} | {statistics.median(r['counting']):,.0f} "
            f"| {r['counting_ratio']:.2f} | {r['load'][0]:.1f} -> {r['load'][1]:.1f} |"
        )
    print(
        f"batch {args.batch_size}, torch 1 thread, {args.rounds} rounds of ~{args.seconds:g} s per "
        f"contender; counters of {', '.join(counted)}, lifetime and a 600-s window"
    )


if __name__ == "__main__":
    main()
