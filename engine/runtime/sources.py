"""Source helpers for the pipeline.

``EndOffsets`` gives a KafkaSource the ``end_positions()`` the merge uses to tell a partition that is
caught up from one whose records are merely not fetched yet; with it the merge order is exact (no
idle guess), which the resume-equals-uninterrupted guarantee needs. It reaches the consumer through
``KafkaSource._client()`` (the only way without importing a Kafka client into the engine); a
``KafkaSource.end_positions()`` in the connector would replace this adapter.
"""

from __future__ import annotations

import time
from typing import Any

from connectors.base import Positions, TopicPartition


class EndOffsets:
    """Wraps a source; adds ``end_positions()`` (cached for ``min_interval_s``), delegates the rest."""

    def __init__(self, source: Any, *, min_interval_s: float = 0.1) -> None:
        self.source = source
        self.min_interval_s = min_interval_s
        self._cached: Positions | None = None
        self._at = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def end_positions(self) -> Positions:
        now = time.monotonic()
        if self._cached is not None and now - self._at < self.min_interval_s:
            return self._cached
        consumer = self.source._client()
        ends = consumer.end_offsets(list(consumer.assignment()))
        self._cached = {TopicPartition(tp.topic, tp.partition): int(off) for tp, off in ends.items()}
        self._at = now
        return self._cached
