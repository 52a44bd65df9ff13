"""The join stage over input topics written by producers that are not ours, on the real broker: every
compression codec, transactions (aborted ones and their markers), idempotent producers, headers, null
keys, tombstones and log-append time. Every valid record is joined, every invalid one dead-lettered."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from reloop.connectors.kafka.admin import admin_client, create_topics
from reloop.engine.events.sample_batch import decode_batch
from reloop.engine.runtime.synthetic import SyntheticLog, generate

from .test_deadletters_kafka import _read as _read_all
from .test_run_kafka import _config, _now_ms, _topics

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ["kafka-python", "confluent"]


def _produce(
    bootstrap: str, topics: Mapping[str, str], synth: SyntheticLog, config: Mapping[str, Any]
) -> None:
    """``synth`` written by a librdkafka producer with ``config`` (it has every codec built in)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, **config})
    for r in synth.records:
        producer.produce(topics[r.topic_kind + "s"], key=r.key, value=r.value, timestamp=r.timestamp_ms)
        producer.poll(0)
    assert producer.flush(30) == 0


def _join(
    tmp: Path,
    bootstrap: str,
    topics: Mapping[str, str],
    client: str,
    want: int,
    want_dead: int,
    consumer_config: Mapping[str, Any] | None = None,
) -> tuple[set, list[str], str]:
    """Run ``reloop join`` until the samples topic holds ``want`` distinct samples and the dead-letter
    topic ``want_dead`` letters (or 60 s pass); returns the samples' (id, is_correction), the letters'
    reasons and the process's log."""
    config = _config(
        tmp, bootstrap, dict(topics), "correct", kafka={"client": client},
        consumer={"client_config": dict(consumer_config or {})},
    )  # fmt: skip
    log = tmp / "join.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reloop.engine.runtime.cli", "join", "--config", str(config)],
            cwd=ROOT, stdout=out, stderr=out, env=env,
        )  # fmt: skip
    try:
        seen: set = set()
        dead: list[str] = []
        deadline = time.monotonic() + 60
        while (len(seen) < want or len(dead) < want_dead) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(1.0)
            if topics["samples"] in _topic_names(bootstrap):
                for r in _read_all(bootstrap, topics["samples"]):
                    seen |= {(s.sample_id, s.is_correction) for s in decode_batch(r.value).to_samples()}
            dead = _dead_reasons(bootstrap, topics["deadletter"])
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
    return seen, _dead_reasons(bootstrap, topics["deadletter"]), log.read_text(errors="replace")


def _topic_names(bootstrap: str) -> set[str]:
    admin = admin_client(bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def _dead_reasons(bootstrap: str, topic: str) -> list[str]:
    if topic not in _topic_names(bootstrap):
        return []
    return [orjson.loads(r.value)["reason"] for r in _read_all(bootstrap, topic)]


# Every codec through kafka-python (its codecs are packages of their own); librdkafka has them all built
# in, so one of them stands for the rest there.
@pytest.mark.parametrize(
    ("codec", "client"),
    [(codec, "kafka-python") for codec in ("gzip", "snappy", "lz4", "zstd")] + [("zstd", "confluent")],
)
def test_every_codec_on_the_input_topics_is_joined(kafka_broker, unique_topic, tmp_path, codec, client):
    synth = generate(300, seed=5, start_ms=_now_ms())
    topics = _topics(unique_topic)
    create_topics(kafka_broker.bootstrap, {topics["impressions"]: 1, topics["clicks"]: 1})
    _produce(kafka_broker.bootstrap, topics, synth, {"compression.type": codec, "enable.idempotence": True})
    seen, dead, log = _join(
        tmp_path, kafka_broker.bootstrap, topics, client, len(synth.expected), synth.malformed
    )
    assert seen == set(synth.expected), log[-3000:]
    assert len(dead) == synth.malformed, (dead, log[-3000:])
    assert "pipeline failed" not in log


def _produce_transactions(bootstrap: str, topics: Mapping[str, str], synth: SyntheticLog) -> set[str]:
    """``synth`` written in transactions of 50 records (lz4) by a transactional producer, with an aborted
    transaction of copies (new ids) after every committed one. Returns the aborted ids."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"tx-{topics['samples']}",
            "linger.ms": 5,
            "compression.type": "lz4",
        }
    )
    producer.init_transactions(30)
    aborted: set[str] = set()
    records = synth.records
    for start in range(0, len(records), 50):
        producer.begin_transaction()
        for r in records[start : start + 50]:
            producer.produce(topics[r.topic_kind + "s"], key=r.key, value=r.value, timestamp=r.timestamp_ms)
        producer.commit_transaction(30)
        producer.begin_transaction()
        for r in records[start : start + 50]:
            if r.topic_kind == "impression" and r.key.startswith(b"imp"):
                ghost = "aborted-" + r.key.decode()
                value = r.value.replace(r.key, ghost.encode())
                producer.produce(
                    topics["impressions"], key=ghost.encode(), value=value, timestamp=r.timestamp_ms
                )
                aborted.add(ghost)
        producer.flush(30)  # on the log before the abort: the consumer has records to skip
        producer.abort_transaction(30)
    return aborted


@pytest.mark.parametrize("client", CLIENTS)
def test_aborted_transactions_are_not_joined_under_read_committed(
    kafka_broker, unique_topic, tmp_path, client
):
    synth = generate(300, seed=6, start_ms=_now_ms())
    topics = _topics(unique_topic)
    create_topics(kafka_broker.bootstrap, {topics["impressions"]: 1, topics["clicks"]: 1})
    aborted = _produce_transactions(kafka_broker.bootstrap, topics, synth)
    assert aborted
    committed = {"kafka-python": {"isolation_level": "read_committed"}, "confluent": {}}[client]
    seen, dead, log = _join(
        tmp_path, kafka_broker.bootstrap, topics, client, len(synth.expected), synth.malformed, committed
    )
    assert seen == set(synth.expected), log[-3000:]
    assert len(dead) == synth.malformed, (dead, log[-3000:])
    assert "pipeline failed" not in log


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("timestamps", ["CreateTime", "LogAppendTime"])
def test_null_keys_tombstones_empty_values_and_headers(
    kafka_broker, unique_topic, tmp_path, client, timestamps
):
    """Headers and null keys change nothing; a tombstone or an empty value is dead-lettered, the records
    around it joined. Under LogAppendTime the records carry the broker's clock, not the producer's."""
    synth = generate(300, seed=7, start_ms=_now_ms())
    topics = _topics(unique_topic)
    create_topics(
        kafka_broker.bootstrap,
        {topics["impressions"]: 1, topics["clicks"]: 1},
        configs={"message.timestamp.type": timestamps},
    )
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "linger.ms": 20})
    odd = 0
    for i, r in enumerate(synth.records):
        topic = topics[r.topic_kind + "s"]
        headers = [("trace", b"x" * (i % 300)), ("empty", None), ("", b"")] if i % 2 else None
        producer.produce(
            topic, key=None if i % 3 == 0 else r.key, value=r.value, timestamp=r.timestamp_ms, headers=headers
        )
        if i % 40 == 0:  # a tombstone and an empty value, between the records of the log
            producer.produce(topic, key=r.key, value=None, timestamp=r.timestamp_ms)
            producer.produce(topic, key=None, value=b"", timestamp=r.timestamp_ms, headers=headers)
            odd += 2
    assert producer.flush(30) == 0
    impressions = {k for k in synth.expected if not k[1]}
    if timestamps == "CreateTime":
        seen, reasons, log = _join(
            tmp_path, kafka_broker.bootstrap, topics, client, len(synth.expected), synth.malformed + odd
        )
        assert seen == set(synth.expected), log[-3000:]
    else:
        # The broker stamps a whole batch with its append time: this log, written in a second, has the
        # records of both topics at a few timestamps, so a click after the window may merge before the
        # impressions that close it and join as a positive (no correction). Every impression is joined.
        seen, reasons, log = _join(
            tmp_path, kafka_broker.bootstrap, topics, client, len(impressions), synth.malformed + odd
        )
        assert {k for k in seen if not k[1]} == impressions, log[-3000:]
        assert seen <= set(synth.expected)
    assert len(reasons) == synth.malformed + odd, (reasons, log[-3000:])
    assert "pipeline failed" not in log


def test_a_codec_kafka_python_cannot_read_stops_the_join_stage_naming_its_package(
    kafka_broker, unique_topic, tmp_path
):
    """Without lz4's package kafka-python raised at every poll of an lz4 batch, and the supervisor rebuilt
    the stage for 15 minutes (for ever while another task checkpointed), reading nothing."""
    synth = generate(50, seed=8, start_ms=_now_ms())
    topics = _topics(unique_topic)
    create_topics(kafka_broker.bootstrap, {topics["impressions"]: 1, topics["clicks"]: 1})
    _produce(kafka_broker.bootstrap, topics, synth, {"compression.type": "lz4"})
    config = _config(tmp_path, kafka_broker.bootstrap, topics, "correct", kafka={"client": "kafka-python"})
    without_lz4 = (
        "import sys, kafka.codec as c; c.lz4 = c.lz4f = c.lz4framed = None; "
        "from reloop.engine.runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__")}
    try:
        out = subprocess.run(
            [sys.executable, "-c", without_lz4, "join", "--config", str(config)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"still running after 60 s: {str(exc.stderr)[-2000:]}") from None
    assert out.returncode == 2, out.stderr[-3000:]
    assert "lz4-compressed" in out.stderr and "pip install lz4" in out.stderr
    assert "pipeline failed" not in out.stderr
