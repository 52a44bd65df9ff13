"""A real Prometheus server scrapes the real stream processor (`reloop run` on the local Kafka broker):
its train process on ``metrics.prometheus_port`` and its join process on the port after it.

The processes export through the one adapter (connectors/metrics/prometheus.py) from the plain
registry; we read the series back from Prometheus' HTTP API, as a dashboard or an alert would.
"""

from __future__ import annotations

import importlib.metadata
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.metrics.local_prometheus import LocalPrometheus, find_binary, free_port
from reloop.connectors.metrics.prometheus import exported_series_names
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Click, Impression
from reloop.engine.runtime.synthetic import SPEC

pytestmark = [pytest.mark.prometheus, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
# Recent stamps: the shared broker's time-based retention (7 days) deletes records stamped years ago at its
# next check (30 s after it starts, then every 5 minutes). Stamped in 2023, the feed was deleted before the
# processor read it whenever a check fell between the two (twice in CI: the join stage read nothing).
START_MS = int(time.time() * 1000) - 600_000
WINDOW_MS = 2_000
# Served predictions separate the classes better on the "reloop" arm than on "control".
ARMS = {"control": 0.15, "reloop": 0.35}


@dataclass
class Feed:
    bootstrap: str
    impressions: str
    clicks: str
    t_ms: int = START_MS
    seq: int = 0

    def send(self, n: int, rng: random.Random) -> int:
        """n impressions alternating arms, ~25% clicked within the window; returns records sent."""
        imp = KafkaSink(bootstrap=self.bootstrap, topic=self.impressions)
        clk = KafkaSink(bootstrap=self.bootstrap, topic=self.clicks)
        sent = 0
        for _ in range(n):
            iid = f"imp{self.seq:07d}"
            arm = "control" if self.seq % 2 else "reloop"
            clicked = rng.random() < 0.25
            p = min(0.99, max(0.01, rng.uniform(0.05, 0.45) + (ARMS[arm] if clicked else 0.0)))
            imp.send(encode(Impression(
                impression_id=iid, request_id=f"r{iid}", user_id=f"u{rng.randrange(50)}",
                item_id=f"it{rng.randrange(80)}",
                features={"user": f"u{rng.randrange(50)}", "item": f"it{rng.randrange(80)}",
                          "ctx": rng.randrange(10)},
                event_time_ms=self.t_ms, served_prediction=round(p, 6), model_version=3, arm=arm,
            )), key=iid.encode(), timestamp_ms=self.t_ms)
            sent += 1
            if clicked:
                ct = self.t_ms + rng.randint(1, WINDOW_MS // 2)
                click = encode(Click(impression_id=iid, event_time_ms=ct))
                clk.send(click, key=iid.encode(), timestamp_ms=ct)
                sent += 1
            self.seq += 1
            self.t_ms += 10
        # Two malformed impressions: dead letters with a reason.
        for _ in range(2):
            imp.send(b"{not json", key=b"bad", timestamp_ms=self.t_ms)
            sent += 1
        imp.close()
        clk.close()
        return sent


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def processor_config(tmp: Path, feed: Feed, metrics_port: int, group: str) -> Path:
    cfg = {
        "kafka": {"bootstrap": feed.bootstrap},
        "source": {"impressions_topic": feed.impressions, "clicks_topic": feed.clicks},
        "consumer": {"group_id": group, "poll_max_records": 256, "merge_idle_ms": 200},
        "sink": {"dead_letter_topic": None},
        "stages": {"samples_topic": f"samples-{group}", "join_group_id": f"join-{group}", "max_delay_ms": 50,
                   "join_checkpoint_every_s": 1.0},
        # A short idle timeout lets the watermark advance when the feed pauses, so the joiner emits
        # the last negatives without a sentinel event.
        "join": {"window_ms": WINDOW_MS, "allowed_lateness_ms": 100, "click_grace_ms": 500,
                 "idle_timeout_ms": 1_000, "retention_ms": 5_000},
        "model": {"backbone": "lr", "strategy": "reloop", "alpha": 0.3, "spec": SPEC},
        "train": {"batch_size": 32},
        "period": {"every_samples": 256},
        "checkpoint": {"dir": str(tmp / "snaps"), "keep": 3},
        "metrics": {"window_size": 5_000, "prometheus_host": "127.0.0.1", "prometheus_port": metrics_port},
        "log": {"stats_every_s": 1.0},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Running:
    prom: LocalPrometheus
    feed: Feed
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def running(kafka_broker, tmp_path_factory, unavailable) -> Iterator[Running]:
    binary = find_binary("prometheus") or unavailable("prometheus not found: run deploy/prometheus/fetch.sh")
    tmp = tmp_path_factory.mktemp("scrape")
    tag = uuid.uuid4().hex[:10]  # module scope: the conftest's unique_topic is per test
    feed = Feed(kafka_broker.bootstrap, f"impressions-{tag}", f"clicks-{tag}")
    create_topics(feed.bootstrap, {feed.impressions: 2, feed.clicks: 2})
    rng = random.Random(5)
    feed.send(800, rng)
    port = free_port()
    while not _free(port + 1):
        port = free_port()
    config = processor_config(tmp, feed, port, group=f"g-{tag}")
    log = tmp / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__")}
    with open(log, "ab") as out:
        cli = [sys.executable, "-m", "reloop.engine.runtime.cli"]
        proc = subprocess.Popen([*cli, "run", "--config", str(config)],
                                cwd=ROOT, stdout=out, stderr=out, env=env)
    prom = LocalPrometheus(targets={"reloop-processor": [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]},
                           workdir=tmp / "prometheus", binary=binary)
    try:
        with prom:
            running = Running(prom, feed, proc, log)
            # Once for the module: a processor that reads nothing fails every test here, each after its own
            # wait (five times 90 s in a CI run that saw it).
            wait_for(running, f'reloop_events_consumed_total{{topic="{feed.impressions}"}} > 0', timeout=120)
            yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(r: Running, promql: str, min_results: int = 1, timeout: float = 90) -> list[dict]:
    try:
        return r.prom.wait_for(promql, timeout=timeout, min_results=min_results)
    except TimeoutError as exc:
        raise AssertionError(
            f"{exc}\nfeed topics (log start, log end): {log_ranges(r.feed)}\n"
            f"processor exit={r.proc.poll()} log:\n{log_digest(r.log)}"
        ) from exc


def log_ranges(feed: Feed) -> dict[str, tuple[int, int]] | str:
    """Each feed partition's oldest stored offset and its end: a start at the end means the broker deleted
    the records (retention) before anything read them; a start at 0 with records left, that they wait."""
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KafkaTopicPartition

    try:
        consumer = KafkaConsumer(bootstrap_servers=feed.bootstrap)
        try:
            tps = [KafkaTopicPartition(t, p) for t in (feed.impressions, feed.clicks) for p in (0, 1)]
            starts, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
            return {f"{tp.topic}:{tp.partition}": (starts[tp], ends[tp]) for tp in tps}
        finally:
            consumer.close()
    except Exception as exc:  # noqa: BLE001 - a failure message must not fail on its own details
        return f"unknown ({exc!r})"


def log_digest(path: Path, keep: int = 60) -> str:
    """The processor's log for a failure message: every line but its once-a-second progress reports (the
    starts, restores, warnings and errors that say why), then its last two progress reports."""
    lines = path.read_text().splitlines()
    progress = [line for line in lines if '"msg":"progress"' in line]
    other = [line for line in lines if '"msg":"progress"' not in line]
    if len(other) > keep:
        other = [*other[: keep // 2], f"... {len(other) - keep} lines left out ...", *other[-keep // 2 :]]
    return "\n".join([*other, *progress[-2:]])[-12_000:]


def test_rolling_auc_per_arm_is_scraped_from_the_processor(running):
    series = wait_for(running, 'reloop_rolling_auc{job="reloop-processor",slot="current"}', min_results=2)
    by_arm = {s["metric"]["arm"]: s for s in series}
    assert set(by_arm) == set(ARMS)
    for s in series:
        assert s["metric"]["model_version"] == "3"
        assert 0.0 <= float(s["value"][1]) <= 1.0
    # Each arm's window over every version (slot "all", no model_version label): one version fed here,
    # so it holds the same samples.
    whole = wait_for(running, 'reloop_rolling_auc{job="reloop-processor",slot="all"}', min_results=2)
    assert {s["metric"]["arm"] for s in whole} == set(ARMS)
    # Both slots in one query, so from one scrape: two queries read two scrapes of windows still filling.
    both = wait_for(running, 'reloop_rolling_auc{job="reloop-processor",slot=~"current|all"}', min_results=4)
    current = {s["metric"]["arm"]: s for s in both if s["metric"]["slot"] == "current"}
    for s in (s for s in both if s["metric"]["slot"] == "all"):
        assert "model_version" not in s["metric"]
        assert float(s["value"][1]) == pytest.approx(float(current[s["metric"]["arm"]]["value"][1]))
    # The feed separates clicks better on the reloop arm: the scraped AUCs say so.
    assert float(by_arm["reloop"]["value"][1]) > float(by_arm["control"]["value"][1]) > 0.5
    samples = wait_for(running, "reloop_rolling_window_samples", min_results=2)
    assert all(float(s["value"][1]) > 0 for s in samples)


def test_events_counter_increases_as_events_arrive(running):
    def consumed() -> float:
        topic = running.feed.impressions
        result = running.prom.query(f'sum(reloop_events_consumed_total{{topic="{topic}"}})')
        return float(result[0]["value"][1]) if result else 0.0

    wait_for(running, f'reloop_events_consumed_total{{topic="{running.feed.impressions}"}} > 0')
    deadline = time.monotonic() + 60
    before = consumed()
    while time.monotonic() < deadline:  # let the first feed drain, so the rise below is the new one
        time.sleep(2)
        now = consumed()
        if now == before:
            break
        before = now
    running.feed.send(300, random.Random(6))
    wait_for(running, f'sum(reloop_events_consumed_total{{topic="{running.feed.impressions}"}}) > {before}')
    dead = wait_for(running, "reloop_dead_letters_total > 0")
    assert all(s["metric"]["reason"] for s in dead)


def test_only_canonical_series_and_bounded_labels(running):
    wait_for(running, "reloop_rolling_auc", min_results=2)
    names = running.prom.query('count by (__name__) ({job="reloop-processor", __name__=~"reloop_.*"})')
    exported = {s["metric"]["__name__"] for s in names}
    assert {"reloop_events_consumed_total", "reloop_rolling_auc", "reloop_joiner_pending"} <= exported
    assert exported <= exported_series_names()
    allowed = {"__name__", "job", "instance", "topic", "partition", "arm", "model_version", "slot",
               "reason", "label", "part", "kind", "policy", "outcome", "optimizer",
               "version", "python", "torch"}  # the last three: reloop_build_info only
    for s in running.prom.query('{job="reloop-processor", __name__=~"reloop_.*"}'):
        assert set(s["metric"]) <= allowed, s["metric"]
        if s["metric"]["__name__"] != "reloop_build_info":
            assert not {"version", "python", "torch"} & set(s["metric"]), s["metric"]
    # Both processes (train on the port, join on the next) say which build they run.
    info = wait_for(running, 'reloop_build_info{job="reloop-processor"}', min_results=2)
    assert {s["metric"]["version"] for s in info} == {importlib.metadata.version("reloop")}
    # The standard collectors are scraped too.
    wait_for(running, 'process_cpu_seconds_total{job="reloop-processor"}', min_results=2)
    wait_for(running, 'python_info{job="reloop-processor"}', min_results=2)
    wait_for(running, 'python_gc_collections_total{job="reloop-processor"}', min_results=2)


def test_train_loss_total_and_its_parts_are_separate_series(running):
    total = wait_for(running, 'reloop_train_loss{job="reloop-processor"}')
    assert all("part" not in s["metric"] for s in total)
    parts = wait_for(running, 'reloop_train_loss_part{job="reloop-processor"}', min_results=3)
    assert {s["metric"]["part"] for s in parts} == {"ce", "sc", "kd"}
    rates = wait_for(running, 'reloop_train_learning_rate{job="reloop-processor"}', min_results=2)
    assert {s["metric"]["optimizer"] for s in rates} == {"dense", "embedding"}
    assert all(0 < float(s["value"][1]) < 1 for s in rates)


def test_record_age_and_retention_match_topic_by_topic_for_the_alert(running):
    """ReloopRecordsNearRetention compares two gauges label by label: on a real scrape each topic's age and
    retention carry the same labels. The feed is stamped minutes ago, in seconds (not ms); its topics keep
    the broker's week, so the alert's own expression finds nothing."""
    feed = running.feed
    under = "reloop_join_record_age_seconds < reloop_topic_retention_seconds"
    by_topic = {s["metric"]["topic"]: float(s["value"][1]) for s in wait_for(running, under, min_results=3)}
    tag = feed.impressions.removeprefix("impressions-")
    assert {feed.impressions, feed.clicks, f"samples-g-{tag}"} <= set(by_topic)
    assert all(0 < age < 2 * 24 * 3600 for age in by_topic.values()), by_topic
    retention = running.prom.query(f'reloop_topic_retention_seconds{{topic="{feed.impressions}"}}')
    assert float(retention[0]["value"][1]) == 7 * 24 * 3600  # the broker's default, read at the start
    assert running.prom.query("reloop_join_record_age_seconds > 0.8 * reloop_topic_retention_seconds") == []


def test_processor_stops_cleanly_after_being_scraped(running):
    wait_for(running, "reloop_train_samples_total > 0")
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=60) == 0, log_digest(running.log)
