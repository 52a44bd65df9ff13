"""Figure 6: replay throughput on MovieLens-100K against a plain offline training loop.

Replay: ``engine.replay.replay.run_replay`` exactly as ``reloop replay --dataset movielens-100k
--delay exponential:60000`` runs it (the dataset's rows as impressions and clicks, merged by time, the
whole pipeline: decode, join with a 1 h window, featurise, predict-then-learn DCN with the ReLoop loss,
batch 512, a snapshot every 7 days of event time, a final snapshot), from an in-memory event log.

Baseline: the same backbone (same config, same seed) trained for one pass over the same rows by a bare
torch loop on tensors built beforehand (``bench.suite_e2e.BareLoop``). The two alternate round by
round in this process; ratio = median per-round ratio of samples/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.suite import Context, Figure, Row, alternate
from bench.suite_e2e import BareLoop
from bench.suite_profile import cprofile_top

COMMAND = "python -m bench --only replay"
TITLE = "6. Replay on MovieLens-100K"
DATA = Path(os.environ.get("RELOOP_DATA", "/work/shared/data")) / "movielens-100k"


def replay_args(max_rows: int) -> argparse.Namespace:
    return argparse.Namespace(
        dataset="movielens-100k",
        data=DATA,
        config=None,
        max_rows=max_rows,
        delay="exponential:60000",
        delay_seed=0,
        backbone="dcn",
        strategy="reloop",
        alpha=0.5,
        batch_size=512,
        every_event_ms=7 * 86_400_000,
        buckets=10_000,
        window_ms=3_600_000,
        timestamps=None,
    )


def run(ctx: Context) -> Figure:
    import itertools

    from connectors.files.datasets import open_dataset, to_events
    from engine.replay.replay import run_replay
    from engine.replay.replay_cmd import _parse_delay, dataset_config
    from engine.replay.sources import EventListSource
    from engine.runtime.config import load_config_dict, load_feature_spec

    if not DATA.exists():
        raise FileNotFoundError(f"MovieLens-100K not found at {DATA} (set RELOOP_DATA)")
    args = replay_args(ctx.pick(0, 20_000))
    ds = open_dataset(args.dataset, args.data)
    cfg = load_config_dict(dataset_config(args, ds.fields), env={})
    rows = list(ds.rows() if not args.max_rows else itertools.islice(ds.rows(), args.max_rows))
    events = list(to_events(iter(rows), _parse_delay(args.delay, args.delay_seed)))
    spec = load_feature_spec(cfg.model)
    labels = np.array([float(r.label) for r in rows])
    bare = BareLoop(args.backbone, spec, rows, labels, args.batch_size)
    results: list[Any] = []

    with tempfile.TemporaryDirectory(prefix="reloop-bench-replay-") as tmp:
        work = Path(tmp)

        def replay_pass() -> Any:
            source = EventListSource(events, cfg.source.impressions_topic, cfg.source.clicks_topic)
            out = work / f"r{len(results)}"
            res = run_replay(
                cfg, source=source, end=source.end_positions(), checkpoint_dir=out, timestamps="record"
            )
            results.append(res)
            return res

        def replay_rate() -> float:
            res = replay_pass()
            return res.samples_trained / res.seconds

        rep, base, ratio = alternate(replay_rate, bare.run, ctx.rounds)
        measured = results[1:]  # the first pass is alternate()'s warm-up
        events_per_s = float(np.median([r.records_per_s for r in measured]))
        profile = ""
        if ratio < 0.9:
            _, profile = cprofile_top(replay_pass, top=25)
    r0 = measured[0]
    rows_out = [
        Row(
            figure="replay MovieLens-100K (DCN, batch 512), samples trained/s",
            value=float(np.median(rep)),
            unit="samples/s",
            baseline_name="plain offline loop, same model and rows, pre-built tensors",
            baseline_value=float(np.median(base)),
            ratio=ratio,
            target=">= 0.9 x offline loop",
            met=ratio >= 0.9,
            command=COMMAND,
        ),
        Row(
            figure="replay MovieLens-100K, events (impressions + clicks) read/s",
            value=events_per_s,
            unit="events/s",
            command=COMMAND,
        ),
    ]
    notes = [
        f"{len(rows):,} rows -> {r0.records:,} events ({r0.join.get('impressions', 0):,} impressions, "
        f"{r0.join.get('clicks', 0):,} clicks), {r0.samples_trained:,} samples trained in {r0.steps} steps, "
        f"final snapshot v{r0.final_version}; {ctx.rounds} rounds alternating with the offline loop. "
        f"Replay samples/s per round: {', '.join(f'{x:,.0f}' for x in rep)}; offline loop: "
        f"{', '.join(f'{x:,.0f}' for x in base)}. The replay's time includes what the offline loop "
        f"does not do: decoding, the merge and the join, featurising per batch, the predict half of "
        f"predict-then-learn, the ReLoop loss, and {r0.final_version} snapshots.",
    ]
    if profile:
        notes += ["", "The target is missed; one replay pass under cProfile:", "", profile]
    return Figure(key="replay", title=TITLE, rows=rows_out, notes="\n".join(notes))
