"""What click counters add to serving: one request of 100 candidates through the scoring service, counters
on vs off, and the feed's rate of counting clicks.

    .venv/bin/python -m reloop.bench.counters_latency --out docs/bench-counters-serving.md

Same process, same model (DCN, MLP 400,400,400, embedding dim 10, 8 categorical fields of 100,000 buckets:
the BARS settings, a multi-valued ``tags`` field of 1-3 values per candidate, plus the counter inputs of
``--counters``, lifetime and one 600-s window: by default two fields, 8 dense inputs; ``f0,f4,f0*tags``
adds a cross with the multi-valued field), same requests, the two arms interleaved request by request so
that load on the machine hits both alike:

* off: an arm without counters (the model's counter inputs take their fill value);
* on: an arm with counters (``arms[].counters``): featurise, read and write the counter inputs, score,
  count the 10 shown items, log the values with each impression (to a logger that keeps nothing).

Timed apart: the feed's side, ``ServedCounters.write`` of samples-topic batches of 500 (half clicks).
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
from reloop.engine.features.counters import CounterSettings, with_counter_fields
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.memory.served_counters import ServedCounters
from reloop.engine.models.registry import build_learner
from reloop.engine.serve.arms import ArmRouter
from reloop.engine.serve.bundle import ModelBundle, ModelHolder
from reloop.engine.serve.schema import ScoreRequest
from reloop.engine.serve.service import ArmRuntime, ScoringService

FIELDS = [f"f{i}" for i in range(8)]
COUNTED = "f0,f4"  # a context field, a candidate field; f0*tags: a cross with a multi-valued field


class _Discard:
    def log(self, impressions: list) -> int:
        return len(impressions)


def _pct(x: list[float], q: float) -> float:
    return float(np.percentile(np.array(x) * 1e3, q))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the report here (else stdout only)")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (serve.torch_threads)")
    ap.add_argument("--counters", default=COUNTED, help="counted fields and crosses (FIELD or A*B, ...)")
    args = ap.parse_args(argv)
    settings = CounterSettings(fields=tuple(args.counters.split(",")), windows_s=(600.0,))
    torch.set_num_threads(args.threads)
    base = FeatureSpec.model_validate(
        {
            "fields": [
                *({"kind": "categorical", "name": f, "buckets": 100_000} for f in FIELDS),
                {"kind": "multi", "name": "tags", "buckets": 1000, "max_len": 4},
            ]
        }
    )
    spec = with_counter_fields(base, settings)
    learner = build_learner("dcn", spec, "ce", 0.0, seed=0)
    bundle = ModelBundle(version=1, learner=learner.clone_frozen(), featurizer=Featurizer(spec))
    counters = ServedCounters(settings)
    services = {
        name: ScoringService(
            router=ArmRouter([("A", 1.0)], salt="b"),
            arms={"A": ArmRuntime("A", ModelHolder(bundle), logger=_Discard(), counters=c)},
            top_k=10,
        )
        for name, c in (("off", None), ("on", counters))
    }
    rng = np.random.default_rng(0)

    def request(i: int) -> ScoreRequest:
        ctx = {f: f"v{rng.integers(1000)}" for f in FIELDS[:4]}
        cands = [
            {
                "item_id": f"c{j}",
                "features": {
                    **{f: f"v{rng.integers(100_000)}" for f in FIELDS[4:]},
                    "tags": [f"t{t}" for t in rng.integers(1000, size=int(rng.integers(1, 4)))],
                },
            }
            for j in range(args.candidates)
        ]
        return ScoreRequest.model_validate(
            {"request_id": f"r{i}", "user_id": ctx["f0"], "context": ctx, "candidates": cands}
        )

    reqs = [request(i) for i in range(200)]
    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.requests + 200):
        r = reqs[i % len(reqs)]
        for name in ("off", "on") if i % 2 else ("on", "off"):  # alternate which goes first
            t0 = time.perf_counter()
            services[name].score(r)
            if i >= 200:  # warm-up
                times[name].append(time.perf_counter() - t0)

    # The feed's side: batches of 500 joined samples, half of them clicks.
    batch = bundle.featurizer.transform([{**r.context, **c.features} for r in reqs[:5] for c in r.candidates])
    labels = (np.arange(len(batch)) % 2).astype(np.float64)
    shown = np.full(len(batch), float(time.time_ns() // 1_000_000))
    rounds, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        counters.write(bundle, batch, labels, shown)
        rounds += 1
    feed_rate = rounds * len(batch) / (time.perf_counter() - t0)

    load = os.getloadavg()
    lines = [
        "# Serving cost of click counters (100 candidates, 10 shown)",
        "",
        f"Command: `.venv/bin/python -m reloop.bench.counters_latency {shlex.join(argv)}`",
        "",
        f"- {args.requests} requests of {args.candidates} candidates per arm, interleaved, after 200 "
        f"warm-up; {args.threads} torch thread(s); shared 2-core machine, load average {load[0]:.1f} / "
        f"{load[1]:.1f} (1 / 5 min) at the end",
        "- DCN (MLP 400,400,400, 3 cross layers, embedding dim 10), 8 categorical fields of 100,000 buckets "
        f"and a multi-valued one (tags, 1-3 per candidate); counters of {', '.join(settings.fields)} (f0: "
        f"context, f4: candidate), lifetime and a 600-s window ({len(counters.names)} dense inputs); both "
        "arms score the same model; the service's whole path (`ScoringService.score`), impressions handed "
        "to a logger that keeps nothing",
        "",
        "| arm | p50 ms | p90 ms | p99 ms | requests/s (1 / mean) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in (("off", "counters off"), ("on", "counters on (arms[].counters)")):
        x = times[name]
        lines.append(
            f"| {label} | {_pct(x, 50):.3f} | {_pct(x, 90):.3f} | {_pct(x, 99):.3f} | {1 / np.mean(x):,.0f} |"
        )
    ratio = np.mean(times["off"]) / np.mean(times["on"])
    lines += [
        "",
        f"Added p50 (on − off): {_pct(times['on'], 50) - _pct(times['off'], 50):+.3f} ms; "
        f"throughput on / off: {ratio:.2f}x.",
        f"The feed's side (`ServedCounters.write`, batches of {len(batch)}, half clicks; not counting the "
        "decode and featurise of the samples topic, which the error memory's feed does too): "
        f"{feed_rate:,.0f} samples/s.",
    ]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
