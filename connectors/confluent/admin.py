"""Topic administration on confluent-kafka (librdkafka), for the stream processor's start-up."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
from reloop.connectors.confluent.login import LOGIN_CHECK_S, LoginWatch
from reloop.connectors.confluent.logs import built, logged
from reloop.engine.streams import MissingTopic, ReplicationRefused

_log = logging.getLogger(__name__)


def ensure_topic_like(
    connection: Mapping[str, Any],
    bootstrap: str,
    topic: str,
    like: str,
    *,
    timeout_s: float = 30.0,
    replication_factor: int | None = None,
) -> None:
    """Create ``topic`` when it is missing, with as many partitions as ``like`` (``replication_factor``;
    None: the broker's default); an existing one is left as it is. Losing a creation race to another
    process is fine."""
    login = LoginWatch(bootstrap)
    admin = built(AdminClient, {**connection, "bootstrap.servers": bootstrap, "error_cb": login})
    topics = _topics(admin, login, timeout_s=10.0)
    if topic in topics:
        return
    if like not in topics:
        raise MissingTopic(like, topic)
    partitions = len(topics[like].partitions)
    replication = -1 if replication_factor is None else replication_factor  # -1: the broker's default
    futures = admin.create_topics([NewTopic(topic, partitions, replication)])
    for future in futures.values():
        try:
            future.result(timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.INVALID_REPLICATION_FACTOR:
                raise ReplicationRefused(f"creating topic {topic!r} failed: {exc.args[0].str()}") from exc
            if "already exists" not in str(exc).lower():  # lost a race with another creator: fine
                raise


def _topics(admin: AdminClient, login: LoginWatch, *, timeout_s: float) -> dict[str, Any]:
    """The cluster's topics. ``list_topics`` serves no error callback while it waits, so a refused login
    showed only when the whole timeout had passed (10 s); asked in waits of at most
    ``LOGIN_CHECK_S``, with the callbacks served between them, a refusal is told within one."""
    deadline = time.monotonic() + timeout_s
    while True:
        wait = min(LOGIN_CHECK_S, max(deadline - time.monotonic(), 0.001))
        try:
            return admin.list_topics(timeout=wait).topics
        except KafkaException:
            login.check(admin)
            if time.monotonic() >= deadline:
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


def topic_settings(
    connection: Mapping[str, Any],
    bootstrap: str,
    topics: Iterable[str],
    keys: Iterable[str],
    *,
    timeout_s: float = 5.0,
) -> dict[str, dict[str, str]]:
    """Each topic's values of the topic settings ``keys``; a topic the cluster does not say for is left
    out, with a warning. As the kafka-python connector's ``topic_settings``."""
    found: dict[str, dict[str, str]] = {}
    names = list(keys)
    admin = AdminClient(logged({**connection, "bootstrap.servers": bootstrap}))
    # One request for all, one deadline: a broker gone meanwhile costs one timeout, not one per topic.
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in dict.fromkeys(topics)])
    deadline = time.monotonic() + timeout_s
    for resource, future in futures.items():
        try:
            entries = future.result(max(0.0, deadline - time.monotonic()))
            found[resource.name] = {k: str(entries[k].value) for k in names if k in entries}
        except Exception as exc:  # noqa: BLE001 - settings we cannot read are not a reason to stop
            _log.warning("could not read the settings of topic %r: %r", resource.name, exc)
    return found


def topic_ids(
    connection: Mapping[str, Any], bootstrap: str, topics: Iterable[str], *, timeout_s: float = 5.0
) -> dict[str, str]:
    """Each topic's id (KIP-516) as a UUID string, as the kafka-python connector's ``topic_ids``
    (librdkafka prints it in base64: the same id is written the same way whichever client wrote it)."""
    found: dict[str, str] = {}
    admin = AdminClient(logged({**connection, "bootstrap.servers": bootstrap}))
    futures = admin.describe_topics(TopicCollection(list(dict.fromkeys(topics))))
    deadline = time.monotonic() + timeout_s
    mask = (1 << 64) - 1
    for name, future in futures.items():
        try:
            uid = future.result(max(0.0, deadline - time.monotonic())).topic_id
            bits = ((uid.get_most_significant_bits() & mask) << 64) | (
                uid.get_least_significant_bits() & mask
            )
            found[name] = str(uuid.UUID(int=bits))
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "code", lambda: None)() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue  # a missing topic has no id: its absence is said elsewhere
            _log.warning("could not read the id of topic %r: %r", name, exc)
        except Exception as exc:  # noqa: BLE001 - ids we cannot read are not a reason to stop
            _log.warning("could not read the id of topic %r: %r", name, exc)
    return found


def _config_value(admin: AdminClient, kind: ResourceType, name: str, key: str, timeout_s: float) -> str:
    (future,) = admin.describe_configs([ConfigResource(kind, name)]).values()
    return future.result(timeout_s)[key].value
