"""The warning for a partition a group member reads again from below its position (both Kafka clients)."""

from __future__ import annotations

import logging

from reloop.engine.streams import TopicPartition

_log = logging.getLogger("reloop.connectors")


def warn_restarted_below(tp: TopicPartition, position: int, restart: int) -> None:
    """A partition read again from ``restart``, below the ``position`` its reader had reached: the broker
    no longer holds that position because the partition's log now ends below it (the topic was deleted
    and created again, or an unclean leader election truncated it). Its records from ``restart`` on are
    read as new ones: samples of records the join stage had read before may be emitted again under new
    numbers, and trained twice."""
    _log.warning(
        "partition restarted below its position: its log now ends below it (topic recreated, or truncated "
        "by an unclean leader election); read again from its oldest record",
        extra={
            "fields": {"partition": f"{tp.topic}:{tp.partition}", "position": position, "restart": restart}
        },
    )
