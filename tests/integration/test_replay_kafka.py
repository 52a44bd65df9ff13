"""``reloop replay`` from the real Kafka broker equals the replay of the same log from files.

A generated log (impressions with exponentially delayed clicks, record timestamp = event time, as the
scoring service produces them) goes to two Kafka topics and to JSONL files. Replaying the topics
(no consumer group, nothing committed) and the files must give byte-identical samples and an identical
final model; a time range (offsets_for_times) replays only the impressions inside it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
import yaml
from reloop.connectors.files.datasets import DatasetRow, ExponentialDelay, to_events
from reloop.connectors.files.datasets.base import FieldInfo
from reloop.connectors.files.datasets.spec import feature_spec
from reloop.connectors.files.jsonl import JsonlSink
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.checkpoint import SnapshotRegistry
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Impression
from reloop.engine.runtime.cli import main

pytestmark = pytest.mark.kafka

FIELDS = (FieldInfo("user", "categorical"), FieldInfo("item", "categorical"))
N = 500
STEP_MS = 600


def _rows(t0: int) -> list[DatasetRow]:
    rng = np.random.default_rng(11)
    out = []
    for i in range(N):
        u, it = int(rng.integers(25)), int(rng.integers(40))
        label = int(rng.random() < (0.65 if (u * it) % 4 == 1 else 0.2))
        features = {"user": str(u), "item": str(it)}
        out.append(DatasetRow(f"r{i}", f"q{i}", str(u), str(it), t0 + STEP_MS * i, features, label))
    return out


def _config(path: Path, bootstrap: str, topics: dict[str, str]) -> Path:
    cfg = {
        "kafka": {"bootstrap": bootstrap},
        "source": {"impressions_topic": topics["impressions"], "clicks_topic": topics["clicks"]},
        "consumer": {"group_id": f"live-{topics['impressions']}", "poll_max_records": 64},
        "model": {"backbone": "dcn", "strategy": "reloop", "alpha": 0.5,
                  "spec": feature_spec(FIELDS, buckets=64).to_dict(),
                  "params": {"hidden_units": [16], "embedding_dim": 4, "cross_layers": 2}},
        "train": {"batch_size": 32, "deterministic": True, "y_last": "snapshot"},
        "period": {"every_samples": 128},
        "join": {"window_ms": 60_000, "allowed_lateness_ms": 0},
        "checkpoint": {"dir": str(path.parent / "live-snapshots")},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def logged(kafka_broker, unique_topic, tmp_path: Path):
    """The same events in Kafka (1 partition per topic) and as JSONL files."""
    topics = {"impressions": unique_topic("impressions"), "clicks": unique_topic("clicks")}
    create_topics(kafka_broker.bootstrap, {t: 1 for t in topics.values()})
    # Recent times: the broker's time-based retention would delete records stamped years ago.
    t0 = int(time.time() * 1000) - 3_600_000
    rows = _rows(t0)
    events = list(to_events(rows, ExponentialDelay(mean_ms=3_000, seed=4)))
    kafka = {k: KafkaSink(bootstrap=kafka_broker.bootstrap, topic=t) for k, t in topics.items()}
    files = {k: JsonlSink(root=tmp_path / "log", topic=t) for k, t in topics.items()}
    for e in events:
        kind = "impressions" if isinstance(e, Impression) else "clicks"
        kafka[kind].send(encode(e), key=e.impression_id.encode(), timestamp_ms=e.event_time_ms)
        files[kind].send(encode(e))
    for s in [*kafka.values(), *files.values()]:
        s.close()
    cfg = _config(tmp_path / "run.yaml", kafka_broker.bootstrap, topics)
    return {"topics": topics, "rows": rows, "events": events, "config": cfg, "t0": t0}


def _samples(out: Path) -> list[bytes]:
    return (out / "samples" / "samples" / "partition-00000.jsonl").read_bytes().splitlines()


def _model(out: Path) -> dict[str, torch.Tensor]:
    return SnapshotRegistry(out / "snapshots").load().state["model"]["model"]


def test_kafka_replay_equals_file_replay(kafka_broker, logged, tmp_path: Path) -> None:
    cfg = str(logged["config"])
    k_out, f_out = tmp_path / "from-kafka", tmp_path / "from-files"
    assert (
        main(["replay", "--config", cfg, "--kafka", kafka_broker.bootstrap, "--out", str(k_out), "--samples"])
        == 0
    )
    assert (
        main(["replay", "--config", cfg, "--jsonl", str(tmp_path / "log"), "--out", str(f_out), "--samples"])
        == 0
    )
    from_kafka, from_files = _samples(k_out), _samples(f_out)
    assert len(from_kafka) == N
    assert from_kafka == from_files
    truth = {r.row_id: r.label for r in logged["rows"]}
    assert {orjson.loads(s)["sample_id"]: orjson.loads(s)["label"] for s in from_kafka} == truth
    a, b = _model(k_out), _model(f_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = orjson.loads((k_out / "summary.json").read_bytes())
    assert summary["records"] == len(logged["events"]) and summary["final_version"] >= N // 128

    # Isolated: the live group's offsets were never committed, the live checkpoint dir never written.
    topics = logged["topics"]
    probe = KafkaSource(
        bootstrap=kafka_broker.bootstrap,
        topics=list(topics.values()),
        group_id=f"live-{topics['impressions']}",
    )
    try:
        assert probe.committed() == {}
    finally:
        probe.close()
    assert not (logged["config"].parent / "live-snapshots").exists()


def test_time_range_replays_the_impressions_inside_it(kafka_broker, logged, tmp_path: Path) -> None:
    t0 = logged["t0"]
    start, end = t0 + STEP_MS * 100, t0 + STEP_MS * 300
    out = tmp_path / "range"
    argv = [
        "replay",
        "--config",
        str(logged["config"]),
        "--kafka",
        kafka_broker.bootstrap,
        "--out",
        str(out),
        "--samples",
        "--start-time",
        str(start),
        "--end-time",
        str(end),
    ]
    assert main(argv) == 0
    got = {orjson.loads(s)["sample_id"]: orjson.loads(s)["label"] for s in _samples(out)}
    assert set(got) == {f"r{i}" for i in range(100, 300)}
    # The last impressions keep the clicks that came after the end (read one join window further): they
    # were labelled 0 (clicks come ~3 s after their impression here, 5 impressions' worth).
    truth = {r.row_id: r.label for r in logged["rows"]}
    assert got == {k: truth[k] for k in got}
    # The first clicks, of impressions before the start, are counted as orphans, not held for ever.
    join = orjson.loads((out / "summary.json").read_bytes())["join"]
    assert join["early_clicks_held"] == join["early_clicks_matched"] + join["orphan_clicks"] > 0


def test_replay_of_the_samples_topic_trains_each_sample_once(kafka_broker, unique_topic, tmp_path):
    """`reloop replay --from-samples`: the train stage alone over a samples topic holding a copy sent
    twice (a join task taken over) and a corrupt message: every sample trained once, the bad message
    dead-lettered, the same weights as the train stage fed the same messages in memory."""
    from reloop.connectors.memory.memory import MemoryLog, MemorySource
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
    from reloop.engine.events.schema import LabeledSample
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.build import build_train_stage
    from reloop.engine.runtime.clock import ManualClock
    from reloop.engine.runtime.config import load_config
    from reloop.engine.runtime.synthetic import SPEC
    from reloop.engine.streams import TopicPartition
    from reloop.engine.train.ledger import Ledger

    rng = np.random.default_rng(0)
    t0 = int(time.time() * 1000) - 3_600_000
    samples = []
    for i in range(640):
        features = {"user": f"u{rng.integers(50)}", "item": f"i{rng.integers(80)}", "ctx": int(i % 7)}
        samples.append(LabeledSample(f"s{i}", features, int(rng.random() < 0.3), 0.3, 0, t0 + i))
    messages = [
        encode_batch(batch_from_samples(samples[i : i + 64], task=0, first_seq=i)) for i in range(0, 640, 64)
    ]
    messages.insert(4, messages[3])  # sent again
    messages.insert(7, b"not an arrow stream")
    topic = unique_topic("samples")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    sink = KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topic)
    for k, m in enumerate(messages):
        sink.send(m, partition=0, timestamp_ms=t0 + k)
    sink.close()
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "model": {"backbone": "lr", "strategy": "reloop", "alpha": 0.3, "spec": SPEC},
                "train": {"batch_size": 32, "deterministic": True},
                "period": {"every_samples": 128},
                "stages": {"samples_topic": topic},
                "checkpoint": {"dir": str(tmp_path / "unused"), "ledger": str(tmp_path / "ledger.jsonl")},
                "consumer": {"group_id": None},
            }
        )
    )
    out = tmp_path / "replay"
    code = main(["replay", "--config", str(cfg_path), "--kafka", kafka_broker.bootstrap, "--from-samples",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["samples_trained"] == 640
    assert summary["dead_letters"] == {"malformed": 1}
    assert summary["join"]["duplicates_dropped"] == 64
    assert summary["join"]["seq_gaps"] == 0
    ids = [sid for _, sid, _, _ in Ledger.read(tmp_path / "ledger.jsonl")]
    assert sorted(ids) == sorted(s.sample_id for s in samples)
    replayed = SnapshotRegistry(out / "snapshots").load(parts=["model"]).state["model"]["model"]
    # From the middle of the topic: where it starts is no gap (it logged "samples missing", an ERROR).
    middle = tmp_path / "middle"
    code = main(["replay", "--config", str(cfg_path), "--kafka", kafka_broker.bootstrap, "--from-samples",
                 "--out", str(middle), "--start-offsets", f"{topic}:0=2"])  # fmt: skip
    assert code == 0
    summary = orjson.loads((middle / "summary.json").read_bytes())
    assert summary["samples_trained"] == 640 - 128 and summary["join"]["seq_gaps"] == 0

    log = MemoryLog()
    log.create(topic)
    for k, m in enumerate(messages):
        log.append(topic, m, None, t0 + k)
    cfg = load_config(cfg_path, env={})
    stage = build_train_stage(
        cfg,
        source=MemorySource(log, [topic]),
        clock=ManualClock(t0),
        stats=EngineStats(),
        checkpoint_dir=tmp_path / "m",
    )
    stage.open()
    while stage.positions.get(TopicPartition(topic, 0), 0) < len(messages):
        stage.step()
    stage.train_remaining()
    stage.close(final=None)  # its fetch thread and snapshot writer stopped
    for k, v in stage.trainer.learner.model.state_dict().items():
        assert torch.equal(v, replayed[k]), k


def _kafka_client_threads() -> int:
    """kafka-python's I/O threads alive in this process: one per open client."""
    return sum(t.name.startswith("kafka-io") for t in threading.enumerate())


def test_kafka_offsets_are_checked_against_the_partitions(
    kafka_broker, logged, tmp_path: Path, capsys
) -> None:
    # --end-offsets naming one topic was a traceback ("replay end positions missing"), a partition the
    # topics do not have was ignored (exit 0) or a traceback, an end past the log stalled 30 s and then
    # ended in a traceback.
    imp, clk = logged["topics"]["impressions"], logged["topics"]["clicks"]
    base = ["replay", "--config", str(logged["config"]), "--kafka", kafka_broker.bootstrap, "--out"]
    assert main([*base, str(tmp_path / "a"), "--end-offsets", f"{imp}:0=100"]) == 0
    summary = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    assert summary["join"]["impressions"] == 100
    assert summary["join"]["clicks"] == len(logged["events"]) - N  # the clicks end with their log
    capsys.readouterr()
    refused = [
        (["--end-offsets", f"{clk}:3=1"], f"--end-offsets: {clk}:3 is not a partition of this replay"),
        (["--start-offsets", f"{imp}:0=-1"], f"--start-offsets: {imp}:0=-1 is outside the partition"),
        (["--end-offsets", f"{imp}:0={N + 1}"], f"--end-offsets: {imp}:0={N + 1} is outside the partition"),
        (["--start-offsets", f"{imp}:0=50", "--end-offsets", f"{imp}:0=40"], "past its end 40"),
    ]
    clients = _kafka_client_threads()
    for k, (extra, needle) in enumerate(refused):
        t = time.monotonic()
        assert main([*base, str(tmp_path / f"r{k}"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert time.monotonic() - t < 20
    # A refused replay closes the client it asked the partitions with (it was left running, one per call).
    deadline = time.monotonic() + 10
    while _kafka_client_threads() > clients and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _kafka_client_threads() <= clients
