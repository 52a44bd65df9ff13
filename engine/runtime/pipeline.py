"""The stream processor's wiring: source -> merge -> decode -> joiner -> trainer -> snapshots.

One thread does everything, in an order that is a function of the input alone (records are merged by
timestamp across partitions, see merge.py; batches are cut by sample count; count and event-time period
boundaries are checked after each step), so a restart from a snapshot continues exactly like an
uninterrupted run. The clock is injected: replay drives ``step()`` with a ManualClock.

Snapshot = learner state (part ``model``: weights, optimizer, RNG, config) + part ``state`` (joiner,
trainer counters and progressive metric, served-prediction metrics, samples joined but not trained yet,
period trigger, ledger length) + JSON meta (source positions, config fingerprint, counters). Order at a
boundary (quix-streams): flush sinks, write the snapshot durably, then commit the source offsets.
The positions saved are those of the last record handed to the joiner, never the consumer's fetch
position, so records buffered in the merge are read again after a restart.

Delivery: training is exactly-once (the snapshot is the only truth); the samples topic and the
dead-letter topic are at-least-once (records re-processed after a crash are sent again).

Failure rule ("nothing lost, nothing wedged"): a record that cannot be processed (undecodable, against
the contract or the feature spec, an event time beyond ``max_future_ms`` of the clock, too large to
forward) goes to the dead-letter sink with its reason and the run goes on. Any other exception is not
about one record: it propagates out of ``step()`` with the in-memory state possibly half-updated, and
the caller must throw this Pipeline away and build a new one, which restores the last snapshot (see
engine/runtime/supervisor.py). Nothing is ever skipped: positions only move forward in a snapshot.

Snapshots and checkpoints: at each period boundary a snapshot is published as the next model version
(the model serving loads, the "previous model" for y_last). Anything saved between boundaries (the
final save of a graceful stop) is a *checkpoint* (``registry.checkpoints``): it takes no version
number, does not re-base the period trigger and does not become the previous model, so a stopped and
restarted run reaches its next boundary with the same version, the same samples and the same previous
model as an uninterrupted run. Restoring prefers the newest checkpoint made after the newest usable
snapshot; a snapshot or checkpoint that does not load is refused and the next older one is tried,
but for one written by a newer reloop (``NewerFormat``: exit 2, engine/runtime/restore.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from reloop.engine.checkpoint.blobs import loadable, saveable
from reloop.engine.checkpoint.registry import Snapshot, SnapshotError, SnapshotRegistry, check_state_format
from reloop.engine.checkpoint.writer import SnapshotWriter
from reloop.engine.deadletter import DeadLetterSink, SampleRecord
from reloop.engine.events.codec import decode_samples, encode
from reloop.engine.events.schema import Click, LabeledSample
from reloop.engine.events.validation import EventError
from reloop.engine.features.check import SpecChecker
from reloop.engine.join.joiner import Joined, Joiner, JoinerConfig
from reloop.engine.metrics.lag import ConsumerLag
from reloop.engine.metrics.online import OnlineMetricsBook
from reloop.engine.metrics.stats import STATS, EngineStats
from reloop.engine.runtime.checkpointer import Checkpointer
from reloop.engine.runtime.config import (
    CheckpointSection,
    ConsumerSection,
    RecoverySection,
    SourceSection,
    ValidationSection,
    default_of,
)
from reloop.engine.runtime.intake import EventIntake, IntakeLimits
from reloop.engine.runtime.join_metrics import BoundDropLog, JoinDrops, JoinerMetrics, TooLateLog
from reloop.engine.runtime.jsonlog import ThrottledWarning
from reloop.engine.runtime.merge import RecordMerger
from reloop.engine.runtime.restore import (
    RestorePoint,
    SaveKind,
    check_train_fingerprint,
    restore_newest,
    take_over,
)
from reloop.engine.runtime.train_metrics import TrainerMetrics
from reloop.engine.serve.bundle_format import publish_serving_bundle
from reloop.engine.streams import (
    Positions,
    Record,
    RecordTooLarge,
    Sink,
    Source,
    TopicPartition,
    merge_ends,
    positions_from_json,
    positions_to_json,
)
from reloop.engine.train.ledger import Ledger
from reloop.engine.train.period import PeriodTrigger
from reloop.engine.train.stream import StepResult, StreamTrainer
from reloop.engine.train.unlearnt import dead_letter_unlearnt, learnt, unlearnt_only

log = logging.getLogger("reloop.pipeline")
STATE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """What the pipeline takes from the config (engine/runtime/build.py); the defaults are the config's."""

    impressions_topic: str = default_of(SourceSection, "impressions_topic")
    clicks_topic: str = default_of(SourceSection, "clicks_topic")
    poll_max_records: int = default_of(ConsumerSection, "poll_max_records")
    poll_timeout_s: float = default_of(ConsumerSection, "poll_timeout_s")
    merge_idle_ms: int = default_of(ConsumerSection, "merge_idle_ms")
    merge_lookahead: int = default_of(ConsumerSection, "merge_lookahead")
    fingerprint: str = ""
    allow_fingerprint_change: bool = False
    flush_timeout_s: float = default_of(RecoverySection, "flush_timeout_s")
    background_writes: bool = default_of(CheckpointSection, "background_writes")
    # Record-level bounds (a record beyond them is dead-lettered, see engine/runtime/config.py).
    max_event_bytes: int = default_of(ValidationSection, "max_event_bytes")
    max_future_ms: int | None = default_of(ValidationSection, "max_future_ms")
    max_past_ms: int | None = default_of(ValidationSection, "max_past_ms")
    # Event-time periods checked at polls that released nothing too, where the joiner's idle watermark
    # moves on: a quiet stream then reaches its boundaries (else only a training step asks, and with no
    # input none comes). Off where deterministic: boundaries at steps alone, however input is chunked.
    periods_when_idle: bool = False


class Pipeline:
    def __init__(
        self,
        *,
        source: Source,
        joiner_config: JoinerConfig,
        trainer: StreamTrainer,
        registry: SnapshotRegistry,
        period: PeriodTrigger,
        settings: PipelineSettings,
        clock: Callable[[], int],
        samples_sink: Sink | None = None,
        dead_letters: DeadLetterSink | None = None,
        served_metrics: OnlineMetricsBook | None = None,
        ledger: Ledger | None = None,
        commit: Callable[[Positions], None] | None = None,
        meta: Mapping[str, Any] | None = None,
        stats: EngineStats = STATS,
        checker: SpecChecker | None = None,
    ) -> None:
        self.source = source
        self.trainer = trainer
        self.registry = registry
        self.period = period
        self.settings = settings
        self.clock = clock
        self._ends_unavailable = ThrottledWarning(log, "end offsets unavailable")
        self.samples_sink = samples_sink
        self.dead_letters = dead_letters or DeadLetterSink()
        self.served_metrics = served_metrics or OnlineMetricsBook()
        self.ledger = ledger
        self.commit = commit
        # Period snapshots are written on a thread while processing goes on (engine/checkpoint/writer.py)
        # when no offsets are committed (a replay): a consumer's commit must stay on the consumer's thread.
        self.writer = SnapshotWriter(background=settings.background_writes and commit is None)
        # Flush (samples, dead letters, ledger), publish, commit; no flush timeout unless a caller gives one.
        self.checkpointer = Checkpointer(
            [samples_sink, self.dead_letters], commit=commit, ledger=ledger, writer=self.writer
        )
        self.meta = dict(meta or {})
        self.intake = EventIntake(
            impressions_topic=settings.impressions_topic,
            clicks_topic=settings.clicks_topic,
            limits=IntakeLimits(
                max_event_bytes=settings.max_event_bytes,
                max_future_ms=settings.max_future_ms,
                max_past_ms=settings.max_past_ms,
            ),
            clock=clock,
            dead_letters=self.dead_letters,
            checker=checker,
        )
        self.joiner = Joiner(joiner_config, clock=clock)
        self._buffer: list[LabeledSample] = []
        self._positions: Positions = {}
        self._merger: RecordMerger | None = None
        self.version: int | None = None  # the newest period snapshot (model version) this state follows
        self.records_processed = 0
        self.snapshots_written = 0  # snapshots and checkpoints published by THIS object
        self.restore_fallbacks = 0  # restore points refused before one loaded
        self.restored_from: str | None = None
        self.last_commit_error: str | None = None
        self._opened = False
        self._metrics = _Publisher(stats, wall_period_s=period.every_wall_s, event_period_s=period.length_s)
        period.on_idle = self._metrics.idle_boundary
        self._restore_latest()

    def _publish_serving_bundle(self) -> None:
        """The version's weights alone for the scoring service, written just before its snapshot
        (engine/serve/bundle_format.py); without it serving loads the version from the snapshot."""
        try:
            publish_serving_bundle(self.registry, self.trainer.learner)
        except OSError as exc:
            log.warning("serving bundle not written", extra={"fields": {"error": repr(exc)}})

    # ------------------------------------------------------------------ lifecycle
    def _restore_latest(self) -> None:
        def refused(point: RestorePoint, exc: BaseException) -> None:
            self.restore_fallbacks += 1
            self._metrics.restore_fallback()

        if restore_newest(self.registry, self._restore, refused) is None and self.ledger is not None:
            self.ledger.truncate(0)  # lines of a run that died before its first snapshot
        take_over(self.registry)

    def _restore(self, point: RestorePoint, snap: Snapshot) -> None:
        meta = snap.meta
        check_train_fingerprint(
            point, meta, self.meta, self.settings.fingerprint, allow=self.settings.allow_fingerprint_change
        )
        state = snap.state["state"]
        # A newer one (a rollback): restore_newest stops the replay instead of resuming from before it.
        check_state_format(
            state,
            STATE_FORMAT,
            "pipeline state",
            prefix=f"{point.kind} {point.number}: ",
            error=SnapshotError,
        )
        learner = self.trainer.learner
        previous = None
        base = point.base_version  # None: a checkpoint from before the first snapshot (no previous model)
        if point.kind == "checkpoint" and base is not None and self.trainer.config.needs_previous_model:
            # The previous model is the one of the period snapshot this checkpoint follows.
            learner.load_state_dict(self.registry.load(base, parts=["model"]).state["model"])
            previous = learner.clone_frozen()
        self.trainer.load_state_dict({**state["trainer"], "learner": snap.state["model"]})
        joiner = Joiner(self.joiner.config, self.clock)
        joiner.load_state_dict(loadable(state["joiner"]))
        samples, bad = decode_samples(state["buffer"])
        if bad:
            raise SnapshotError(f"{point.kind} {point.number}: {len(bad)} buffered samples do not decode")
        served = OnlineMetricsBook.from_state_dict(state["served_metrics"], **self.served_metrics.settings())
        positions = positions_from_json(meta["positions"])
        if base is not None:
            self.trainer.on_snapshot(base)
        if previous is not None:
            self.trainer.prev_model = previous
        self.period.load_state_dict(state["period"])
        self.joiner = joiner
        self.served_metrics = served
        self._buffer = samples
        self._positions = positions
        if self.ledger is not None:
            self.ledger.truncate(int(state["ledger_bytes"]))
        self.version = base
        self.restored_from = f"{point.kind} {point.number}"
        self._metrics.restore(self)
        # The last model version's number and time, at once (as the train stage does).
        if base is not None:
            self._metrics.restored(self.registry, base)
        log.info(
            "restored",
            extra={
                "fields": {
                    "from": self.restored_from,
                    "version": self.version,
                    "positions": meta["positions"],
                    "samples_trained": self.trainer.counters.samples,
                }
            },
        )

    def open(self) -> None:
        if self._opened:
            return
        self.source.open(self._positions or None)
        if not self._positions:
            self._positions = dict(self.source.position())
        self._merger = RecordMerger(
            self.source.partitions(),
            idle_ms=self.settings.merge_idle_ms,
            clock=self.clock,
            lookahead=self.settings.merge_lookahead,
            first_topics=(self.settings.impressions_topic,),
        )
        self._opened = True

    def close(self, *, final: SaveKind | None = "checkpoint") -> int | None:
        """Stop: save the state a last time (``final``: a checkpoint, which takes no model version, or a
        snapshot, e.g. at the end of a replay; None: nothing), then release everything. Returns the
        snapshot version or checkpoint number written, or None.

        When the sinks cannot flush (broker down) the final save is skipped, so a restart re-processes
        from the previous one and the records those sinks still held are sent again, not lost.
        """
        number = None
        saved = True
        try:
            if final is not None and self._opened:
                try:
                    number = self.snapshot(kind=final, flush_timeout_s=self.settings.flush_timeout_s)
                except Exception as exc:  # noqa: BLE001 - the previous snapshot stays the restart point
                    saved = False
                    log.error("final save skipped", extra={"fields": {"kind": final, "error": repr(exc)}})
        finally:
            self.writer.finish()  # the write in flight is on disk for whoever restores next
            self.source.close()
            if saved:
                if self.samples_sink is not None:
                    self.samples_sink.close()
                self.dead_letters.close()
            else:
                self._abort_sinks()
            if self.ledger is not None:
                self.ledger.close()
        return number

    def abort(self) -> None:
        """Release everything without saving (after a failure: the last snapshot is the restart point,
        and what the sinks still hold is sent again by the pipeline that resumes from it)."""
        for release in (self.writer.finish, self.source.close, self._abort_sinks):
            try:
                release()
            except Exception as exc:  # noqa: BLE001 - tearing down a failed pipeline
                log.warning("abort: release failed", extra={"fields": {"error": repr(exc)}})
        if self.ledger is not None:
            self.ledger.close()

    def _abort_sinks(self) -> None:
        for sink in (self.samples_sink, self.dead_letters.sink):
            if sink is not None:
                abort = getattr(sink, "abort", None)
                try:
                    (abort or sink.close)()
                except Exception as exc:  # noqa: BLE001 - a broken sink is being thrown away
                    log.warning("abort: sink release failed", extra={"fields": {"error": repr(exc)}})

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        until: Callable[[Pipeline], bool] | None = None,
        stop: threading.Event | None = None,
        on_step: Callable[[Pipeline], None] | None = None,
    ) -> None:
        """Call ``step()`` until ``stop`` is set or ``until(self)`` is true. An exception is never
        swallowed here (see the failure rule in the module docstring)."""
        self.open()
        while not (stop is not None and stop.is_set()) and not (until is not None and until(self)):
            self.step()
            if on_step is not None:
                on_step(self)

    def step(self) -> int:
        """Poll once, process what can be released, let wall-clock time act. Returns records processed."""
        self.open()
        assert self._merger is not None
        records = self.source.poll(self.settings.poll_max_records, self.settings.poll_timeout_s)
        if records:
            self._metrics.consumed(records)
            self._merger.add(records)
        released = self._merger.release(self.source.position(), self._end_positions())
        if released:
            self._process(released)
        idle_out = self.joiner.advance()
        if idle_out:
            self._accept(idle_out)
        self._metrics.publish(self)
        self._metrics.lag(self.source)
        idle = not released and self.settings.periods_when_idle and self.period.every_event_ms is not None
        if self.period.every_wall_s is not None or idle:
            self._maybe_snapshot()
        return len(released)

    def _end_positions(self) -> Positions | None:
        """The source's log ends when it can tell (and a partition has fewer records buffered than the
        merge looks ahead); {} when it failed to."""
        assert self._merger is not None
        end = getattr(self.source, "end_positions", None)
        if end is None or not self._merger.needs_ends():
            return None if end is None else {}
        try:
            return merge_ends(self.source)
        except Exception as exc:  # noqa: BLE001 - unknown ends: hold back, never guess the order
            self._ends_unavailable(error=repr(exc))
            return {}

    def drain(self) -> int:
        """Process everything buffered in the merge regardless of idleness (end of a bounded replay)."""
        assert self._merger is not None
        released = self._merger.drain()
        if released:
            self._process(released)
        return len(released)

    def flush_join(self) -> None:
        """Close every pending window now (end of a bounded replay)."""
        self._accept(self.joiner.flush())

    def train_remaining(self) -> StepResult | None:
        """Train the partial batch now (end of a bounded replay; a live run carries it in its snapshot)."""
        if not self._buffer:
            return None
        batch, self._buffer = self._buffer, []
        return self._train(batch)

    # ------------------------------------------------------------------ internals
    def _process(self, records: list[Record]) -> None:
        joiner = self.joiner
        positions = self._positions
        for r, ev in self.intake.events(records):
            out: list[Joined] = []
            if ev is not None:
                if type(ev) is Click:
                    out = joiner.on_click(ev.impression_id, ev.event_time_ms)
                else:
                    out = joiner.on_impression(ev.impression_id, ev.event_time_ms, r.value)
            positions[TopicPartition(r.topic, r.partition)] = r.offset + 1
            self.records_processed += 1
            if out:
                self._accept(out)

    def _accept(self, joined: list[Joined]) -> None:
        sink = self.samples_sink
        for j in joined:
            sample = sample_from_joined(j)
            if sink is not None:
                value = encode(sample)
                key = j.impression_id.encode()
                try:
                    sink.send(value, key=key, timestamp_ms=j.event_time_ms)
                except RecordTooLarge as exc:
                    # Still trained: only its copy on the samples topic is replaced by a dead letter.
                    unsent = SampleRecord("samples", None, None, key, value, j.event_time_ms)
                    self.dead_letters.send(unsent, EventError("oversized", str(exc)))
            self._metrics.joined(sample)
            self._buffer.append(sample)
        # Train only once ALL of ``joined`` is in the buffer: a snapshot at a boundary then holds every
        # emitted sample (trained, or in its buffer). Snapshotting between two samples of one joiner
        # output lost the rest of it on restore: the joiner state already counted them as emitted.
        bs = self.trainer.config.batch_size
        while len(self._buffer) >= bs:
            batch = self._buffer[:bs]
            del self._buffer[:bs]
            self._train(batch)
            self._maybe_snapshot()

    def _train(self, batch: list[LabeledSample]) -> StepResult:
        # Served-prediction metrics are fed per batch (one lock); the buffer in a snapshot is not yet counted.
        self.served_metrics.update_many(batch)
        result = self.trainer.train_batch(batch)
        if result.unlearnt is not None:
            unlearnt = unlearnt_only(batch, result.unlearnt)
            dead_letter_unlearnt(self.dead_letters, "samples", unlearnt, result.unlearnt_why)
        if self.ledger is not None:
            self.ledger.append(self.trainer.counters.steps, learnt(batch, result.unlearnt))
        self._metrics.trained(result)
        return result

    def _maybe_snapshot(self) -> None:
        """A due period boundary is published before anything else is processed; if publishing
        fails, the exception propagates (the boundary is never postponed past more input, which
        would change what the snapshot holds and shift the schedule). A background write that failed
        is raised here, at the next call after it."""
        self.writer.check()
        wm = self.joiner.watermark_ms
        if self.period.due(
            samples=self.trainer.counters.samples, event_time_ms=wm if wm > 0 else None, now_ms=self.clock()
        ):
            self.snapshot(flush_timeout_s=self.settings.flush_timeout_s, wait=False)

    def snapshot(
        self, *, kind: SaveKind = "snapshot", flush_timeout_s: float | None = None, wait: bool = True
    ) -> int:
        """Publish everything now as the next model version (``kind="snapshot"``: a period boundary)
        or as a checkpoint (no version, no boundary; see the module docstring). Returns the version or
        checkpoint number. In the checkpointer's order: the sinks are flushed first (a flush that fails
        raises before anything is written), the offsets committed last. ``wait``: return once it is
        durable; otherwise once it is serialised (background writes: the write and the commit go on on
        the writer thread, and a failed write is raised by the next ``snapshot`` or ``step``)."""
        positions = dict(self._positions)
        number = self.checkpointer.save(
            lambda ledger_bytes: self._publish(kind, positions, ledger_bytes),
            positions,
            timeout_s=flush_timeout_s,
            kind=kind,
        )
        if wait:
            self.writer.wait()
        self.last_commit_error = self.checkpointer.last_commit_error
        return number

    def _publish(self, kind: SaveKind, positions: Positions, ledger_bytes: int) -> int:
        """The checkpointer's publish step: the state as a snapshot or a checkpoint; its number."""
        t0 = time.perf_counter()
        self.writer.wait()  # the write in flight first: the bundle below takes the next version on disk
        boundary = kind == "snapshot"
        # A snapshot holds the trigger as it is AFTER its boundary, or a restart fires it again; a
        # checkpoint holds it untouched, so the next boundary comes where it would have come.
        period_before = self.period.state_dict()
        if boundary:
            wm = self.joiner.watermark_ms
            self.period.mark(
                samples=self.trainer.counters.samples,
                event_time_ms=wm if wm > 0 else None,
                now_ms=self.clock(),
            )
        trainer_state = self.trainer.state_dict()
        model = trainer_state.pop("learner")  # the snapshot's "model" part
        state = {
            "format": STATE_FORMAT,
            "joiner": saveable(self.joiner.state_dict()),  # its columns as tensors (blobs.py)
            "trainer": trainer_state,
            "served_metrics": self.served_metrics.state_dict(),
            "buffer": [encode(s) for s in self._buffer],
            "period": self.period.state_dict(),
            "ledger_bytes": ledger_bytes,
        }
        meta = {
            **self.meta,
            "kind": kind,
            "fingerprint": self.settings.fingerprint,
            "positions": positions_to_json(positions),
            "samples_trained": self.trainer.counters.samples,
            "steps": self.trainer.counters.steps,
            "watermark_ms": self.joiner.watermark_ms,
            "pending": self.joiner.pending_count,
            "buffered_samples": len(self._buffer),
            "previous_version": self.version,
        }
        if not boundary:
            meta["base_version"] = self.version  # the period snapshot this checkpoint follows
        target = self.registry if boundary else self.registry.checkpoints
        if boundary:
            self._publish_serving_bundle()
        fields = {
            "version": None if boundary else self.version,
            "samples_trained": meta["samples_trained"],
            "positions": meta["positions"],
        }
        try:
            number = self.writer.publish(
                target,
                {"model": model, "state": state},
                meta,
                on_durable=lambda n: self._durable(kind, n, {**fields, "seconds": time.perf_counter() - t0}),
            )
        except BaseException:
            self.period.load_state_dict(period_before)
            raise
        if boundary:
            self.version = number
            self.trainer.on_snapshot(number)
        return number

    def _durable(self, kind: SaveKind, number: int, fields: dict[str, Any]) -> None:
        """A save is on disk (called on the writer thread when writes are in the background)."""
        self.snapshots_written += 1
        if kind == "snapshot":
            self._metrics.snapshotted(number)
        version = number if kind == "snapshot" else fields["version"]
        fields = {"number": number, **fields, "version": version, "seconds": round(fields["seconds"], 4)}
        log.info(kind, extra={"fields": fields})

    @property
    def positions(self) -> Positions:
        return dict(self._positions)

    @property
    def buffered_samples(self) -> int:
        return len(self._buffer)


def sample_from_joined(j: Joined) -> LabeledSample:
    """The labeled sample of a joined impression. Its payload passed validation when it arrived
    (``decode_impressions``), so it is only parsed here, not checked again."""
    obj = orjson.loads(j.payload)
    return LabeledSample(
        sample_id=j.impression_id,
        features=obj["features"],
        label=j.label,
        served_prediction=float(obj["served_prediction"]),
        served_version=int(obj["model_version"]),
        event_time_ms=j.event_time_ms,
        arm=obj.get("arm") or "default",
        is_correction=j.is_correction,
    )


class _Publisher(TrainerMetrics):
    """The trainer's metrics, plus the joiner's (``JoinerMetrics``) and the consumer's lag."""

    def __init__(
        self,
        stats: EngineStats,
        *,
        wall_period_s: float | None = None,
        event_period_s: float | None = None,
        lag_interval_s: float = 1.0,
    ) -> None:
        super().__init__(stats, wall_period_s=wall_period_s, event_period_s=event_period_s)
        self.join = JoinerMetrics(stats)
        self._lag_interval_s = lag_interval_s
        self._lag_at = float("-inf")
        self._lag = ConsumerLag(stats.consumer_lag, interval_s=0.0)  # (rate-limited here: it asks)
        self._fallbacks = stats.snapshot_restore_fallbacks
        self._last_join: dict[str, int] = {}
        self._too_late_log = TooLateLog(log)
        self._bound_drop_log = BoundDropLog(log)

    def restore(self, p: Pipeline) -> None:
        # Counters restart at zero in a new process (Prometheus handles resets); start deltas from the
        # restored joiner so its history is not exported twice.
        self._last_join = p.joiner.stats.as_dict()

    def restore_fallback(self) -> None:
        self._fallbacks.add()

    def consumed(self, records: list[Record]) -> None:
        self.join.consumed(records)

    def joined(self, sample: LabeledSample) -> None:
        self.join.joined([sample.label])

    def lag(self, source: Any) -> None:
        """End offset minus position per partition, at most once per ``lag_interval_s`` (a metadata
        round trip); on the processing thread because a consumer is not thread-safe."""
        end_positions = getattr(source, "end_positions", None)
        now = time.monotonic()
        if end_positions is None or now - self._lag_at < self._lag_interval_s:
            return
        self._lag_at = now
        try:
            ends = end_positions()
        except Exception as exc:  # noqa: BLE001 - lag is best effort; processing goes on
            log.debug("lag unavailable", extra={"fields": {"error": repr(exc)}})
            return
        self._lag.observe(source.position(), ends)

    def publish(self, p: Pipeline) -> None:
        j = p.joiner
        self.join.pending.set(j.pending_count)
        if j.watermark_ms > 0:
            self.join.watermark_s.set(j.watermark_ms / 1000.0)
        now = j.stats.as_dict()
        if p._merger is not None:
            now["stamped_ahead"] = p._merger.stamped_ahead
        drops = JoinDrops((0, 0), {})
        if now != self._last_join:
            drops = self.join.joiner_delta(now, self._last_join)
            self._last_join = now
        self._too_late_log(drops.too_late, j.watermark_ms)
        self._bound_drop_log(drops.at_bounds, pending=j.pending_count)
        self.join.dead_letters(p.dead_letters.counts)
