"""A join task replayed after a SIGKILL must send again what it sent before under the same seqs.

In its first life the task saw the clicks topic ahead of the impressions topic on the broker (a lagging
impressions producer: any live pair of topics is written independently); its merge released the clicks
once the impressions partition was at its end. Its successor, resumed from the task's checkpoint, finds
both topics complete and merges them in timestamp order: the same (incarnation, seq) then named other
samples, the train stage dropped as copies samples it had never trained (lost, with seq_gaps 0 and
samples_missing 0) and trained others twice (43 seqs here). Found by a chaos soak (broker crashes
mid-stream). Now the first life writes those releases to its merge journal and the second takes them
again (engine/runtime/merge_journal.py)."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter

import pytest
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.events.sample_batch import decode_batch
from reloop.engine.runtime.synthetic import generate
from reloop.engine.train.ledger import Ledger

from .test_run_kafka import PERIOD, _config, _now_ms, _stop
from .test_stages_kafka import _CHILDREN, _kill_leftovers, _stage, _wait_log  # noqa: F401 - the fixture

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def _produce(bootstrap: str, topics: dict[str, str], records: list) -> None:
    sinks = {k: KafkaSink(bootstrap=bootstrap, topic=topics[k + "s"]) for k in ("impression", "click")}
    for r in records:
        sinks[r.topic_kind].send(r.value, key=r.key, timestamp_ms=r.timestamp_ms)
    for s in sinks.values():
        s.close()


def _stable(measure, quiet_s: float, timeout_s: float) -> int:
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        now = measure()
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= quiet_s:
            return now
        time.sleep(0.2)
    return last or 0


def test_a_replayed_join_task_sends_the_same_samples_under_the_same_seqs(
    kafka_broker, unique_topic, tmp_path
):
    bs = kafka_broker.bootstrap
    topics = {k: unique_topic(k) for k in ("impressions", "clicks", "samples", "deadletter")}
    create_topics(bs, {t: 1 for t in topics.values()})
    synth = generate(1500, seed=21, policy="correct", pad_to_multiple=PERIOD, start_ms=_now_ms())
    cut = synth.records[len(synth.records) // 2].timestamp_ms
    lag = 600  # the impressions topic 600 ms behind the clicks topic
    first = [r for r in synth.records if r.timestamp_ms <= (cut if r.topic_kind == "click" else cut - lag)]
    taken = {id(r) for r in first}
    _produce(bs, topics, first)
    config = _config(tmp_path, bs, topics, "correct", stages={"join_checkpoint_every_s": 600.0})
    train = _stage("train", config, tmp_path / "train.log")
    join = _stage("join", config, tmp_path / "join.log")
    watcher = KafkaSource(bootstrap=bs, topics=[topics["samples"]])
    watcher.open()
    assert _stable(lambda: sum(watcher.end_positions().values()), 2.0, 60), "the join sent nothing"
    join.send_signal(signal.SIGKILL)  # no checkpoint since its first (empty) one: all of it is replayed
    join.wait()
    _produce(bs, topics, [r for r in synth.records if id(r) not in taken])
    join = _stage("join", config, tmp_path / "join.log")
    # The task restored first: until the group's rebalance gives it (the killed member's session runs out
    # first) the second life sends nothing, and on a busy machine that outlasted the quiet time below.
    _wait_log(tmp_path / "join.log", '"msg":"task restored"', timeout_s=60)
    _stable(lambda: sum(watcher.end_positions().values()), 3.0, 60)
    watcher.close()
    ledger = tmp_path / "ledger.jsonl"
    _stable(lambda: len(ledger.read_text().splitlines()) if ledger.exists() else 0, 3.0, 30)
    assert _stop(join) == 0 and _stop(train) == 0
    replayed = re.findall(r'"merge_decisions_to_replay": ?(\d+)', (tmp_path / "join.log").read_text())
    assert replayed and int(replayed[0]) > 0, "the second life had no decisions of the first to take again"

    src = KafkaSource(bootstrap=bs, topics=[topics["samples"]])
    src.open()
    by_seq: dict[tuple[str, int], set] = {}
    for _ in range(5):
        for r in src.poll(1000, 1.0):
            b = decode_batch(r.value)
            for s, q in zip(b.to_samples(), b.seqs().tolist(), strict=True):
                by_seq.setdefault((b.incarnation, q), set()).add((s.sample_id, s.is_correction))
    src.close()
    clashes = {k: v for k, v in by_seq.items() if len(v) > 1}
    assert not clashes, f"{len(clashes)} seqs name two samples, e.g. {list(clashes.items())[:3]}"
    keys = Counter((sid, corr) for _, sid, _, corr in Ledger.read(ledger))
    assert not [k for k, n in keys.items() if n > 1], "trained twice"
    sent = set().union(*by_seq.values())
    lost = sent - set(keys)  # at most a partial batch may still wait in the train stage's buffer
    assert len(lost) < 16, f"sent but never trained: {len(lost)}, e.g. {sorted(lost)[:10]}"
