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
    # Closed windows forgotten at join.max_closed were counted in the joiner and exported nowhere.
    before = JoinStats()
    now = JoinStats(evicted_pending=2, expired_ttl=5, evicted_early_clicks=3, evicted_closed=7)
    drops = metrics.joiner_delta(now.as_dict(), before.as_dict())
    assert dict(stats.joiner_dropped_by_bound.items()) == {
        ("max_pending",): 2,
        ("ttl",): 5,
        ("max_early_clicks",): 3,
        ("max_closed",): 7,
    }
    # What lost events is worth a log line; a forgotten window lost nothing.
    assert drops.at_bounds == {"max_pending": 2, "ttl": 5, "max_early_clicks": 3}
    later = JoinStats(evicted_pending=2, expired_ttl=6, evicted_early_clicks=3)
    metrics.joiner_delta(later.as_dict(), now.as_dict())
    assert stats.joiner_dropped_by_bound.get("ttl") == 6


def _stage_with_one_task(stats: EngineStats, *, partition: int, pending: int):
    """The join stage's metrics over a stand-in stage holding one task: (metrics, its joiner, stage)."""
    from types import SimpleNamespace

    from reloop.engine.runtime.join_stage import _JoinMetrics

    metrics = _JoinMetrics(stats)
    joiner = SimpleNamespace(stats=JoinStats(), pending_count=pending, watermark_ms=1_000)
    task = SimpleNamespace(
        joiner=joiner,
        merger=SimpleNamespace(stamped_ahead=0),
        replay_abandoned=0,
        partition=partition,
        incarnation="x",
    )
    stage = SimpleNamespace(tasks={partition: task}, dead_letters=SimpleNamespace(counts={}))
    metrics.taken(partition, task)
    return metrics, joiner, stage


def test_the_join_stage_logs_events_dropped_as_too_late(caplog) -> None:
    # Only the single-process pipeline logged them (operations.md says "counted and logged"); under
    # `reloop run`'s join stage, events stamped in seconds were dropped with nothing in the log.
    import logging

    stats = EngineStats()
    metrics, joiner, stage = _stage_with_one_task(stats, partition=3, pending=0)
    with caplog.at_level(logging.WARNING, logger="reloop.join"):
        metrics.publish(stage)
        assert not caplog.records
        joiner.stats = JoinStats(too_late_impressions=2, too_late_clicks=1)
        metrics.publish(stage)
    [record] = caplog.records
    assert record.getMessage().startswith("events dropped as too late")
    assert record.fields == {"impressions": 2, "clicks": 1, "watermark_ms": 1_000, "task": 3}
    assert stats.joiner_too_late.get("impression") == 2 and stats.joiner_too_late.get("click") == 1


def test_events_dropped_as_too_late_are_logged_at_most_every_10_s_with_the_counts_between() -> None:
    # A producer sending event times in seconds logged one WARNING per poll (74 lines in 0.2 s).
    import logging

    from reloop.engine.runtime.join_metrics import TooLateLog

    lines: list[dict] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.fields)  # type: ignore[attr-defined]

    logger = logging.getLogger("test.too_late")
    logger.addHandler(Catch())
    logger.propagate = False
    now = [0.0]
    too_late = TooLateLog(logger, every_s=10.0, clock=lambda: now[0])
    too_late((0, 2), 5, task=1)  # the first at once
    for t in (1.0, 2.0, 3.0):
        now[0] = t
        too_late((1, 3), 6, task=1)  # held back
    now[0] = 9.0
    too_late((0, 0), 7, task=1)
    assert lines == [{"impressions": 0, "clicks": 2, "watermark_ms": 5, "task": 1}]
    now[0] = 10.0
    too_late((0, 0), 8, task=1)  # none new, but some held back: out now
    now[0] = 30.0
    too_late((0, 0), 9, task=1)  # nothing held: no line
    assert lines[1:] == [{"impressions": 3, "clicks": 9, "watermark_ms": 8, "task": 1}]


def test_the_join_stage_logs_events_dropped_at_its_memory_bounds(caplog) -> None:
    # 472 of 2,000 impressions dropped at join.max_pending were counted with no word in the log.
    import logging

    metrics, joiner, stage = _stage_with_one_task(EngineStats(), partition=0, pending=1000)
    with caplog.at_level(logging.WARNING, logger="reloop.join"):
        joiner.stats = JoinStats(evicted_closed=50)  # nothing lost: no line
        metrics.publish(stage)
        assert not caplog.records
        joiner.stats = JoinStats(evicted_closed=50, evicted_pending=472, evicted_early_clicks=100)
        metrics.publish(stage)
        joiner.stats = JoinStats(evicted_closed=50, evicted_pending=480, evicted_early_clicks=100)
        metrics.publish(stage)  # within 10 s of the first line: held back
    [record] = caplog.records
    assert record.getMessage().startswith("events dropped at the join's memory bounds")
    assert record.fields == {
        "max_pending": 472, "ttl": 0, "max_early_clicks": 100, "task": 0, "pending": 1000
    }  # fmt: skip
