"""Warns when records are stamped longer ago than their topic's time-based retention.

A Kafka broker deletes a log segment once its newest record timestamp (CreateTime: the producer's stamp)
is older than the topic's ``retention.ms``, at its next retention check (``log.retention.check.interval.ms``,
5 minutes by default), whether anything has read the records or not. Live events are stamped now; a
backtest that writes logged events with their original stamps, or a producer with a clock years behind,
puts records on the topic that the broker deletes within minutes: a join task that has not read them yet
loses them (counted when its checkpoint position passes the log start; a task without a checkpoint just
starts at what is left), and samples stamped with such a task's event-time watermark can be deleted before
the train stage reads them (counted there as samples missing). The join stage tells the operator once a
while, naming the topic, the stamp's age and the retention, and exports both as gauges per topic (the age
of the last record checked, the retention), so an alert can compare them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.jsonlog import ThrottledWarning

log = logging.getLogger("reloop.join")

ADVICE = "a retention reaching back past the topic's oldest stamp (retention.ms=-1 for a backtest's topics)"


class RetentionWatch:
    """``retention_ms``: each watched topic's ``retention.ms`` (topics without time-based retention are
    left out); ``clock``: wall time in ms; ``stats``: where the gauges go (``join_record_age_s``, the age
    of the last record checked per topic, retention or not, and ``topic_retention_s``)."""

    def __init__(
        self,
        retention_ms: Mapping[str, int],
        clock: Callable[[], int],
        stats: EngineStats,
        *,
        every_s: float = 600.0,
    ) -> None:
        self.retention_ms = {topic: ms for topic, ms in retention_ms.items() if ms >= 0}
        self.clock = clock
        self._ages = stats.join_record_age_s
        for topic, ms in self.retention_ms.items():
            stats.topic_retention_s.set(ms / 1000, topic)
        self._read = self._warnings(
            "input records stamped longer ago than the topic's retention: the broker deletes such records "
            "at its next retention check, read or not",
            every_s,
        )
        self._written = self._warnings(
            "samples stamped longer ago than the samples topic's retention: the broker may delete them "
            "before the train stage reads them",
            every_s,
        )

    def _warnings(self, msg: str, every_s: float) -> dict[str, ThrottledWarning]:
        return {topic: ThrottledWarning(log, msg, every_s=every_s) for topic in self.retention_ms}

    def read(self, topic: str, timestamp_ms: int) -> None:
        """An input record just read; its stamp (the oldest of its batch, say) is checked."""
        self._check(self._read, topic, timestamp_ms)

    def written(self, topic: str, timestamp_ms: int) -> None:
        """A record the stage is writing, stamped ``timestamp_ms``."""
        self._check(self._written, topic, timestamp_ms)

    def idle(self) -> None:
        """The process holds no task any more (a rebalance took them all): it reads and writes nothing, so
        its last ages would stand until it gets a task again, an alert firing on them long after another
        process took the partitions over and caught up. Its age series go until it checks a record."""
        self._ages.clear()

    def _check(self, warnings: Mapping[str, ThrottledWarning], topic: str, timestamp_ms: int) -> None:
        if timestamp_ms < 0:  # -1: the record has no timestamp
            return
        age = self.clock() - timestamp_ms
        self._ages.set(age / 1000, topic)
        retention = self.retention_ms.get(topic)
        if retention is not None and age > retention:
            warnings[topic](topic=topic, stamp_age_s=round(age / 1000), retention_ms=retention, advice=ADVICE)
