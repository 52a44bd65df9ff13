"""The two stages as separate processes on the real broker: a join process killed mid-run (its task
resumes from its checkpoint, the train stage drops what it sent again), and join tasks spread over
two processes of one consumer group, moving when a process joins and back when it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch
from kafka.partitioner.default import murmur2
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.checkpoint import SnapshotRegistry
from reloop.engine.runtime.synthetic import generate
from reloop.engine.train.ledger import Ledger

from .test_run_kafka import (
    PERIOD,
    _chunks,
    _config,
    _final_model,
    _now_ms,
    _produce,
    _read_samples,
    _start,
    _stop,
    _trained,
    _wait_trained,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
_CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    yield
    while _CHILDREN:
        proc = _CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stage(stage: str, config: Path, log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", stage, "--config", str(config)],
        cwd=ROOT, stdout=out, stderr=out, env=env,
    )  # fmt: skip
    _CHILDREN.append(proc)
    return proc


def _wait_log(log: Path, needle: str, count: int = 1, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count(needle) >= count:
            return text
        time.sleep(0.1)
    raise AssertionError(
        f"{needle!r} x{count} not in {log}:\n" + (log.read_text()[-3000:] if log.exists() else "")
    )


def _tasks_now(log: Path) -> list[int]:
    """The tasks a join process owns after its last assignment or revocation (its JSON log)."""
    owned: list[int] = []
    for line in log.read_text(errors="replace").splitlines():
        if '"tasks assigned"' in line:
            owned = orjson.loads(line)["tasks"]
        elif '"tasks revoked"' in line:
            owned = orjson.loads(line)["kept"]
    return owned


def _wait_owned(log: Path, tasks: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _tasks_now(log) != tasks:
        time.sleep(0.2)
    assert _tasks_now(log) == tasks, log.read_text(errors="replace")[-3000:] if log.exists() else log


def test_killed_join_and_train_processes_resume_and_every_sample_is_trained_once(
    kafka_broker, unique_topic, tmp_path
):
    synth = generate(1500, seed=21, policy="correct", pad_to_multiple=PERIOD, start_ms=_now_ms())
    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    pieces = _chunks(synth.records, 2)
    _produce(kafka_broker.bootstrap, topics, synth, pieces[0])
    run = tmp_path / "split"
    run.mkdir()
    # Join checkpoints every 60 s: killed once its first samples are on the samples topic, the join
    # process sent samples it never checkpointed; its successor sends them again from the start and the
    # train stage drops the copies. (A kill at a fixed 2 s after the assignment, with checkpoints every
    # 4 s, could come after a checkpoint that covered everything sent: no copies, and a failed test.)
    config = _config(run, kafka_broker.bootstrap, topics, "correct", stages={"join_checkpoint_every_s": 60.0})
    train = _stage("train", config, run / "train.log")
    join = _stage("join", config, run / "join.log")
    _wait_log(run / "join.log", '"tasks assigned"')
    # A rebalance revokes the task and checkpoints it (that covers what was sent): kill only while the
    # task is owned since its last assignment and samples are out.
    watcher = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topics["samples"]])
    watcher.open()

    def sent_unacknowledged() -> bool:
        text = (run / "join.log").read_text()
        owned = text.rfind('"tasks assigned"') > text.rfind('"revoked":[0]')
        return owned and sum(watcher.end_positions().values()) > 0

    deadline = time.monotonic() + 60
    while not sent_unacknowledged() and time.monotonic() < deadline:
        assert join.poll() is None, (run / "join.log").read_text()[-3000:]
        time.sleep(0.01)
    watcher.close()
    join.send_signal(signal.SIGKILL)
    join.wait()
    _produce(kafka_broker.bootstrap, topics, synth, pieces[1])
    join = _stage("join", config, run / "join.log")
    reg = SnapshotRegistry(run / "snaps")
    # The train process killed too, once it has published a version past the first half.
    deadline = time.monotonic() + 120
    while _trained(reg) < len(synth.expected) // 2 and time.monotonic() < deadline:
        assert train.poll() is None, (run / "train.log").read_text()[-3000:]
        time.sleep(0.05)
    train.send_signal(signal.SIGKILL)
    train.wait()
    train = _stage("train", config, run / "train.log")
    _wait_trained(train, reg, len(synth.expected), run)
    assert _stop(join) == 0 and _stop(train) == 0
    train_log = (run / "train.log").read_text()
    stops = [orjson.loads(ln) for ln in train_log.splitlines() if '"msg":"stopped"' in ln]
    assert stops[-1]["seq_gaps"] == 0
    assert '"msg":"restored"' in train_log  # the train process resumed from its snapshot
    # The topic holds copies (the join process sent again what it had never checkpointed); trained once.
    on_topic = _read_samples(kafka_broker.bootstrap, topics["samples"], len(synth.expected))
    assert len(on_topic) > len({(x.sample_id, x.is_correction) for x in on_topic}) == len(synth.expected)
    keys = [(sid, corr) for _, sid, _, corr in Ledger.read(run / "ledger.jsonl")]
    assert len(keys) == len(set(keys)) and set(keys) == set(synth.expected)

    # The same weights as `reloop run` over the same log, never interrupted.
    ref = tmp_path / "ref"
    ref.mkdir()
    ref_topics = dict(topics, samples=unique_topic("samples"))
    create_topics(kafka_broker.bootstrap, {ref_topics["samples"]: 1})
    proc = _start(_config(ref, kafka_broker.bootstrap, ref_topics, "correct"), ref)
    _wait_trained(proc, SnapshotRegistry(ref / "snaps"), len(synth.expected), ref)
    assert _stop(proc) == 0
    a, b = _final_model(ref), _final_model(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _key_for(partition: int, partitions: int, prefix: str) -> str:
    for i in range(10_000):
        key = f"{prefix}-{i}"
        if (murmur2(key.encode()) & 0x7FFFFFFF) % partitions == partition:
            return key
    raise AssertionError("no key found")


def test_join_tasks_spread_over_two_processes_and_move_back(kafka_broker, unique_topic, tmp_path):
    """The whole log is written first (records written while a join runs may reach the two topics out of
    timestamp order across producers, which the ground truth of the generated log does not allow for);
    small polls keep the first joiner busy long enough for the second to join and to be killed."""
    synth = generate(4000, seed=22, policy="correct", pad_to_multiple=PERIOD, start_ms=_now_ms())
    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    create_topics(kafka_broker.bootstrap, {topics[k]: 2 for k in ("impressions", "clicks", "samples")})
    create_topics(kafka_broker.bootstrap, {topics["deadletter"]: 1})
    sinks = {
        k: KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topics[k + "s"]) for k in ("impression", "click")
    }
    for r in synth.records:
        sinks[r.topic_kind].send(r.value, key=r.key, timestamp_ms=r.timestamp_ms)
    # Sentinels: each task's watermark moves with its own partition; close every window in both.
    sentinel = next(r for r in synth.records if r.key == synth.sentinel_id.encode())
    for p in range(2):
        key = _key_for(p, 2, "sentinel")
        value = sentinel.value.replace(b'"sentinel"', f'"{key}"'.encode())
        sinks["impression"].send(value, key=key.encode(), timestamp_ms=sentinel.timestamp_ms)
    for s in sinks.values():
        s.close()
    run = tmp_path / "group"
    run.mkdir()
    config = _config(
        run, kafka_broker.bootstrap, topics, "correct",
        consumer={"poll_max_records": 4},
        stages={"join_client_config": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}},
    )  # fmt: skip
    train = _stage("train", config, run / "train.log")
    a = _stage("join", config, run / "join-a.log")
    # The first assignment can come before the consumer's metadata knows the topic (an empty one, then a
    # rebalance): wait for the process to own both tasks.
    _wait_owned(run / "join-a.log", [0, 1], timeout_s=60)
    b = _stage("join", config, run / "join-b.log")
    _wait_log(run / "join-b.log", '"tasks assigned"')
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        _tasks_now(run / "join-a.log") and _tasks_now(run / "join-b.log")
    ):
        time.sleep(0.2)
    owned = (_tasks_now(run / "join-a.log"), _tasks_now(run / "join-b.log"))
    assert sorted(owned[0] + owned[1]) == [0, 1] and owned[0] and owned[1], owned  # one task each
    time.sleep(1.5)
    b.send_signal(signal.SIGKILL)
    b.wait()
    # The dead member's session times out and its task moves back.
    _wait_owned(run / "join-a.log", [0, 1], timeout_s=90)
    reg = SnapshotRegistry(run / "snaps")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and _trained(reg) < len(synth.expected) - PERIOD:
        assert train.poll() is None and a.poll() is None
        time.sleep(0.2)
    time.sleep(3)
    assert _stop(a) == 0 and _stop(train) == 0
    keys = [(sid, corr) for _, sid, _, corr in Ledger.read(run / "ledger.jsonl")]
    # Every sample of the log trained once (the last partial batch stays in the final checkpoint).
    assert len(keys) == len(set(keys))
    assert set(keys) <= set(synth.expected)
    last = reg.checkpoints.load(reg.checkpoints.versions()[-1], parts=["state"]).state["state"]
    buffered = sum(len(decode(b)) for part in last["ranks"] for b in part["buffer"])
    assert len(keys) + buffered == len(synth.expected)
    got: dict = {}
    for s in _read_samples(kafka_broker.bootstrap, topics["samples"], len(synth.expected)):
        assert got.setdefault((s.sample_id, s.is_correction), s) == s  # a copy sent again is the same
    assert {k: v.label for k, v in got.items()} == synth.expected


def decode(data: bytes):
    from reloop.engine.events.sample_batch import decode_batch

    return decode_batch(data)
