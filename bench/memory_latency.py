"""What the error memory adds to serving latency: one request of 100 candidates, memory on vs off.

    .venv/bin/python -m reloop.bench.memory_latency --out docs/backtest/reloop2/serving-latency.md

Same process, same bundle (DCN, MLP 400,400,400, embedding dim 10, 8 fields: the BARS settings), same
requests, the two paths interleaved request by request so that load on the machine hits both alike:

* off: ``bundle.score_request`` (what a request without memory does);
* on: ``memory.score(bundle, bundle.request_batch(...))`` (one forward for the prediction and the key,
  then the sketch's read and correction), with a memory holding 20,000 samples.

Also timed alone: the sketch's part (hashing 100 keys, reading, correcting), which is the memory's own
cost without the forward pass it shares with the model.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from reloop.bench.report import publish
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.memory.served import ServedMemory, predict_and_hidden
from reloop.engine.memory.sketch import SketchConfig
from reloop.engine.models.registry import build_learner
from reloop.engine.serve.bundle import ModelBundle

FIELDS = [f"f{i}" for i in range(8)]


def _pct(x: list[float], q: float) -> float:
    return float(np.percentile(np.array(x) * 1e3, q))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (serve.torch_threads)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = FeatureSpec.model_validate(
        {"fields": [{"kind": "categorical", "name": f, "buckets": 100_000} for f in FIELDS]}
    )
    learner = build_learner("dcn", spec, "ce", 0.0, seed=0)
    bundle = ModelBundle(version=1, learner=learner.clone_frozen(), featurizer=Featurizer(spec))
    rng = np.random.default_rng(0)

    def request() -> tuple[dict, list[dict]]:
        ctx = {f: f"v{rng.integers(1000)}" for f in FIELDS[:4]}
        return ctx, [{f: f"v{rng.integers(100_000)}" for f in FIELDS[4:]} for _ in range(args.candidates)]

    memory = ServedMemory(SketchConfig(n_tables=16, n_bits=12, lam=0.3, prior_count=50))
    for _ in range(20):  # 20,000 joined samples
        ctx, cands = request()
        rows = [{**ctx, **c} for c in cands] * 10
        memory.write(bundle, bundle.featurizer.transform(rows), rng.integers(0, 2, len(rows)).astype(float))
    off: list[float] = []
    on: list[float] = []
    sketch_only: list[float] = []
    reqs = [request() for _ in range(200)]
    for i in range(args.requests + 200):
        ctx, cands = reqs[i % len(reqs)]
        t0 = time.perf_counter()
        bundle.score_request(ctx, cands)
        t1 = time.perf_counter()
        memory.score(bundle, bundle.request_batch(ctx, cands))
        t2 = time.perf_counter()
        base, keys = predict_and_hidden(bundle.learner, bundle.request_batch(ctx, cands))
        t3 = time.perf_counter()
        assert memory.sketch is not None
        memory.sketch.correct(base, keys)
        t4 = time.perf_counter()
        if i >= 200:  # warm-up
            off.append(t1 - t0)
            on.append(t2 - t1)
            sketch_only.append(t4 - t3)
    load = os.getloadavg()
    lines = [
        "# Serving latency of the error memory (100 candidates)",
        "",
        f"Command: `.venv/bin/python -m reloop.bench.memory_latency {shlex.join(argv)}`",
        "",
        f"- {args.requests} requests of {args.candidates} candidates per path, interleaved, after 200 "
        "warm-up; "
        f"{args.threads} torch thread(s); shared 2-core machine, load average {load[0]:.1f} / {load[1]:.1f} "
        "(1 / 5 min) at the end",
        "- DCN (MLP 400,400,400, 3 cross layers, embedding dim 10), 8 categorical fields; memory 16 tables x "
        "2^12 buckets holding 20,000 samples",
        "",
        "| path | p50 ms | p90 ms | p99 ms |",
        "| --- | --- | --- | --- |",
    ]
    for name, x in (("memory off (score_request)", off), ("memory on (score with memory)", on),
                    ("the sketch alone (hash 100 keys, read, correct)", sketch_only)):  # fmt: skip
        lines.append(f"| {name} | {_pct(x, 50):.3f} | {_pct(x, 90):.3f} | {_pct(x, 99):.3f} |")
    added = _pct(on, 99) - _pct(off, 99)
    lines += [
        "",
        f"Added p99 (on − off): {added:+.3f} ms; the sketch's own p99: {_pct(sketch_only, 99):.3f} ms.",
    ]
    return publish(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
