"""``reloop kafka topics --config FILE`` on the real broker: it creates the topics that config's ``reloop
run`` reads (it waited for them, and no reloop command made them), once, and refuses fewer partitions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from reloop.connectors.kafka.admin import admin_client, partition_counts

from .test_run_kafka import _config, _topics

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]


def _topics_cmd(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "kafka", "topics",
         "--config", str(config), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_topics_a_run_config_reads_are_created_once(kafka_broker, unique_topic, tmp_path):
    topics = _topics(unique_topic)
    config = _config(tmp_path, kafka_broker.bootstrap, topics, "correct")
    first = _topics_cmd(config, "--partitions", "3")
    assert first.returncode == 0, first.stderr
    for kind in ("impressions", "clicks", "deadletter"):
        assert f"{topics[kind]}: created" in first.stdout, first.stdout
    admin = admin_client(kafka_broker.bootstrap)
    try:
        counts = partition_counts(admin, [topics["impressions"], topics["clicks"], topics["deadletter"]])
        assert topics["samples"] not in admin.list_topics()  # the join stage's, with the impressions' count
    finally:
        admin.close()
    assert counts == {topics["impressions"]: 3, topics["clicks"]: 3, topics["deadletter"]: 1}

    again = _topics_cmd(config, "--partitions", "3")
    assert again.returncode == 0 and again.stdout.count("already there") == 3, again.stdout + again.stderr
    fewer = _topics_cmd(config, "--partitions", "2")  # kept at 3, and said so
    assert fewer.returncode == 0, fewer.stderr
    assert (
        f"{topics['impressions']}: already there at {kafka_broker.bootstrap} with 3 partition(s) (asked 2"
        in (fewer.stdout)
    )
    more = _topics_cmd(config, "--partitions", "6")  # the producers' key routing would change under them
    assert more.returncode == 1 and "fewer partitions than asked" in more.stderr, more.stdout + more.stderr


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_the_replication_of_the_topics_reloop_creates_is_a_setting(
    kafka_broker, unique_topic, tmp_path, client
):
    # Every topic was created with replication 1, whatever the cluster: on one whose min.insync.replicas
    # is 2, every acks=all produce failed. Unset, the broker's default is taken (one broker here: 1); a
    # factor the cluster cannot hold is refused by the broker, named.
    from reloop.engine.runtime.config import ConfigError, load_config
    from reloop.engine.runtime.kafka_stages import _ensure_samples_topic

    topics = _topics(unique_topic)
    config = _config(tmp_path, kafka_broker.bootstrap, topics, "correct")
    env = {"RELOOP__KAFKA__REPLICATION_FACTOR": "2"}
    refused = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "kafka", "topics", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip
    assert refused.returncode == 1 and "replication factor" in refused.stderr.lower(), refused.stderr
    assert _topics_cmd(config).returncode == 0  # unset: the broker's default
    cfg = load_config(str(config))
    cfg = cfg.model_copy(update={"kafka": cfg.kafka.model_copy(update={"client": client})})
    # The samples topic, by the join stage: a config error (exit 2), not a failure retried for 15 minutes.
    with pytest.raises(ConfigError, match=r"kafka\.replication_factor: the cluster refused it"):
        _ensure_samples_topic(
            cfg.model_copy(update={"kafka": cfg.kafka.model_copy(update={"replication_factor": 2})})
        )
    _ensure_samples_topic(cfg)
    admin = admin_client(kafka_broker.bootstrap)
    try:
        replicas = admin.describe_topics([topics["samples"], topics["impressions"]])
    finally:
        admin.close()
    assert [len(t["partitions"][0]["replica_nodes"]) for t in replicas] == [1, 1]
