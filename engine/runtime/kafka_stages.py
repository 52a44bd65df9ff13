"""The stages over real Kafka clients: a fresh set of clients per build, so the supervisor never reuses
one that went through an outage. The only place (with the serving stack) that wires Kafka clients into
the engine."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from reloop.engine.runtime.config import RunConfig
from reloop.engine.runtime.supervisor import FATAL, ProcessFatal
from reloop.engine.streams import ReplicationRefused

log = logging.getLogger("reloop.run")


def _fail_fast_on_config(exc: BaseException) -> None:
    """A Kafka client that refuses its settings will refuse them again: a ConfigError (exit 2), not a
    failure to retry for the supervisor's whole budget."""
    from reloop.engine.runtime.config import ConfigError

    # librdkafka: 'No such configuration property: "x"', 'Invalid value for configuration property "x"',
    # 'Configuration property "x" not supported in this build'.
    if type(exc).__name__ == "KafkaConfigurationError" or "configuration property" in str(exc).lower():
        raise ConfigError(f"Kafka client settings refused: {exc}") from exc


def _release(things: list[Any]) -> None:
    for thing in things:
        release = getattr(thing, "abort", None) or thing.close
        try:
            release()
        except Exception:  # noqa: BLE001 - releasing what a failed build opened
            log.debug("release after a failed build failed", exc_info=True)


def _clients(cfg: RunConfig) -> tuple[Any, Any, Any]:
    """(Source, Sink, GroupSource) classes of the configured client (kafka.client)."""
    if cfg.kafka.client == "confluent":
        from reloop.connectors.confluent.group_source import ConfluentGroupSource
        from reloop.connectors.confluent.sink import ConfluentSink
        from reloop.connectors.confluent.source import ConfluentSource

        return ConfluentSource, ConfluentSink, ConfluentGroupSource
    from reloop.connectors.kafka.group_source import KafkaGroupSource
    from reloop.connectors.kafka.sink import KafkaSink
    from reloop.connectors.kafka.source import KafkaSource

    return KafkaSource, KafkaSink, KafkaGroupSource


def samples_partition_count(cfg: RunConfig, timeout_s: float = 10.0) -> int | None:
    """How many partitions the samples topic has; None when that is not known within ``timeout_s`` (no
    topic yet, no broker): a launcher's check before its ranks start, which then check it themselves."""
    import threading

    KafkaSource = _clients(cfg)[0]  # noqa: N806 - a class
    found: list[int] = []

    def ask() -> None:
        source = None
        try:
            source = KafkaSource(
                bootstrap=cfg.kafka.bootstrap,
                topics=[cfg.stages.samples_topic],
                client_config=cfg.consumer_client_config(),
            )
            found.append(len(source.partitions()))
        except Exception:  # noqa: BLE001 - unknown is an answer: the ranks check again
            log.debug("samples topic's partitions unknown", exc_info=True)
        finally:
            if source is not None:
                _release([source])

    asker = threading.Thread(target=ask, name="samples-partitions", daemon=True)
    asker.start()
    asker.join(timeout_s)
    return found[0] if found else None


def _ensure_samples_topic(cfg: RunConfig) -> None:
    """Create the samples topic when it is missing, with one partition per join task (the partition
    count of the impressions topic). An existing one is checked by the join stage."""
    if cfg.kafka.client == "confluent":
        from reloop.connectors.confluent.admin import ensure_topic_like
    else:
        from reloop.connectors.kafka.admin import ensure_topic_like
    try:
        ensure_topic_like(
            cfg.kafka.connection(),
            cfg.kafka.bootstrap,
            cfg.stages.samples_topic,
            cfg.source.impressions_topic,
            replication_factor=cfg.kafka.replication_factor,
        )
    except ReplicationRefused as exc:
        # A factor the cluster cannot hold is refused again at every rebuild: exit 2 at once, not
        # retried for recovery.give_up_after_s.
        from reloop.engine.runtime.config import ConfigError

        raise ConfigError(
            f"invalid config: kafka.replication_factor: the cluster refused it for the samples topic "
            f"{cfg.stages.samples_topic!r}: {exc}"
        ) from exc


def _retention(cfg: RunConfig) -> dict[str, int]:
    """The input and samples topics' retention.ms, for the join stage's warning about records stamped
    longer ago (engine/runtime/retention_watch.py); topics it cannot read are left out. A compacted
    samples topic is refused (a ConfigError, exit 2): the broker refuses every samples message (they
    have no key), and the stage was rebuilt and refused again for as long as it ran."""
    topics = [cfg.source.impressions_topic, cfg.source.clicks_topic, cfg.stages.samples_topic]
    keys = ["retention.ms", "cleanup.policy"]
    if cfg.kafka.client == "confluent":
        from reloop.connectors.confluent.admin import topic_settings as confluent_settings

        found = confluent_settings(cfg.kafka.connection(), cfg.kafka.bootstrap, topics, keys)
    else:
        from reloop.connectors.kafka.admin import topic_settings

        found = topic_settings(cfg.kafka.bootstrap, topics, keys, cfg.kafka.connection())
    policy = found.get(cfg.stages.samples_topic, {}).get("cleanup.policy", "delete")
    if "compact" in policy.split(","):
        from reloop.engine.runtime.config import ConfigError

        raise ConfigError(
            f"the samples topic {cfg.stages.samples_topic!r} has cleanup.policy={policy}: its messages have "
            "no key, which a compacted topic refuses (and compaction would drop samples); give it "
            "cleanup.policy=delete, or name another topic in stages.samples_topic"
        )
    return {t: int(v["retention.ms"]) for t, v in found.items() if "retention.ms" in v}


def _topic_ids(cfg: RunConfig, topics: list[str]) -> dict[str, str]:
    """Topics' ids, which the join tasks' checkpoints (the input topics') and the train stage's saves (the
    samples topic's) record: a topic deleted and created again since is read from its oldest record."""
    if cfg.kafka.client == "confluent":
        from reloop.connectors.confluent.admin import topic_ids as confluent_topic_ids

        return confluent_topic_ids(cfg.kafka.connection(), cfg.kafka.bootstrap, topics)
    from reloop.connectors.kafka.admin import topic_ids

    return topic_ids(cfg.kafka.bootstrap, topics, cfg.kafka.connection())


def join_stage_factory(cfg: RunConfig) -> Callable[[], Any]:
    from reloop.engine.runtime.build import build_join_stage

    _, KafkaSink, KafkaGroupSource = _clients(cfg)  # noqa: N806 - classes

    src, bootstrap = cfg.source, cfg.kafka.bootstrap

    def build() -> Any:
        opened: list[Any] = []
        try:
            _ensure_samples_topic(cfg)
            source = KafkaGroupSource(
                bootstrap=bootstrap,
                topics=[src.impressions_topic, src.clicks_topic],
                group_id=cfg.stages.join_group_id,
                client_config=cfg.consumer_client_config(cfg.stages.join_client_config),
            )
            opened.append(source)
            samples = KafkaSink(
                bootstrap=bootstrap,
                topic=cfg.stages.samples_topic,
                client_config=cfg.producer_client_config(),
            )
            opened.append(samples)
            dead = None
            if cfg.sink.dead_letter_topic:
                dead = KafkaSink(
                    bootstrap=bootstrap,
                    topic=cfg.sink.dead_letter_topic,
                    client_config=cfg.producer_client_config(),
                )
                opened.append(dead)
            return build_join_stage(
                cfg,
                source=source,
                samples_sink=samples,
                dead_letter_sink=dead,
                retention_ms=_retention(cfg),
                topic_ids=_topic_ids(cfg, [src.impressions_topic, src.clicks_topic]),
            )
        except BaseException as exc:
            _release(opened)
            _fail_fast_on_config(exc)
            raise

    return build


def train_stage_factory(cfg: RunConfig, group: Any = None) -> Callable[[], Any]:
    """Builds the train stage; with ``group`` (engine/train/data_parallel.RankGroup) this process's rank,
    reading its share of the samples topic's partitions."""
    from reloop.engine.runtime.build import build_train_stage
    from reloop.engine.streams import PartitionShare

    KafkaSource, KafkaSink, _ = _clients(cfg)  # noqa: N806 - classes

    bootstrap, group_id = cfg.kafka.bootstrap, cfg.consumer.group_id

    def build() -> Any:
        opened: list[Any] = []
        try:
            source = KafkaSource(
                bootstrap=bootstrap,
                topics=[cfg.stages.samples_topic],
                group_id=group_id,
                client_config=cfg.consumer_client_config(),
                share=None if group is None else PartitionShare(group.rank, group.world_size),
            )
            opened.append(source)
            dead = None
            if cfg.sink.dead_letter_topic:
                dead = KafkaSink(
                    bootstrap=bootstrap,
                    topic=cfg.sink.dead_letter_topic,
                    client_config=cfg.producer_client_config(),
                )
                opened.append(dead)
            commit = source.commit if group_id else None
            topic = cfg.stages.samples_topic
            samples_id = _topic_ids(cfg, [topic]).get(topic)
            stage = build_train_stage(
                cfg,
                source=source,
                dead_letter_sink=dead,
                commit=commit,
                group=group,
                samples_topic_id=samples_id,
            )
            meta = getattr(stage, "meta", None)
            if samples_id is None and meta is not None:
                # Asked again once the stage opened its source on the topic: a train stage built while
                # the join stage created the topic (`reloop run` starts both) recorded no id in its saves,
                # and a later recreation of the topic went unnoticed.
                samples_id = _topic_ids(cfg, [topic]).get(topic)
                if samples_id is not None:
                    meta["samples_topic_id"] = samples_id
            return stage
        except BaseException as exc:
            _release(opened)
            _fail_fast_on_config(exc)
            if group is not None and isinstance(exc, Exception) and not isinstance(exc, FATAL):
                # The other ranks wait in a collective this one will not reach: restart them all.
                raise ProcessFatal(f"rank {group.rank} could not start: {exc!r}") from exc
            raise

    return build


def describe_join(stage: Any) -> dict[str, Any]:
    return {
        "tasks": sorted(stage.tasks),
        "samples_sent": stage.samples_sent,
        "messages_split": stage.messages_split,
        # records stamped ahead of their successors, merged with them (engine/runtime/merge.py)
        "stamped_ahead": sum(t.merger.stamped_ahead for t in stage.tasks.values()),
        "pending": sum(t.joiner.pending_count for t in stage.tasks.values()),
        "dead_letters": stage.dead_letters.counts,
        "rebalances": stage.rebalances,
    }


def describe_train(stage: Any) -> dict[str, Any]:
    from reloop.engine.runtime.train_stage import samples_fields

    # With data-parallel ranks each logs its progress: every rank's samples and, named so, its own.
    return {
        "version": stage.version,
        **samples_fields(stage),
        "buffered": stage.buffered_samples,
        "partial_steps": stage.partial_steps,
        "duplicates_dropped": stage.duplicates_dropped,
        "samples_refused": stage.samples_refused,
        "seq_gaps": stage.seq_gaps,
        "samples_missing": stage.samples_missing,
        "join_task_restarts": stage.task_restarts,
        "version_mismatches": stage.trainer.counters.version_mismatches,
        "dead_letters": stage.dead_letters.counts,
    }
