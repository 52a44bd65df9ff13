"""Topic administration on confluent-kafka (librdkafka), for the stream processor's start-up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic


def ensure_topic_like(
    connection: Mapping[str, Any], bootstrap: str, topic: str, like: str, *, timeout_s: float = 30.0
) -> None:
    """Create ``topic`` when it is missing, with as many partitions as ``like`` (replication 1); an
    existing one is left as it is. Losing a creation race to another process is fine."""
    admin = AdminClient({**connection, "bootstrap.servers": bootstrap})
    topics = admin.list_topics(timeout=10).topics
    if topic in topics:
        return
    partitions = len(topics[like].partitions)
    futures = admin.create_topics([NewTopic(topic, partitions, 1)])
    for future in futures.values():
        try:
            future.result(timeout_s)
        except Exception as exc:  # noqa: BLE001 - lost a race with another creator: fine
            if "already exists" not in str(exc).lower():
                raise
