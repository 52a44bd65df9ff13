"""kafka-python's setting names, for checking a config written in them before any client is built.

The engine's config validation asks here (it imports no Kafka client itself): which keys a kafka-python
client accepts at all, which a producer accepts (a key given to every client must be one), and which an
admin client accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

# Settings the connectors set themselves, which a client_config may not change (setting -> why): the
# sources and sinks refuse them, and the run config refuses them at load (engine/runtime/config.py).
CONSUMER_RESERVED = {
    "bootstrap_servers": "pass bootstrap=...",
    "group_id": "pass group_id=...",
    "enable_auto_commit": "offsets are committed only by the source's commit()",
    "auto_offset_reset": "a source reads from its checkpoint's positions and restarts one that retention "
    "passed at the oldest record left (the join stage's source also counts what was deleted unread)",
    "key_deserializer": "records carry raw bytes",
    "value_deserializer": "records carry raw bytes",
}
PRODUCER_RESERVED = {
    "bootstrap_servers": "pass bootstrap=...",
    "acks": "the sink always waits for all in-sync replicas",
    "enable_idempotence": "the sink is always idempotent",
    "key_serializer": "the sink sends raw bytes",
    "value_serializer": "the sink sends raw bytes",
}


def client_settings() -> frozenset[str]:
    """Every key a kafka-python consumer or producer accepts."""
    return frozenset(KafkaConsumer.DEFAULT_CONFIG) | frozenset(KafkaProducer.DEFAULT_CONFIG)


def consumer_settings() -> frozenset[str]:
    return frozenset(KafkaConsumer.DEFAULT_CONFIG)


def producer_settings() -> frozenset[str]:
    return frozenset(KafkaProducer.DEFAULT_CONFIG)


def admin_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``config`` an admin client accepts (it refuses what only a producer or consumer has)."""
    return {k: v for k, v in config.items() if k in KafkaAdminClient.DEFAULT_CONFIG}


def consumer_part(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``config`` a consumer accepts: a kafka.client_config shared with producers may hold
    producer-only settings (linger_ms), which kafka-python's consumer refuses (librdkafka's ignores them)."""
    return {k: v for k, v in config.items() if k in KafkaConsumer.DEFAULT_CONFIG}
