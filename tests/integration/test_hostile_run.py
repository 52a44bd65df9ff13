"""`reloop run` on the real broker fed with hostile input: nothing lost, nothing wedged.

One stream (a generated log whose samples are known in advance) is mixed with thousands of fuzzed bad
records of every kind (tests/integration/hostile.py), oversized ones included; the processor is killed
once mid-run and restarted. The tests below each check one promise against that run:

* every bad record reaches the dead-letter topic with its reason, oversized ones truncated with their
  size and digest (the fuzz test; defects "silent loss on an exception", "validation ignores the spec",
  "watermark poisoning");
* every valid sample is trained exactly once (the ledger), except the few the model cannot learn from
  (a numeric of 1e30 under the identity transform): those are dead-lettered (``unlearnable``) instead;
* no credential from the config reaches any file the engine wrote;
* a newest state that passes its checksum but does not load is refused and the run falls back.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.checkpoint import SnapshotRegistry
from reloop.engine.deadletter import decode_raw
from reloop.engine.events.sample_batch import decode_batch
from reloop.engine.runtime.synthetic import SPEC, generate
from reloop.engine.train.ledger import Ledger

from .hostile import generate_hostile
from .test_run_kafka import (
    FAST_REJOIN,
    _now_ms,
    _start,
    _stop,
    _wait_started,
    _wait_trained,
    join_stats,
    join_task_states,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

BATCH = 16
PERIOD = 4 * BATCH
PASSWORD = "hunter2-do-not-write-me"
# The synthetic spec plus a numeric field, so a numeric value that is not a number can be sent.
HOSTILE_SPEC = {"fields": [*SPEC["fields"], {"kind": "numeric", "name": "price", "transform": "identity"}]}


def _read_all(bootstrap: str, topic: str, timeout_s: float = 20.0) -> list:
    src = KafkaSource(bootstrap=bootstrap, topics=[topic])
    src.open()
    out: list = []
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        got = src.poll(5000, 0.5)
        out += got
        quiet = 0 if got else quiet + 1
    src.close()
    return out


def _config(tmp: Path, bootstrap: str, topics: dict[str, str]) -> Path:
    cfg = {
        # Accepted and ignored by the PLAINTEXT client: what matters is where the value ends up.
        "kafka": {"bootstrap": bootstrap, "sasl_username": "reloop", "sasl_password": PASSWORD},
        "source": {"impressions_topic": topics["impressions"], "clicks_topic": topics["clicks"]},
        # fetch_max_wait_ms: a consumer-only setting, which producers used to be handed (a crash);
        # linger_ms: a producer-only one (a kafka-python consumer refuses it). Each reaches its kind only.
        "consumer": {
            "group_id": f"g-{topics['samples']}",
            "poll_max_records": 256,
            "client_config": {"fetch_max_wait_ms": 200},
        },
        "producer": {"client_config": {"linger_ms": 5}},
        "sink": {"dead_letter_topic": topics["deadletter"]},
        "stages": {
            "samples_topic": topics["samples"],
            "join_group_id": f"join-{topics['samples']}",
            "batch_samples": 32,
            "max_delay_ms": 50,
            "join_checkpoint_every_s": 1.0,
            "join_client_config": FAST_REJOIN,
        },
        "join": {
            "window_ms": 2_000,
            "allowed_lateness_ms": 200,
            "click_grace_ms": 1_000,
            "idle_timeout_ms": 10**9,
            "retention_ms": 5_000,
            "late_click_policy": "correct",
        },
        "model": {
            "backbone": "dcn",
            "strategy": "reloop",
            "alpha": 0.3,
            "spec": HOSTILE_SPEC,
            "params": {"hidden_units": [16], "cross_layers": 1, "embedding_dim": 4},
        },
        "train": {"batch_size": BATCH, "deterministic": True},
        "period": {"every_samples": PERIOD},
        "checkpoint": {"dir": str(tmp / "snaps"), "keep": 100, "ledger": str(tmp / "ledger.jsonl")},
        "log": {"stats_every_s": 1.0},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def hostile_run(kafka_broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-run")
    suffix = hashlib.sha1(str(tmp).encode()).hexdigest()[:8]
    topics = {k: f"{k}-hostile-{suffix}" for k in ("impressions", "clicks", "samples", "deadletter")}
    create_topics(kafka_broker.bootstrap, {t: 1 for t in topics.values()})
    start = _now_ms()
    synth = generate(1200, seed=17, policy="correct", pad_to_multiple=PERIOD, start_ms=start)
    # Valid, finite in float32, but DCN's logit for it is NaN: the train stage learns the rest of its step.
    unlearnable = {iid for iid, _ in list(synth.expected)[100:400:100]}

    def price(impression_id, features) -> bool:
        features["price"] = 1e30 if impression_id in unlearnable else 1.5
        return True

    synth = synth.with_features(price)
    bad = generate_hostile(2500, now_ms=start + 5_000, seed=4, oversized=6)
    # Interleave: the bad records go out between the valid ones, in one order per topic (1 partition:
    # the offsets of each record are known from that order). Written in two halves: the processor is
    # killed while it works on the first and restarted before the second.
    kinds = {"impression": topics["impressions"], "click": topics["clicks"]}
    ordered: list[tuple[str, bytes | None, bytes, int]] = []
    offsets = Counter()
    expected_reason: dict[tuple[str, int], str] = {}
    bad_iter = iter(bad)
    every = max(1, len(synth.records) // len(bad))

    def add(kind: str, key: bytes | None, value: bytes, ts: int, reason: str | None = None) -> None:
        if reason is not None:
            expected_reason[(kinds[kind], offsets[kind])] = reason
        offsets[kind] += 1
        ordered.append((kind, key, value, ts))

    for i, rec in enumerate(synth.records):
        add(rec.topic_kind, rec.key, rec.value, rec.timestamp_ms)
        if i % every == 0:
            for h in (next(bad_iter, None), next(bad_iter, None)):
                if h is not None:
                    add(h.topic_kind, h.key, h.value, rec.timestamp_ms, h.reason)
    for h in bad_iter:
        add(h.topic_kind, h.key, h.value, synth.records[-1].timestamp_ms, h.reason)
    half = len(ordered) // 2
    while ordered[half][3] == ordered[half - 1][3]:
        half += 1

    def write(rows) -> None:
        sinks = {kind: KafkaSink(bootstrap=kafka_broker.bootstrap, topic=t) for kind, t in kinds.items()}
        for kind, key, value, ts in rows:
            sinks[kind].send(value, key=key, timestamp_ms=ts)
        for sink in sinks.values():
            sink.close()

    write(ordered[:half])
    config = _config(tmp, kafka_broker.bootstrap, topics)
    reg = SnapshotRegistry(tmp / "snaps")
    n = len(synth.expected)
    proc = _start(config, tmp)
    _wait_started(proc, tmp / "run.log")
    time.sleep(1.0)
    assert proc.poll() is None, (tmp / "run.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    write(ordered[half:])
    proc = _start(config, tmp)
    _wait_trained(proc, reg, n, tmp)
    assert _stop(proc) == 0, (tmp / "run.log").read_text()[-3000:]
    dead = _read_all(kafka_broker.bootstrap, topics["deadletter"])
    return {
        "tmp": tmp,
        "topics": topics,
        "synth": synth,
        "unlearnable": {k for k in synth.expected if k[0] in unlearnable},
        "bad": bad,
        "expected_reason": expected_reason,
        "dead": dead,
        "config": config,
        "reg": reg,
        "bootstrap": kafka_broker.bootstrap,
    }


def _envelopes(run) -> dict[tuple[str, int], dict]:
    """Dead letters by (topic, offset) of the bad record (the topic is at-least-once: a record handled
    again after the kill appears twice, with the same reason)."""
    out: dict[tuple[str, int], dict] = {}
    for rec in run["dead"]:
        env = orjson.loads(rec.value)
        if env["reason"] == "unlearnable":  # a sample, not a record (see the test of its own below)
            continue
        key = (env["topic"], env["offset"])
        if key in out:
            assert out[key]["reason"] == env["reason"]
        out[key] = env
    return out


def test_fuzz_every_bad_record_is_dead_lettered_with_its_reason(hostile_run):
    envelopes = _envelopes(hostile_run)
    expected = hostile_run["expected_reason"]
    synth_bad = hostile_run["synth"].malformed  # the generator's own three malformed kinds
    assert len(expected) >= 2500
    missing = {k: v for k, v in expected.items() if k not in envelopes}
    assert not missing, (
        f"{len(missing)} bad records never reached the dead-letter topic: {list(missing.items())[:5]}"
    )
    wrong = {k: (v, envelopes[k]["reason"]) for k, v in expected.items() if envelopes[k]["reason"] != v}
    assert not wrong, f"wrong reasons (expected, got): {list(wrong.items())[:10]}"
    assert len(envelopes) == len(expected) + synth_bad  # nothing valid was dead-lettered
    by_reason = Counter(expected.values())
    assert set(by_reason) >= {
        "malformed",
        "missing_field",
        "wrong_type",
        "bad_prediction",
        "bad_time",
        "unknown_schema_version",
        "bad_value",
        "bad_feature",
        "oversized",
    }


def test_every_valid_sample_is_trained_exactly_once(hostile_run):
    keys = [(sid, corr) for _, sid, _, corr in Ledger.read(hostile_run["tmp"] / "ledger.jsonl")]
    assert len(keys) == len(set(keys)), "a sample was trained twice"
    assert set(keys) == set(hostile_run["synth"].expected) - hostile_run["unlearnable"]
    got = {}
    for rec in _read_all(hostile_run["bootstrap"], hostile_run["topics"]["samples"]):
        for s in decode_batch(rec.value).to_samples():
            got[(s.sample_id, s.is_correction)] = s.label
    assert got == hostile_run["synth"].expected


def test_samples_the_model_cannot_learn_are_dead_lettered_as_samples(hostile_run):
    """1e30 under the identity transform passes every check; DCN's logit for it is NaN. Its sample is
    left out of its step (the others learnt), is not in the ledger (above) and reaches the dead-letter
    topic as itself, naming its join task and seq (at least once: the run was killed once)."""
    letters = [orjson.loads(r.value) for r in hostile_run["dead"]]
    letters = [e for e in letters if e["reason"] == "unlearnable"]
    samples = [orjson.loads(decode_raw(e["value"])) for e in letters]
    assert {(s["sample_id"], s["is_correction"]) for s in samples} == hostile_run["unlearnable"]
    assert all(s["features"]["price"] == 1e30 for s in samples)
    assert all(e["topic"] == hostile_run["topics"]["samples"] and "seq" in e["detail"] for e in letters)


def test_oversized_records_are_dead_lettered_truncated_with_size_and_digest(hostile_run):
    """Defect 1: one 600 KB invalid record used to fail the step (its envelope exceeded the producer's
    1 MiB) and lose the rest of the step's records, permanently."""
    envelopes = _envelopes(hostile_run)
    oversized = [k for k, v in hostile_run["expected_reason"].items() if v == "oversized"]
    assert len(oversized) == 6
    originals = {}
    kinds = {"impression": hostile_run["topics"]["impressions"], "click": hostile_run["topics"]["clicks"]}
    for h in hostile_run["bad"]:
        if h.reason == "oversized":
            originals[(kinds[h.topic_kind], len(h.value))] = h.value
    for key in oversized:
        env = envelopes[key]
        assert env["truncated"] is True and env["value_bytes"] > 512 * 1024
        value = originals[(key[0], env["value_bytes"])]
        assert env["value_sha256"] == hashlib.sha256(value).hexdigest()
        assert decode_raw(env["value"]) == value[:4096]


def test_values_against_the_feature_spec_are_dead_lettered_not_failing_a_batch(hostile_run):
    """Defect 2: contract-valid impressions whose values the spec cannot read used to fail the trainer's
    batch (3 such records lost 1,792 of 6,400 samples)."""
    envelopes = _envelopes(hostile_run)
    spec_bad = [k for k, v in hostile_run["expected_reason"].items() if v == "bad_feature"]
    assert len(spec_bad) > 50
    assert all(envelopes[k]["field"].startswith("features.") for k in spec_bad)
    fields = Counter(envelopes[k]["field"] for k in spec_bad)
    assert set(fields) == {"features.user", "features.price", "features.item"}


def test_far_future_events_are_refused_and_do_not_poison_the_watermark(hostile_run):
    """Defect 3: one impression dated year 3000 moved the watermark and 2,368 samples were dropped as too
    late; now it is dead-lettered (bad_time) and no valid event is too late."""
    envelopes = _envelopes(hostile_run)
    future = [k for k, env in envelopes.items() if env["reason"] == "bad_time" and "clock" in env["detail"]]
    assert len(future) > 50
    stats = join_stats(hostile_run["tmp"] / "snaps")
    assert stats["too_late_impressions"] == 0 and stats["too_late_clicks"] == 0
    for state in join_task_states(hostile_run["tmp"] / "snaps"):
        assert state["joiner"]["max_event_ms"] < _now_ms() + 600_000  # never the year 3000


def test_no_credential_reaches_any_file_the_engine_wrote(hostile_run):
    """Defect 10: sasl_plain_password and ssl_password were written into every snapshot manifest."""
    tmp = hostile_run["tmp"]
    needle = PASSWORD.encode()
    written = [p for p in tmp.rglob("*") if p.is_file() and p.name != "run.yaml"]
    assert any(p.name == "manifest.json" for p in written)
    leaked = [str(p) for p in written if needle in p.read_bytes()]
    assert not leaked
    manifest = orjson.loads(
        (hostile_run["reg"].path(hostile_run["reg"].latest_version()) / "manifest.json").read_bytes()
    )
    assert manifest["meta"]["config"]["kafka"]["sasl_password"] == "**********"


def test_a_resealed_unloadable_state_is_refused_and_the_run_falls_back(hostile_run):
    """Defect 7: a part that passes its checksum but is refused by weights_only made `reloop run` exit 1
    instead of using the previous snapshot."""
    import io
    import os

    import torch

    from ..unit.checkpoint.test_registry import reseal

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/reloop-pwned",))

    reg = hostile_run["reg"]
    tmp = hostile_run["tmp"]
    buf = io.BytesIO()
    torch.save({"evil": Evil()}, buf)
    newest_ckpt = reg.checkpoints.versions()[-1]
    reseal(reg.checkpoints, newest_ckpt, "model", buf.getvalue())
    reseal(reg, reg.latest_version(), "model", buf.getvalue())
    before = len(Ledger.read(tmp / "ledger.jsonl"))
    newest = reg.latest_version()
    proc = _start(hostile_run["config"], tmp)
    log_path = tmp / "run.log"
    # Restored from the snapshot before the resealed one, it trains the last period again and
    # publishes the next version.
    deadline = time.monotonic() + 180
    while reg.latest_version() == newest and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, log_path.read_text()[-3000:]
    assert reg.latest_version() == newest + 1
    assert _stop(proc) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "refusing restore point" in text and "does not load" in text
    assert not Path("/tmp/reloop-pwned").exists()
    keys = [(sid, corr) for _, sid, _, corr in Ledger.read(tmp / "ledger.jsonl")]
    # Re-trained from the older snapshot: the ledger was cut back to it, then re-written: still once each.
    assert len(keys) == len(set(keys)) == before
    assert set(keys) == set(hostile_run["synth"].expected) - hostile_run["unlearnable"]
