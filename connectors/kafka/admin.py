"""Topic administration and timestamp lookups on kafka-python, for setup scripts, tests and replay.

``client_config`` is passed to kafka-python unchanged (``security_protocol``, ``sasl_mechanism``,
``sasl_plain_username``, ``ssl_cafile`` ...), so the same code talks to a secured cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer
from kafka import TopicPartition as KafkaTopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import InvalidReplicationFactorError, TopicAlreadyExistsError
from reloop.connectors.kafka.client_start import start_client
from reloop.connectors.kafka.login import login_checked
from reloop.connectors.kafka.settings import admin_settings
from reloop.engine.streams import (
    AuthenticationFailed,
    MissingTopic,
    Positions,
    ReplicationRefused,
    TopicPartition,
)

_log = logging.getLogger(__name__)
T = TypeVar("T")
# A topic's replication factor left to the broker (its default.replication.factor; KIP-464, Kafka 2.4).
BROKER_DEFAULT = -1


def admin_client(bootstrap: str, client_config: Mapping[str, Any] | None = None) -> KafkaAdminClient:
    with login_checked(bootstrap):
        return start_client(KafkaAdminClient, bootstrap_servers=bootstrap, **dict(client_config or {}))


def create_topics(bootstrap: str, topics: Mapping[str, int], **options: Any) -> list[str]:
    """Create each ``{name: partitions}`` topic that does not exist yet and wait until every partition of
    every named topic has a leader. Returns the names that were newly created. ``options``: those of
    ``create_topics_counted``.

    A topic that already exists with fewer partitions than asked is an error (the key routing of the
    producer would silently differ from what the caller expects).
    """
    return create_topics_counted(bootstrap, topics, **options)[0]


def create_topics_counted(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int | None = None,
    configs: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    client_config: Mapping[str, Any] | None = None,
) -> tuple[list[str], dict[str, int]]:
    """``create_topics``, and the partition count each named topic has (an existing one keeps its own)."""
    admin = admin_client(bootstrap, client_config)
    try:
        existing = set(admin.list_topics())
        wanted = {
            name: {
                "num_partitions": int(partitions),
                "replication_factor": BROKER_DEFAULT if replication_factor is None else replication_factor,
                "configs": dict(configs or {}),
            }
            for name, partitions in topics.items()
            if name not in existing
        }
        created: list[str] = []
        if wanted:
            result = admin.create_topics(wanted, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for topic in result["topics"]:
                code = topic.get("error_code", 0)
                if code == 0:
                    created.append(topic["name"])
                elif code != TopicAlreadyExistsError.errno:  # lost a race with another creator: fine
                    why = topic.get("error_message") or f"error code {code}"
                    kind = ReplicationRefused if code == InvalidReplicationFactorError.errno else RuntimeError
                    raise kind(f"creating topic {topic['name']!r} failed: {why} (error code {code})")
        admin.wait_for_topics(list(topics), timeout_ms=int(timeout_s * 1000))
        counts = partition_counts(admin, topics)
        short = {name: (counts[name], want) for name, want in topics.items() if counts[name] < want}
        if short:
            raise RuntimeError(f"existing topics have fewer partitions than asked (have, want): {short}")
        return created, counts
    finally:
        admin.close()


def ensure_topic_like(
    client_config: Mapping[str, Any],
    bootstrap: str,
    topic: str,
    like: str,
    *,
    replication_factor: int | None = None,
) -> None:
    """Create ``topic`` when it is missing, with as many partitions as ``like``; an existing one is left
    as it is. ``client_config``: the connection settings (what an admin client refuses is dropped).
    ``replication_factor``: None takes the broker's default."""
    client = admin_settings(client_config)
    admin = admin_client(bootstrap, client)
    try:
        existing = set(admin.list_topics())
        if topic in existing:
            return
        if like not in existing:
            raise MissingTopic(like, topic)
        partitions = partition_counts(admin, [like])[like]
    finally:
        admin.close()
    create_topics(bootstrap, {topic: partitions}, client_config=client, replication_factor=replication_factor)


def record_limit(bootstrap: str, topic: str, client_config: Mapping[str, Any] | None = None) -> int | None:
    """The largest record batch the broker takes for ``topic``: its ``max.message.bytes``, or the
    broker's ``message.max.bytes`` (what a topic created later gets) when it does not exist yet.

    None when the cluster does not say (no DescribeConfigs permission, say): the caller keeps its own
    limit. A producer whose ``max_request_size`` is above this would see such a record refused by the
    broker at flush, after the caller let go of it, instead of at ``send``.
    """
    admin = None
    try:
        # Bounded: with the broker down the caller's own client fails (or waits) as it would anyway.
        settings = {"bootstrap_timeout_ms": 5_000, "request_timeout_ms": 5_000}
        admin = admin_client(bootstrap, settings | admin_settings(client_config or {}))
        found = _config_value(admin, ConfigResourceType.TOPIC, topic, "max.message.bytes")
        if found is None:
            brokers = admin.describe_cluster()["brokers"]
            node = str(brokers[0]["broker_id"])
            found = _config_value(admin, ConfigResourceType.BROKER, node, "message.max.bytes")
        return None if found is None else int(found)
    except AuthenticationFailed:  # the caller's own client would be refused too: say why now
        raise
    except Exception as exc:  # noqa: BLE001 - a limit we cannot read is not a reason to stop
        _log.warning("could not read the record size limit of topic %r: %r", topic, exc)
        return None
    finally:
        if admin is not None:
            admin.close()


def _asked(
    bootstrap: str,
    client_config: Mapping[str, Any] | None,
    timeout_s: float,
    what: str,
    ask: Callable[[KafkaAdminClient], T],
) -> T | None:
    """``ask(admin)``'s answer, or None with a warning naming ``what`` when the cluster cannot be asked
    (the facts asked for here only inform: no reason to stop); bounded by ``timeout_s``."""
    settings = {"bootstrap_timeout_ms": int(timeout_s * 1000), "request_timeout_ms": int(timeout_s * 1000)}
    try:
        admin = admin_client(bootstrap, settings | admin_settings(client_config or {}))
    except AuthenticationFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        _log.warning("could not read the %s: %r", what, exc)
        return None
    try:  # one request for all: a broker gone meanwhile costs one timeout, not one per topic
        return ask(admin)
    except Exception as exc:  # noqa: BLE001 - as above
        _log.warning("could not read the %s: %r", what, exc)
        return None
    finally:
        admin.close()


def topic_settings(
    bootstrap: str,
    topics: Iterable[str],
    keys: Iterable[str],
    client_config: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 5.0,
) -> dict[str, dict[str, str]]:
    """Each topic's values of the topic settings ``keys`` (``retention.ms``, ``cleanup.policy``...), as
    the cluster reports them (its defaults included). A topic the cluster does not say for (missing, no
    DescribeConfigs permission) is left out, with a warning: the values only inform a check."""
    found: dict[str, dict[str, str]] = {}
    wanted, names = list(dict.fromkeys(topics)), list(keys)
    answer = _asked(
        bootstrap,
        client_config,
        timeout_s,
        f"settings of topics {wanted!r}",
        lambda admin: admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, names) for topic in wanted],
            config_filter="all",
        ).get("topic", {}),
    )
    if answer is None:
        return found
    for topic in wanted:
        entries = answer.get(topic, {})
        values = {k: str(entries[k]["value"]) for k in names if entries.get(k) is not None}
        if not values:
            _log.warning("could not read the settings of topic %r: the cluster did not say", topic)
        else:
            found[topic] = values
    return found


def topic_ids(
    bootstrap: str,
    topics: Iterable[str],
    client_config: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 5.0,
) -> dict[str, str]:
    """Each topic's id (KIP-516) as a UUID string: a topic deleted and created again under its name has
    another. A topic the cluster does not say for (missing, an old broker) is left out, with a warning
    when the cluster cannot be asked: the ids only tell a recreated topic."""
    wanted = list(dict.fromkeys(topics))
    described = _asked(
        bootstrap, client_config, timeout_s, f"ids of topics {wanted!r}", lambda a: a.describe_topics(wanted)
    )
    return {
        t["name"]: str(t["topic_id"])
        for t in described or []
        if not t.get("error_code") and t.get("topic_id") and t.get("name") in wanted
    }


def _config_value(admin: KafkaAdminClient, kind: ConfigResourceType, name: str, key: str) -> str | None:
    found = admin.describe_configs([ConfigResource(kind, name, [key])], config_filter="all")
    entry = found.get(kind.name.lower(), {}).get(name, {}).get(key)
    return None if entry is None else entry["value"]


def partition_counts(admin: KafkaAdminClient, topics: Iterable[str]) -> dict[str, int]:
    return {t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics(list(topics))}


def delete_topics(
    bootstrap: str, topics: Iterable[str], client_config: Mapping[str, Any] | None = None
) -> None:
    admin = admin_client(bootstrap, client_config)
    try:
        admin.delete_topics(list(topics), raise_errors=False)
    finally:
        admin.close()


def offsets_for_times(
    bootstrap: str,
    topics: Iterable[str],
    timestamp_ms: int,
    *,
    client_config: Mapping[str, Any] | None = None,
) -> Positions:
    """Per partition of ``topics``, the first offset whose record timestamp is >= ``timestamp_ms``,
    or the end offset when no such record exists yet (so a replay from there waits for new data).

    Use the result as ``Source.open(positions)`` to start a replay at a point in time.
    """
    with login_checked(bootstrap):
        consumer = start_client(
            KafkaConsumer,
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            **dict(client_config or {}),
        )
    try:
        pairs: list[KafkaTopicPartition] = []
        for topic in topics:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                raise ValueError(f"topic {topic!r} does not exist")
            pairs += [KafkaTopicPartition(topic, p) for p in sorted(partitions)]
        found = consumer.offsets_for_times(dict.fromkeys(pairs, int(timestamp_ms)))
        ends = consumer.end_offsets(pairs)
        out: Positions = {}
        for tp in pairs:
            hit = found.get(tp)
            out[TopicPartition(tp.topic, tp.partition)] = (
                int(hit.offset) if hit is not None else int(ends[tp])
            )
        return out
    finally:
        consumer.close(autocommit=False)
