"""Partitions a group member reads again from below its position (both Kafka clients): warned of and
counted, for the join stage's ``reloop_join_input_restarted_below_total``."""

from __future__ import annotations

import logging

from reloop.engine.streams import TopicPartition

_log = logging.getLogger("reloop.connectors")


class RestartsBelow:
    """Restarts per partition since the last ``take``."""

    def __init__(self) -> None:
        self._counts: dict[TopicPartition, int] = {}

    def restarted(self, tp: TopicPartition, position: int, restart: int) -> None:
        """``tp`` read again from ``restart``, below the ``position`` its reader had reached: the broker
        no longer holds that position because the partition's log now ends below it (the topic was
        deleted and created again, or an unclean leader election truncated it). Its records from
        ``restart`` on are read as new ones: samples of records the join stage had read before may be
        emitted again under new numbers, and trained twice."""
        self._counts[tp] = self._counts.get(tp, 0) + 1
        _log.warning(
            "partition restarted below its position: its log now ends below it (topic recreated, or "
            "truncated by an unclean leader election); read again from its oldest record",
            extra={
                "fields": {
                    "partition": f"{tp.topic}:{tp.partition}",
                    "position": position,
                    "restart": restart,
                }
            },
        )

    def take(self) -> dict[TopicPartition, int]:
        taken, self._counts = self._counts, {}
        return taken
