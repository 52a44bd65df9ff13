"""``reloop kafka topics --config FILE`` on the real broker: it creates the topics that config's ``reloop
run`` reads (it waited for them, and no reloop command made them), once, and refuses fewer partitions."""

from __future__ import annotations

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
