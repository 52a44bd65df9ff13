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


def test_two_stages_of_one_process_keep_each_others_series_and_a_rebuilt_stage_takes_over_its_own() -> None:
    # `reloop run` with stages.processes 1 (the demo's): the join and train stages each replaced the
    # shared gauge whole, so the lag graph and ReloopConsumerLagGrowing saw each topic in half the scrapes.
    S = TopicPartition("samples", 0)
    gauge = Level()
    join, train = (
        ConsumerLag(gauge, interval_s=0.0, owner="join"),
        ConsumerLag(gauge, interval_s=0.0, owner="train"),
    )
    join.observe({A: 5, B: 7}, {A: 9, B: 8})
    train.observe({S: 3}, {S: 10})
    join.observe({A: 6, B: 7}, {A: 9, B: 8})
    assert dict(gauge.items()) == {("imp", "0"): 3.0, ("imp", "1"): 1.0, ("samples", "0"): 7.0}
    rebuilt = ConsumerLag(gauge, interval_s=0.0, owner="join")  # the join stage rebuilt, now without B
    rebuilt.observe({A: 9}, {A: 9})
    assert dict(gauge.items()) == {("imp", "0"): 0.0, ("samples", "0"): 7.0}
