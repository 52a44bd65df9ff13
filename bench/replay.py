"""Replay throughput against a plain offline training loop, on the same MovieLens-100K rows.

A (replay): the dataset's events (impressions + exponentially delayed clicks) encoded as JSON records,
through ``run_replay``: deterministic merge, decode, validation, join, predict-then-learn, progressive
metrics, a snapshot every simulated week, a final snapshot.
B (offline): the same rows as labeled samples, featurised per mini-batch and learned in time order with
the same learner config (predict-then-learn too, so both score every sample once).

Both are timed in the same process, alternating A and B over several rounds (the machine's speed drifts
between processes, docs/performance.md); the figure is the median of the per-round throughput ratios.

    .venv/bin/python -m reloop.bench.replay [--rows 20000] [--rounds 3] [--backbone dcn] [--data PATH]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k"


def _setup(data: Path, rows: int, backbone: str, batch: int):
    from reloop.connectors.files.datasets import make_delay, open_dataset, to_events, to_samples
    from reloop.engine.replay.replay_cmd import dataset_config
    from reloop.engine.runtime.config import load_config_dict

    ds = open_dataset("movielens-100k", data)
    picked = list(itertools.islice(ds.rows(), rows))
    events = list(to_events(picked, make_delay("exponential", ms=60_000, seed=0)))
    samples = list(to_samples(picked))
    args = argparse.Namespace(
        backbone=backbone,
        strategy="reloop",
        alpha=0.5,
        buckets=10_000,
        batch_size=batch,
        every_event_ms=7 * 86_400_000,
        window_ms=3_600_000,
        y_last="logged",  # what the offline loop uses too: the samples' served prediction
    )
    # No click counters (dataset_config without the dataset's declared ones, as `--counters none`): the
    # offline loop it is compared with has none, and the data plane is what is measured.
    cfg = load_config_dict(dataset_config(args, ds.fields), env={})
    return cfg, events, samples


def replay_rate(cfg: Any, events: list, workdir: Path) -> float:
    """Samples per second through the whole replay (source to final snapshot)."""
    from reloop.engine.replay.replay import run_replay
    from reloop.engine.replay.sources import EventListSource

    ckpt = workdir / f"replay-{time.perf_counter_ns()}"
    source = EventListSource(events, cfg.source.impressions_topic, cfg.source.clicks_topic)
    t0 = time.perf_counter()
    result = run_replay(cfg, source=source, end=source.end_positions(), checkpoint_dir=ckpt)
    seconds = time.perf_counter() - t0
    shutil.rmtree(ckpt, ignore_errors=True)
    return result.samples_trained / seconds


def samples_log(samples: list, per_message: int = 1024) -> tuple[Any, str, int]:
    """The samples as the join stage writes them (one Arrow batch of ``per_message`` per record), in
    memory: (log, topic, records)."""
    from reloop.connectors.memory import MemoryLog, MemorySink
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch

    topic = "reloop.samples"
    log = MemoryLog()
    log.create(topic, 1)
    sink = MemorySink(log, topic)
    count = 0
    for i in range(0, len(samples), per_message):
        chunk = samples[i : i + per_message]
        sink.send(encode_batch(batch_from_samples(chunk, task=0, first_seq=i)), partition=0,
                  timestamp_ms=chunk[-1].event_time_ms)  # fmt: skip
        count += 1
    return log, topic, count


def samples_replay_rate(cfg: Any, log: Any, topic: str, records: int, workdir: Path) -> float:
    """Samples per second of ``reloop replay --from-samples`` (the train stage alone) over the samples
    topic, source to final snapshot."""
    from reloop.connectors.memory import MemorySource
    from reloop.engine.replay.replay import run_samples_replay
    from reloop.engine.streams import TopicPartition

    cfg = cfg.model_copy(update={"stages": cfg.stages.model_copy(update={"samples_topic": topic})})
    ckpt = workdir / f"samples-replay-{time.perf_counter_ns()}"
    t0 = time.perf_counter()
    result = run_samples_replay(
        cfg, source=MemorySource(log, [topic]), end={TopicPartition(topic, 0): records}, checkpoint_dir=ckpt
    )
    seconds = time.perf_counter() - t0
    shutil.rmtree(ckpt, ignore_errors=True)
    return result.samples_trained / seconds


def offline_rate(cfg: Any, samples: list) -> float:
    """Samples per second of featurise + predict + learn over the same samples, in time order."""
    from reloop.engine.features.featurizer import Featurizer
    from reloop.engine.models.registry import build_learner
    from reloop.engine.runtime.config import load_feature_spec

    spec = load_feature_spec(cfg.model)
    m = cfg.model
    learner = build_learner(
        m.backbone, spec, m.strategy, m.alpha, seed=m.seed, optimizer=m.optimizer or None, **m.params
    )
    featurizer = Featurizer(spec)
    bs = cfg.train.batch_size
    t0 = time.perf_counter()
    for i in range(0, len(samples), bs):
        chunk = samples[i : i + bs]
        batch = featurizer.transform([s.features for s in chunk])
        labels = np.array([s.label for s in chunk], dtype=np.float32)
        y_last = np.array([s.served_prediction for s in chunk], dtype=np.float32)
        learner.predict_proba(batch)
        learner.learn(batch, labels, y_last)
    return len(samples) / (time.perf_counter() - t0)


def measure(
    data: Path = DEFAULT_DATA, rows: int = 20_000, rounds: int = 3, backbone: str = "dcn", batch: int = 512
) -> dict[str, Any]:
    from reloop.bench.suite import alternate

    cfg, events, samples = _setup(data, rows, backbone, batch)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        a, b, ratio = alternate(
            lambda: replay_rate(cfg, events, Path(tmp)), lambda: offline_rate(cfg, samples), rounds
        )
    return {
        "rows": rows, "events": len(events), "backbone": backbone, "batch": batch, "rounds": rounds,
        "replay_samples_per_s": a, "offline_samples_per_s": b, "median_ratio": ratio,
        "replay_median": statistics.median(a), "offline_median": statistics.median(b),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }  # fmt: skip


def run(ctx: Any) -> Any:
    """The suite's figure (``reloop.bench.suite`` expects ``run(ctx) -> Figure``)."""
    from reloop.bench.suite import Figure, Row

    res = measure(rows=ctx.pick(20_000, 3_000), rounds=ctx.pick(ctx.rounds, 2))
    row = Row(
        figure=f"replay throughput, MovieLens-100K first {res['rows']} rows, {res['backbone']}",
        value=res["replay_median"],
        unit="samples/s",
        baseline_name="offline loop (featurise + predict + learn)",
        baseline_value=res["offline_median"],
        ratio=res["median_ratio"],
        command=f"python -m reloop.bench.replay --rows {res['rows']} --rounds {res['rounds']}",
    )
    return Figure(key="replay", title="Replay on MovieLens-100K", rows=[row])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backbone", default="dcn")
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    if not args.data.exists():
        alt = Path("/work/shared/data/movielens-100k")
        if not alt.exists():
            raise SystemExit(f"MovieLens-100K not found at {args.data}")
        args.data = alt
    res = measure(args.data, args.rows, args.rounds, args.backbone, args.batch)
    print("| round | replay samples/s | offline samples/s | ratio |\n| --- | --- | --- | --- |")
    for i, (a, b) in enumerate(zip(res["replay_samples_per_s"], res["offline_samples_per_s"], strict=True)):
        print(f"| {i} | {a:,.0f} | {b:,.0f} | {a / b:.2f} |")
    print(
        f"\nmedian ratio replay/offline: {res['median_ratio']:.2f} "
        f"({res['rows']} rows, {res['events']} events, {res['backbone']}, batch {res['batch']})"
    )


if __name__ == "__main__":
    main()
