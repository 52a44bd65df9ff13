"""What every trainer exports, for the single-process pipeline and the train stage alike: steps, samples,
the last mini-batch's loss (total and parts), SC activity and learning rates, and the version, time and
expected period of its snapshots (set at restore too, so a restored process that then stalls trips the
stale alert)."""

from __future__ import annotations

import time

from reloop.engine.checkpoint.registry import SnapshotError, SnapshotRegistry
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.train.stream import StepResult


class TrainerMetrics:
    def __init__(
        self, stats: EngineStats, *, wall_period_s: float | None, event_period_s: float | None = None
    ) -> None:
        self._steps = stats.train_steps.child()
        self._samples = stats.train_samples.child()
        self._skipped = stats.train_skipped_steps.child()
        self._skipped_samples = stats.train_skipped_samples.child()
        self._replayed = stats.train_replayed_samples.child()
        self._mismatches = stats.train_version_mismatches.child()  # at zero from the start
        self._loss = stats.train_loss
        self._loss_parts = stats.train_loss_parts
        self._sc_active = stats.train_sc_active
        self._rates = stats.train_learning_rate
        self._snap_version = stats.snapshot_version
        self._snap_time = stats.snapshot_time_s
        self._snap_period = stats.snapshot_period_s
        self._boundary_time = stats.period_boundary_time_s
        self._snaps = stats.snapshots
        self._wall_period_s = wall_period_s
        # A period of event time lasts that long on the wall clock once the stream is live: the interval
        # observed while a backlog was caught up (0.01 s) made the stale alert fire on live data.
        self._event_period_s = event_period_s or 0.0
        if wall_period_s is not None:
            self._snap_period.set(wall_period_s)
        # Where the interval up to the next snapshot is measured from (count and event-time periods):
        # a fresh stage's first period runs from its start (measured from nothing, the period stayed
        # unknown until the second snapshot, and a stage stalled after its first tripped no alert).
        # Monotonic seconds: on the wall clock a step back of 4 minutes between snapshots 5 minutes apart
        # exported a period of 1 minute (a false ReloopSnapshotStale), an hour forward one of 65 minutes
        # (a stall then went unalerted for over two hours).
        self._measure_from: float | None = time.monotonic()

    def trained(self, result: StepResult) -> None:
        self._steps.add()
        self._samples.add(result.n)
        if result.skipped:
            self._skipped.add()
        if result.skipped_samples:
            self._skipped_samples.add(result.skipped_samples)
        if result.replayed:
            self._replayed.add(result.replayed)
        if result.version_mismatches:
            self._mismatches.add(result.version_mismatches)
        loss = result.loss
        self._loss.set(loss.total)
        for part, value in (("ce", loss.ce), ("sc", loss.sc), ("kd", loss.kd)):
            self._loss_parts.set(value, part)
        self._sc_active.set(loss.sc_active_fraction)
        for optimizer, lr in result.rates.items():
            self._rates.set(lr, optimizer)

    def restored(self, registry: SnapshotRegistry, version: int) -> None:
        """Version ``version`` of ``registry`` was restored: its number and time, and for count and
        event-time periods the interval between it and the version before it, at once: a restored
        process that then stalls must trip the snapshot-stale alert without ever writing a snapshot."""
        created = float(registry.manifest(version)["created_unix"])
        self._snap_version.set(version)
        self._snap_time.set(created)
        self._boundary_time.set(created)
        # Written by another process: its age on the wall clock now, counted on from here monotonically.
        self._measure_from = time.monotonic() - (time.time() - created)
        if self._wall_period_s is not None:
            return
        older = [v for v in registry.versions() if v < version]
        try:
            before = float(registry.manifest(older[-1])["created_unix"]) if older else None
        except SnapshotError:  # an older version that does not read: its time is unknown
            before = None
        if before is not None and created > before:
            self._snap_period.set(max(created - before, self._event_period_s))
            # The next interval spans the downtime and part of a period: not a period's length.
            self._measure_from = None

    def snapshotted(self, version: int) -> None:
        self._snap_version.set(version)
        self._snap_time.set(time.time())
        self._snaps.add()
        self._boundary()

    def idle_boundary(self) -> None:
        """A period boundary passed without a snapshot, nothing trained since the last one
        (engine/train/period.py): a quiet stream, not a stalled one, so the stale alert must not fire."""
        self._boundary()

    def _boundary(self) -> None:
        now = time.monotonic()
        self._boundary_time.set(time.time())
        # Count and event-time periods have no fixed wall length: the stale-snapshot alert uses the
        # last observed interval instead (an event-time period's length at least).
        if self._wall_period_s is None and self._measure_from is not None:
            self._snap_period.set(max(now - self._measure_from, self._event_period_s))
        self._measure_from = now
