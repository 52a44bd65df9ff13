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

Resuming (``reloop replay --resume``): every save of a replay carries, in its meta (``REPLAY_META``), what
the summary needs beyond the state itself: the records processed, the first record's time, and the dead
letters sent up to that save (how many, and by reason those of records before its positions: a polled
batch is decoded, and its bad records dead-lettered, before its records are processed one by one). A
replay that restores a save goes on from those, so its summary equals an uninterrupted run's (but for
``seconds``, ``records_this_run`` and ``resumed_from``), and ``on_dead_letters_restored`` cuts the dead
letters written after the save, which the resumed replay sends again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.replay.sources import ReplaySource, TimestampMode
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.config import RunConfig
from reloop.engine.runtime.gc_tuning import set_young_threshold
from reloop.engine.streams import Positions, Sink, Source, TopicPartition, positions_to_json

# The key of a replay's own progress in the meta of its snapshots and checkpoints (see the module doc).
REPLAY_META = "replay"


@dataclass
class ReplayResult:
    final_version: int | None
    records: int  # the whole replay's, a resumed one's included
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
    records_this_run: int | None = None  # this process's (``seconds`` is its time too); None: ``records``
    resumed_from: str | None = None  # the snapshot or checkpoint a resumed replay went on from

    def __post_init__(self) -> None:
        if self.records_this_run is None:
            self.records_this_run = self.records

    @property
    def records_per_s(self) -> float:
        """This run's records per second of this run."""
        return (self.records_this_run or 0) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "records_per_s": self.records_per_s}


# What ``on_dead_letters_restored`` is given: the dead letters the restored save had sent (None: a save
# without REPLAY_META, from an older reloop) and its positions. It cuts the dead letters written after those
# (the first ``lines``, less those of records at or past ``positions``, which the replay refuses again)
# and returns the kept ones' counts by reason.
DeadLettersRestored = Callable[[int | None, Positions], Mapping[str, int]]


class _Progress:
    """The dead-letter sink as the stage sees it (it forwards to the real one, if any) and the keeper of
    REPLAY_META: at each save's flush, which comes just before the save is made, it puts the replay's
    progress into the stage's meta, which every save carries."""

    def __init__(self, sink: Sink | None, source: ReplaySource) -> None:
        self.sink = sink
        self.source = source
        self.stage: Any = None
        self.records_before = 0  # processed by the replay before the restored save
        self.first_time_ms: int | None = None  # the whole replay's first record time, once resumed
        self.last_time_ms: int | None = None  # its newest before this run (a resume that reads none)
        self.resumed = False
        self.lines = 0  # dead letters sent, the restored save's included
        self.counts: dict[str, int] = {}  # those of records before the last save's positions, by reason
        self._pending: list[tuple[TopicPartition | None, int | None, str]] = []

    # -- the Sink the stage's DeadLetterSink forwards to
    def send(self, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None) -> None:
        if self.sink is not None:
            self.sink.send(value, key=key, timestamp_ms=timestamp_ms)
        self.lines += 1
        self._pending.append(_letter(value))

    def flush(self, timeout_s: float | None = None) -> None:
        if self.sink is not None:
            self.sink.flush(timeout_s)
        self._note()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def abort(self) -> None:
        if self.sink is not None:
            (getattr(self.sink, "abort", None) or self.sink.close)()

    # -- the replay's progress
    def restored(self, on_dead_letters_restored: DeadLettersRestored | None) -> str | None:
        """Go on from the save the stage restored (if any); the dead letters after it are cut."""
        stage = self.stage
        point = stage.restored_from
        prior = _replay_meta(stage.registry, point) if point is not None else None
        if prior is not None:
            self.records_before = int(prior["records"])
            self.first_time_ms = prior["first_time_ms"]
            self.last_time_ms = prior.get("last_time_ms")  # absent from a save of an older reloop
            self.lines = int(prior["dead_letter_lines"])
            self.counts = {str(k): int(v) for k, v in prior["dead_letters"].items()}
            self.resumed = True
        kept = None
        if on_dead_letters_restored is not None:
            lines = self.lines if point is None or prior is not None else None
            kept = on_dead_letters_restored(lines, stage.positions if point is not None else {})
        if point is not None and prior is None:  # a save without REPLAY_META: what the sink kept
            self.counts = dict(kept or {})
        stage.dead_letters.counts = dict(self.counts)
        return point

    def _note(self) -> None:
        stage = self.stage
        positions = stage.positions
        still = []
        for tp, offset, reason in self._pending:
            if tp is not None and offset is not None and offset >= positions.get(tp, offset + 1):
                still.append((tp, offset, reason))  # its record comes after the save: sent again
            else:
                self.counts[reason] = self.counts.get(reason, 0) + 1
        self._pending = still
        stage.meta[REPLAY_META] = {
            "records": self.records,
            "first_time_ms": self.first_time,
            "last_time_ms": self.last_time,
            "dead_letter_lines": self.lines,
            "dead_letters": dict(self.counts),
        }

    @property
    def records(self) -> int:
        return self.records_before + self.stage.records_processed

    @property
    def first_time(self) -> int | None:
        return self.first_time_ms if self.resumed else self.source.first_timestamp_ms

    @property
    def last_time(self) -> int | None:
        # A resume of a finished replay reads nothing: its newest time was null in the summary, and the
        # span from the first time to it negative ("the events span -1,714,550,400 s").
        newest = self.source.last_timestamp_ms
        return newest if newest is not None else self.last_time_ms


class ReplaySaveFailed(RuntimeError):
    """The replay's final snapshot (its model) was not written; the period snapshots before it were."""


def _final_snapshot(stage: Any, save: Callable[[], int]) -> int:
    """``save()`` the final snapshot, then close ``stage``. A stage's own close(final="snapshot") logs a
    failed save ("final save skipped") and returns None: the replay ended 0 without its model."""
    try:
        version = save()
    except Exception as exc:
        stage.abort()
        raise ReplaySaveFailed(f"the final snapshot was not written: {exc}") from exc
    stage.close(final=None)
    return version


def _letter(value: bytes) -> tuple[TopicPartition | None, int | None, str]:
    """(partition, offset, reason) of a dead-letter envelope (engine/deadletter.py)."""
    envelope = orjson.loads(value)
    topic, partition, offset = envelope.get("topic"), envelope.get("partition"), envelope.get("offset")
    tp = TopicPartition(topic, partition) if isinstance(topic, str) and isinstance(partition, int) else None
    return tp, offset if isinstance(offset, int) else None, str(envelope.get("reason"))


def _replay_meta(registry: Any, point: str) -> dict[str, Any] | None:
    """REPLAY_META of the save ``point`` ("snapshot 3", "checkpoint 2"); None when it has none."""
    kind, _, number = point.partition(" ")
    target = registry.checkpoints if kind == "checkpoint" else registry
    meta = target.manifest(int(number))["meta"].get(REPLAY_META)
    keys = ("records", "first_time_ms", "dead_letter_lines", "dead_letters")
    return meta if isinstance(meta, dict) and all(k in meta for k in keys) else None


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
    on_dead_letters_restored: DeadLettersRestored | None = None,
) -> ReplayResult:
    """Replay ``source`` from ``start`` (default: its beginning) to ``end`` (exclusive) into a fresh or
    resumed pipeline under ``checkpoint_dir``; ``on_progress`` gets the number of records handed out,
    a resumed replay's counting those before its restore point (a bar over the whole range then shows
    the whole replay's progress: it ended a resumed replay at 56%);
    refused records go to ``dead_letter_sink`` with their reason (counted either way).
    ``on_restored`` gets, before any sample is sent, how many samples the restored state had already
    sent to ``samples_sink`` (0 for a fresh replay): a resumed replay sends the ones after its restore
    point again, so a file sink keeps only that many lines (else they were in the file twice).
    ``on_dead_letters_restored``: the same for ``dead_letter_sink`` (see DeadLettersRestored)."""
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
    book = _Progress(dead_letter_sink, replay_source)
    pipeline = build_pipeline(
        cfg,
        source=replay_source,
        samples_sink=samples_sink,
        dead_letter_sink=book,
        commit=None,  # never touch the live consumer group's offsets
        clock=clock,
        stats=EngineStats(),
        checkpoint_dir=checkpoint_dir,
        replay=True,
    )
    book.stage = pipeline
    resumed_from = book.restored(on_dead_letters_restored)
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
                on_progress(book.records_before + last_reported)
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
    resumed_to_nothing = unchanged and (pipeline.restored_from or "").startswith("snapshot")
    # Nothing trained at all: no untrained model published as version 1 (a service would serve it).
    if resumed_to_nothing or pipeline.trainer.counters.samples == 0:
        pipeline.close(final=None)
        version = pipeline.version
    else:
        timeout_s = pipeline.settings.flush_timeout_s
        version = _final_snapshot(pipeline, lambda: pipeline.snapshot(flush_timeout_s=timeout_s))
    seconds = time.perf_counter() - t0
    progressive = pipeline.trainer.progressive.get()
    return ReplayResult(
        final_version=version,
        records=book.records,
        samples_trained=pipeline.trainer.counters.samples,
        steps=pipeline.trainer.counters.steps,
        seconds=seconds,
        first_time_ms=book.first_time,
        last_time_ms=book.last_time,
        join=pipeline.joiner.stats.as_dict(),
        dead_letters=dict(pipeline.dead_letters.counts),
        progressive={k: float(v) for k, v in progressive.items()},
        positions=positions_to_json(pipeline.positions),
        trainer=pipeline.trainer.counters.as_dict(),
        records_this_run=pipeline.records_processed,
        resumed_from=resumed_from,
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
    on_dead_letters_restored: DeadLettersRestored | None = None,
    starts_mid_topic: bool = False,
) -> ReplayResult:
    """Replay a range of the samples topic through the train stage alone (the join already happened):
    a new model, feature spec or strategy trained from the same samples at training speed. A resumed
    one goes on as ``run_replay`` does. ``starts_mid_topic``: the range was given a start, so each
    numbering's first samples read are where it starts (not samples missing from the topic)."""
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
    book = _Progress(dead_letter_sink, replay_source)
    stage = build_train_stage(
        cfg.model_copy(update={"train": full_batches}),
        source=replay_source,
        dead_letter_sink=book,
        commit=None,
        clock=clock,
        stats=EngineStats(),
        checkpoint_dir=checkpoint_dir,
        replay=True,
    )
    book.stage = stage
    resumed_from = book.restored(on_dead_letters_restored)
    stage.starts_mid_topic = starts_mid_topic
    t0 = time.perf_counter()
    stage.open()
    restored_at = (stage.trainer.counters.samples, stage.records_processed)
    last_reported = 0

    def report() -> None:
        # Messages trained, not handed out: the fetch thread reads ahead (a bar at 100% after 2.9 s
        # with one snapshot written).
        nonlocal last_reported
        done = stage.records_processed - restored_at[1]
        if on_progress is not None and done != last_reported:
            last_reported = done
            on_progress(book.records_before + done)

    try:
        while not replay_source.done():
            stage.step()
            report()
        while stage.records_processed < replay_source.records_out:  # still on the fetch thread's queue
            stage.step()
            report()
    except BaseException:
        # As run_replay: the snapshot write in flight finished (a resume in this process restored the
        # one before it, and published its boundary a second time) and the fetch thread stopped.
        stage.abort()
        raise
    stage.train_remaining()
    # As run_replay: a resume that finds nothing left publishes no new version (it published the
    # restored snapshot's model again as the next one), nor does a replay that trained nothing.
    unchanged = (stage.trainer.counters.samples, stage.records_processed) == restored_at
    resumed_to_nothing = unchanged and (stage.restored_from or "").startswith("snapshot")
    if resumed_to_nothing or stage.trainer.counters.samples == 0:
        stage.close(final=None)
        version = stage.version
    else:
        version = _final_snapshot(stage, stage.snapshot)
    progressive = stage.trainer.progressive.get()
    return ReplayResult(
        final_version=version,
        records=book.records,
        samples_trained=stage.trainer.counters.samples,
        steps=stage.trainer.counters.steps,
        seconds=time.perf_counter() - t0,
        first_time_ms=book.first_time,
        last_time_ms=book.last_time,
        join={
            "duplicates_dropped": stage.duplicates_dropped,
            "samples_refused": stage.samples_refused,
            "seq_gaps": stage.seq_gaps,
        },
        dead_letters=dict(stage.dead_letters.counts),
        progressive={k: float(v) for k, v in progressive.items()},
        positions=positions_to_json(stage.positions),
        trainer=stage.trainer.counters.as_dict(),
        records_this_run=stage.records_processed,
        resumed_from=resumed_from,
    )
