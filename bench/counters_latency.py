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
  count the 10 shown items, log the values with each impression (to a logger that keeps nothing);
* on, shown counted from the log: the same with ``shown_from: impressions`` (the request path counts
  nothing; the feed counts the impression log).

Timed apart, the feed's side: ``ServedCounters.write`` of samples-topic batches of 500 (half clicks), and
the impression log counted by a ``SamplesFeed`` as ``shown_from: impressions`` has it (decode, featurise,
count: 256 records per poll, the feed's default there) over an in-memory log of the impressions the "on"
arm served, encoded as the impression logger sends them.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from reloop.bench.report import publish
from reloop.engine.features.counters import CounterSettings, with_counter_fields
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.memory.feed import SHOWN_POLL_MAX_RECORDS
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


class _KeepFirst:
    """Keeps the first ``limit`` impressions (the impression log the feed's side then counts)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.impressions = limit, []

    def log(self, impressions: list) -> int:
        if len(self.impressions) < self.limit:
            self.impressions += impressions
        return len(impressions)


def log_counting_rate(bundle: ModelBundle, settings: CounterSettings, impressions: list) -> tuple[float, int]:
    """(impressions/s, impressions) a counters feed with ``shown_from: impressions`` counts from an
    in-memory impression log holding ``impressions`` (decode, featurise, count; the feed's own poll size)."""
    from reloop.connectors.memory.memory import MemoryLog, MemorySink, MemorySource
    from reloop.engine.events.codec import encode
    from reloop.engine.memory.feed import SamplesFeed
    from reloop.engine.serve.config import ArmCountersConfig

    shared = ArmCountersConfig(**settings.model_dump(), samples_topic="samples", shown_from="impressions")
    mlog = MemoryLog()
    for topic in ("samples", "impressions"):
        mlog.create(topic, 1)
    target = ServedCounters(shared)
    feed = SamplesFeed(name="A", source=MemorySource(mlog, ["samples", "impressions"]), target=target,
                       holder=ModelHolder(bundle), poll_timeout_s=0, shown_topic="impressions")  # fmt: skip
    feed.step()  # opens at the end of the (empty) topics
    sink = MemorySink(mlog, "impressions")
    for imp in impressions:
        sink.send(encode(imp), key=imp.impression_id.encode())
    # As a serving process does after start (engine/serve/stack.py): the impressions kept for this log
    # would otherwise make every full collection scan them.
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    try:
        while target.shown < len(impressions):
            feed.step()
    finally:
        gc.unfreeze()
    return len(impressions) / (time.perf_counter() - t0), len(impressions)


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
    from reloop.engine.serve.config import ArmCountersConfig

    counters = ServedCounters(settings)
    from_log = ServedCounters(
        ArmCountersConfig(**settings.model_dump(), samples_topic="samples", shown_from="impressions")
    )
    served = _KeepFirst(20_000)
    services = {
        name: ScoringService(
            router=ArmRouter([("A", 1.0)], salt="b"),
            arms={"A": ArmRuntime("A", ModelHolder(bundle), logger=logger, counters=c)},
            top_k=10,
        )
        for name, c, logger in (
            ("off", None, _Discard()),
            ("on", counters, served),
            ("log", from_log, _Discard()),
        )
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
    times: dict[str, list[float]] = {"off": [], "on": [], "log": []}
    orders = [("off", "on", "log"), ("on", "log", "off"), ("log", "off", "on")]
    for i in range(args.requests + 200):
        r = reqs[i % len(reqs)]
        for name in orders[i % 3]:  # rotate which goes first
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
    log_rate, logged = log_counting_rate(bundle, settings, served.impressions)

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
        f"context, f4: candidate), lifetime and a 600-s window ({len(counters.names)} dense inputs); the "
        "three arms score the same model; the service's whole path (`ScoringService.score`), impressions "
        "handed to a logger that keeps nothing (the 'on' arm's keeps its first 20,000 for the feed's side)",
        "",
        "| arm | p50 ms | p90 ms | p99 ms | requests/s (1 / mean) |",
        "| --- | --- | --- | --- | --- |",
    ]
    arms = (("off", "counters off"), ("on", "counters on (arms[].counters)"),
            ("log", "counters on, shown_from: impressions"))  # fmt: skip
    for name, label in arms:
        x = times[name]
        lines.append(
            f"| {label} | {_pct(x, 50):.3f} | {_pct(x, 90):.3f} | {_pct(x, 99):.3f} | {1 / np.mean(x):,.0f} |"
        )
    ratio = np.mean(times["off"]) / np.mean(times["on"])
    lines += [
        "",
        f"Added p50 (on − off): {_pct(times['on'], 50) - _pct(times['off'], 50):+.3f} ms; "
        f"throughput on / off: {ratio:.2f}x. With shown_from: impressions: "
        f"{_pct(times['log'], 50) - _pct(times['off'], 50):+.3f} ms, "
        f"{np.mean(times['off']) / np.mean(times['log']):.2f}x (the counting moves to the feed, below).",
        f"The feed's side (`ServedCounters.write`, batches of {len(batch)}, half clicks; not counting the "
        "decode and featurise of the samples topic, which the error memory's feed does too): "
        f"{feed_rate:,.0f} samples/s.",
        f"The impression log counted by the feed (`shown_from: impressions`: decode, featurise, count; "
        f"{logged:,} impressions the 'on' arm served, {SHOWN_POLL_MAX_RECORDS} per poll, in-memory log): "
        f"{log_rate:,.0f} "
        f"impressions/s, {1e6 / log_rate:.1f} us each, in every process serving the arm. At 100 requests/s "
        f"of 10 shown that is {100 * 10 / log_rate:.1%} of a core per process.",
    ]
    return publish(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
