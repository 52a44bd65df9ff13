"""`reloop run` against the real local Kafka broker: ground truth, SIGKILL resume, broker restart."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from connectors.kafka.admin import create_topics
from connectors.kafka.local_broker import LocalBroker, free_port
from connectors.kafka.sink import KafkaSink
from connectors.kafka.source import KafkaSource
from engine.checkpoint import SnapshotRegistry
from engine.events.codec import decode_samples
from engine.runtime.synthetic import SPEC, generate
from engine.train.ledger import Ledger

pytestmark = pytest.mark.kafka

BATCH = 16
PERIOD = 4 * BATCH  # logs are padded to whole periods: the last sample trained is also snapshotted
ROOT = Path(__file__).resolve().parents[2]


def _now_ms() -> int:
    # Recent timestamps: the broker's time-based retention would delete records stamped years ago.
    return int(time.time() * 1000) - 3_600_000


def _topics(unique_topic) -> dict[str, str]:
    return {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}


def _produce(bootstrap: str, topics: dict[str, str], synth) -> None:
    create_topics(bootstrap, {t: 1 for t in topics.values()})
    sinks = {
        kind: KafkaSink(bootstrap=bootstrap, topic=topics[kind + "s"]) for kind in ("impression", "click")
    }
    for r in synth.records:
        sinks[r.topic_kind].send(r.value, key=r.key, timestamp_ms=r.timestamp_ms)
    for s in sinks.values():
        s.close()


def _config(
    tmp: Path,
    bootstrap: str,
    topics: dict[str, str],
    policy: str,
    merge_idle_ms: int = 2_000,
    **overrides: dict,
) -> Path:
    cfg = {
        "source": {
            "bootstrap": bootstrap,
            "impressions_topic": topics["impressions"],
            "clicks_topic": topics["clicks"],
            "group_id": f"g-{topics['samples']}",
            "poll_max_records": 64,
            "merge_idle_ms": merge_idle_ms,
        },
        "sink": {"samples_topic": topics["samples"], "dead_letter_topic": topics["deadletter"]},
        "join": {
            "window_ms": 2_000,
            "allowed_lateness_ms": 200,
            "click_grace_ms": 1_000,
            "idle_timeout_ms": 10**9,
            "retention_ms": 5_000,
            "late_click_policy": policy,
        },
        "model": {
            "backbone": "dcn",
            "strategy": "reloop",
            "alpha": 0.3,
            "spec": SPEC,
            "params": {"hidden_units": [32, 32], "cross_layers": 2, "embedding_dim": 8, "dropout": 0.1},
        },
        "train": {"batch_size": BATCH, "deterministic": True},
        "period": {"every_samples": PERIOD},
        "checkpoint": {"dir": str(tmp / "snaps"), "keep": 100, "ledger": str(tmp / "ledger.jsonl")},
        "log": {"stats_every_s": 1.0},
    }
    for section, values in overrides.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


_CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftover_processors():
    """A failed test must not leave a processor running against the next test's directories."""
    yield
    while _CHILDREN:
        proc = _CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(config: Path, tmp: Path) -> subprocess.Popen:
    err = open(tmp / "run.log", "ab")  # noqa: SIM115 - handed to the child
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.runtime.cli", "run", "--config", str(config)],
        cwd=ROOT,
        stdout=err,
        stderr=err,
        env=env,
    )
    _CHILDREN.append(proc)
    return proc


def _trained(reg: SnapshotRegistry) -> int:
    v = reg.latest_version()
    return 0 if v is None else int(reg.manifest(v)["meta"]["samples_trained"])


def _wait_trained(
    proc: subprocess.Popen, reg: SnapshotRegistry, n: int, tmp: Path, timeout_s: float = 180
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _trained(reg) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"reloop run exited with {proc.returncode}:\n{(tmp / 'run.log').read_text()[-3000:]}"
            )
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"not all samples trained in time:\n{(tmp / 'run.log').read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def _read_samples(bootstrap: str, topic: str, n: int, timeout_s: float = 30) -> list:
    src = KafkaSource(bootstrap=bootstrap, topics=[topic])
    src.open()
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < n and time.monotonic() < deadline:
        values += [r.value for r in src.poll(1000, 0.5)]
    values += [r.value for r in src.poll(1000, 1.0)]  # nothing more may come
    src.close()
    samples, bad = decode_samples(values)
    assert not bad
    return samples


def _ledger_keys(tmp: Path) -> list[tuple[str, bool]]:
    return [(sid, corr) for _, sid, _, corr in Ledger.read(tmp / "ledger.jsonl")]


def _final_model(tmp: Path) -> dict[str, torch.Tensor]:
    return SnapshotRegistry(tmp / "snaps").load(parts=["model"]).state["model"]["model"]


@pytest.mark.parametrize("policy", ["correct", "drop"])
def test_run_emits_exactly_the_ground_truth(kafka_broker, unique_topic, tmp_path, policy):
    synth = generate(600, seed=11, policy=policy, pad_to_multiple=PERIOD, start_ms=_now_ms())
    topics = _topics(unique_topic)
    _produce(kafka_broker.bootstrap, topics, synth)
    config = _config(tmp_path, kafka_broker.bootstrap, topics, policy)
    reg = SnapshotRegistry(tmp_path / "snaps")
    proc = _start(config, tmp_path)
    _wait_trained(proc, reg, len(synth.expected), tmp_path)
    assert _stop(proc) == 0, (tmp_path / "run.log").read_text()[-3000:]

    samples = _read_samples(kafka_broker.bootstrap, topics["samples"], len(synth.expected))
    got = {(s.sample_id, s.is_correction): s.label for s in samples}
    assert len(samples) == len(got) == len(synth.expected)
    assert got == synth.expected
    counts = {"label_0": 0, "label_1": 0, "correction": 0}
    for s in samples:
        counts["correction" if s.is_correction else f"label_{s.label}"] += 1
    assert counts == {"label_0": 0, "label_1": 0, "correction": 0} | synth.label_counts()
    if policy == "drop":
        assert counts["correction"] == 0
    else:
        assert counts["correction"] == synth.cases["beyond"] > 0

    versions = reg.versions()
    assert len(versions) >= len(synth.expected) // PERIOD
    assert versions == list(range(1, len(versions) + 1))
    meta = reg.manifest(versions[-1])["meta"]
    assert meta["samples_trained"] == len(synth.expected)
    # The joiner state as the run ended: in the final checkpoint SIGTERM wrote after the last snapshot.
    [ckpt] = reg.checkpoints.versions()[-1:]
    final = reg.checkpoints.manifest(ckpt)["meta"]
    assert final["kind"] == "checkpoint" and final["base_version"] == versions[-1]
    stats = reg.checkpoints.load(ckpt, parts=["state"]).state["state"]["joiner"]["stats"]
    assert stats["orphan_clicks"] == synth.orphans
    assert stats["duplicate_impressions"] == synth.cases["duplicate"]
    assert stats["early_clicks_matched"] == synth.cases["early"]
    key = "late_clicks_corrected" if policy == "correct" else "late_clicks_dropped"
    assert stats[key] == synth.cases["beyond"]
    dead = _read_samples_raw(kafka_broker.bootstrap, topics["deadletter"], synth.malformed)
    assert len(dead) == synth.malformed
    # Offsets are committed after the snapshot: the group's offsets equal the final snapshot's positions.
    src = KafkaSource(
        bootstrap=kafka_broker.bootstrap,
        topics=[topics["impressions"], topics["clicks"]],
        group_id=f"g-{topics['samples']}",
    )
    committed = {f"{tp.topic}:{tp.partition}": off for tp, off in src.committed().items()}
    src.close()
    # The final checkpoint (no model version) came after the last snapshot: its positions were committed last.
    assert committed == final["positions"]
    assert sorted(_ledger_keys(tmp_path)) == sorted(synth.expected)


def _read_samples_raw(bootstrap: str, topic: str, n: int, timeout_s: float = 20) -> list[bytes]:
    src = KafkaSource(bootstrap=bootstrap, topics=[topic])
    src.open()
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < n and time.monotonic() < deadline:
        values += [r.value for r in src.poll(1000, 0.5)]
    src.close()
    return values


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("y_last", "mismatch"),
    # "recompute": the impressions were served by version 0, so after the first snapshot every sample
    # is a version mismatch and gets y_last from the previous snapshot's model (like y_last=snapshot).
    [("logged", "recompute"), ("snapshot", "use_logged")],
)
def test_resume_after_sigterm_and_sigkill_equals_uninterrupted_run(
    kafka_broker, unique_topic, tmp_path, y_last, mismatch
):
    """The README's claim for every y_last mode: stopped gracefully (SIGTERM: a final checkpoint) or
    killed (SIGKILL: nothing saved) at random moments, then restarted, the run ends with the weights of
    a run that never stopped, and every sample trained exactly once."""
    synth = generate(2000, seed=5, policy="correct", pad_to_multiple=PERIOD, start_ms=_now_ms())
    topics = _topics(unique_topic)
    _produce(kafka_broker.bootstrap, topics, synth)
    n = len(synth.expected)
    train = {"y_last": y_last, "version_mismatch": mismatch}

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_topics = dict(topics, samples=unique_topic("samples"))
    create_topics(kafka_broker.bootstrap, {ref_topics["samples"]: 1})
    proc = _start(_config(ref_dir, kafka_broker.bootstrap, ref_topics, "correct", train=train), ref_dir)
    _wait_trained(proc, SnapshotRegistry(ref_dir / "snaps"), n, ref_dir)
    assert _stop(proc) == 0

    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    config = _config(run_dir, kafka_broker.bootstrap, topics, "correct", train=train)
    reg = SnapshotRegistry(run_dir / "snaps")
    rng = random.Random(2)
    for fraction, sig in ((0.2, signal.SIGTERM), (0.45, signal.SIGKILL), (0.7, signal.SIGTERM)):
        proc = _start(config, run_dir)
        target = int(n * fraction)
        deadline = time.monotonic() + 180
        while _trained(reg) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, (run_dir / "run.log").read_text()[-3000:]
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere between snapshots
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), (run_dir / "run.log").read_text()[
            -3000:
        ]
    assert reg.checkpoints.versions(), "SIGTERM wrote no final checkpoint"
    proc = _start(config, run_dir)
    _wait_trained(proc, reg, n, run_dir)
    assert _stop(proc) == 0

    ref_reg = SnapshotRegistry(ref_dir / "snaps")
    # Same schedule: the stops shifted no boundary and took no version number.
    assert reg.versions() == ref_reg.versions()
    for v in reg.versions():
        assert reg.manifest(v)["meta"]["samples_trained"] == ref_reg.manifest(v)["meta"]["samples_trained"]
    ref, got = _final_model(ref_dir), _final_model(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k}: max abs diff {(ref[k] - got[k]).abs().max()}"
    keys = _ledger_keys(run_dir)
    assert len(keys) == len(set(keys)) == n
    assert set(keys) == set(synth.expected)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_broker_outages_neither_lose_samples_nor_wedge_the_processor(tmp_path, unique_topic):
    """A broker outage long enough for snapshot flushes to time out: the processor rebuilds from its
    last snapshot (new producers) and catches up once the broker is back, instead of retrying a dead
    producer after every step; a SIGTERM during an outage ends the process within stop_timeout_s."""
    # Fixed ports: the restarted broker must come back at the same address (the default may pick a new
    # port when the old one is not free yet, and the processor would then wait for a broker that moved).
    broker = LocalBroker(tmp_path / "broker", port=free_port(), controller_port=free_port())
    broker.start()
    recovery = {"flush_timeout_s": 2.0, "stop_timeout_s": 6.0, "backoff_initial_s": 0.5, "backoff_max_s": 2.0}
    try:
        synth = generate(1500, seed=8, policy="correct", pad_to_multiple=PERIOD, start_ms=_now_ms())
        topics = _topics(unique_topic)
        _produce(broker.bootstrap, topics, synth)
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        # With end offsets unknown during the outage the merge holds back instead of guessing the order.
        config = _config(run_dir, broker.bootstrap, topics, "correct", recovery=recovery)
        reg = SnapshotRegistry(run_dir / "snaps")
        proc = _start(config, run_dir)
        deadline = time.monotonic() + 120
        while _trained(reg) < len(synth.expected) // 4 and time.monotonic() < deadline:
            assert proc.poll() is None, (run_dir / "run.log").read_text()[-3000:]
            time.sleep(0.05)
        broker.stop()
        time.sleep(12)  # several flush timeouts and rebuilds
        assert proc.poll() is None, (run_dir / "run.log").read_text()[-3000:]
        broker.start()
        _wait_trained(proc, reg, len(synth.expected), run_dir, timeout_s=240)
        log_text = (run_dir / "run.log").read_text()
        assert "rebuilding from the last snapshot" in log_text, log_text[-3000:]

        broker.stop()
        time.sleep(1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        stopped_in = time.monotonic() - t0
        assert stopped_in < recovery["stop_timeout_s"] + 3, (
            stopped_in,
            (run_dir / "run.log").read_text()[-3000:],
        )
        assert code in (0, 1)

        broker.start()
        proc = _start(config, run_dir)
        time.sleep(3)
        assert _stop(proc) == 0
        keys = _ledger_keys(run_dir)
        assert len(keys) == len(set(keys)) and set(keys) == set(synth.expected)
        samples = _read_samples(broker.bootstrap, topics["samples"], len(synth.expected))
        # The samples topic is at-least-once: compare as a set, and every label must match.
        got = {(s.sample_id, s.is_correction): s.label for s in samples}
        assert got == synth.expected
    finally:
        broker.stop()
