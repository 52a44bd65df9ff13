"""The snapshot interval the stale-snapshot alert compares with, across steps of the wall clock."""

from __future__ import annotations

import pytest
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime import train_metrics
from reloop.engine.runtime.train_metrics import TrainerMetrics


class SteppedTime:
    """``time.time`` that an NTP correction steps, and ``time.monotonic`` that no step moves."""

    def __init__(self) -> None:
        self.wall = 1_700_000_000.0
        self.steady = 100.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.steady

    def run(self, s: float) -> None:
        self.wall += s
        self.steady += s


@pytest.mark.parametrize("step_s", [-240.0, 3_600.0])
def test_a_wall_clock_step_between_snapshots_does_not_change_the_exported_period(monkeypatch, step_s):
    # Back 4 minutes: a period of 60 s, and ReloopSnapshotStale fired before the next snapshot was due;
    # an hour forward: 3,900 s, and a stall went unalerted for over two hours.
    clock = SteppedTime()
    monkeypatch.setattr(train_metrics, "time", clock)
    stats = EngineStats()
    metrics = TrainerMetrics(stats, wall_period_s=None)
    clock.run(300)
    metrics.snapshotted(1)
    clock.wall += step_s
    clock.run(300)
    metrics.snapshotted(2)
    assert stats.snapshot_period_s.get() == 300
    assert stats.snapshot_time_s.get() == clock.wall  # the timestamp stays wall-clock time


class _OneVersion:
    def __init__(self, created: float) -> None:
        self.created = created

    def manifest(self, version: int) -> dict[str, float]:
        return {"created_unix": self.created}

    def versions(self) -> list[int]:
        return [1]


def test_the_first_interval_after_a_restore_spans_the_snapshots_age_and_no_later_step(monkeypatch):
    clock = SteppedTime()
    monkeypatch.setattr(train_metrics, "time", clock)
    stats = EngineStats()
    metrics = TrainerMetrics(stats, wall_period_s=None)
    metrics.restored(_OneVersion(created=clock.wall - 100), 1)  # written 100 s before this restore
    clock.wall -= 240
    clock.run(200)
    metrics.snapshotted(2)
    assert stats.snapshot_period_s.get() == pytest.approx(300)
