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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from connectors.base import (
    Positions,
    Record,
    Sink,
    Source,
    TopicPartition,
    positions_from_json,
    positions_to_json,
)
from connectors.deadletter import DeadLetterSink
from engine.checkpoint.registry import SnapshotRegistry
from engine.events.codec import decode_clicks, decode_impressions, decode_samples, encode
from engine.events.schema import LabeledSample
from engine.events.validation import EventError
from engine.join.joiner import Joined, Joiner, JoinerConfig
from engine.metrics import registry as m
from engine.metrics.online import OnlineMetricsBook
from engine.runtime.merge import RecordMerger
from engine.train.ledger import Ledger
from engine.train.period import PeriodTrigger
from engine.train.stream import StepResult, StreamTrainer

log = logging.getLogger("reloop.pipeline")
STATE_FORMAT = 1


class SnapshotMismatch(RuntimeError):
    """The newest snapshot was made with a different training configuration."""


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    impressions_topic: str = "impressions"
    clicks_topic: str = "clicks"
    poll_max_records: int = 4096
    poll_timeout_s: float = 0.1
    merge_idle_ms: int = 2_000
    fingerprint: str = ""
    allow_fingerprint_change: bool = False
    error_backoff_s: float = 1.0
    flush_timeout_s: float = 30.0


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
        stats: m.MetricsRegistry = m.REGISTRY,
    ) -> None:
        self.source = source
        self.trainer = trainer
        self.registry = registry
        self.period = period
        self.settings = settings
        self.clock = clock
        self.samples_sink = samples_sink
        self.dead_letters = dead_letters or DeadLetterSink()
        self.served_metrics = served_metrics or OnlineMetricsBook()
        self.ledger = ledger
        self.commit = commit
        self.meta = dict(meta or {})
        self.joiner = Joiner(joiner_config, clock=clock)
        self._buffer: list[LabeledSample] = []
        self._positions: Positions = {}
        self._merger: RecordMerger | None = None
        self.version: int | None = None
        self.records_processed = 0
        self.last_commit_error: str | None = None
        self._opened = False
        self._metrics = _Publisher(stats, wall_period_s=period.every_wall_s)
        self._restore_latest()

    # ------------------------------------------------------------------ lifecycle
    def _restore_latest(self) -> None:
        if self.registry.latest_version() is None:
            if self.ledger is not None:
                self.ledger.truncate(0)  # lines of a run that died before its first snapshot
            return
        snap = self.registry.load()
        meta = snap.meta
        fp = meta.get("fingerprint")
        if fp != self.settings.fingerprint and not self.settings.allow_fingerprint_change:
            raise SnapshotMismatch(
                f"snapshot {snap.version} was made with config fingerprint {fp}, this config is "
                f"{self.settings.fingerprint}; use a fresh checkpoint dir or allow_fingerprint_change"
            )
        state = snap.state["state"]
        if state.get("format") != STATE_FORMAT:
            raise SnapshotMismatch(f"snapshot {snap.version}: unknown state format {state.get('format')!r}")
        self.trainer.learner.load_state_dict(snap.state["model"])
        self.joiner = Joiner.restore(state["joiner"], clock=self.clock, config=self.joiner.config)
        self.trainer.restore(state["trainer"], snap.version)
        self.served_metrics = OnlineMetricsBook.restore(
            state["served_metrics"],
            window_size=self.served_metrics.window_size,
            max_versions=self.served_metrics.max_versions,
        )
        samples, bad = decode_samples(state["buffer"])
        if bad:
            raise SnapshotMismatch(f"snapshot {snap.version}: {len(bad)} buffered samples do not decode")
        self._buffer = samples
        self.period.restore(state["period"], now_ms=self.clock())
        self._positions = positions_from_json(meta["positions"])
        if self.ledger is not None:
            self.ledger.truncate(int(state["ledger_bytes"]))
        self.version = snap.version
        self._metrics.restore(self)
        log.info(
            "restored",
            extra={
                "fields": {
                    "version": snap.version,
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
            self.source.partitions(), idle_ms=self.settings.merge_idle_ms, clock=self.clock
        )
        self._opened = True

    def close(self, *, final_snapshot: bool = True) -> int | None:
        """Stop: a last snapshot (samples not yet trained are carried in it), then release everything.

        When the sinks cannot flush (broker down) the final snapshot is skipped, so a restart re-processes
        from the previous one and the records those sinks still held are sent again, not lost.
        """
        version = None
        flushed = True
        try:
            if final_snapshot and self._opened:
                try:
                    version = self.snapshot(flush_timeout_s=self.settings.flush_timeout_s)
                except Exception as exc:  # noqa: BLE001 - the previous snapshot stays the restart point
                    flushed = False
                    log.error("final snapshot skipped", extra={"fields": {"error": repr(exc)}})
        finally:
            self.source.close()
            if flushed:
                if self.samples_sink is not None:
                    self.samples_sink.close()
                self.dead_letters.close()
            if self.ledger is not None:
                self.ledger.close()
        return version

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        until: Callable[[Pipeline], bool] | None = None,
        stop: threading.Event | None = None,
        on_step: Callable[[Pipeline], None] | None = None,
    ) -> None:
        """Call ``step()`` until ``stop`` is set or ``until(self)`` is true. Source errors are logged and
        retried after a back-off: the state is untouched by a failed poll, so nothing is lost."""
        self.open()
        while not (stop is not None and stop.is_set()) and not (until is not None and until(self)):
            try:
                self.step()
            except (EventError, SnapshotMismatch):
                raise
            except Exception as exc:  # noqa: BLE001 - a broker outage: keep the state, retry
                log.warning("step failed, retrying", extra={"fields": {"error": repr(exc)}})
                time.sleep(self.settings.error_backoff_s)
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
        if self.period.every_wall_s is not None:
            self._maybe_snapshot()
        return len(released)

    def _end_positions(self) -> Positions | None:
        """The source's log ends when it can tell (and a partition is empty); {} when it failed to."""
        assert self._merger is not None
        end = getattr(self.source, "end_positions", None)
        if end is None or not self._merger.needs_ends():
            return None if end is None else {}
        try:
            return dict(end())
        except Exception as exc:  # noqa: BLE001 - unknown ends: hold back, never guess the order
            log.warning("end offsets unavailable", extra={"fields": {"error": repr(exc)}})
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
        s = self.settings
        kinds: list[int] = []
        imp_values: list[bytes] = []
        clk_values: list[bytes] = []
        for r in records:
            if r.topic == s.impressions_topic:
                kinds.append(0)
                imp_values.append(r.value)
            elif r.topic == s.clicks_topic:
                kinds.append(1)
                clk_values.append(r.value)
            else:
                kinds.append(2)
        imps, imp_bad = decode_impressions(imp_values)
        clks, clk_bad = decode_clicks(clk_values)
        imp_errors = dict(imp_bad)
        clk_errors = dict(clk_bad)
        imp_iter, clk_iter = iter(imps), iter(clks)
        i_imp = i_clk = 0
        joiner = self.joiner
        positions = self._positions
        for r, kind in zip(records, kinds, strict=True):
            out: list[Joined] = []
            if kind == 0:
                err = imp_errors.get(i_imp)
                i_imp += 1
                if err is None:
                    ev = next(imp_iter)
                    out = joiner.on_impression(ev.impression_id, ev.event_time_ms, r.value)
                else:
                    self.dead_letters.send(r, err)
            elif kind == 1:
                err = clk_errors.get(i_clk)
                i_clk += 1
                if err is None:
                    ck = next(clk_iter)
                    out = joiner.on_click(ck.impression_id, ck.event_time_ms)
                else:
                    self.dead_letters.send(r, err)
            else:
                self.dead_letters.send(
                    r, EventError("bad_value", f"record from unexpected topic {r.topic!r}")
                )
            positions[TopicPartition(r.topic, r.partition)] = r.offset + 1
            self.records_processed += 1
            if out:
                self._accept(out)

    def _accept(self, joined: list[Joined]) -> None:
        sink = self.samples_sink
        for j in joined:
            sample = sample_from_joined(j)
            if sink is not None:
                sink.send(encode(sample), key=j.impression_id.encode(), timestamp_ms=j.event_time_ms)
            self._metrics.joined(sample)
            self._buffer.append(sample)
            if len(self._buffer) >= self.trainer.config.batch_size:
                bs = self.trainer.config.batch_size
                batch = self._buffer[:bs]
                del self._buffer[:bs]
                self._train(batch)
                self._maybe_snapshot()

    def _train(self, batch: list[LabeledSample]) -> StepResult:
        # Served-prediction metrics are fed per batch (one lock); the buffer in a snapshot is not yet counted.
        self.served_metrics.update_many(batch)
        result = self.trainer.train_batch(batch)
        if self.ledger is not None:
            self.ledger.append(self.trainer.counters.steps, batch)
        self._metrics.trained(result)
        return result

    def _maybe_snapshot(self) -> None:
        wm = self.joiner.watermark_ms
        if self.period.due(
            samples=self.trainer.counters.samples, event_time_ms=wm if wm > 0 else None, now_ms=self.clock()
        ):
            try:
                self.snapshot(flush_timeout_s=self.settings.flush_timeout_s)
            except Exception as exc:  # noqa: BLE001 - retried at the next step; processing goes on
                log.warning("snapshot postponed", extra={"fields": {"error": repr(exc)}})

    def snapshot(self, flush_timeout_s: float | None = None) -> int:
        """Publish a snapshot of everything now; returns its version. The sinks are flushed first: a
        flush that fails raises before anything is written."""
        if self.samples_sink is not None:
            self.samples_sink.flush(flush_timeout_s)
        self.dead_letters.flush(flush_timeout_s)
        ledger_bytes = self.ledger.sync() if self.ledger is not None else 0
        positions = dict(self._positions)
        # The snapshot must hold the trigger as it is AFTER this boundary, or a restart fires it again.
        period_before = self.period.state()
        wm = self.joiner.watermark_ms
        self.period.mark(
            samples=self.trainer.counters.samples, event_time_ms=wm if wm > 0 else None, now_ms=self.clock()
        )
        state = {
            "format": STATE_FORMAT,
            "joiner": self.joiner.snapshot(),
            "trainer": self.trainer.state(),
            "served_metrics": self.served_metrics.snapshot(),
            "buffer": [encode(s) for s in self._buffer],
            "period": self.period.state(),
            "ledger_bytes": ledger_bytes,
        }
        meta = {
            **self.meta,
            "fingerprint": self.settings.fingerprint,
            "positions": positions_to_json(positions),
            "samples_trained": self.trainer.counters.samples,
            "steps": self.trainer.counters.steps,
            "watermark_ms": self.joiner.watermark_ms,
            "pending": self.joiner.pending_count,
            "buffered_samples": len(self._buffer),
            "previous_version": self.version,
        }
        t0 = time.perf_counter()
        try:
            version = self.registry.publish(
                {"model": self.trainer.learner.state_dict(), "state": state}, meta
            )
        except BaseException:
            self.period.restore(period_before, now_ms=self.clock())
            raise
        self.version = version
        self.trainer.on_snapshot(version)
        self._metrics.snapshotted(version)
        if self.commit is not None:
            try:
                self.commit(positions)
                self.last_commit_error = None
            except Exception as exc:  # noqa: BLE001 - offsets are informational; the snapshot is the truth
                self.last_commit_error = repr(exc)
                log.warning(
                    "offset commit failed", extra={"fields": {"version": version, "error": repr(exc)}}
                )
        log.info(
            "snapshot",
            extra={
                "fields": {
                    "version": version,
                    "samples_trained": self.trainer.counters.samples,
                    "positions": meta["positions"],
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            },
        )
        return version

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


class _Publisher:
    """Copies engine counters into the stats registry (deltas of the joiner's own counters)."""

    def __init__(
        self, stats: m.MetricsRegistry, *, wall_period_s: float | None = None, lag_interval_s: float = 1.0
    ) -> None:
        m.ensure_canonical(stats)
        g = stats.get
        self._wall_period_s = wall_period_s
        self._lag_interval_s = lag_interval_s
        self._lag_at = float("-inf")
        self._lag = g(m.CONSUMER_LAG.name)
        self._snap_period = g(m.SNAPSHOT_PERIOD.name)
        self._last_snap_wall: float | None = None
        if wall_period_s is not None:
            self._snap_period.set(wall_period_s)
        self.consumed_by_topic: dict[str, Any] = {}
        self._events = g(m.EVENTS_CONSUMED.name)
        self._joined = {
            0: g(m.JOINED_SAMPLES.name).labels(label="0"),
            1: g(m.JOINED_SAMPLES.name).labels(label="1"),
        }
        self._pending = g(m.JOINER_PENDING.name)
        self._watermark = g(m.JOINER_WATERMARK.name)
        self._expired = g(m.JOINER_EXPIRED.name)
        self._late = g(m.JOINER_LATE_CLICKS.name)
        self._orphans = g(m.JOINER_ORPHAN_CLICKS.name)
        self._dupes = g(m.JOINER_DUPLICATES.name)
        self._bound = g(m.JOINER_DROPPED_BY_BOUND.name)
        self._steps = g(m.TRAIN_STEPS.name)
        self._samples = g(m.TRAIN_SAMPLES.name)
        self._loss = g(m.TRAIN_LOSS.name)
        self._sc_active = g(m.TRAIN_SC_ACTIVE.name)
        self._snap_version = g(m.SNAPSHOT_VERSION.name)
        self._snap_time = g(m.SNAPSHOT_TIMESTAMP.name)
        self._snaps = g(m.SNAPSHOTS.name)
        self._dead = g(m.DEAD_LETTERS.name)
        self._last_join: dict[str, int] = {}
        self._last_dead: dict[str, int] = {}

    def restore(self, p: Pipeline) -> None:
        # Counters restart at zero in a new process (Prometheus handles resets); start deltas from the
        # restored joiner so its history is not exported twice.
        self._last_join = p.joiner.stats.as_dict()

    def consumed(self, records: list[Record]) -> None:
        counts: dict[str, int] = {}
        for r in records:
            counts[r.topic] = counts.get(r.topic, 0) + 1
        for topic, n in counts.items():
            child = self.consumed_by_topic.get(topic)
            if child is None:
                child = self.consumed_by_topic[topic] = self._events.labels(topic=topic)
            child.inc(n)

    def joined(self, sample: LabeledSample) -> None:
        self._joined[sample.label].inc()

    def trained(self, result: StepResult) -> None:
        self._steps.inc()
        self._samples.inc(len(result.samples))
        loss = result.loss
        for part, value in (("ce", loss.ce), ("sc", loss.sc), ("kd", loss.kd), ("total", loss.total)):
            self._loss.labels(part=part).set(value)
        self._sc_active.set(loss.sc_active_fraction)

    def snapshotted(self, version: int) -> None:
        now = time.time()
        self._snap_version.set(version)
        self._snap_time.set(now)
        self._snaps.inc()
        # Count and event-time periods have no fixed wall length: the stale-snapshot alert uses the
        # last observed interval instead.
        if self._wall_period_s is None and self._last_snap_wall is not None:
            self._snap_period.set(now - self._last_snap_wall)
        self._last_snap_wall = now

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
        positions = source.position()
        for tp, end in ends.items():
            pos = positions.get(tp)
            if pos is not None:
                self._lag.labels(topic=tp.topic, partition=str(tp.partition)).set(max(0, end - pos))

    def publish(self, p: Pipeline) -> None:
        j = p.joiner
        self._pending.set(j.pending_count)
        if j.watermark_ms > 0:
            self._watermark.set(j.watermark_ms / 1000.0)
        now = j.stats.as_dict()
        last = self._last_join

        def delta(name: str) -> int:
            return now[name] - last.get(name, 0)

        if now != last:
            self._expired.inc(delta("negatives"))
            self._late.labels(policy="drop").inc(delta("late_clicks_dropped"))
            self._late.labels(policy="correct").inc(delta("late_clicks_corrected"))
            self._orphans.inc(delta("orphan_clicks") + delta("too_late_clicks"))
            self._dupes.labels(kind="impression").inc(delta("duplicate_impressions"))
            self._dupes.labels(kind="click").inc(delta("duplicate_clicks"))
            self._bound.inc(delta("evicted_pending") + delta("expired_ttl"))
            self._last_join = now
        dead = p.dead_letters.counts
        if dead != self._last_dead:
            for reason, n in dead.items():
                d = n - self._last_dead.get(reason, 0)
                if d:
                    self._dead.labels(reason=reason).inc(d)
            self._last_dead = dict(dead)
