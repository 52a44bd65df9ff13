from __future__ import annotations

from reloop.engine.metrics.lag import ConsumerLag
from reloop.engine.metrics.stats import Level
from reloop.engine.streams import TopicPartition

A, B = TopicPartition("imp", 0), TopicPartition("imp", 1)


def test_lag_per_partition_at_most_once_an_interval_and_only_for_partitions_still_read() -> None:
    now = [0.0]
    gauge = Level()
    lag = ConsumerLag(gauge, interval_s=1.0, clock=lambda: now[0])
    lag.observe({A: 5, B: 7}, {A: 9, B: 7})
    assert dict(gauge.items()) == {("imp", "0"): 4.0, ("imp", "1"): 0.0}
    lag.observe({A: 9}, {A: 9})  # within the interval: nothing new
    assert dict(gauge.items())[("imp", "0")] == 4.0
    now[0] = 1.0
    lag.observe({A: 8}, {})  # ends unknown now: the values stay
    assert len(gauge.items()) == 2
    lag.observe({A: 8}, {A: 10})  # B moved to another process: its series leaves this one
    assert dict(gauge.items()) == {("imp", "0"): 2.0}
    now[0] = 2.0
    lag.observe({A: 12}, {A: 10})  # a position past a stale end is no lag, not a negative one
    assert dict(gauge.items()) == {("imp", "0"): 0.0}
