"""The joiner's counts as the join stage exports them."""

from __future__ import annotations

from reloop.engine.join.joiner import JoinStats
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.join_metrics import JoinerMetrics


def test_what_each_bound_dropped_is_exported_under_that_bound() -> None:
    # Impressions past join.ttl_ms were counted as "evicted because the joiner reached its memory bound",
    # and clicks dropped past join.max_early_clicks were lost without any count.
    stats = EngineStats()
    metrics = JoinerMetrics(stats)
    before, now = JoinStats(), JoinStats(evicted_pending=2, expired_ttl=5, evicted_early_clicks=3)
    metrics.joiner_delta(now.as_dict(), before.as_dict())
    assert dict(stats.joiner_dropped_by_bound.items()) == {
        ("max_pending",): 2,
        ("ttl",): 5,
        ("max_early_clicks",): 3,
    }
    later = JoinStats(evicted_pending=2, expired_ttl=6, evicted_early_clicks=3)
    metrics.joiner_delta(later.as_dict(), now.as_dict())
    assert stats.joiner_dropped_by_bound.get("ttl") == 6


def test_the_join_stage_logs_events_dropped_as_too_late(caplog) -> None:
    # Only the single-process pipeline logged them (operations.md says "counted and logged"); under
    # `reloop run`'s join stage, events stamped in seconds were dropped with nothing in the log.
    import logging
    from types import SimpleNamespace

    from reloop.engine.runtime.join_stage import _JoinMetrics

    stats = EngineStats()
    metrics = _JoinMetrics(stats)
    joiner = SimpleNamespace(stats=JoinStats(), pending_count=0, watermark_ms=1_000)
    task = SimpleNamespace(
        joiner=joiner,
        merger=SimpleNamespace(stamped_ahead=0),
        replay_abandoned=0,
        partition=3,
        incarnation="x",
    )
    stage = SimpleNamespace(tasks={3: task}, dead_letters=SimpleNamespace(counts={}))
    metrics.taken(3, task)
    with caplog.at_level(logging.WARNING, logger="reloop.join"):
        metrics.publish(stage)
        assert not caplog.records
        joiner.stats = JoinStats(too_late_impressions=2, too_late_clicks=1)
        metrics.publish(stage)
    [record] = caplog.records
    assert record.getMessage().startswith("events dropped as too late")
    assert record.fields == {"impressions": 2, "clicks": 1, "watermark_ms": 1_000, "task": 3}
    assert stats.joiner_too_late.get("impression") == 2 and stats.joiner_too_late.get("click") == 1
