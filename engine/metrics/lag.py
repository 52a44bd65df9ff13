"""``reloop_consumer_lag_records``: how far a process's consumer is behind the end of each partition it
reads, from positions and ends the process already has (a merge asks for the ends anyway; the Kafka
sources answer from their last fetch responses, with no round trip)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from reloop.engine.metrics.stats import Level
from reloop.engine.streams import TopicPartition


class ConsumerLag:
    """End offset minus position per partition, at most once per ``interval_s``. This reader's series
    are replaced whole, so a partition that moved to another process (a rebalance) leaves this process's
    series instead of staying at its last value beside the new owner's."""

    def __init__(
        self,
        gauge: Level,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        owner: str | None = None,
    ) -> None:
        """``owner``: which reader's series these are, where two readers share the gauge (a rebuilt
        stage's replace its predecessor's; the other stage of the process keeps its own)."""
        self._gauge = gauge
        self._owner = owner
        self._interval_s = interval_s
        self._clock = clock
        self._at = float("-inf")

    def observe(
        self, positions: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int] | None
    ) -> None:
        """``ends`` None or empty: unknown right now (the gauge keeps its values)."""
        now = self._clock()
        if not ends or now - self._at < self._interval_s:
            return
        self._at = now
        self._gauge.replace(
            {
                (tp.topic, str(tp.partition)): float(max(0, end - positions[tp]))
                for tp, end in ends.items()
                if tp in positions
            },
            owner=self._owner,
        )
