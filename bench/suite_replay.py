"""Figure 6: replay throughput on MovieLens-100K against a plain offline training loop.

D = ``run_samples_replay`` (``reloop replay --from-samples``) over the same samples as Arrow batches.

The replay and the offline loop are the backtest engineer's (``reloop.bench.replay.replay_rate`` /
``offline_rate``): A = ``run_replay`` over the dataset's events (impressions + clicks delayed
exponentially with a 60 s mean: merge, decode, join with a 1 h window, predict-then-learn DCN with the
ReLoop loss, batch 512, a snapshot every 7 days of event time, a final snapshot); B = the same learner
config featurising, predicting and learning the same rows as labeled samples in time order. This module
adds a stricter second baseline, C = a bare torch loop of the same model on tensors built beforehand
(``reloop.bench.suite_e2e.BareLoop``), and runs A, B, C rotated round by round in one process over the whole
dataset; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
from reloop.bench.suite import Context, Figure, Row, alternate_many
from reloop.bench.suite_e2e import BareLoop
from reloop.bench.suite_profile import cprofile_top

COMMAND = "python -m reloop.bench --only replay"
TITLE = "6. Replay on MovieLens-100K"
DATA = Path(os.environ.get("RELOOP_DATA", "/work/shared/data")) / "movielens-100k"


def run(ctx: Context) -> Figure:
    import torch
    from reloop.bench.replay import _setup, offline_rate, replay_rate, samples_log, samples_replay_rate
    from reloop.engine.runtime.config import load_feature_spec

    threads = torch.get_num_threads()
    if not DATA.exists():
        raise FileNotFoundError(f"MovieLens-100K not found at {DATA} (set RELOOP_DATA)")
    # The owner's set-up (rows, delays, run config), so this figure and bench/replay.py measure the same.
    cfg, events, samples = _setup(DATA, ctx.pick(10**9, 5_000), "dcn", 512)
    rows = samples
    spec = load_feature_spec(cfg.model)
    labels = np.array([float(s.label) for s in samples])
    bare = BareLoop("dcn", spec, samples, labels, 512)
    rounds = min(ctx.rounds, 3)  # a replay pass over the whole dataset takes tens of seconds
    with tempfile.TemporaryDirectory(prefix="reloop-bench-replay-") as tmp:
        work = Path(tmp)
        log, topic, messages = samples_log(samples)
        rep, off, bar, srep = alternate_many(
            [
                lambda: replay_rate(cfg, events, work),
                lambda: offline_rate(cfg, samples),
                bare.run,
                lambda: samples_replay_rate(cfg, log, topic, messages, work),
            ],
            rounds,
        )
        ratio_off = statistics.median(a / b for a, b in zip(rep, off, strict=True))
        ratio_samples = statistics.median(a / b for a, b in zip(srep, off, strict=True))
        ratio_bare = statistics.median(a / b for a, b in zip(rep, bar, strict=True))
        profile = ""
        if ratio_off < 0.9:
            _, profile = cprofile_top(lambda: replay_rate(cfg, events, work), top=25)
    rep_med = statistics.median(rep)
    events_per_sample = len(events) / len(samples)
    out = [
        Row(
            figure=f"replay MovieLens-100K ({len(rows):,} rows, DCN, batch 512), samples/s",
            value=rep_med,
            unit="samples/s",
            baseline_name="offline loop: featurise + predict + learn, same learner config and rows",
            baseline_value=statistics.median(off),
            ratio=ratio_off,
            target=">= 0.9 x offline loop",
            met=ratio_off >= 0.9,
            command=COMMAND,
        ),
        Row(
            figure=f"replay of the samples topic, MovieLens-100K ({len(rows):,} rows, DCN, batch 512)",
            value=statistics.median(srep),
            unit="samples/s",
            baseline_name="offline loop: featurise + predict + learn, same learner config and rows",
            baseline_value=statistics.median(off),
            ratio=ratio_samples,
            target=">= 0.9 x offline loop",
            met=ratio_samples >= 0.9,
            command=COMMAND,
        ),
        Row(
            figure="replay MovieLens-100K, same run, against a bare loop",
            value=rep_med,
            unit="samples/s",
            baseline_name="bare torch loop, same model, pre-built tensors",
            baseline_value=statistics.median(bar),
            ratio=ratio_bare,
            command=COMMAND,
        ),
        Row(
            figure="replay MovieLens-100K, events (impressions + clicks)/s",
            value=rep_med * events_per_sample,
            unit="events/s",
            command=COMMAND,
        ),
    ]
    notes = [
        f"{len(rows):,} rows -> {len(events):,} events ({len(samples):,} impressions, "
        f"{len(events) - len(samples):,} clicks); every impression becomes one trained sample (no click "
        f"falls beyond the 1 h window), so events/s = samples/s x {events_per_sample:.3f}. {rounds} rounds, "
        f"the four rotated each round (plus one warm-up each). torch at its default {threads} threads "
        "in all four: the replays share the cores with their own other threads (the snapshot writer; "
        "the samples-topic replay's fetch thread), the offline and bare loops have them to themselves.",
        "",
        "| round | replay (raw topics) samples/s | replay of the samples topic samples/s "
        "| offline loop samples/s | bare loop samples/s |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {i + 1} | {a:,.0f} | {d:,.0f} | {b:,.0f} | {c:,.0f} |"
            for i, (a, b, c, d) in enumerate(zip(rep, off, bar, srep, strict=True))
        ),
        "",
        "The replay's time includes what the offline loop does not do: decoding and validating "
        "every record, the merge and the join, building samples, the periodic snapshots (model + "
        "optimizer state) and the final one. The replay of the samples topic (`reloop replay "
        "--from-samples`, the train stage alone) reads the same samples as the join stage writes them "
        f"({messages} Arrow batches of 1,024, in memory) and decodes, deduplicates and featurises them "
        "column-wise on its fetch thread; the raw replay still runs the single-process pipeline.",
    ]
    if profile:
        notes += ["", "The target is missed; one replay pass under cProfile:", "", profile]
    return Figure(key="replay", title=TITLE, rows=out, notes="\n".join(notes))
