"""The join stage's stall clocks against consumer-group rebalances on the real broker.

A join process is rebuilt (engine/runtime/join_stage.py ``ConsumerStalled``) when it is out of its group,
or fetches nothing while records wait, for ``stages.stall_timeout_s``. A rebalance takes its own time: a
joiner waits for the other members to rejoin (at their next heartbeat and poll), and a task's restore from
a large checkpoint takes seconds. Judged by a shorter stall_timeout_s, each rebuild left the group and
joined it again (a new rebalance each time), and the stage never got to work.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaTopicPartition
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.group_source import KafkaGroupSource
from reloop.connectors.kafka.sink import KafkaSink
from reloop.engine.runtime.config import ConfigError, load_config
from reloop.engine.runtime.join_stage import ConsumerStalled
from reloop.engine.runtime.join_task import JoinTask
from reloop.engine.runtime.kafka_stages import join_stage_factory
from reloop.engine.runtime.supervisor import RetryPolicy, Supervisor
from reloop.engine.runtime.synthetic import generate

from .test_run_kafka import _config, _now_ms

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]
CLIENTS = ["kafka-python", "confluent"]
STALL_S = 1.0  # shorter than the rebalances below; the group's session is 6 s (FAST_REJOIN)


def _setup(kafka_broker, unique_topic, tmp_path: Path, client: str) -> tuple[Any, dict[str, str]]:
    """Two co-partitioned input topics holding a generated log, and a run config over them."""
    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    bootstrap = kafka_broker.bootstrap
    create_topics(bootstrap, {topics["impressions"]: 2, topics["clicks"]: 2, topics["samples"]: 2})
    create_topics(bootstrap, {topics["deadletter"]: 1})
    sinks = {k: KafkaSink(bootstrap=bootstrap, topic=topics[k + "s"]) for k in ("impression", "click")}
    for r in generate(1500, seed=7, start_ms=_now_ms()).records:
        sinks[r.topic_kind].send(r.value, key=r.key, timestamp_ms=r.timestamp_ms)
    for s in sinks.values():
        s.close()
    path = _config(
        tmp_path, bootstrap, topics, "correct", kafka={"client": client}, stages={"stall_timeout_s": STALL_S}
    )
    return load_config(path, env={}), topics


@pytest.mark.parametrize("client", CLIENTS)
def test_a_join_stage_knows_its_topics_retention(kafka_broker, unique_topic, tmp_path, client):
    """What it warns of records stamped longer ago by (engine/runtime/retention_watch.py): the input
    topics' own retention.ms and the broker's default for the samples topic it creates."""
    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    bootstrap = kafka_broker.bootstrap
    inputs = {topics["impressions"]: 1, topics["clicks"]: 1}
    create_topics(bootstrap, inputs, configs={"retention.ms": "3600000"})
    create_topics(bootstrap, {topics["deadletter"]: 1})
    cfg = load_config(_config(tmp_path, bootstrap, topics, "correct", kafka={"client": client}), env={})
    stage = join_stage_factory(cfg)()
    try:
        week = 7 * 24 * 3_600_000  # the broker's default (log.retention.hours 168)
        assert stage.retention_watch.retention_ms == {
            topics["impressions"]: 3_600_000,
            topics["clicks"]: 3_600_000,
            topics["samples"]: week,
        }
    finally:
        stage.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_compacted_samples_topic_is_refused_before_the_join_stage_starts(
    kafka_broker, unique_topic, tmp_path, client
):
    """The broker refuses every samples message of a compacted topic (they have no key): the stage was
    rebuilt and refused again every few seconds for as long as it ran. Now a ConfigError (exit 2)."""
    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    bootstrap = kafka_broker.bootstrap
    create_topics(bootstrap, {topics["impressions"]: 1, topics["clicks"]: 1, topics["deadletter"]: 1})
    create_topics(bootstrap, {topics["samples"]: 1}, configs={"cleanup.policy": "compact,delete"})
    cfg = load_config(_config(tmp_path, bootstrap, topics, "correct", kafka={"client": client}), env={})
    with pytest.raises(ConfigError, match=rf"samples topic '{topics['samples']}' has cleanup.policy=compact"):
        join_stage_factory(cfg)()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_train_stage_records_the_id_of_a_samples_topic_created_while_it_was_built(
    kafka_broker, unique_topic, tmp_path, client, monkeypatch
):
    """Built while the join stage created the samples topic (``reloop run`` starts both at once), a train
    stage asked for the topic's id before the topic existed and recorded none in its saves: a later
    recreation of the topic went unnoticed. It now asks again once the stage is built on the topic."""
    from reloop.connectors.kafka.admin import topic_ids
    from reloop.engine.runtime import kafka_stages
    from reloop.engine.streams import TopicNotFound

    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    bootstrap = kafka_broker.bootstrap
    create_topics(bootstrap, {topics["impressions"]: 1, topics["clicks"]: 1, topics["deadletter"]: 1})
    cfg = load_config(_config(tmp_path, bootstrap, topics, "correct", kafka={"client": client}), env={})
    asked = kafka_stages._topic_ids

    def join_creates_it_meanwhile(cfg_, names):
        found = asked(cfg_, names)
        if not found:
            create_topics(bootstrap, {topics["samples"]: 1})
        return found

    monkeypatch.setattr(kafka_stages, "_topic_ids", join_creates_it_meanwhile)
    build = kafka_stages.train_stage_factory(cfg)
    try:
        stage = build()
    except TopicNotFound:  # the supervisor waits, then builds again
        create_topics(bootstrap, {topics["samples"]: 1})
        stage = build()
    try:
        wanted = topic_ids(bootstrap, [topics["samples"]])[topics["samples"]]
        assert stage.meta.get("samples_topic_id") == wanted
    finally:
        stage.close()


class _Joiner:
    """One join process: the stage under its supervisor, on a thread of this process."""

    def __init__(self, cfg: Any) -> None:
        self.stop = threading.Event()
        self.supervisor = Supervisor(
            join_stage_factory(cfg),
            stop=self.stop,
            policy=RetryPolicy(backoff_initial_s=0.2, backoff_max_s=0.5),
            close=lambda stage: stage.close(checkpoint=True),
        )
        self.thread = threading.Thread(target=self.supervisor.run, daemon=True)
        self.thread.start()

    def tasks(self) -> list[int]:
        stage = self.supervisor.pipeline
        return sorted(stage.tasks) if stage is not None else []

    def wait(self, until, timeout_s: float) -> float:
        """Seconds until ``until(self)`` held (fails after ``timeout_s``)."""
        began = time.monotonic()
        while not until(self):
            assert time.monotonic() - began < timeout_s, (self.tasks(), self.supervisor.restarts)
            assert self.thread.is_alive()
            time.sleep(0.05)
        return time.monotonic() - began

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_joiner_waits_out_a_rebalance_longer_than_the_stall_timeout(
    kafka_broker, unique_topic, tmp_path, client
):
    """A member of the group is busy for 3 s (a long step: a checkpoint of a large join state) when a new
    join process joins: the rebalance waits for its next poll. The newcomer, out of the group meanwhile,
    was rebuilt after stall_timeout_s (1 s), and its rebuild (a new member, a new rebalance) waited again:
    kafka-python never joined. It now waits as long as a healthy join may take (session + heartbeat)."""
    cfg, topics = _setup(kafka_broker, unique_topic, tmp_path, client)
    busy = KafkaGroupSource(
        bootstrap=kafka_broker.bootstrap, topics=[topics["impressions"], topics["clicks"]],
        group_id=cfg.stages.join_group_id,
        client_config={"session_timeout_ms": 10_000, "heartbeat_interval_ms": 1000},
    )  # fmt: skip
    owned: list[Any] = []
    busy.subscribe(SimpleNamespace(on_assigned=owned.extend, on_revoked=lambda _: owned.clear()))
    joiner = None
    try:
        deadline = time.monotonic() + 20
        while not owned:
            assert time.monotonic() < deadline
            busy.poll(64, 0.1)
        joiner = _Joiner(cfg)
        time.sleep(3.0)  # the member does not poll (its heartbeats go on): the rebalance waits for it
        assert joiner.tasks() == []  # still joining, three times stall_timeout_s on
        done = threading.Event()

        def poll_again() -> None:
            while not done.is_set():
                busy.poll(64, 0.1)

        polling = threading.Thread(target=poll_again)
        polling.start()
        try:
            joiner.wait(lambda j: bool(j.tasks()), timeout_s=15)
        finally:
            done.set()
            polling.join()
        assert joiner.supervisor.restarts == 0
    finally:
        busy.close()
        if joiner is not None:
            joiner.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_restore_longer_than_the_stall_timeout_is_no_stall(
    kafka_broker, unique_topic, tmp_path, client, monkeypatch
):
    """Restoring the tasks (1.5 s each here, as a join state of some 200,000 pending impressions takes)
    happens inside the rebalance, before the first fetch. The stall clock ran from before it, so the first
    step after the assignment found nothing fetched for longer than stall_timeout_s with records waiting:
    rebuilt, restored again, rebuilt, for ever (both clients). It now starts when the tasks are in place."""
    cfg, _ = _setup(kafka_broker, unique_topic, tmp_path, client)
    first = _Joiner(cfg)  # each task's first checkpoint, written when it is assigned
    try:
        first.wait(lambda j: len(j.tasks()) == 2, timeout_s=20)
    finally:
        first.close()
    assert first.supervisor.restarts == 0

    load = JoinTask.load_state_dict

    def slow_load(task: JoinTask, state: Any) -> None:
        time.sleep(1.5 * STALL_S)
        load(task, state)

    monkeypatch.setattr(JoinTask, "load_state_dict", slow_load)
    joiner = _Joiner(cfg)
    try:
        joiner.wait(lambda j: j.supervisor.pipeline is not None and j.supervisor.pipeline.samples_sent, 15)
        time.sleep(2 * STALL_S)  # past another stall check of a stage that now fetches
        assert joiner.supervisor.restarts == 0
    finally:
        joiner.close()


class _Rebuilding:
    """A join stage stepped by hand, rebuilt as its supervisor would when its consumer is out of the group
    for stall_timeout_s (kafka-python's group join takes a minute at times: not what is tested here); any
    other failure is the test's."""

    def __init__(self, cfg: Any) -> None:
        self.build = join_stage_factory(cfg)
        self.stage = self.build()

    def step(self) -> None:
        try:
            self.stage.step()
        except ConsumerStalled:
            self.stage.abort()
            self.stage = self.build()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("client", CLIENTS)
def test_topics_grown_together_while_running_give_the_group_a_new_task(
    kafka_broker, unique_topic, tmp_path, client
):
    # data-plane.md's procedure: the samples topic grown first, then both inputs. kafka-python's rebalance
    # callback, where the stage checked the new partition counts, cannot fetch metadata ("Cannot block on
    # net.run() from the IO thread itself"): the samples topic, which the join group does not subscribe
    # to, was missing from its cache, and each such growth failed the stage. Then the new task's first
    # send: its producer, at its clients' default metadata age (5 minutes), did not know the samples
    # topic's new partition ("Unrecognized partition 2", librdkafka's "Unknown partition").
    from kafka.admin import NewPartitions
    from reloop.connectors.kafka.admin import admin_client

    cfg, topics = _setup(kafka_broker, unique_topic, tmp_path, client)
    refresh = (
        {"topic.metadata.refresh.interval.ms": 1000}
        if client == "confluent"
        else {"metadata_max_age_ms": 1000}
    )
    stages = cfg.stages.model_copy(
        update={"join_client_config": {**cfg.stages.join_client_config, **refresh}, "stall_timeout_s": 20.0}
    )
    joiner = _Rebuilding(cfg.model_copy(update={"stages": stages}))
    ends = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap)
    try:
        old_partitions = [KafkaTopicPartition(topics["samples"], p) for p in (0, 1)]
        deadline = time.monotonic() + 80
        # Samples sent before the growth: the producer then holds the topic's metadata, with 2 partitions.
        while sorted(joiner.stage.tasks) != [0, 1] or not all(ends.end_offsets(old_partitions).values()):
            assert time.monotonic() < deadline, sorted(joiner.stage.tasks)
            joiner.step()
        admin = admin_client(kafka_broker.bootstrap)
        try:
            for kind in ("samples", "impressions", "clicks"):
                admin.create_partitions({topics[kind]: NewPartitions(total_count=3)})
        finally:
            admin.close()
        deadline = time.monotonic() + 80
        while 2 not in joiner.stage.tasks:
            assert time.monotonic() < deadline, sorted(joiner.stage.tasks)
            joiner.step()
        sink = KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topics["impressions"])
        for r in generate(200, seed=9, start_ms=_now_ms()).records:
            if r.topic_kind == "impression":  # the last one, far ahead, closes every window before it
                sink.send(r.value, key=r.key, timestamp_ms=r.timestamp_ms, partition=2)
        sink.close()
        new_partition = KafkaTopicPartition(topics["samples"], 2)
        deadline = time.monotonic() + 80
        while not ends.end_offsets([new_partition])[new_partition]:
            assert time.monotonic() < deadline
            joiner.step()
    finally:
        joiner.stage.close()
        ends.close()
