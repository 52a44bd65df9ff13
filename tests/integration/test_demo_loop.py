"""``reloop demo`` end to end on the real broker, short: trainers publish snapshots, the service hot-reloads
them, impressions on Kafka carry increasing model versions, every process stops cleanly (exit 0)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.events.codec import decode_impression
from reloop.engine.events.schema import Impression
from reloop.engine.runtime.demo import DEFAULT_CONFIG

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path) -> Path:
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    # Three arms (the A/A copy left out) and 4 s periods: versions advance several times within the run.
    doc["arms"] = [a for a in doc["arms"] if a["name"] in ("reloop", "ce", "ce_memory")]
    # The memory arm is served with click counters too (the trainer's model.counters; the demo gives the
    # service the same): both of the service's samples feeds run, without one more trainer process.
    counters = {"fields": ["user_id", "item_id"], "windows_s": [60]}
    for arm in doc["arms"]:
        if arm["name"] == "ce_memory":
            arm["train"] = {**arm["train"], "model": {**arm["train"]["model"], "counters": counters}}
    doc["run"]["period"] = {"every_wall_s": 4}
    doc["simulate"]["rate"] = 25
    doc["simulate"]["report"] = {"treatment": "reloop", "control": "ce"}
    path = tmp_path / "demo-test.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _impressions_in_topic(bootstrap: str, topic: str) -> list[Impression]:
    source = KafkaSource(bootstrap=bootstrap, topics=[topic])
    source.open()
    out: list[Impression] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        batch = source.poll(5000, 0.5)
        if not batch and out:
            break
        out += [decode_impression(r.value) for r in sorted(batch, key=lambda r: r.offset)]
    source.close()
    return out


def test_demo_runs_the_whole_loop(kafka_broker, tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "reloop.engine.runtime.cli",
        "demo",
        "--config",
        str(_config(tmp_path)),
        "--duration",
        "45",  # 32 s published 2 versions per arm on a busy machine (trainers start in ~10 s)
        "--bootstrap",
        kafka_broker.bootstrap,
        "--workdir",
        str(workdir),
        "--no-live",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "160"}
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "reloop demo: summary" in output
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["failed_requests"] == 0 and summary["not_ready"] == 0
    assert summary["clicks_sent"] > 0
    for name, arm in summary["arms"].items():
        assert arm["trainer_exit"] == 0, name
        # Snapshots advanced and the service served them: v0 (cold start) first, then at least two more.
        # On a loaded machine a trainer can publish v1 before the simulator's first request is scored.
        assert arm["snapshots_published"] >= 3, (name, arm)
        assert arm["first_version"] in (0, 1) and arm["last_version"] >= arm["first_version"] + 2, (name, arm)
        assert arm["impressions_dropped"] == 0
        assert arm["impressions_logged"] == arm["impressions"] > 0
        assert 0.0 <= arm["served_auc"] <= 1.0
        # Read back from Kafka by the demo: every logged impression, and clicks joined to them.
        assert arm["logged_impressions"] == arm["impressions_logged"]
        assert 0 < arm["logged_clicked"] <= arm["clicks"]
        # What reached Kafka: every logged impression, with versions that advance over the log.
        impressions = _impressions_in_topic(kafka_broker.bootstrap, arm["impressions_topic"])
        versions = [imp.model_version for imp in impressions]
        assert len(versions) == arm["impressions_logged"]
        # Counter inputs travel with the impressions of the arm served with counters, and only with them.
        counted = [imp.features.get("user_id#ctr@60s") for imp in impressions]
        if name == "ce_memory":
            assert all(isinstance(v, float) and math.isfinite(v) for v in counted)
            assert len(set(counted)) > 1  # they moved as impressions and clicks were counted
        else:
            assert set(counted) == {None}
        first_offset = {}
        for offset, v in enumerate(versions):
            first_offset.setdefault(v, offset)
        ordered = sorted(first_offset)
        assert ordered[0] == arm["first_version"] and len(ordered) >= 3
        assert [first_offset[v] for v in ordered] == sorted(first_offset[v] for v in ordered)
    # The arm served with ReLoop2's error memory wrote joined samples from its samples topic into it.
    written = {name: arm["memory_written"] for name, arm in summary["arms"].items()}
    assert written.pop("ce_memory") > 0 and set(written.values()) == {None}
    # Its counters read the clicks of its samples topic: each click at most once (on time or late).
    clicks = {name: arm["counters_clicks"] for name, arm in summary["arms"].items()}
    assert 0 < clicks.pop("ce_memory") <= summary["arms"]["ce_memory"]["clicks"]
    assert set(clicks.values()) == {None}
    assert "A/B lift ce_memory vs ce (true CTR)" in output
    expected_ab = {"ab_lift_true", "ab_lift_clicks", "ab_lift_logged", "clicks_plan_detectable"}
    assert expected_ab <= set(summary["ab"])
    assert 0 < summary["ab"]["clicks_plan_detectable"] < 10  # what this run's clicks can tell apart
    assert summary["ab"]["clicks_plan_unit"] == "user"  # its variance over the users the arms split
    # Each trainer wrote a log and a config next to its snapshots.
    for name in summary["arms"]:
        assert (workdir / name / "run.yaml").exists() and (workdir / name / "trainer.log").exists()
