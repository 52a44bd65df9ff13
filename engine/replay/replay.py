"""Replay: logged impressions and clicks through the engine, with isolated state.

Raw topics go through the single-process pipeline (engine/runtime/pipeline.py): the intake, joiner,
featurizer, trainer, snapshots and checkpoint order that ``reloop run``'s two stages use, stepped in one
thread, with one merge over all partitions instead of one per join task and samples built per record
instead of as Arrow batches. The samples topic goes through the train stage itself
(``run_samples_replay``).

Isolation: the caller hands in a source that commits nothing (a Kafka consumer without a group, or
files), the pipeline gets its own checkpoint directory, and the clock is a ManualClock that
``ReplaySource`` moves to the newest record time it hands out, so windows close by event time and
nothing waits on the wall clock. At the end of the range the merge is drained, every pending join
window is closed, the partial batch is trained, and a final snapshot is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reloop.engine.metrics.stats import EngineStats
from reloop.engine.replay.sources import ReplaySource, TimestampMode
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.config import RunConfig
from reloop.engine.runtime.gc_tuning import set_young_threshold
from reloop.engine.streams import Positions, Sink, Source, positions_to_json


@dataclass
class ReplayResult:
    final_version: int | None
    records: int
    samples_trained: int
    steps: int
    seconds: float
    first_time_ms: int | None
    last_time_ms: int | None
    join: dict[str, int]
    dead_letters: dict[str, int]
    progressive: dict[str, float]
    positions: dict[str, int]
    trainer: dict[str, int] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "records_per_s": self.records_per_s}


def run_replay(
    cfg: RunConfig,
    *,
    source: Source,
    end: Positions,
    checkpoint_dir: Path,
    start: Positions | None = None,
    timestamps: TimestampMode = "record",
    samples_sink: Sink | None = None,
    dead_letter_sink: Sink | None = None,
    on_progress: Callable[[int], None] | None = None,
    stall_timeout_s: float = 30.0,
    on_restored: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Replay ``source`` from ``start`` (default: its beginning) to ``end`` (exclusive) into a fresh or
    resumed pipeline under ``checkpoint_dir``; ``on_progress`` gets the number of records handed out;
    refused records go to ``dead_letter_sink`` with their reason (counted either way).
    ``on_restored`` gets, before any sample is sent, how many samples the restored state had already
    sent to ``samples_sink`` (0 for a fresh replay): a resumed replay sends the ones after its restore
    point again, so a file sink keeps only that many lines (else they were in the file twice)."""
    from reloop.engine.runtime.build import build_pipeline

    set_young_threshold(cfg.stages.gc_young_threshold)  # as every stage process (gc_tuning.py)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    clock = ManualClock(0)

    def set_clock(t: int) -> None:
        if t > clock.now_ms:
            clock.set(t)

    replay_source = ReplaySource(
        source,
        end=end,
        start=start,
        batch_size=cfg.consumer.poll_max_records,
        timestamps=timestamps,
        set_clock=set_clock,
        stall_timeout_s=stall_timeout_s,
        first_topics=(cfg.source.impressions_topic,),
    )
    pipeline = build_pipeline(
        cfg,
        source=replay_source,
        samples_sink=samples_sink,
        dead_letter_sink=dead_letter_sink,
        commit=None,  # never touch the live consumer group's offsets
        clock=clock,
        stats=EngineStats(),
        checkpoint_dir=checkpoint_dir,
    )
    t0 = time.perf_counter()
    restored_at = (pipeline.trainer.counters.samples, pipeline.records_processed)
    pipeline.open()
    if on_restored is not None:
        # The joiner counts every sample it emitted, in its restored state too; a snapshot or
        # checkpoint holds all of them (trained, or in the buffer), and the sinks were flushed by it.
        join = pipeline.joiner.stats
        on_restored(join.positives + join.negatives + join.corrections)
    last_reported = 0
    try:
        while not replay_source.done():
            pipeline.step()
            if on_progress is not None and replay_source.records_out != last_reported:
                last_reported = replay_source.records_out
                on_progress(last_reported)
    except BaseException:
        # Ctrl-C, a stalled source: wait for the snapshot write in flight (it was left to a thread the
        # exit killed) so that --resume starts from the newest period snapshot, then release the rest.
        pipeline.abort()
        raise
    pipeline.drain()
    pipeline.flush_join()
    pipeline.train_remaining()
    # A resume that finds nothing left publishes no new model version: the snapshot it restored is it.
    unchanged = (pipeline.trainer.counters.samples, pipeline.records_processed) == restored_at
    if unchanged and (pipeline.restored_from or "").startswith("snapshot"):
        pipeline.close(final=None)
        version = pipeline.version
    else:
        version = pipeline.close(final="snapshot")
    seconds = time.perf_counter() - t0
    progressive = pipeline.trainer.progressive.get()
    return ReplayResult(
        final_version=version,
        records=pipeline.records_processed,
        samples_trained=pipeline.trainer.counters.samples,
        steps=pipeline.trainer.counters.steps,
        seconds=seconds,
        first_time_ms=replay_source.first_timestamp_ms,
        last_time_ms=replay_source.last_timestamp_ms,
        join=pipeline.joiner.stats.as_dict(),
        dead_letters=dict(pipeline.dead_letters.counts),
        progressive={k: float(v) for k, v in progressive.items()},
        positions=positions_to_json(pipeline.positions),
        trainer=pipeline.trainer.counters.as_dict(),
    )


def run_samples_replay(
    cfg: RunConfig,
    *,
    source: Source,
    end: Positions,
    checkpoint_dir: Path,
    start: Positions | None = None,
    dead_letter_sink: Sink | None = None,
    on_progress: Callable[[int], None] | None = None,
    stall_timeout_s: float = 30.0,
) -> ReplayResult:
    """Replay a range of the samples topic through the train stage alone (the join already happened):
    a new model, feature spec or strategy trained from the same samples at training speed."""
    from reloop.engine.runtime.build import build_train_stage

    set_young_threshold(cfg.stages.gc_young_threshold)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    clock = ManualClock(0)

    def set_clock(t: int) -> None:
        if t > clock.now_ms:
            clock.set(t)

    replay_source = ReplaySource(
        source,
        end=end,
        start=start,
        batch_size=cfg.stages.train_poll_messages,
        timestamps="record",
        set_clock=set_clock,
        stall_timeout_s=stall_timeout_s,
    )
    # Full batches only: a replay is a function of the topic's range, never of how fast it was read.
    full_batches = cfg.train.model_copy(update={"max_wait_ms": None})
    stage = build_train_stage(
        cfg.model_copy(update={"train": full_batches}),
        source=replay_source,
        dead_letter_sink=dead_letter_sink,
        commit=None,
        clock=clock,
        stats=EngineStats(),
        checkpoint_dir=checkpoint_dir,
    )
    t0 = time.perf_counter()
    stage.open()
    last_reported = 0
    while not replay_source.done():
        stage.step()
        if on_progress is not None and replay_source.records_out != last_reported:
            last_reported = replay_source.records_out
            on_progress(last_reported)
    while stage.records_processed < replay_source.records_out:  # still on the fetch thread's queue
        stage.step()
    stage.train_remaining()
    version = stage.close(final="snapshot")
    progressive = stage.trainer.progressive.get()
    return ReplayResult(
        final_version=version,
        records=stage.records_processed,
        samples_trained=stage.trainer.counters.samples,
        steps=stage.trainer.counters.steps,
        seconds=time.perf_counter() - t0,
        first_time_ms=replay_source.first_timestamp_ms,
        last_time_ms=replay_source.last_timestamp_ms,
        join={
            "duplicates_dropped": stage.duplicates_dropped,
            "samples_refused": stage.samples_refused,
            "seq_gaps": stage.seq_gaps,
        },
        dead_letters=dict(stage.dead_letters.counts),
        progressive={k: float(v) for k, v in progressive.items()},
        positions=positions_to_json(stage.positions),
        trainer=stage.trainer.counters.as_dict(),
    )
