"""kafka-python's setting names, for checking a config written in them before any client is built.

The engine's config validation asks here (it imports no Kafka client itself): which keys a kafka-python
client accepts at all, which a producer accepts (a key given to every client must be one), and which an
admin client accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer


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
