"""Topic administration on confluent-kafka (librdkafka), for the stream processor's start-up."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
from reloop.connectors.confluent.login import LoginWatch
from reloop.connectors.confluent.logs import logged
from reloop.engine.streams import MissingTopic

_log = logging.getLogger(__name__)


def ensure_topic_like(
    connection: Mapping[str, Any], bootstrap: str, topic: str, like: str, *, timeout_s: float = 30.0
) -> None:
    """Create ``topic`` when it is missing, with as many partitions as ``like`` (replication 1); an
    existing one is left as it is. Losing a creation race to another process is fine."""
    login = LoginWatch(bootstrap)
    admin = AdminClient(logged({**connection, "bootstrap.servers": bootstrap, "error_cb": login}))
    try:
        topics = admin.list_topics(timeout=10).topics
    except KafkaException:
        login.check(admin)
        raise
    if topic in topics:
        return
    if like not in topics:
        raise MissingTopic(like, topic)
    partitions = len(topics[like].partitions)
    futures = admin.create_topics([NewTopic(topic, partitions, 1)])
    for future in futures.values():
        try:
            future.result(timeout_s)
        except Exception as exc:  # noqa: BLE001 - lost a race with another creator: fine
            if "already exists" not in str(exc).lower():
                raise


def record_limit(
    connection: Mapping[str, Any], bootstrap: str, topic: str, *, timeout_s: float = 5.0
) -> int | None:
    """The largest record batch the broker takes for ``topic``: its ``max.message.bytes``, or the
    broker's ``message.max.bytes`` (what a topic created later gets) when it does not exist yet; None
    when the cluster does not say (no DescribeConfigs permission, say). As the kafka-python connector's
    ``record_limit``."""
    try:
        admin = AdminClient(logged({**connection, "bootstrap.servers": bootstrap}))
        try:
            return int(_config_value(admin, ResourceType.TOPIC, topic, "max.message.bytes", timeout_s))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
        broker = str(next(iter(admin.list_topics(timeout=timeout_s).brokers)))
        return int(_config_value(admin, ResourceType.BROKER, broker, "message.max.bytes", timeout_s))
    except Exception as exc:  # noqa: BLE001 - a limit we cannot read is not a reason to stop
        _log.warning("could not read the record size limit of topic %r: %r", topic, exc)
        return None


def _config_value(admin: AdminClient, kind: ResourceType, name: str, key: str, timeout_s: float) -> str:
    (future,) = admin.describe_configs([ConfigResource(kind, name)]).values()
    return future.result(timeout_s)[key].value
