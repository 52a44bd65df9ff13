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
