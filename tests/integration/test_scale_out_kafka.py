"""Scale-out on the real broker: three join processes in one consumer group and two data-parallel train
ranks (``reloop train --world-size 2``, torchrun); one joiner and one train rank SIGKILLed mid-run.
The run still ends with every sample of the log trained exactly once, by ranks that hold the same
weights."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

import orjson
import psutil
import pytest
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.sink import KafkaSink
from reloop.engine.checkpoint import SnapshotRegistry
from reloop.engine.runtime.synthetic import generate
from reloop.engine.train.ledger import Ledger

from .test_run_kafka import PERIOD, _config, _now_ms, _trained
from .test_stages_kafka import _CHILDREN, _key_for, _stage, _tasks_now, _wait_log

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(900)]
PARTITIONS = 4


@pytest.fixture(autouse=True)
def _reap():
    """Kill what a failed test left running, torchrun's ranks included."""
    yield
    while _CHILDREN:
        proc = _CHILDREN.pop()
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


def _fill(bootstrap: str, topics: dict[str, str], synth) -> None:
    create_topics(bootstrap, {topics[k]: PARTITIONS for k in ("impressions", "clicks", "samples")})
    create_topics(bootstrap, {topics["deadletter"]: 1})
    sinks = {k: KafkaSink(bootstrap=bootstrap, topic=topics[k + "s"]) for k in ("impression", "click")}
    for r in synth.records:
        sinks[r.topic_kind].send(r.value, key=r.key, timestamp_ms=r.timestamp_ms)
    # One sentinel per partition: each task's watermark moves with its own partition.
    sentinel = next(r for r in synth.records if r.key == synth.sentinel_id.encode())
    for p in range(PARTITIONS):
        key = _key_for(p, PARTITIONS, "sentinel")
        value = sentinel.value.replace(b'"sentinel"', f'"{key}"'.encode())
        sinks["impression"].send(value, key=key.encode(), timestamp_ms=sentinel.timestamp_ms)
    for s in sinks.values():
        s.close()


def _setup(kafka_broker, unique_topic, run, seed: int, **overrides):
    """A generated log on topics of PARTITIONS partitions and these tests' run config: (log, dir, config)."""
    synth = generate(4000, seed=seed, policy="correct", pad_to_multiple=PERIOD, start_ms=_now_ms())
    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    _fill(kafka_broker.bootstrap, topics, synth)
    run.mkdir()
    config = _config(
        run, kafka_broker.bootstrap, topics, "correct",
        consumer={"poll_max_records": 8},
        train={"deterministic": False},
        distributed={"max_wait_ms": 100, "timeout_s": 30},
        **overrides,
    )  # fmt: skip
    return synth, run, config


def _ranks(launcher) -> list[psutil.Process]:
    """The rank processes under torchrun (``reloop train`` replaced itself with torchrun)."""
    return [
        c
        for c in psutil.Process(launcher.pid).children(recursive=True)
        if "reloop.engine.runtime.cli" in " ".join(c.cmdline())
    ]


def _log_records(log: str, marker: str) -> list[dict]:
    """The JSON log records on lines holding ``marker``. Two ranks and torchrun write one file, so a record
    can follow another process's unterminated text on its line (seen: triton's nanobind leak warning at a
    rank's exit, "...refleaks.html{"ts":...}"): parse from the record's start; anything else that does
    not parse fails with the line itself."""
    records = []
    for line in log.splitlines():
        if marker in line:
            start = max(line.find('{"ts":'), 0)
            try:
                records.append(orjson.loads(line[start:]))
            except orjson.JSONDecodeError as exc:
                raise AssertionError(f"unparsable log line: {line[:1000]!r}") from exc
    return records


def test_three_joiners_two_train_ranks_one_of_each_killed_every_sample_trained_once(
    kafka_broker, unique_topic, tmp_path
):
    synth, run, config = _setup(
        kafka_broker, unique_topic, tmp_path / "scale", seed=31,
        stages={"join_client_config": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}},
    )  # fmt: skip
    train = _stage_world("train", config, run / "train.log")
    joins = [_stage("join", config, run / f"join-{i}.log") for i in range(3)]
    for i in range(3):
        _wait_log(run / f"join-{i}.log", '"tasks assigned"')
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(bool(_tasks_now(run / f"join-{i}.log")) for i in range(3)) < 3:
        time.sleep(0.2)
    owners = [i for i in range(3) if _tasks_now(run / f"join-{i}.log")]
    assert len(owners) == 3, [_tasks_now(run / f"join-{i}.log") for i in range(3)]
    time.sleep(1.0)
    joins[0].send_signal(signal.SIGKILL)  # its tasks move to the other two after its session times out
    joins[0].wait()

    reg = SnapshotRegistry(run / "snaps")
    deadline = time.monotonic() + 240
    _train_until(reg, train, run / "train.log", 2 * PERIOD, deadline)
    ranks = _ranks(train)
    assert len(ranks) == 2, ranks
    ranks[1].kill()  # torchrun restarts both ranks from the last save
    _train_until(reg, train, run / "train.log", len(synth.expected) - PERIOD, deadline)
    assert _trained(reg) >= len(synth.expected) - PERIOD, (run / "train.log").read_text()[-3000:]
    time.sleep(3)
    for proc in joins[1:]:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    train.send_signal(signal.SIGTERM)
    assert train.wait(90) == 0  # torchrun stopped the ranks; each saved the final checkpoint with the other

    log = (run / "train.log").read_text()
    assert log.count('"msg":"restored"') >= 2  # both ranks resumed after the kill
    stops = _log_records(log, '"msg":"stopped"')
    assert stops and all(s["seq_gaps"] == 0 for s in stops)
    _assert_trained_once(run, reg, synth, ranks=2)


def test_train_ranks_rescaled_from_two_to_one_lose_and_repeat_no_sample(kafka_broker, unique_topic, tmp_path):
    """``reloop train --world-size 2`` stopped mid-run, then ``reloop train`` (one process) from its last
    save: the two ranks' parts (positions, seqs, buffered samples) regroup into one, on the real broker."""
    synth, run, config = _setup(kafka_broker, unique_topic, tmp_path / "rescale", seed=37)
    join = _stage("join", config, run / "join.log")
    ranks2 = _stage_world("train", config, run / "train-2.log")
    reg = SnapshotRegistry(run / "snaps")
    deadline = time.monotonic() + 240
    _train_until(reg, ranks2, run / "train-2.log", 2 * PERIOD, deadline)
    ranks2.send_signal(signal.SIGTERM)
    assert ranks2.wait(90) == 0, (run / "train-2.log").read_text()[-3000:]
    saved = reg.checkpoints.load(reg.checkpoints.versions()[-1]).state
    assert len(saved["state"]["ranks"]) == 2  # the final save of the two ranks
    assert _trained(reg) < len(synth.expected) - PERIOD  # stopped mid-run: the rest is for one process

    one = _stage("train", config, run / "train-1.log")
    _train_until(reg, one, run / "train-1.log", len(synth.expected) - PERIOD, deadline)
    time.sleep(3)
    join.send_signal(signal.SIGTERM)
    assert join.wait(60) == 0
    one.send_signal(signal.SIGTERM)
    assert one.wait(90) == 0, (run / "train-1.log").read_text()[-3000:]
    log = (run / "train-1.log").read_text()
    assert '"msg":"restored"' in log
    assert all(s["seq_gaps"] == 0 for s in _log_records(log, '"msg":"stopped"'))
    _assert_trained_once(run, reg, synth, ranks=1)


def test_a_sigkilled_launcher_takes_its_ranks_with_it_and_a_restart_trains_each_sample_once(
    kafka_broker, unique_topic, tmp_path
):
    """``kill -9`` of ``reloop train --world-size 2``: torchrun had started its ranks in sessions of their
    own, so they went on training next to the group the restart started (320 samples trained twice,
    orphaned versions). They now die with the launcher."""
    synth, run, config = _setup(kafka_broker, unique_topic, tmp_path / "orphans", seed=41)
    join = _stage("join", config, run / "join.log")
    train = _stage_world("train", config, run / "train-a.log")
    reg = SnapshotRegistry(run / "snaps")
    deadline = time.monotonic() + 240
    _train_until(reg, train, run / "train-a.log", 2 * PERIOD, deadline)
    ranks = _ranks(train)
    assert len(ranks) == 2, ranks
    train.send_signal(signal.SIGKILL)
    train.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive, f"ranks outlived their SIGKILLed launcher: {[r.pid for r in alive]}"
    scratch = list(Path(tempfile.gettempdir()).glob(f"reloop-train-{train.pid}-*"))
    assert scratch  # what the killed launcher left behind ...

    again = _stage_world("train", config, run / "train-b.log")
    _train_until(reg, again, run / "train-b.log", len(synth.expected) - PERIOD, deadline)
    assert not any(f.exists() for f in scratch)  # ... the next launcher removed
    time.sleep(3)
    join.send_signal(signal.SIGTERM)
    assert join.wait(60) == 0
    again.send_signal(signal.SIGTERM)
    assert again.wait(90) == 0, (run / "train-b.log").read_text()[-3000:]
    _assert_trained_once(run, reg, synth, ranks=2)


def test_a_stop_that_cannot_save_the_final_checkpoint_does_not_exit_0(kafka_broker, unique_topic, tmp_path):
    """SIGTERM while a rank is frozen (SIGSTOP: a rank stuck in a collective looks the same to its peer):
    torchrun kills the ranks after its shutdown timeout, nothing is saved, and ``reloop train`` said 0."""
    synth, run, config = _setup(kafka_broker, unique_topic, tmp_path / "frozen", seed=43)
    join = _stage("join", config, run / "join.log")
    # torchrun's wait before it SIGKILLs ranks that do not stop: 5 s instead of 30, to keep the test short
    train = _stage_world("train", config, run / "train.log", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5")
    reg = SnapshotRegistry(run / "snaps")
    deadline = time.monotonic() + 240
    _train_until(reg, train, run / "train.log", PERIOD, deadline)
    ranks = _ranks(train)
    assert len(ranks) == 2, ranks
    ranks[1].suspend()
    saves = len(reg.checkpoints.versions())
    train.send_signal(signal.SIGTERM)
    assert train.wait(60) == 1, (run / "train.log").read_text()[-3000:]
    assert "stopped before their final checkpoint" in (run / "train.log").read_text()
    assert len(reg.checkpoints.versions()) == saves  # indeed nothing was saved
    join.send_signal(signal.SIGTERM)
    assert join.wait(60) == 0


@pytest.mark.parametrize(
    ("partitions", "deterministic", "said"),
    [(3, True, "train.deterministic"), (1, False, "ranks [1] would read none")],
)
def test_a_split_the_ranks_cannot_train_is_refused_before_torchrun_starts(
    kafka_broker, unique_topic, tmp_path, partitions, deterministic, said
):
    """Deterministic ranks over unequal shares buffered without bound; more ranks than partitions exited 1
    after torchrun's restarts (some 40 s). Both are one line and exit 2, with no rank started."""
    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    create_topics(kafka_broker.bootstrap, {topics["samples"]: partitions})
    run = tmp_path / "split"
    run.mkdir()
    config = _config(run, kafka_broker.bootstrap, topics, "correct", train={"deterministic": deterministic})
    started = time.monotonic()
    train = _stage_world("train", config, run / "train.log")
    assert train.wait(60) == 2, (run / "train.log").read_text()[-3000:]
    log = (run / "train.log").read_text()
    assert said in log and '"msg":"restored"' not in log  # no rank started
    assert time.monotonic() - started < 60


def _train_until(reg: SnapshotRegistry, proc, log, samples: int, deadline: float) -> None:
    """Wait until the snapshots hold ``samples`` trained (or the deadline), failing with the log's tail
    if the train process ends first."""
    while _trained(reg) < samples and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)


def _assert_trained_once(run, reg: SnapshotRegistry, synth, ranks: int) -> None:
    """Every sample of the log in exactly one place: the ledgers of all ranks ever run, or the buffers of
    the last checkpoint (samples taken but not yet trained); all ranks saved the same weights."""
    keys = [(sid, corr) for _, sid, _, corr in Ledger.read_ranks(run / "ledger.jsonl")]
    assert len(keys) == len(set(keys))  # nothing trained twice
    last = reg.checkpoints.load(reg.checkpoints.versions()[-1]).state
    assert len(last["state"]["ranks"]) == ranks
    buffered = {
        (s.sample_id, s.is_correction)
        for part in last["state"]["ranks"]
        for b in part["buffer"]
        for s in _decode(b).to_samples()
    }
    assert set(keys) | buffered == set(synth.expected) and not set(keys) & buffered  # nothing lost
    if ranks > 1:  # a digest of each rank's weights is saved where there are several
        assert len({part["weights"] for part in last["state"]["ranks"]}) == 1


def _decode(data: bytes):
    from reloop.engine.events.sample_batch import decode_batch

    return decode_batch(data)


def _stage_world(stage: str, config, log, **env_over: str):
    """``reloop train --world-size 2`` (torchrun) as a child process (``env_over``: more environment)."""
    import os
    import subprocess
    import sys

    from .test_stages_kafka import ROOT

    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__")} | env_over
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", stage, "--config", str(config),
         "--world-size", "2"],
        cwd=ROOT, stdout=out, stderr=out, env=env,
    )  # fmt: skip
    _CHILDREN.append(proc)
    return proc
