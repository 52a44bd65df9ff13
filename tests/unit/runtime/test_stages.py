"""The two-stage data plane on memory connectors: join stage -> samples topic (Arrow) -> train stage.

Ground truth, exactly-once across a join crash (dedup by task and seq), resume equality for both
stages, bad samples messages dead-lettered, co-partitioning checked. The Kafka versions of these are
in tests/integration/test_stages_kafka.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import replace

import numpy as np
import orjson
import pytest
import torch
from reloop.connectors.memory.memory import MemoryGroupSource, MemoryLog, MemorySink, MemorySource
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.deadletter import decode_raw
from reloop.engine.events.sample_batch import decode_batch
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.build import build_join_stage, build_train_stage
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.config import load_config_dict
from reloop.engine.runtime.join_stage import CopartitionError
from reloop.engine.runtime.synthetic import SPEC, generate
from reloop.engine.streams import TopicPartition
from reloop.engine.train.ledger import Ledger

BATCH = 16
START = 1_700_000_000_000


class EndAware(MemorySource):
    def end_positions(self):
        return {tp: len(self.log._data[tp]) for tp in self.partitions()}


def _config(tmp_path, **over):
    data = {
        "join": {
            "window_ms": 2_000,
            "allowed_lateness_ms": 200,
            "click_grace_ms": 1_000,
            "idle_timeout_ms": 10**9,
            "retention_ms": 5_000,
            "late_click_policy": "correct",
        },
        "model": {"backbone": "lr", "strategy": "reloop", "alpha": 0.3, "spec": SPEC},
        "train": {"batch_size": BATCH, "deterministic": True},
        "period": {"every_samples": 4 * BATCH},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "keep": 50, "ledger": str(tmp_path / "ledger.jsonl")},
        "consumer": {"poll_max_records": 37},
        "stages": {
            "samples_topic": "samples",
            "batch_samples": 10,
            "max_delay_ms": 0,
            "join_checkpoint_every_s": 3600,
            "train_poll_messages": 2,
        },
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return load_config_dict(data, env={})


def _log(synth, partitions: int = 1) -> MemoryLog:
    log = MemoryLog()
    for topic in ("impressions", "clicks", "samples", "dead"):
        log.create(topic, partitions)
    for r in synth.records:
        log.append(
            "impressions" if r.topic_kind == "impression" else "clicks", r.value, r.key, r.timestamp_ms
        )
    # Each join task's watermark moves with its own partition: one far-future sentinel per partition
    # closes every window (the generator's own sentinel reaches only one partition).
    sentinel = next(r for r in synth.records if r.key == synth.sentinel_id.encode())
    for p in range(partitions):
        value = sentinel.value.replace(b'"sentinel"', f'"sentinel-{p}"'.encode())
        log.append("impressions", value, f"sentinel-{p}".encode(), sentinel.timestamp_ms, p)
    return log


def _join(cfg, log, clock, tmp, stats=None, topic_ids=None):
    return build_join_stage(
        cfg,
        source=MemoryGroupSource(log, ["impressions", "clicks"]),
        samples_sink=MemorySink(log, "samples"),
        dead_letter_sink=MemorySink(log, "dead"),
        clock=clock,
        stats=stats or EngineStats(),
        checkpoint_dir=tmp / "join-ckpt",
        topic_ids=topic_ids,
    )


def _join_done(stage, log) -> bool:
    ends = {tp: len(log._data[tp]) for topic in ("impressions", "clicks") for tp in log.partitions(topic)}
    return all(
        t.positions.get(tp, 0) >= ends[tp] for t in stage.tasks.values() for tp in t.inputs
    ) and not any(t.unsent for t in stage.tasks.values())


def _run_join(stage, log, clock, max_steps=5000) -> None:
    for _ in range(max_steps):
        stage.step()
        clock.advance(10)
        if stage.tasks and _join_done(stage, log):
            return
    raise AssertionError("join stage did not reach the end of its input")


def _train(cfg, log, clock, tmp, dead=None, stats=None):
    return build_train_stage(
        cfg,
        source=EndAware(log, ["samples"]),
        dead_letter_sink=dead,
        clock=clock,
        stats=stats or EngineStats(),
        checkpoint_dir=tmp / "train-ckpt",
    )


def _joined(tmp_path, n: int, seed: int):
    """n synthetic impressions joined onto the samples topic: (log, clock, config)."""
    log = _log(generate(n, seed=seed, pad_to_multiple=4 * BATCH))
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    return log, clock, cfg


def _run_train(stage, log, clock, max_steps=5000) -> None:
    ends = {tp: len(log._data[tp]) for tp in log.partitions("samples")}
    for _ in range(max_steps):
        stage.step()
        clock.advance(10)
        if all(stage.positions.get(tp, 0) >= n for tp, n in ends.items()):
            stage.writer.wait()  # period snapshots are written in the background: on disk now
            return
    raise AssertionError("train stage did not reach the end of the samples topic")


def _samples_on_topic(log):
    out = []
    for tp in log.partitions("samples"):
        for rec in log.read(tp, 0, 10**9):
            out += decode_batch(rec.value).to_samples()
    return out


def _join_all(synth, tmp_path):
    """``synth`` joined by a join stage with the default test config: (the stage, the samples sent)."""
    log = _log(synth)
    clock = ManualClock(START)
    join = _join(_config(tmp_path), log, clock, tmp_path)
    _run_join(join, log, clock)
    return join, _samples_on_topic(log)


def _ledger(tmp):
    return [(sid, corr) for _, sid, _, corr in Ledger.read(tmp / "ledger.jsonl")]


def _assert_trained_once(cfg, log, clock, tmp_path, expected) -> None:
    """A train stage over the whole samples topic trains every expected sample, and each once."""
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    train.close(final=None)
    keys = _ledger(tmp_path)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(expected)


def _weights(stage):
    return {k: v.clone() for k, v in stage.trainer.learner.model.state_dict().items()}


@pytest.mark.parametrize("partitions", [1, 3])
def test_two_stages_reproduce_the_ground_truth(tmp_path, partitions):
    synth = generate(500, seed=3, pad_to_multiple=BATCH)
    log = _log(synth, partitions)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    join = _join(cfg, log, clock, tmp_path)
    _run_join(join, log, clock)
    assert sorted(join.tasks) == list(range(partitions))
    got = _samples_on_topic(log)
    assert {(s.sample_id, s.is_correction): s.label for s in got} == synth.expected
    assert len(got) == len(synth.expected)  # no duplicates on the topic without a crash
    assert join.dead_letters.total == synth.malformed
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    train.train_remaining()
    assert train.trainer.counters.samples == len(synth.expected)
    train.close()
    join.close()
    assert sorted(_ledger(tmp_path)) == sorted(synth.expected)


def test_feature_keys_msgspec_cannot_name_a_field_after_are_joined_and_kept(tmp_path):
    # A quote, a backslash or a control character in a feature key is valid JSON: such impressions take
    # the decoders' dict paths (at the door and in the samples batch) instead of failing the stage.
    synth = generate(300, seed=5, pad_to_multiple=BATCH)
    odd = {'q"uote': "v", "back\\slash": 7, "ctl\x01": ["a", "b"]}
    changed = set()

    def add_odd_keys(impression_id, features) -> bool:
        # Every copy of a chosen id (the generator repeats some impressions), about a third of them.
        if str(impression_id)[-1:] not in ("0", "3", "6"):
            return False
        features.update(odd)
        changed.add(impression_id)
        return True

    synth = synth.with_features(add_odd_keys)
    join, got = _join_all(synth, tmp_path)
    assert {(s.sample_id, s.is_correction): s.label for s in got} == synth.expected
    assert join.dead_letters.total == synth.malformed
    kept = {s.sample_id for s in got if all(s.features.get(k) == v for k, v in odd.items())}
    assert kept and kept == changed & {s.sample_id for s in got}
    join.close()


def test_a_join_crash_is_deduplicated_and_training_equals_the_uninterrupted_run(tmp_path):
    synth = generate(700, seed=5, pad_to_multiple=4 * BATCH)
    clock = ManualClock(START)
    ref_log = _log(synth)
    ref_cfg = _config(tmp_path / "ref")
    _run_join(_join(ref_cfg, ref_log, clock, tmp_path / "ref"), ref_log, clock)
    ref = _train(ref_cfg, ref_log, clock, tmp_path / "ref")
    _run_train(ref, ref_log, clock)

    log = _log(synth)
    cfg = _config(tmp_path / "crash")
    join = _join(cfg, log, clock, tmp_path / "crash")
    for _ in range(12):  # some output sent and checkpointed ...
        join.step()
        clock.advance(10)
    join.checkpoint_all()
    for _ in range(15):  # ... then more sent after the checkpoint, then a crash (no close)
        join.step()
        clock.advance(10)
    sent_before_crash = join.samples_sent
    join.abort()
    again = _join(cfg, log, clock, tmp_path / "crash")
    _run_join(again, log, clock)
    on_topic = _samples_on_topic(log)
    assert len(on_topic) > len(synth.expected)  # the resumed task sent part of its output again
    assert sent_before_crash > 0
    train = _train(cfg, log, clock, tmp_path / "crash")
    _run_train(train, log, clock)
    assert train.duplicates_dropped == len(on_topic) - len(synth.expected)
    assert train.seq_gaps == 0
    train.close(final=None)
    keys = _ledger(tmp_path / "crash")
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(synth.expected)
    a, b = _weights(ref), _weights(train)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("partitions", "seed"), [(1, 0), (1, 1), (3, 0), (3, 1)])
def test_join_crashes_at_random_moments_lose_and_double_nothing(tmp_path, partitions, seed):
    """Four crashes of the join stage at random steps, some soon after a checkpoint, some long after one
    (with three partitions, tasks at different checkpoints); the train stage then trains every sample
    once. With one samples partition it also ends with the weights of a run without crashes (with
    several, a re-sent copy may interleave differently: docs/data-plane.md)."""
    import random

    rng = random.Random(seed)
    synth = generate(700, seed=11 + seed, pad_to_multiple=4 * BATCH)
    clock = ManualClock(START)
    ref_log = _log(synth, partitions)
    ref_cfg = _config(tmp_path / "ref")
    _run_join(_join(ref_cfg, ref_log, clock, tmp_path / "ref"), ref_log, clock)
    ref = _train(ref_cfg, ref_log, clock, tmp_path / "ref")
    _run_train(ref, ref_log, clock)

    log = _log(synth, partitions)
    cfg = _config(tmp_path / "crash")
    join = _join(cfg, log, clock, tmp_path / "crash")
    crash_at = set(rng.sample(range(2, 40), 4))  # the run takes about 50 steps
    crashes = 0
    for step in range(5000):
        if join.tasks and _join_done(join, log):
            break
        join.step()
        clock.advance(10)
        if rng.random() < 0.15:
            join.checkpoint_all()
        if step in crash_at:
            join.abort()
            join = _join(cfg, log, clock, tmp_path / "crash")
            crashes += 1
    assert crashes == 4 and _join_done(join, log)
    train = _train(cfg, log, clock, tmp_path / "crash")
    _run_train(train, log, clock)
    assert train.seq_gaps == 0
    assert train.duplicates_dropped == len(_samples_on_topic(log)) - len(synth.expected)
    train.close(final=None)
    keys = _ledger(tmp_path / "crash")
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(synth.expected)
    if partitions == 1:
        a, b = _weights(ref), _weights(train)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_a_train_crash_resumes_to_the_same_weights(tmp_path):
    synth = generate(600, seed=9, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    ref_cfg = _config(tmp_path / "ref")
    ref = _train(ref_cfg, log, clock, tmp_path / "ref")
    _run_train(ref, log, clock)

    train = _train(cfg, log, clock, tmp_path)
    crashes = 0
    seen = train.version
    ends = {tp: len(log._data[tp]) for tp in log.partitions("samples")}
    while not all(train.positions.get(tp, 0) >= n for tp, n in ends.items()):
        train.step()
        clock.advance(10)
        if crashes < 3 and train.version != seen:  # a crash soon after each of the first new versions
            train.step()
            train.abort()
            train = _train(cfg, log, clock, tmp_path)
            seen = train.version
            crashes += 1
    assert crashes == 3
    train.close(final=None)
    a, b = _weights(ref), _weights(train)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = _ledger(tmp_path)
    assert len(keys) == len(set(keys)) == ref.trainer.counters.samples


def test_a_stop_within_the_first_period_resumes_from_its_checkpoint(tmp_path):
    # Its checkpoint follows no period snapshot (base_version None) and was never used: the restart
    # trained the samples topic again from its start.
    log, clock, _ = _joined(tmp_path, 600, seed=11)
    cfg = _config(tmp_path, period={"every_samples": 10**9})
    ref = _train(_config(tmp_path / "ref", period={"every_samples": 10**9}), log, clock, tmp_path / "ref")
    _run_train(ref, log, clock)
    expected = _weights(ref)
    ref.close(final=None)

    train = _train(cfg, log, clock, tmp_path)
    for _ in range(3):
        train.step()
        clock.advance(10)
    trained = train.trainer.counters.samples
    assert 0 < trained < ref.trainer.counters.samples and train.version is None
    assert train.close() == 1  # checkpoint 1, before any snapshot
    resumed = _train(cfg, log, clock, tmp_path)
    assert resumed.restored_from == "checkpoint 1" and resumed.version is None
    assert resumed.trainer.counters.samples == trained
    _run_train(resumed, log, clock)
    got = _weights(resumed)
    resumed.close(final=None)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    keys = _ledger(tmp_path)
    assert len(keys) == len(set(keys)) == ref.trainer.counters.samples


def test_a_stop_before_any_sample_was_trained_restarts(tmp_path):
    # The final checkpoint of a stage stopped before its first sample held empty metric windows, which
    # no weights-only load took: every restart exited 2 ("no snapshot ... loads; refusing to start from
    # scratch") until someone deleted the checkpoint by hand.
    log, clock, _ = _joined(tmp_path, 600, seed=11)
    cfg = _config(tmp_path)
    train = _train(cfg, log, clock, tmp_path)
    train.open()
    assert train.trainer.counters.samples == 0
    assert train.close() == 1
    resumed = _train(cfg, log, clock, tmp_path)
    assert resumed.restored_from == "checkpoint 1" and resumed.trainer.counters.samples == 0
    _run_train(resumed, log, clock)
    resumed.close(final=None)
    keys = _ledger(tmp_path)
    assert keys and len(keys) == len(set(keys)) == resumed.trainer.counters.samples


def test_a_samples_partition_added_while_training_is_read_after_a_rebuild(tmp_path):
    # The stage read the partitions it opened with for ever: a join task added by growing the topics
    # wrote to a samples partition nobody read (no error, no gap, no lag series), until a restart.
    from reloop.engine.runtime.train_stage import SamplesTopicGrew

    synth = generate(600, seed=12, pad_to_multiple=4 * BATCH)
    log = _log(synth, 2)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)

    class Growing(EndAware):
        hidden = {TopicPartition("samples", 1)}  # not created yet, as far as the stage can tell

        def partitions(self):
            return [tp for tp in super().partitions() if tp not in self.hidden]

    def stage():
        train = build_train_stage(
            cfg, source=Growing(log, ["samples"]), clock=clock, stats=EngineStats(),
            checkpoint_dir=tmp_path / "train-ckpt",
        )  # fmt: skip
        train.settings = replace(train.settings, partition_check_s=0.0)
        return train

    train = stage()
    first = len(log._data[TopicPartition("samples", 0)])
    for _ in range(200):
        train.step()
        clock.advance(10)
        if train.positions.get(TopicPartition("samples", 0), 0) >= first:
            break
    assert TopicPartition("samples", 1) not in train.positions
    Growing.hidden = set()
    with pytest.raises(SamplesTopicGrew, match="samples:1"):
        for _ in range(200):
            train.step()
            clock.advance(10)
    train.abort()
    train = stage()  # what the supervisor does: the rebuilt stage opens every partition
    _run_train(train, log, clock)
    train.close(final=None)
    keys = _ledger(tmp_path)
    assert len(keys) == len(set(keys)) == len(synth.expected) == train.trainer.counters.samples


def test_a_corrupt_samples_message_is_dead_lettered_and_the_rest_trained(tmp_path):
    synth = generate(300, seed=2, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    log.append("samples", b"\x00 not arrow", b"k", START)
    log.append("samples", None, b"k", START)  # a tombstone: a record without a value
    train = _train(cfg, log, clock, tmp_path, dead=MemorySink(log, "dead"))
    _run_train(train, log, clock)
    train.train_remaining()
    train.close(final=None)
    assert train.dead_letters.counts == {"malformed": 2}
    assert sorted(_ledger(tmp_path)) == sorted(synth.expected)


def test_samples_whose_features_the_train_spec_cannot_read_are_dead_lettered_and_the_rest_trained(tmp_path):
    """A train stage may read the topic with another spec than the join stage checked (a new model):
    a value it cannot read costs its own sample, not its message; the message is dead-lettered as it
    was, a resent copy is not dead-lettered again, and the samples around the bad ones resume from a
    checkpoint."""
    import base64

    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
    from reloop.engine.events.schema import LabeledSample

    synth = generate(300, seed=2, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    price = [1.5, 2, "3.5", "abc", 4.0, "", 2**61 + 1, ["x"], 0.5, 9]  # rows 3 and 7 unreadable
    extra = [
        LabeledSample(f"x{i}", {"user": f"u{i}", "item": "i", "price": p}, i % 2, 0.5, 0, START + i)
        for i, p in enumerate(price)
    ]
    message = encode_batch(batch_from_samples(extra, task=99, first_seq=0))
    log.append("samples", message, b"x", START)
    log.append("samples", message, b"x", START)  # a resumed join task sends it again
    spec = {"fields": [*SPEC["fields"], {"kind": "numeric", "name": "price"}]}
    train_cfg = _config(tmp_path / "t", model={"spec": spec})

    def build(dead):
        return _train(train_cfg, log, clock, tmp_path, dead=dead)

    train = build(MemorySink(log, "dead"))
    _run_train(train, log, clock)
    assert train.dead_letters.counts == {"bad_feature": 1}
    assert train.samples_refused == 2 and train.duplicates_dropped == len(extra)
    assert train.buffered_samples == 8  # the synthetic samples filled whole batches
    train.close(final="checkpoint")
    dead = [orjson.loads(r.value) for tp in log.partitions("dead") for r in log.read(tp, 0, 10**9)]
    (envelope,) = [e for e in dead if e["reason"] == "bad_feature"]  # the others are the join stage's
    assert "seq 3, 7" in envelope["detail"]
    assert base64.b64decode(envelope["value"]["data"]) == message

    resumed = build(MemorySink(log, "dead"))  # the checkpoint's buffer: three runs of rows
    assert resumed.buffered_samples == 8
    resumed.train_remaining()
    resumed.close(final=None)
    good = {(f"x{i}", False): i % 2 for i in range(len(extra)) if i not in (3, 7)}
    keys = _ledger(tmp_path / "t")
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted({**synth.expected, **good})


def test_values_the_model_cannot_take_are_dead_lettered_and_poison_nothing(tmp_path):
    """Two numeric features under an identity transform, both valid JSON and finite: 1e39 (inf in
    float32) is refused at the join's door (``bad_feature``); 1e30 fits float32 but makes the model's
    logit NaN, so the train stage leaves its sample out of the step, counts it and dead-letters it
    (``unlearnable``, the sample itself). The ledger lists exactly the samples learnt, and the model
    still predicts numbers (before: the stage stopped on "score is NaN", again at every restart, or the
    weights turned NaN; then the left-out sample was still written in the ledger as trained)."""
    synth = generate(300, seed=4, pad_to_multiple=BATCH)
    poisoned: list[str] = []  # the first impression gets 1e39, the second 1e30 (and their copies)

    def add_x(impression_id, features) -> bool:
        if impression_id not in poisoned and len(poisoned) < 2:
            poisoned.append(impression_id)
        values = dict(zip(poisoned, (1e39, 1e30), strict=False))
        features["x"] = values.get(impression_id, 0.5)
        return True

    synth = synth.with_features(add_x)
    door, unlearnable = poisoned
    spec = {"fields": [*SPEC["fields"], {"kind": "numeric", "name": "x"}]}
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path, model={"spec": spec, "backbone": "dcn"})
    join = _join(cfg, log, clock, tmp_path)
    _run_join(join, log, clock)
    refused = [orjson.loads(r.value) for tp in log.partitions("dead") for r in log.read(tp, 0, 10**9)]
    refused = [e for e in refused if "beyond float32" in (e["detail"] or "")]
    assert refused and all(orjson.loads(e["value"]["data"])["impression_id"] == door for e in refused)
    train = _train(cfg, log, clock, tmp_path, dead=MemorySink(log, "train-dead"))
    _run_train(train, log, clock)
    train.train_remaining()
    left_out = sorted(k for k in synth.expected if k[0] == unlearnable)
    assert left_out and train.dead_letters.counts == {"unlearnable": len(left_out)}
    counters = train.trainer.counters
    assert counters.skipped_samples == len(left_out) and counters.skipped_steps == 0  # the others learnt
    batch = train.trainer.featurizer.transform([{"user": "u1", "item": "i1", "ctx": "c", "x": 0.5}])
    assert np.isfinite(train.trainer.learner.predict_proba(batch)).all()
    train.close()
    letters = [orjson.loads(r.value) for tp in log.partitions("train-dead") for r in log.read(tp, 0, 10**9)]
    samples = [orjson.loads(decode_raw(e["value"])) for e in letters]
    assert sorted((s["sample_id"], s["is_correction"]) for s in samples) == left_out
    assert all(s["features"]["x"] == 1e30 for s in samples) and "seq" in letters[0]["detail"]
    learnt = {k: v for k, v in synth.expected.items() if k[0] not in (door, unlearnable)}
    assert sorted(_ledger(tmp_path)) == sorted(learnt)


def test_a_model_version_beyond_int64_is_dead_lettered_not_a_crash_at_every_rebuild(tmp_path):
    """JSON holds 2**63; the samples topic's int64 column does not: the join stage raised OverflowError
    on its batch, and again at every rebuild from its checkpoint (a poison record that held the partition)."""
    synth = generate(300, seed=12, pad_to_multiple=BATCH)
    shown = [r for r in synth.records if r.topic_kind == "impression" and r.key != synth.sentinel_id.encode()]
    poison = shown[len(shown) // 2]
    poison_id = orjson.loads(poison.value)["impression_id"]
    value = orjson.dumps({**orjson.loads(poison.value), "model_version": 2**63})
    synth.records[synth.records.index(poison)] = dataclasses.replace(poison, value=value)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    letters = [orjson.loads(r.value) for tp in log.partitions("dead") for r in log.read(tp, 0, 10**9)]
    assert [e["reason"] for e in letters if "model_version" in (e["detail"] or "")] == ["bad_value"]
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    train.train_remaining()
    train.close()
    assert sorted(_ledger(tmp_path)) == sorted(k for k in synth.expected if k[0] != poison_id)


@pytest.mark.parametrize("ahead_ms", [5_000, 3_600_000])
def test_one_impression_stamped_ahead_by_its_producer_costs_no_sample(tmp_path, ahead_ms):
    """The Kafka timestamp of one impression record 5 s or an hour ahead of the records after it (its
    producer's clock): merged by its own timestamp it held back every later impression until the clicks
    ran dry, and their clicks were orphaned (5 s: 131 of 560 samples wrong; an hour: 275)."""
    synth = generate(500, seed=3, pad_to_multiple=BATCH)
    records = list(synth.records)
    i = [k for k, r in enumerate(records) if r.topic_kind == "impression"][20]
    records[i] = replace(records[i], timestamp_ms=records[i].timestamp_ms + ahead_ms)
    join, got = _join_all(replace(synth, records=records), tmp_path)
    assert {(s.sample_id, s.is_correction): s.label for s in got} == synth.expected
    assert len(got) == len(synth.expected)
    assert sum(t.merger.stamped_ahead for t in join.tasks.values()) == 1
    assert join._metrics._stamped_ahead.get() == 1  # reloop_merge_stamped_ahead_total


def test_messages_too_large_for_the_samples_topic_are_split_and_an_oversized_sample_dead_lettered(tmp_path):
    """Large impressions times batch_samples can exceed the topic's record limit (1 MB by default in
    Kafka): the message goes as halves, and so on, instead of stopping the stage at every restart. A
    single sample still too large is dead-lettered with its impression's bytes; the train stage then
    trains every other sample once and counts the one gap."""
    synth = generate(300, seed=6, pad_to_multiple=BATCH)
    chosen = []

    def add_blob(impression_id, features) -> bool:
        if chosen:
            return False
        features["blob"] = "x" * 6000  # alone over the limit below
        chosen.append(impression_id)
        return True

    synth = synth.with_features(add_blob)
    (huge,) = chosen
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    join = build_join_stage(
        cfg,
        source=MemoryGroupSource(log, ["impressions", "clicks"]),
        samples_sink=MemorySink(log, "samples", max_record_bytes=5000),  # ~10 samples: 3.5 to 4.5 kB
        dead_letter_sink=MemorySink(log, "dead"),
        clock=clock,
        stats=EngineStats(),
        checkpoint_dir=tmp_path / "join-ckpt",
    )
    _run_join(join, log, clock)
    assert join.messages_split > 0
    assert join.dead_letters.counts.get("oversized") == 1
    dead = [orjson.loads(r.value) for tp in log.partitions("dead") for r in log.read(tp, 0, 10**9)]
    (envelope,) = [e for e in dead if e["reason"] == "oversized"]
    assert orjson.loads(envelope["value"]["data"])["impression_id"] == huge
    lost = {key for key in synth.expected if key[0] == huge}
    assert lost
    got = _samples_on_topic(log)
    assert {(s.sample_id, s.is_correction): s.label for s in got} == {
        k: v for k, v in synth.expected.items() if k not in lost
    }
    assert join.samples_sent == len(got)  # (the dead-lettered one is not reported as sent)
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    train.train_remaining()
    assert train.seq_gaps == 1
    train.close()
    keys = _ledger(tmp_path)
    assert len(keys) == len(set(keys)) and set(keys) == set(synth.expected) - lost


def test_samples_lost_from_the_topic_are_counted_one_by_one_and_exported(tmp_path):
    # A lost message was one "seq gap" in a log line and a progress field reset at restart: no metric,
    # no alert, and 1 whether one sample or a thousand were lost.
    log, clock, cfg = _joined(tmp_path, 400, seed=13)
    messages = log._data[TopicPartition("samples", 0)]
    lost = decode_batch(messages.pop(3).value)  # the topic lost one message (retention, a recreation)
    messages[:] = [r._replace(offset=i) for i, r in enumerate(messages)]
    stats = EngineStats()
    train = _train(cfg, log, clock, tmp_path, stats=stats)
    _run_train(train, log, clock)
    train.step()
    assert len(lost) > 1 and train.seq_gaps == 1
    assert train.samples_missing == len(lost) == stats.train_samples_missing.get()
    train.close(final=None)


def test_topics_that_are_not_co_partitioned_are_refused(tmp_path):
    log = MemoryLog()
    log.create("impressions", 2)
    log.create("clicks", 3)
    log.create("samples", 3)
    with pytest.raises(CopartitionError, match="co-partitioned"):
        _join(_config(tmp_path), log, ManualClock(START), tmp_path)
    log2 = MemoryLog()
    log2.create("impressions", 2)
    log2.create("clicks", 2)
    log2.create("samples", 1)
    with pytest.raises(CopartitionError, match="samples topic"):
        _join(_config(tmp_path), log2, ManualClock(START), tmp_path)


def test_a_copartition_error_ends_the_stage_instead_of_a_retry_loop(tmp_path):
    # It was retried with backoff for recovery.give_up_after_s (15 min), a traceback per attempt.
    import threading

    from reloop.engine.runtime.supervisor import RetryPolicy, Supervisor

    log = MemoryLog()
    log.create("impressions", 2)
    log.create("clicks", 3)
    log.create("samples", 3)
    builds = []

    def build():
        builds.append(1)
        return _join(_config(tmp_path), log, ManualClock(START), tmp_path)

    policy = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05, give_up_after_s=2)
    supervisor = Supervisor(build, stop=threading.Event(), policy=policy)
    with pytest.raises(CopartitionError, match="co-partitioned"):
        supervisor.run()
    assert builds == [1]


def test_revoked_tasks_are_checkpointed_and_resume_elsewhere(tmp_path):
    synth = generate(400, seed=7, pad_to_multiple=BATCH)
    log = _log(synth, 2)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    first = _join(cfg, log, clock, tmp_path)
    for _ in range(10):
        first.step()
        clock.advance(10)
    first.source.revoke_all()  # a rebalance: every task checkpointed and dropped
    assert not first.tasks
    second = _join(cfg, log, clock, tmp_path)  # the new owner, same checkpoint folder
    _run_join(second, log, clock)
    got = _samples_on_topic(log)
    assert {(s.sample_id, s.is_correction): s.label for s in got} == synth.expected
    assert len(got) == len(synth.expected)  # a clean hand-over sends nothing twice
    assert TopicPartition("impressions", 0) in second.tasks[0].inputs


@pytest.mark.parametrize("zombie_first", [True, False])
def test_a_process_that_lost_its_task_cannot_checkpoint_over_the_new_owner(tmp_path, zombie_first):
    # A join process paused past its session (a zombie) checkpointed its tasks again after SIGCONT: each
    # write took a new registry object, so the registry's fence against a second writer never applied.
    from reloop.engine.checkpoint.registry import SnapshotError

    synth = generate(400, seed=7, pad_to_multiple=BATCH)
    log = _log(synth, 1)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    zombie = _join(cfg, log, clock, tmp_path)
    for _ in range(5):
        zombie.step()
        clock.advance(10)
    zombie.checkpoint_all()
    # The group gave task 0 to another process: restored from that checkpoint and checkpointed at once
    # (a merge journal of its own), so the zombie is refused whichever writes next.
    owner = _join(cfg, log, clock, tmp_path)
    owner.step()
    if not zombie_first:
        owner.checkpoint_all()
    with pytest.raises(SnapshotError, match="another process publishes"):
        zombie.checkpoint_all()
    owner.checkpoint_all()


def test_slow_join_checkpoints_come_less_often_within_their_share_of_the_time(tmp_path, monkeypatch):
    """A join checkpoint writes the whole join state; when it is slow, the next one waits for its
    duration / join_checkpoint_max_share, so checkpoints never take more than that share of the time."""
    from reloop.engine.checkpoint.registry import SnapshotRegistry

    synth = generate(200, seed=8, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path, stages={"join_checkpoint_every_s": 0.01, "join_checkpoint_max_share": 0.25})
    publish = SnapshotRegistry.publish

    def slow_publish(self, state, meta=None):
        time.sleep(0.1)  # a large join state
        return publish(self, state, meta)

    monkeypatch.setattr(SnapshotRegistry, "publish", slow_publish)
    stats = EngineStats()
    stage = _join(cfg, log, clock, tmp_path, stats)
    while not stage.tasks:
        stage.step()
    stage.checkpoint_all()
    took = stats.join_checkpoint_seconds.get()
    assert took >= 0.1
    assert stage.checkpoint_interval_s == pytest.approx(took / 0.25)
    assert stats.join_checkpoint_interval_seconds.get() == stage.checkpoint_interval_s
    written = stage.snapshots_written
    deadline = time.monotonic() + 0.2  # well past join_checkpoint_every_s, within 4x the duration
    while time.monotonic() < deadline:
        stage.step()
    assert stage.snapshots_written == written
    stage._last_checkpoint -= stage.checkpoint_interval_s  # the interval has passed
    stage.step()
    assert stage.snapshots_written == written + 1
    stage.close()


def test_a_restored_train_stage_exports_its_snapshot_version_and_time_at_once(tmp_path):
    """After a restart the snapshot gauges must not stay empty until the next snapshot: a restored
    process that then stalls has to trip the snapshot-stale alert."""
    synth = generate(300, seed=4, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    first = _train(cfg, log, clock, tmp_path)
    _run_train(first, log, clock)
    version = first.version
    first.abort()
    created = first.registry.manifest(version)["created_unix"]
    stats = EngineStats()
    build_train_stage(cfg, source=EndAware(log, ["samples"]), clock=clock, stats=stats,
                      checkpoint_dir=tmp_path / "train-ckpt")  # fmt: skip
    assert stats.snapshot_version.get() == version
    assert stats.snapshot_time_s.get() == created


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_quiet_stream_reaches_its_event_time_boundaries(tmp_path, deterministic):
    """The train stage's event clock was the newest sample trained: when samples stopped, no period ever
    ended (the last period's version never came out, and the stale alert fired on a quiet stream). As
    the join's watermark, it now goes on with the wall clock after join.idle_timeout_ms without input
    (not where deterministic: there boundaries are a function of the samples alone)."""
    log, clock, cfg = _joined(tmp_path, 400, seed=11)
    cfg = _config(tmp_path, train={"deterministic": deterministic}, join={"idle_timeout_ms": 1_000})
    cfg = cfg.model_copy(update={"period": type(cfg.period)(every_event_ms=10_000)})
    stats = EngineStats()
    stage = _train(cfg, log, clock, tmp_path, stats=stats)
    _run_train(stage, log, clock)
    trained = stage.trainer.counters.samples
    assert trained > 0 and stage.period.idle_boundaries == 0
    for _ in range(60):  # a minute without samples
        clock.advance(1_000)
        stage.step()
    stage.writer.wait()
    newest = stage.registry.versions()[-1] if stage.registry.versions() else None
    published = None if newest is None else stage.registry.manifest(newest)["meta"]["samples_trained"]
    if deterministic:
        assert stage.period.idle_boundaries == 0
        return
    assert published == trained  # what was trained came out as a version
    assert stage.period.idle_boundaries >= 4  # then a boundary each 10 s of quiet
    # An event-time period lasts its length on a live stream: the interval observed while the samples
    # were caught up (milliseconds here) would have made the stale alert fire on the next quiet minute.
    assert stats.snapshot_period_s.get() >= 10.0
    stage.abort()


def test_a_train_stage_refuses_a_changed_config_unless_allowed(tmp_path):
    from reloop.engine.runtime.restore import SnapshotMismatch

    log, clock, cfg = _joined(tmp_path, 300, seed=4)
    first = _train(cfg, log, clock, tmp_path)
    _run_train(first, log, clock)
    version = first.version
    first.abort()
    pinned = {"model": {"optimizer": {"lr": 0.02}}}  # a deliberate change on a running job
    with pytest.raises(SnapshotMismatch, match="allow_fingerprint_change"):
        _train(_config(tmp_path, **pinned), log, clock, tmp_path)
    allowed = _config(tmp_path, **pinned, checkpoint={"allow_fingerprint_change": True})
    resumed = _train(allowed, log, clock, tmp_path)
    assert resumed.version == version
    resumed.abort()


def test_a_join_stage_refuses_a_changed_join_config_unless_allowed(tmp_path, caplog):
    from reloop.engine.runtime.restore import SnapshotMismatch

    log = _log(generate(300, seed=3, pad_to_multiple=BATCH))
    clock = ManualClock(START)
    join = _join(_config(tmp_path), log, clock, tmp_path)
    for _ in range(12):
        join.step()
        clock.advance(10)
    join.checkpoint_all()
    join.abort()
    longer = {"join": {"window_ms": 3_000}}
    refused = _join(_config(tmp_path, **longer), log, clock, tmp_path)
    with pytest.raises(
        SnapshotMismatch,
        # (checkpoint 1: the one a task started afresh writes before its first sample)
        match="join task 0's checkpoint 2 was made with config .*"
        r"\(changed: join.window_ms: \d+ -> 3000\).*checkpoint.allow_fingerprint_change",
    ):
        for _ in range(5):  # the tasks are restored when the group assigns them
            refused.step()
    refused.abort()
    allowed = _join(
        _config(tmp_path, **longer, checkpoint={"allow_fingerprint_change": True}), log, clock, tmp_path
    )
    with caplog.at_level("WARNING", logger="reloop.restore"):
        _run_join(allowed, log, clock)
    (warning,) = [r for r in caplog.records if "changed config" in r.getMessage()]
    assert warning.fields["restore_point"] == "join task 0's checkpoint 2"
    assert [c.split(":")[0] for c in warning.fields["changed"]] == ["join.window_ms"]
    assert allowed.tasks[0].records_processed > 0 and allowed.tasks[0].sent > 0
    allowed.abort()


def test_each_model_version_gets_a_serving_bundle_with_its_weights(tmp_path):
    from reloop.engine.serve.bundle_format import bundle_versions, read_bundle, serving_dir

    synth = generate(300, seed=6, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    versions = train.registry.versions()
    assert bundle_versions(serving_dir(train.registry.root)) == versions[-3:]  # the newest kept
    tensors, _ = read_bundle(serving_dir(train.registry.root), versions[-1])
    weights = train.registry.load(versions[-1], parts=["model"]).state["model"]["model"]
    for name, value in weights.items():
        assert torch.equal(tensors[f"model.{name}"], value), name
    train.close(final=None)


class _Stalling(MemoryGroupSource):
    """A client that stops fetching after ``good`` polls while records wait (as kafka-python once did)."""

    def __init__(self, log, topics, good: int) -> None:
        super().__init__(log, topics)
        self.good = good

    def poll(self, max_records, timeout_s):
        self.good -= 1
        return super().poll(max_records, timeout_s) if self.good >= 0 else []


def test_snapshots_written_in_the_background_equal_those_written_in_step(tmp_path):
    """Period snapshots are serialised when due and written while training goes on: every version
    must hold exactly the weights and positions that a stage waiting for each write saves."""
    log, clock, _ = _joined(tmp_path, 400, seed=11)
    stages = {}
    for name, background in (("background", True), ("in-step", False)):
        sub = tmp_path / name
        stage = _train(_config(sub, checkpoint={"background_writes": background}), log, clock, sub)
        assert stage.writer.background is background
        _run_train(stage, log, clock)
        stage.close(final=None)
        stages[name] = stage
    bg, fg = stages["background"].registry, stages["in-step"].registry
    assert bg.versions() == fg.versions() and len(bg.versions()) >= 3
    for v in bg.versions():
        a, b = bg.load(v), fg.load(v)
        assert a.meta["positions"] == b.meta["positions"]
        assert a.meta["samples_trained"] == b.meta["samples_trained"]
        for k, value in a.state["model"]["model"].items():
            assert torch.equal(value, b.state["model"]["model"][k]), (v, k)
    assert stages["background"].snapshots_written == stages["in-step"].snapshots_written


def test_every_bundle_holds_its_versions_weights_when_writes_lag_behind(tmp_path, monkeypatch):
    """A snapshot still being written when the next boundary comes: the next bundle must not take the
    version of the one in flight (both take the newest on disk + 1)."""
    from reloop.engine.checkpoint.registry import SnapshotRegistry
    from reloop.engine.serve.bundle_format import bundle_versions, read_bundle, serving_dir

    write = SnapshotRegistry.write

    def slow_write(self, prepared):
        time.sleep(0.05)
        return write(self, prepared)

    monkeypatch.setattr(SnapshotRegistry, "write", slow_write)
    log, clock, cfg = _joined(tmp_path, 400, seed=13)
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    root = serving_dir(train.registry.root)
    assert len(bundle_versions(root)) == 3
    for v in bundle_versions(root):
        tensors, _ = read_bundle(root, v)
        weights = train.registry.load(v, parts=["model"]).state["model"]["model"]
        for name, value in weights.items():
            assert torch.equal(tensors[f"model.{name}"], value), (v, name)
    train.close(final=None)


def test_a_failed_background_write_stops_the_stage_and_the_previous_version_stays(tmp_path):
    from reloop.engine.checkpoint.writer import SnapshotWriteError

    log, clock, cfg = _joined(tmp_path, 400, seed=12)
    train = _train(cfg, log, clock, tmp_path)
    while train.version is None:
        train.step()
        clock.advance(10)
    train.writer.wait()
    good = train.version

    def full_disk(prepared):
        raise OSError(28, "No space left on device")

    train.registry.write = full_disk
    with pytest.raises(SnapshotWriteError, match="No space left"):
        for _ in range(5000):
            train.step()
            clock.advance(10)
    assert train.version == good + 1  # taken when it was serialised, never written
    train.abort()
    assert train.registry.versions()[-1] == good
    again = _train(cfg, log, clock, tmp_path)
    assert again.version == good
    _run_train(again, log, clock)
    assert again.registry.versions()[-1] > good
    again.close(final=None)
    keys = _ledger(tmp_path)  # what the failed version had trained is trained again, once
    assert len(keys) == len(set(keys)) == again.trainer.counters.samples


class _StallingFetched(_Stalling):
    """The same client with the ends its last fetches reported, as the Kafka sources have: a client
    that stopped fetching reports its position as the end (it never hears of newer records)."""

    def fetched_ends(self):
        return self.position()


@pytest.mark.parametrize("client", [_Stalling, _StallingFetched])
def test_a_join_consumer_that_stops_fetching_is_rebuilt_but_an_idle_one_is_not(tmp_path, client):
    from reloop.engine.runtime.join_stage import ConsumerStalled

    synth = generate(300, seed=4, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path, stages={"stall_timeout_s": 0.3})
    stalled = build_join_stage(
        cfg, source=client(log, ["impressions", "clicks"], good=3),
        samples_sink=MemorySink(log, "samples"), clock=clock, stats=EngineStats(),
        checkpoint_dir=tmp_path / "a",
    )  # fmt: skip
    deadline = time.monotonic() + 10
    with pytest.raises(ConsumerStalled, match="nothing fetched for 0.3 s"):
        while time.monotonic() < deadline:
            stalled.step()
    idle = _join(cfg, log, clock, tmp_path)
    _run_join(idle, log, clock)
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:  # caught up: nothing to fetch is not a stall
        idle.step()
    idle.close()


class _RetentionOvertook(MemoryGroupSource):
    """A client whose position retention passed once: it restarted at the oldest record left and says
    how many it never read, as KafkaGroupSource does. And one whose clicks partition was read again
    twice from below its position (a recreated topic), told the same way."""

    deleted = {TopicPartition("impressions", 0): 7}
    restarted = {TopicPartition("clicks", 0): 2}

    def take_deleted_unread(self):
        taken, self.deleted = self.deleted, {}
        return taken

    def take_restarted_below(self):
        taken, self.restarted = self.restarted, {}
        return taken


def test_input_records_deleted_before_they_were_read_are_counted_and_logged(tmp_path, caplog):
    stats = EngineStats()
    log = _log(generate(100, seed=5, pad_to_multiple=BATCH))
    stage = build_join_stage(
        _config(tmp_path), source=_RetentionOvertook(log, ["impressions", "clicks"]),
        samples_sink=MemorySink(log, "samples"), clock=ManualClock(START), stats=stats,
        checkpoint_dir=tmp_path / "a",
    )  # fmt: skip
    for _ in range(3):
        stage.step()
    assert stats.join_input_deleted_unread.get("impressions") == 7  # once, not at every step
    assert sorted(stats.join_input_restarted_below.items()) == [(("clicks",), 2), (("impressions",), 0)]
    lost = [r for r in caplog.records if "deleted by retention before the join task read" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelname == "ERROR"
    stage.close()


WEEK_MS = 7 * 24 * 3_600_000


@pytest.mark.parametrize("age_days", [8, 1])
def test_records_stamped_longer_ago_than_their_topics_retention_are_warned_of(tmp_path, caplog, age_days):
    """A backtest's events stamped years ago: the broker deletes them at its next retention check, read
    or not, and the samples stamped with their watermark too. The operator is told, per topic."""
    log = _log(generate(200, seed=5, pad_to_multiple=BATCH))
    clock = ManualClock(START + age_days * 24 * 3_600_000)
    stats = EngineStats()
    stage = build_join_stage(
        _config(tmp_path), source=MemoryGroupSource(log, ["impressions", "clicks"]),
        samples_sink=MemorySink(log, "samples"), clock=clock, stats=stats,
        checkpoint_dir=tmp_path / "a",
        retention_ms={"impressions": WEEK_MS, "clicks": -1, "samples": WEEK_MS},
    )  # fmt: skip
    _run_join(stage, log, clock)
    stage.close()
    # The gauges an alert compares: the retention of the topics that have one, and the age of the last
    # record checked on every topic, retention or not (a lag in time).
    week_s = WEEK_MS / 1000
    assert dict(stats.topic_retention_s.items()) == {("impressions",): week_s, ("samples",): week_s}
    ages = dict(stats.join_record_age_s.items())
    assert set(ages) == {("impressions",), ("clicks",), ("samples",)}
    day_s = 24 * 3600
    assert all((age_days - 1) * day_s < age <= age_days * day_s for age in ages.values()), ages
    warned = [r for r in caplog.records if "longer ago than the" in r.getMessage()]
    if age_days < 7:
        assert warned == []
        return
    by_topic = {r.fields["topic"]: r for r in warned}
    assert set(by_topic) == {"impressions", "samples"}  # clicks: no time-based retention
    assert len(warned) == 2  # once a while per topic, not at every record
    assert by_topic["impressions"].fields["retention_ms"] == WEEK_MS
    assert by_topic["impressions"].fields["stamp_age_s"] >= 8 * 24 * 3600 - 60
    assert "read or not" in by_topic["impressions"].getMessage()
    assert "before the train stage reads them" in by_topic["samples"].getMessage()


def test_a_process_that_lost_every_task_drops_its_record_ages(tmp_path):
    """The ages of the last records a process checked stood after a rebalance took all its tasks, so an
    alert on them fired (or stayed quiet) on another process's partitions for as long as it lived."""
    log = _log(generate(200, seed=5, pad_to_multiple=BATCH), partitions=2)
    clock = ManualClock(START + 8 * 24 * 3_600_000)
    stats = EngineStats()
    stage = build_join_stage(
        _config(tmp_path), source=MemoryGroupSource(log, ["impressions", "clicks"]),
        samples_sink=MemorySink(log, "samples"), clock=clock, stats=stats,
        checkpoint_dir=tmp_path / "a", retention_ms={"impressions": WEEK_MS, "samples": WEEK_MS},
    )  # fmt: skip
    for _ in range(3):
        stage.step()
    assert ("impressions",) in dict(stats.join_record_age_s.items())
    stage.on_revoked([TopicPartition("impressions", 0), TopicPartition("clicks", 0)])
    assert stage.tasks and stats.join_record_age_s.items()  # one task left: its ages still stand
    stage.source.revoke_all()
    assert not stage.tasks
    assert stats.join_record_age_s.items() == []
    assert len(stats.topic_retention_s.items()) == 2  # the topics' settings, not this process's reading
    stage.step()  # the group gives the tasks back: their records are checked again
    assert ("impressions",) in dict(stats.join_record_age_s.items())
    stage.close()


def test_where_each_new_tasks_inputs_stand_is_logged_once_at_its_first_step(tmp_path, caplog):
    """A task at its end with nothing read (the CI run whose feed the broker had deleted) or far behind
    says so in one line, instead of progress lines with every count at 0."""
    log = _log(generate(100, seed=5, pad_to_multiple=BATCH), partitions=2)
    ends = {f"{tp.topic}:{tp.partition}": len(log._data[tp]) for t in ("impressions", "clicks")
            for tp in log.partitions(t)}  # fmt: skip
    caplog.set_level(logging.INFO, logger="reloop.join")
    stage = _join(_config(tmp_path), log, ManualClock(START), tmp_path)
    for _ in range(5):
        stage.step()
    stage.close()
    lines = [r for r in caplog.records if r.getMessage().startswith("tasks' inputs at their first step")]
    assert len(lines) == 1  # once per assignment, not at every step
    inputs = lines[0].fields["inputs"]
    assert set(inputs) == set(ends)
    assert all(end == ends[tp] and 0 <= position <= end for tp, (position, end) in inputs.items())


class _NeverJoins(MemoryGroupSource):
    """A client stuck looking for its group's coordinator: no partitions, so no records waiting either."""

    def joined(self) -> bool:
        return False

    def poll(self, max_records, timeout_s):
        return []


def _stalls_after_0_3_s(tmp_path, source_type: type[MemoryGroupSource]):
    """A join stage with ``stall_timeout_s`` 0.3 over a ``source_type`` source of a small log."""
    log = _log(generate(100, seed=5, pad_to_multiple=BATCH))
    cfg = _config(tmp_path, stages={"stall_timeout_s": 0.3})
    return build_join_stage(
        cfg, source=source_type(log, ["impressions", "clicks"]), samples_sink=MemorySink(log, "samples"),
        clock=ManualClock(START), stats=EngineStats(), checkpoint_dir=tmp_path / "a",
    )  # fmt: skip


def test_a_join_consumer_that_never_joins_its_group_is_rebuilt(tmp_path):
    from reloop.engine.runtime.join_stage import ConsumerStalled

    outside = _stalls_after_0_3_s(tmp_path, _NeverJoins)
    started = time.monotonic()
    with pytest.raises(ConsumerStalled, match="not a member of the consumer group for 0.3 s"):
        while time.monotonic() < started + 10:
            outside.step()
    assert time.monotonic() - started >= 0.3 and not outside.tasks


def test_a_long_wait_to_join_the_group_is_said_once(tmp_path, monkeypatch, caplog):
    # After a broker outage the rebuilt join stage waited about 45 s for its group, its progress lines saying
    # only "tasks": [].
    import logging

    from reloop.engine.runtime.join_stage import ConsumerStalled, JoinStage

    monkeypatch.setattr(JoinStage, "WAITING_NOTE_S", 0.1)
    outside = _stalls_after_0_3_s(tmp_path, _NeverJoins)
    with (
        caplog.at_level(logging.INFO, logger="reloop.join"),
        pytest.raises(ConsumerStalled),
    ):
        while True:
            outside.step()
    said = [r for r in caplog.records if r.getMessage().startswith("waiting to join the consumer group")]
    assert len(said) == 1 and said[0].fields["waited_s"] >= 0.1


class _SlowJoin(MemoryGroupSource):
    """A client whose join takes 0.6 s (the group waits for its other members), its tasks 0.4 s to
    restore, and whose own settings let a healthy join take 1 s."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.joins_at = time.monotonic() + 0.6

    def joined(self) -> bool:
        return time.monotonic() >= self.joins_at

    def longest_join_s(self) -> float:
        return 1.0

    def poll(self, max_records, timeout_s):
        if not self.joined():
            time.sleep(0.01)
            return []
        if not self._assigned:
            time.sleep(0.4)  # the restore, inside the rebalance
            super().poll(max_records, timeout_s)  # assigns; the first fetch comes with the next poll
            return []
        return super().poll(max_records, timeout_s)


def test_a_join_or_restore_longer_than_the_stall_timeout_is_no_stall(tmp_path):
    """stall_timeout_s 0.3 s: membership is judged no sooner than the client's longest healthy join, and
    the fetch clock starts when the tasks are in place (tests/integration/test_join_rebalance_kafka.py)."""
    stage = _stalls_after_0_3_s(tmp_path, _SlowJoin)
    deadline = time.monotonic() + 10
    while not stage.samples_sent:
        assert time.monotonic() < deadline
        stage.step()
    stage.close()


class _Monotonic:
    """A stand-in for time.monotonic in the train stage: moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "train, partial",
    [
        ({"deterministic": False, "max_wait_ms": 500}, True),
        ({"deterministic": True, "max_wait_ms": 500}, False),  # batches must be a function of the topic
        ({"deterministic": False, "max_wait_ms": None}, False),
        ({"deterministic": False}, False),  # the default: full batches only
    ],
)
def test_a_partial_batch_is_trained_once_its_oldest_sample_waited_max_wait(
    tmp_path, monkeypatch, train, partial
):
    synth = generate(300, seed=4)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path, train={"batch_size": 10_000, **train})  # more than the topic holds
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    fake = _Monotonic()
    monkeypatch.setattr("reloop.engine.runtime.train_stage.monotonic", fake)
    stage = _train(cfg, log, clock, tmp_path)
    _run_train(stage, log, clock)  # every message read in the same instant: nothing waited yet
    n = len(synth.expected)
    assert stage.buffered_samples == n and stage.trainer.counters.steps == 0
    fake.now += 0.499
    stage.step()
    assert stage.trainer.counters.steps == 0  # not yet
    fake.now += 0.002
    stage.step()
    trained = stage.trainer.counters.samples
    assert (stage.partial_steps, stage.trainer.counters.steps, trained) == (
        (1, 1, n) if partial else (0, 0, 0)
    )
    assert stage.buffered_samples == n - trained
    fake.now += 10
    stage.step()
    assert stage.trainer.counters.steps == int(partial)  # nothing new buffered: no empty steps
    stage.train_remaining()
    stage.close()
    assert sorted(_ledger(tmp_path)) == sorted(synth.expected)  # each sample trained once either way


def test_full_batches_reset_the_wait_of_the_rest(tmp_path, monkeypatch):
    """The samples left after a full batch start their own wait: a batch that fills within max_wait
    never triggers a partial step, however long the stream has been flowing."""
    synth = generate(300, seed=5)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path, train={"batch_size": 45, "deterministic": False, "max_wait_ms": 500})
    _run_join(_join(cfg, log, clock, tmp_path), log, clock)
    fake = _Monotonic()
    monkeypatch.setattr("reloop.engine.runtime.train_stage.monotonic", fake)
    stage = _train(cfg, log, clock, tmp_path)
    stage.settings = replace(stage.settings, prefetch=0)  # one poll per step: the steps are the clock
    ends = {tp: len(log._data[tp]) for tp in log.partitions("samples")}
    steps = 0
    while not all(stage.positions.get(tp, 0) >= n for tp, n in ends.items()):
        stage.step()
        steps += 1
        fake.now += 0.08  # a batch of 45 fills in a few polls of 2 messages, well within 0.5 s
    n = len(synth.expected)
    assert steps * 0.08 > 1.0  # the stream flowed for longer than two waits
    assert stage.partial_steps == 0 and stage.trainer.counters.samples == n - n % 45
    assert 0 < stage.buffered_samples < 45
    fake.now += 0.6
    stage.step()
    assert stage.partial_steps == 1 and stage.trainer.counters.samples == n
    stage.close()


def test_max_wait_is_not_part_of_the_fingerprint(tmp_path):
    base = _config(tmp_path)
    assert _config(tmp_path, train={"max_wait_ms": 5}).fingerprint() == base.fingerprint()
    assert _config(tmp_path, train={"max_wait_ms": None}).fingerprint() == base.fingerprint()
    assert _config(tmp_path, train={"batch_size": 17}).fingerprint() != base.fingerprint()


def test_the_join_counters_count_a_taken_tasks_first_step(tmp_path):
    # The baseline of a task's counts was taken after its first step, so everything that step did
    # (up to a fetch of records: here the whole log) never reached the exported counters.
    synth = generate(300, seed=4, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    stats = EngineStats()
    # A backlog: the whole log in one step.
    stage = _join(_config(tmp_path, consumer={"poll_max_records": 100_000}), log, clock, tmp_path, stats)
    _run_join(stage, log, clock)
    negatives = sum(1 for label in synth.expected.values() if label == 0)
    assert negatives > 0
    assert stats.joiner_expired.get() == stage.tasks[0].joiner.stats.negatives == negatives
    final = stage.close()  # what the stage's "stopped" log line reports (it said null)
    assert final == {"0": SnapshotRegistry(tmp_path / "join-ckpt" / "join" / "task-00000").latest_version()}
    assert final["0"] is not None


def test_a_join_task_none_of_whose_checkpoints_loads_refuses_to_start(tmp_path):
    # Started afresh, the task would emit its partition's history again; the stage must stop (exit 2
    # in `reloop join`, as the train stage does) rather than retry the same failure for ever.
    from reloop.engine.runtime.restore import NoUsableSnapshot
    from reloop.engine.runtime.supervisor import FATAL

    synth = generate(200, seed=8, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    first = _join(cfg, log, clock, tmp_path)
    for _ in range(5):
        first.step()
        clock.advance(10)
    first.source.revoke_all()  # checkpoints task 0
    files = [f for f in (tmp_path / "join-ckpt").rglob("*") if f.is_file() and f.suffix != ".json"]
    assert files
    for f in files:
        f.write_bytes(b"\0" * f.stat().st_size)
    second = _join(cfg, log, clock, tmp_path)
    with pytest.raises(NoUsableSnapshot, match="join task 0") as err:
        for _ in range(5):
            second.step()
    assert isinstance(err.value, FATAL)


def test_a_join_task_whose_newest_checkpoint_is_broken_resumes_from_the_one_before_and_goes_on(tmp_path):
    # The task was restored from checkpoint 1 (2 fails its checksum), then its registry's fence took
    # the broken 2 for another process's: every later checkpoint of the task failed with "another
    # process publishes snapshots to the same folder", so the stage was rebuilt for ever.
    synth = generate(400, seed=7, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    first = _join(cfg, log, clock, tmp_path)
    for i in range(12):
        first.step()
        clock.advance(10)
        if i in (4, 9):
            first.checkpoint_all()
    first.abort()
    task = tmp_path / "join-ckpt" / "join" / "task-00000"
    assert SnapshotRegistry(task).versions() == [2, 3]  # (1: the task's first, before its first sample)
    part = task / "v000000000003" / "state.pt"
    part.write_bytes(part.read_bytes()[:100])
    stats = EngineStats()
    second = _join(cfg, log, clock, tmp_path, stats=stats)
    second.step()
    assert stats.snapshot_restore_fallbacks.get() == 1  # counted, not only logged
    second.checkpoint_all()
    assert SnapshotRegistry(task).latest_version() == 5  # 4 at its restore (a merge journal of its own)
    _run_join(second, log, clock)
    _assert_trained_once(cfg, log, clock, tmp_path, synth.expected)


def test_both_stages_export_their_consumer_lag_and_the_join_its_watermark(tmp_path):
    # Only the one-process pipeline set them: the lag alert and panel and the watermark showed nothing
    # for `reloop run`.
    log = _log(generate(300, seed=4, pad_to_multiple=BATCH))
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    join_stats = EngineStats()
    join = _join(cfg, log, clock, tmp_path, stats=join_stats)
    join._metrics.lag._interval_s = 0.0  # every step (1 s of wall clock otherwise)
    join.step()
    behind = dict(join_stats.consumer_lag.items())
    assert {k[0] for k in behind} == {"impressions", "clicks"} and sum(behind.values()) > 0
    _run_join(join, log, clock)
    join.step()
    assert dict(join_stats.consumer_lag.items()) == {k: 0.0 for k in behind}
    marks = [t.joiner.watermark_ms for t in join.tasks.values()]
    assert join_stats.joiner_watermark_s.get() == min(marks) / 1000.0 > 0
    train = _train(cfg, log, clock, tmp_path)
    train._metrics.lag._interval_s = 0.0
    stats = train._metrics.lag._gauge
    train.step()
    assert {k[0] for k, _ in stats.items()} == {"samples"}
    _run_train(train, log, clock)
    train.step()
    assert all(v == 0.0 for _, v in stats.items())
    train.close()


def test_a_first_period_checkpoint_whose_manifest_does_not_read_refuses_to_start_afresh(tmp_path):
    # The restore order skipped a checkpoint whose manifest did not read without counting it: with no
    # other restore point the stage started from scratch, retrained the samples topic from its start
    # and truncated the ledger of what it had trained.
    from reloop.engine.runtime.restore import NoUsableSnapshot

    log, clock, _ = _joined(tmp_path, 600, seed=11)
    cfg = _config(tmp_path, period={"every_samples": 10**9})
    train = _train(cfg, log, clock, tmp_path)
    for _ in range(3):
        train.step()
        clock.advance(10)
    assert train.close() == 1 and _ledger(tmp_path)
    manifest = SnapshotRegistry(tmp_path / "train-ckpt").checkpoints.path(1) / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])  # cut off
    with pytest.raises(NoUsableSnapshot, match=r"checkpoint 1: .*manifest"):
        _train(cfg, log, clock, tmp_path)
    assert _ledger(tmp_path)  # not truncated


def test_a_checkpoint_whose_manifest_does_not_read_is_a_counted_fallback(tmp_path):
    log, clock, _ = _joined(tmp_path, 600, seed=11)
    cfg = _config(tmp_path, period={"every_samples": 10**9})
    train = _train(cfg, log, clock, tmp_path)
    train.step()
    assert train.close() == 1
    train = _train(cfg, log, clock, tmp_path)
    train.step()
    assert train.close() == 2
    (SnapshotRegistry(tmp_path / "train-ckpt").checkpoints.path(2) / "manifest.json").write_text("{")
    stats = EngineStats()
    resumed = _train(cfg, log, clock, tmp_path, stats=stats)
    assert resumed.restored_from == "checkpoint 1" and resumed.restore_fallbacks == 1
    assert stats.snapshot_restore_fallbacks.get() == 1


def test_the_snapshot_period_of_a_count_trigger_is_known_from_the_first_snapshot_and_at_restore(tmp_path):
    # Count periods have no wall length: the gauge held the interval between two snapshots of one
    # process, so it stayed unset through a stage's first snapshot and after every restart (where the
    # next interval also spanned the downtime): a stage stalled then tripped neither stale alert.
    log, clock, _ = _joined(tmp_path, 300, seed=4)
    cfg = _config(tmp_path)
    stats = EngineStats()
    first = _train(cfg, log, clock, tmp_path, stats=stats)
    for wanted in (1, 2):
        deadline = time.monotonic() + 60
        while stats.snapshots.get() < wanted:  # durable (written in the background or not)
            assert time.monotonic() < deadline
            first.step()
            clock.advance(10)
        if wanted == 1:
            assert stats.snapshot_period_s.get() > 0  # from the stage's start
    first.abort()
    reg = SnapshotRegistry(tmp_path / "train-ckpt")
    *_, before, newest = reg.versions()
    gap = reg.manifest(newest)["created_unix"] - reg.manifest(before)["created_unix"]
    stats = EngineStats()
    _train(cfg, log, clock, tmp_path, stats=stats)
    assert stats.snapshot_version.get() == newest and stats.snapshot_period_s.get() == pytest.approx(gap)


@pytest.mark.parametrize("grown", ["impressions", "clicks"])
def test_a_topic_grown_alone_while_running_is_refused_at_the_next_rebalance(tmp_path, grown):
    # The new task waited for ever for its partition of the other topic (never at its end), buffering
    # its records without bound and joining nothing, silently; start-up refuses such topics (exit 2).
    synth = generate(200, seed=2, pad_to_multiple=BATCH)
    log = _log(synth)
    log.create("samples", 2)
    clock = ManualClock(START)
    stage = _join(_config(tmp_path), log, clock, tmp_path)
    _run_join(stage, log, clock)
    log.create(grown, 2)
    record = next(r for r in synth.records if r.topic_kind == grown[:-1])
    log.append(grown, record.value, b"new", record.timestamp_ms, 1)
    stage.source.revoke_all()  # the group's next rebalance gives partition 1 of the grown topic
    other = "impressions" if grown == "clicks" else "clicks"
    with pytest.raises(CopartitionError, match=f"co-partitioned .*; grow {other} to 2 partitions too"):
        stage.step()
    log.create(other, 2)  # grown together: accepted
    stage.source.revoke_all()
    stage.step()
    assert sorted(stage.tasks) == [0, 1]


def test_inputs_grown_past_the_samples_topic_while_running_are_refused_before_a_new_task_sends(tmp_path):
    # The samples topic is checked after the poll whose rebalance gave the new task (inside the client's
    # callback kafka-python cannot fetch its metadata): still before any of that task's samples is sent.
    synth = generate(200, seed=2, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    stage = _join(_config(tmp_path), log, clock, tmp_path)
    _run_join(stage, log, clock)
    sent = [len(log.read(tp, 0, 10**6)) for tp in log.partitions("samples")]
    log.create("impressions", 2)
    log.create("clicks", 2)
    stage.source.revoke_all()
    with pytest.raises(CopartitionError, match="'samples' has 1 partitions; it needs at least 2"):
        stage.step()
    assert [len(log.read(tp, 0, 10**6)) for tp in log.partitions("samples")] == sent


@pytest.mark.parametrize("recreated", [True, False])
def test_an_input_topic_created_again_past_the_checkpoint_position_is_read_from_its_oldest_record(
    tmp_path, caplog, recreated
):
    # Deleted and created again while the join stage was stopped, and grown past the position the task's
    # checkpoint holds: the task read on from that position, and the new topic's records before it were
    # never read, without a word (600 of 1,000 in a walkthrough). The topic's id tells the two apart.
    cfg = _config(tmp_path)
    clock = ManualClock(START)

    def stage(log: MemoryLog, ids: dict[str, str], stats: EngineStats):
        return _join(cfg, log, clock, tmp_path, stats, topic_ids=ids)

    old = _log(generate(150, seed=2, pad_to_multiple=BATCH))
    first = stage(old, {"impressions": "i-1", "clicks": "c-1"}, EngineStats())
    _run_join(first, old, clock)
    was = dict(first.tasks[0].positions)
    first.close()
    new = _log(generate(600, seed=3, pad_to_multiple=BATCH))  # the topics created again, and written to
    assert all(len(new._data[tp]) > offset for tp, offset in was.items())
    stats = EngineStats()
    ids = {"impressions": "i-2", "clicks": "c-2"} if recreated else {"impressions": "i-1", "clicks": "c-1"}
    second = stage(new, ids, stats)
    with caplog.at_level(logging.WARNING, logger="reloop.join"):
        _run_join(second, new, clock)
    read = {t: stats.events_consumed.child(t).value for t in ("impressions", "clicks")}
    restarted = {t: stats.join_input_restarted_below.child(t).value for t in ("impressions", "clicks")}
    said = [r for r in caplog.records if "input topic created again" in r.getMessage()]
    whole = {t: len(new._data[TopicPartition(t, 0)]) for t in ("impressions", "clicks")}
    if recreated:
        assert restarted == {"impressions": 1, "clicks": 1} and len(said) == 2
        assert read == whole  # every record of the new topics
    else:  # the same topics: on from the positions, as before
        assert restarted == {"impressions": 0, "clicks": 0} and not said
        assert read == {t: whole[t] - was[TopicPartition(t, 0)] for t in whole}


@pytest.mark.parametrize("recreated", [True, False])
def test_a_samples_topic_created_again_past_the_saved_position_is_read_from_its_oldest_record(
    tmp_path, caplog, recreated
):
    # Deleted and created again while the train stage was stopped, the join stage going on into the new
    # topic: the train stage read on from its save's position, skipped the new topic's samples below it
    # and reported them "missing from the topic" (132 of 450 in a walkthrough), though they were in it.
    log, clock, cfg = _joined(tmp_path, 600, seed=5)
    (tp,) = log.partitions("samples")
    messages = log.read(tp, 0, 10**9)
    cut = len(messages) // 3
    assert cut >= 2

    def stage(samples: MemoryLog, topic_id: str):
        return build_train_stage(
            cfg,
            source=EndAware(samples, ["samples"]),
            clock=clock,
            stats=EngineStats(),
            checkpoint_dir=tmp_path / "train-ckpt",
            samples_topic_id=topic_id,
        )

    def topic(part: list) -> MemoryLog:
        out = MemoryLog()
        out.create("samples", 1)
        for r in part:
            out.append("samples", r.value, r.key, r.timestamp_ms)
        return out

    old = topic(messages[:cut])
    first = stage(old, "s-1")
    _run_train(first, old, clock)
    first.close(final="checkpoint")
    new = topic(messages[cut:])  # the rest of the join's output, in the new topic from offset 0
    second = stage(new, "s-2" if recreated else "s-1")
    with caplog.at_level(logging.WARNING, logger="reloop.train"):
        _run_train(second, new, clock)
    second.close(final=None)
    said = [r for r in caplog.records if "samples topic created again" in r.getMessage()]
    keys = _ledger(tmp_path)
    every = [(s.sample_id, s.is_correction) for r in messages for s in decode_batch(r.value).to_samples()]
    if recreated:
        assert len(said) == 1 and sorted(keys) == sorted(every)  # each sample once, none skipped
    else:  # the same topic: on from the position, the samples below it never read
        assert not said and len(keys) < len(every)


def test_a_rebuilt_join_stage_counts_what_it_joins_again_once(tmp_path):
    # The supervisor rebuilds the stage in the same process (same counters); the rebuilt one restores
    # the last checkpoint and joins the input after it again: its samples and joiner counts were
    # exported twice (the negatives, samples per label, duplicates ... of that span).
    synth = generate(600, seed=9, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    stats = EngineStats()
    join = _join(cfg, log, clock, tmp_path, stats)
    for _ in range(10):
        join.step()
        clock.advance(10)
    join.checkpoint_all()
    for _ in range(15):  # joined, sent and exported past the checkpoint, then a crash
        join.step()
        clock.advance(10)
    assert join.tasks[0].next_seq > join.registry(0).load().meta["next_seq"]
    join.abort()
    again = _join(cfg, log, clock, tmp_path, stats)
    _run_join(again, log, clock)
    again.close()
    labels = list(synth.expected.values())
    assert len(_samples_on_topic(log)) > len(labels)  # copies on the topic, as designed
    assert stats.joined_samples.get("1") == sum(labels)
    assert stats.joined_samples.get("0") == len(labels) - sum(labels)
    joiner = again.registry(0).load().state["state"]["joiner"]["stats"]
    assert stats.joiner_expired.get() == joiner["negatives"] == len(labels) - sum(labels) > 0
    assert stats.joiner_duplicates.get("impression") == joiner["duplicate_impressions"]
    assert stats.joiner_orphan_clicks.get() == joiner["orphan_clicks"]


# --- a join task's numbering: incarnations -------------------------------------------------------------


class _Retained(MemoryGroupSource):
    """A consumer group over input topics whose retention deleted the records before ``start``: a task
    without a checkpoint reads from there (the oldest record retained), as from a Kafka topic."""

    def __init__(self, log, topics, start):
        super().__init__(log, topics)
        self.start = start

    def seek(self, positions):
        super().seek({tp: self.start.get(tp, 0) if o is None else o for tp, o in positions.items()})


def _input_log(records) -> MemoryLog:
    log = MemoryLog()
    for topic in ("impressions", "clicks", "samples", "dead"):
        log.create(topic, 1)
    _append_input(log, records)
    return log


def _append_input(log, records) -> None:
    for r in records:
        log.append(
            "impressions" if r.topic_kind == "impression" else "clicks", r.value, r.key, r.timestamp_ms
        )


def _input_ends(log):
    return {tp: len(log._data[tp]) for topic in ("impressions", "clicks") for tp in log.partitions(topic)}


def _batches_on_topic(log):
    return [decode_batch(r.value) for tp in log.partitions("samples") for r in log.read(tp, 0, 10**9)]


def _keys(batches):
    return [(s.sample_id, s.is_correction) for b in batches for s in b.to_samples()]


def test_a_join_task_that_lost_its_checkpoint_folder_has_its_new_samples_trained_not_dropped(
    tmp_path, caplog
):
    # The task started again at seq 0 while the train stage held its old numbering up to seq N: every new
    # sample numbered <= N was dropped as a "duplicate" (here all of them), silently.
    import shutil
    from collections import Counter

    synth = generate(900, seed=7, pad_to_multiple=4 * BATCH)
    cut = len(synth.records) * 2 // 3
    log = _input_log(synth.records[:cut])
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    stats = EngineStats()
    join = _join(cfg, log, clock, tmp_path)
    _run_join(join, log, clock)
    join.close()
    train = _train(cfg, log, clock, tmp_path, stats=stats)
    _run_train(train, log, clock)
    train.close()
    before = _batches_on_topic(log)

    shutil.rmtree(tmp_path / "join-ckpt")  # a new volume, a wiped directory
    retained = _input_ends(log)  # the input's retention has deleted what the task joined before
    _append_input(log, synth.records[cut:])
    join = build_join_stage(
        cfg,
        source=_Retained(log, ["impressions", "clicks"], retained),
        samples_sink=MemorySink(log, "samples"),
        dead_letter_sink=MemorySink(log, "dead"),
        clock=clock,
        stats=EngineStats(),
        checkpoint_dir=tmp_path / "join-ckpt",
    )
    _run_join(join, log, clock)
    join.close()
    after = _batches_on_topic(log)[len(before) :]
    assert after and after[0].first_seq == 0  # a new numbering
    assert sum(map(len, after)) <= sum(map(len, before))  # so every new seq is one the train stage took

    train = _train(cfg, log, clock, tmp_path, stats=stats)
    with caplog.at_level("ERROR", logger="reloop.train"):
        _run_train(train, log, clock)
    train.train_remaining()
    train.close(final=None)
    assert Counter(_ledger(tmp_path)) == Counter(_keys(before) + _keys(after))
    old, new = before[0].incarnation, after[0].incarnation
    assert {b.incarnation for b in before} == {old} and {b.incarnation for b in after} == {new}
    assert len(old) == len(new) == 32 and old != new
    assert train.duplicates_dropped == 0 and train.seq_gaps == 0
    assert train.task_restarts == 1 == stats.train_join_task_restarts.get()
    (error,) = [r for r in caplog.records if "new numbering" in r.getMessage()]
    assert error.fields["task"] == 0
    assert error.fields["incarnation"] == new and error.fields["previous_incarnation"] == old
    assert error.fields["previous_highest_seq"] == sum(map(len, before)) - 1
    assert "checkpoint folder" in error.fields["why"]
    # In its snapshot: a restart keeps both numberings apart.
    again = _train(cfg, log, clock, tmp_path)
    assert list(again._numberings[0]) == [old, new]
    assert again._numberings[0][old] == sum(map(len, before)) - 1


def test_a_join_task_that_crashes_before_its_first_periodic_checkpoint_keeps_its_numbering(tmp_path):
    # A task started afresh writes a checkpoint with its incarnation before its first sample: resumed
    # after a crash that came before any other checkpoint, its copies are the same numbering (dropped),
    # not a new one (trained twice).
    synth = generate(600, seed=4, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    join = _join(cfg, log, clock, tmp_path)
    join.step()
    incarnation = join.tasks[0].incarnation
    assert len(incarnation) == 32
    assert SnapshotRegistry(tmp_path / "join-ckpt" / "join" / "task-00000").versions() == [1]
    while join.samples_sent < 3 * BATCH:
        join.step()
        clock.advance(10)
    assert not _join_done(join, log)
    assert SnapshotRegistry(tmp_path / "join-ckpt" / "join" / "task-00000").versions() == [1]
    join.abort()  # no checkpoint since the first one
    again = _join(cfg, log, clock, tmp_path)
    _run_join(again, log, clock)
    again.close()
    assert again.tasks == {} and {b.incarnation for b in _batches_on_topic(log)} == {incarnation}
    _copies_trained_once(cfg, log, clock, tmp_path, synth.expected)


def test_a_join_checkpoint_from_before_incarnations_goes_on_with_its_unnamed_numbering(tmp_path, monkeypatch):
    # A join stage from before incarnations: no first checkpoint, batches without reloop.incarnation,
    # checkpoints without one. Upgraded, the task goes on with that numbering (unnamed), which the train
    # stage keeps deduplicating: copies dropped, no new numbering.
    from reloop.engine.runtime.join_stage import JoinStage

    synth = generate(500, seed=6, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(JoinStage, "_start_numbering", lambda self, task: None)
        join = _join(cfg, log, clock, tmp_path)
        for i in range(20):
            join.step()
            clock.advance(10)
            if i == 8:
                join.checkpoint_all()
        join.abort()  # sent samples after its checkpoint
    folder = tmp_path / "join-ckpt" / "join" / "task-00000"
    snap = SnapshotRegistry(folder).load()
    state = _without(snap.state["state"], "incarnation")  # as a join stage before incarnations wrote it
    SnapshotRegistry(folder).publish({"state": state}, _without(snap.meta, "incarnation"))
    sent = len(log._data[TopicPartition("samples", 0)])
    again = _join(cfg, log, clock, tmp_path)
    _run_join(again, log, clock)
    assert again.tasks[0].incarnation == ""
    batches = _batches_on_topic(log)
    assert len(batches) > sent and {b.incarnation for b in batches} == {""}
    assert all(b"reloop.incarnation" not in b.data.schema.metadata for b in batches)
    again.close()
    _copies_trained_once(cfg, log, clock, tmp_path, synth.expected)


def _copies_trained_once(cfg, log, clock, tmp_path, expected) -> None:
    """The samples topic holds copies (a task sent again what it sent after its checkpoint); a train
    stage trains every expected sample once, drops the copies and sees one numbering per task."""
    on_topic = _samples_on_topic(log)
    assert len(on_topic) > len(expected)
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    train.train_remaining()
    train.close(final=None)
    assert train.task_restarts == 0 and train.seq_gaps == 0
    assert train.duplicates_dropped == len(on_topic) - len(expected)
    keys = _ledger(tmp_path)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(expected)


def _some_samples(tmp_path, n):
    log, _, _ = _joined(tmp_path / "source", 300, seed=2)
    samples = _samples_on_topic(log)
    assert len(samples) >= n
    return samples[:n]


def _message_log(messages):
    """A samples topic of one partition holding ``(samples, first_seq, incarnation)`` messages of task 0."""

    log = MemoryLog()
    for topic in ("samples", "dead"):
        log.create(topic, 1)
    _append_messages(log, messages)
    return log


def _append_messages(log, messages):
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch

    for samples, first, incarnation in messages:
        batch = batch_from_samples(samples, task=0, first_seq=first, incarnation=incarnation)
        log.append(
            "samples", encode_batch(batch), None, START + len(log._data[TopicPartition("samples", 0)]), 0
        )


def test_numberings_are_kept_apart_so_an_earlier_ones_late_copies_are_still_dropped(tmp_path, caplog):
    # Two join processes with different checkpoint folders taking the task in turn: each numbering is
    # deduplicated against itself, nothing of either is lost and the copies of both are dropped.
    s = _some_samples(tmp_path, 6 * BATCH)
    a, b = "a" * 32, "b" * 32
    log = _message_log(
        [
            (s[0:16], 0, a),
            (s[16:32], 16, a),
            (s[32:48], 0, b),  # a new numbering: trained
            (s[16:32] + s[48:64], 16, a),  # a again: 16..31 copies, 32..47 new
            (s[32:48], 0, b),  # copies of b
            (s[64:80], 16, b),
        ]
    )
    cfg = _config(tmp_path)
    clock = ManualClock(START)
    stats = EngineStats()
    train = _train(cfg, log, clock, tmp_path, stats=stats)
    with caplog.at_level("WARNING", logger="reloop.train"):
        _run_train(train, log, clock)
    train.train_remaining()
    assert train.trainer.counters.samples == 5 * BATCH
    assert train.duplicates_dropped == 2 * BATCH == stats.train_duplicates_dropped.get()
    assert train.task_restarts == 1 and train.seq_gaps == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "join task started a new numbering: training it from its first sample"
    ]
    assert sum("earlier numbering" in r.getMessage() for r in caplog.records) == 1  # a again (b: throttled)
    assert train._numberings == {0: {a: 47, b: 31}}
    train.close(final=None)


def test_a_train_state_from_before_incarnations_loads_and_its_numbering_goes_on(tmp_path, monkeypatch):
    from reloop.engine.runtime.train_stage import TrainStage

    s = _some_samples(tmp_path, 8 * BATCH)
    log = _message_log([(s[0:32], 0, "")])  # a join stage before incarnations: no reloop.incarnation
    cfg = _config(tmp_path)
    clock = ManualClock(START)
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    gather = TrainStage._gather_parts
    with monkeypatch.context() as m:  # saved as before incarnations: ``taken`` alone
        m.setattr(TrainStage, "_gather_parts", lambda self, mine: gather(self, _without(mine, "numberings")))
        train.close()
    state = SnapshotRegistry(tmp_path / "train-ckpt").checkpoints.load().state["state"]
    assert "numberings" not in state["ranks"][0] and state["ranks"][0]["taken"] == {"0": 31}

    x, y = "x" * 32, "y" * 32
    _append_messages(
        log,
        [
            (s[16:48], 16, ""),  # unnamed: 16..31 copies, 32..47 new
            (s[48:64], 48, x),  # a join stage with incarnations, upgraded before this train stage: the same
            (s[48:80], 48, x),  # numbering named (x continues it): 48..63 copies
            (s[80:96], 0, y),  # a task started afresh: a new numbering
        ],
    )
    resumed = _train(cfg, log, clock, tmp_path)
    assert resumed._numberings == {0: {"": 31}}
    _run_train(resumed, log, clock)
    resumed.train_remaining()
    assert resumed.duplicates_dropped == 2 * BATCH
    assert resumed.task_restarts == 1 and resumed.seq_gaps == 0
    assert resumed._numberings == {0: {x: 79, y: 15}}
    resumed.close(final=None)
    assert len(_ledger(tmp_path)) == 2 * BATCH + 4 * BATCH


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def test_numberings_move_with_their_partition_when_the_ranks_change():
    from reloop.engine.runtime.train_state import numberings_of, share_of
    from reloop.engine.streams import PartitionShare

    def part(numberings, taken):
        fixed = {
            "served_metrics": None,
            "buffer": [],
            "event_time_ms": None,
            "positions": {},
            "ledger_bytes": 0,
        }
        return {"trainer": {"counters": {"samples": 0}}, "taken": taken, "numberings": numberings, **fixed}

    two = [
        part({"0": [["a", 5], ["b", 3]], "2": [["", 9]]}, {"0": 3, "2": 9}),
        part({"1": [["c", 7]]}, {"1": 7}),
    ]
    one = share_of(two, PartitionShare(0, 1))
    assert numberings_of(one) == {0: {"a": 5, "b": 3}, 1: {"c": 7}, 2: {"": 9}}
    assert list(numberings_of(one)[0]) == ["a", "b"]  # the one taken last stays last
    back = [share_of([one], PartitionShare(r, 2)) for r in range(2)]
    assert [numberings_of(p) for p in back] == [{0: {"a": 5, "b": 3}, 2: {"": 9}}, {1: {"c": 7}}]
    legacy = _without(part(None, {"0": 4, "1": 6}), "numberings")  # a state from before incarnations
    assert numberings_of(share_of([legacy], PartitionShare(1, 2))) == {1: {"": 6}}


def test_a_rebuilt_train_stage_counts_the_copies_and_gaps_it_reads_again_once(tmp_path):
    # The supervisor rebuilds the stage in the same process (same counters); the rebuilt one restores its
    # last save and reads the messages after it again: their copies and missing samples were exported
    # twice.
    log, clock, _ = _joined(tmp_path, 400, seed=13)
    messages = log._data[TopicPartition("samples", 0)]
    lost = decode_batch(messages.pop(3).value)  # the topic lost a message
    copy = decode_batch(messages[1].value)
    messages.insert(5, messages[1])  # and holds a copy of another
    messages[:] = [r._replace(offset=i) for i, r in enumerate(messages)]
    cfg = _config(tmp_path, period={"every_samples": 10**9})  # no save: the rebuild reads everything again
    stats = EngineStats()
    train = _train(cfg, log, clock, tmp_path, stats=stats)
    _run_train(train, log, clock)
    assert train.duplicates_dropped == len(copy) and train.samples_missing == len(lost)
    train.abort()
    again = _train(cfg, log, clock, tmp_path, stats=stats)
    assert again.restored_from is None
    _run_train(again, log, clock)
    assert again.duplicates_dropped == len(copy) and again.samples_missing == len(lost)
    assert stats.train_duplicates_dropped.get() == len(copy) > 0
    assert stats.train_samples_missing.get() == len(lost) > 0
    again.close(final=None)


def _samples_by_seq(log):
    """Each ``(task, incarnation, seq)`` sent on the samples topic with the sample(s) sent under it:
    a name under which two different samples were sent is one the train stage trains once (the other is
    lost, or trained under a seq that named a third sample)."""
    by_seq: dict = {}
    for b in _batches_on_topic(log):
        for seq, s in zip(b.seqs().tolist(), b.to_samples(), strict=True):
            by_seq.setdefault((b.task, b.incarnation, seq), set()).add(
                (s.sample_id, s.is_correction, s.label)
            )
    return by_seq


@pytest.mark.parametrize("bound", ["max_past", "max_future"])
def test_a_join_task_resumed_hours_later_judges_event_times_as_it_did_before(tmp_path, bound):
    """The door's time bounds judged each event against the wall clock when it was processed: a task
    that crashed and read its input since its checkpoint again two hours later refused what it had
    accepted (``max_past_ms``: everything older than an hour then) or accepted what it had refused (an
    impression stamped 8 minutes ahead by its producer, record and event: then within ``max_future_ms``
    of its own record time, its watermark closed every window early). Its samples then differed from
    those it had sent under the same seqs: the train stage dropped the new ones as copies (lost) or
    trained some twice. The door's reference time is now the task's, taken from the wall clock only at
    checkpoints: the resumed task sends what it sent before, and training gets every sample once."""
    synth = generate(700, seed=5, pad_to_multiple=4 * BATCH)
    records = list(synth.records)
    if bound == "max_future":
        at = len(records) // 4  # processed after the checkpoint, before the crash
        first = next(r for r in records if r.topic_kind == "impression")
        ahead = records[at].timestamp_ms + 8 * 60_000
        value = orjson.loads(first.value) | {"impression_id": "ahead", "event_time_ms": ahead}
        records.insert(at, replace(first, key=b"ahead", value=orjson.dumps(value), timestamp_ms=ahead))
    log = _log(replace(synth, records=records))
    clock = ManualClock(START)
    cfg = _config(tmp_path, validation={"max_past_ms": 3_600_000} if bound == "max_past" else {})
    join = _join(cfg, log, clock, tmp_path)
    for _ in range(12):
        join.step()
        clock.advance(10)
    join.checkpoint_all()
    for _ in range(15):
        join.step()
        clock.advance(10)
    assert join.samples_sent > 0 and not _join_done(join, log)
    join.abort()  # a crash; the task is back two hours later
    clock.advance(2 * 3_600_000)
    again = _join(cfg, log, clock, tmp_path)
    _run_join(again, log, clock)
    again.close()
    assert {k: v for k, v in _samples_by_seq(log).items() if len(v) > 1} == {}
    letters = [orjson.loads(r.value) for tp in log.partitions("dead") for r in log.read(tp, 0, 10**9)]
    refused = [e for e in letters if e["reason"] == "bad_time" and "clock" in e["detail"]]
    if bound == "max_future":  # refused by both runs: 8 minutes ahead of the task's clock
        assert [orjson.loads(decode_raw(e["value"]))["impression_id"] for e in refused] == ["ahead"] * 2
    else:
        assert refused == []
    on_topic = _samples_on_topic(log)
    train = _train(cfg, log, clock, tmp_path)
    _run_train(train, log, clock)
    train.train_remaining()
    train.close(final=None)
    assert train.seq_gaps == 0
    assert train.duplicates_dropped == len(on_topic) - len(synth.expected)
    keys = _ledger(tmp_path)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(synth.expected)


def _renamed(synth, prefix: str):
    """``synth`` with every impression id prefixed: a stream sharing no id with another."""
    tag, new = b'"impression_id":"', b'"impression_id":"' + prefix.encode()
    records = [
        replace(r, key=prefix.encode() + r.key, value=r.value.replace(tag, new)) for r in synth.records
    ]
    expected = {(prefix + sid, corr): label for (sid, corr), label in synth.expected.items()}
    return replace(synth, records=records, expected=expected, sentinel_id=prefix + synth.sentinel_id)


def _append(log, records) -> None:
    for r in records:
        topic = "impressions" if r.topic_kind == "impression" else "clicks"
        log.append(topic, r.value, r.key, r.timestamp_ms)


def _join_until_sent(stage, log, clock, n: int) -> None:
    """Step ``stage`` until it has sent ``n`` samples, not all of its input."""
    for _ in range(500):
        stage.step()
        clock.advance(10)
        if stage.samples_sent >= n:
            break
    assert stage.samples_sent >= n and not _join_done(stage, log)


@pytest.mark.parametrize("crash_after_resume", [False, True])
def test_a_join_task_stopped_longer_than_max_future_lets_in_what_comes_after_the_pause(
    tmp_path, crash_after_resume
):
    """The whole pipeline stopped for maintenance (the join stage and the producers) for longer than
    ``max_future_ms``: the task's door clock stayed where the stop saved it, so every record after the
    pause was judged stamped too far ahead and dead-lettered until the task's next checkpoint (here all
    of them). A task restored from a stop's checkpoint (nothing judged after it) now moves its door clock
    to the wall clock, saved before it judges anything: a crash after that resumes the moved clock, and
    the task judges the records again as it did (``max_past_ms`` would refuse them from a clock moved
    again two hours later)."""
    gap_ms = 10 * 60_000
    before = generate(200, seed=21, malformed_rate=0)
    records = [r for r in before.records if r.key != before.sentinel_id.encode()]
    resumed_at = max(r.timestamp_ms for r in records) + gap_ms
    after = _renamed(generate(200, seed=22, malformed_rate=0, start_ms=resumed_at), "b")
    log = MemoryLog()
    for topic in ("impressions", "clicks", "samples", "dead"):
        log.create(topic, 1)
    _append(log, records)
    clock = ManualClock(START)
    cfg = _config(tmp_path, validation={"max_future_ms": 300_000, "max_past_ms": 60_000})
    join = _join(cfg, log, clock, tmp_path)
    _run_join(join, log, clock)
    join.close()  # the stop; the producers pause too, and everything is back ten minutes later
    clock.set(resumed_at)
    _append(log, after.records)
    again = _join(cfg, log, clock, tmp_path)
    if crash_after_resume:
        _join_until_sent(again, log, clock, 40)  # some sent under the moved clock, not all
        again.abort()
        clock.advance(2 * 3_600_000)
        again = _join(cfg, log, clock, tmp_path)
    _run_join(again, log, clock)
    again.close()
    letters = [orjson.loads(r.value) for tp in log.partitions("dead") for r in log.read(tp, 0, 10**9)]
    assert [e["detail"] for e in letters if e["reason"] == "bad_time"] == []
    assert {k: v for k, v in _samples_by_seq(log).items() if len(v) > 1} == {}
    on_topic = {(s.sample_id, s.is_correction): s.label for s in _samples_on_topic(log)}
    assert on_topic == before.expected | after.expected


def test_a_task_that_falls_back_to_a_stops_checkpoint_keeps_its_door_clock(tmp_path):
    """A stop's checkpoint lets the task move its door clock on only when it is the task's newest: one
    restored as a fallback (the newer one did not load) may have been followed by records the task
    judged under that newer one, and they must be judged the same again."""
    log = _log(generate(300, seed=23, pad_to_multiple=BATCH))
    clock = ManualClock(START)
    cfg = _config(tmp_path, validation={"max_future_ms": 300_000})
    first = _join(cfg, log, clock, tmp_path)
    for _ in range(5):
        first.step()
        clock.advance(10)
    first.close()  # the stop's checkpoint
    second = _join(cfg, log, clock, tmp_path)  # back at once: its clock lags by nothing
    _join_until_sent(second, log, clock, 20)
    second.checkpoint_all()
    second.abort()
    task = tmp_path / "join-ckpt" / "join" / "task-00000"
    part = task / f"v{SnapshotRegistry(task).latest_version():012d}" / "state.pt"
    part.write_bytes(part.read_bytes()[:100])
    clock.advance(10 * 60_000)
    stats = EngineStats()
    third = _join(cfg, log, clock, tmp_path, stats=stats)
    third.step()
    (restored,) = third.tasks.values()
    assert stats.snapshot_restore_fallbacks.get() == 1
    assert restored.restored_final and restored.door.now_ms < clock() - 300_000
    third.abort()


def test_a_model_that_no_longer_fits_its_snapshots_stops_at_the_first_with_one_error(tmp_path, caplog):
    """A changed model shape resumed with allow_fingerprint_change: every restore point fails alike,
    so the stage stops at the newest one, naming what does not fit (it logged one ERROR per restore
    point, then listed them all)."""
    from reloop.engine.runtime.restore import SnapshotMismatch

    log, clock, cfg = _joined(tmp_path, 600, seed=5)
    first = _train(cfg, log, clock, tmp_path)
    _run_train(first, log, clock)
    assert len(first.registry.versions()) >= 2
    first.abort()
    wider = _config(tmp_path, model={"backbone": "fm"}, checkpoint={"allow_fingerprint_change": True})
    newest = first.registry.versions()[-1]
    with caplog.at_level("ERROR"), pytest.raises(SnapshotMismatch) as refused:
        _train(wider, log, clock, tmp_path)
    assert str(refused.value).startswith(f"snapshot {newest}: learner state has a different backbone")
    assert '"lr" in the state, "fm" now' in str(refused.value)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def _written_by_an_older_reloop(monkeypatch, cfg, log, clock, tmp_path, without=("train", "replay_size")):
    """A train stage whose snapshots record a config without ``without`` (a key reloop added since)
    and a fingerprint computed otherwise (an older reloop's): they are what an upgrade finds."""
    from reloop.engine.runtime.config import RunConfig

    real_dump = RunConfig.redacted_dump

    def older_dump(self):
        data = real_dump(self)
        del data[without[0]][without[1]]
        return data

    with monkeypatch.context() as patched:
        patched.setattr(RunConfig, "redacted_dump", older_dump)
        patched.setattr(RunConfig, "fingerprint", lambda self: "0ldf1ngerpr1nt00")
        first = _train(cfg, log, clock, tmp_path)
        _run_train(first, log, clock)
    first.abort()
    return first.version


def test_an_upgrade_with_the_config_unchanged_resumes(tmp_path, monkeypatch, caplog):
    # The fingerprint of a config that sets nothing new changed with keys reloop added since (at their
    # defaults): every upgrade's resume was refused until allow_fingerprint_change was set.
    log, clock, cfg = _joined(tmp_path, 300, seed=4)
    version = _written_by_an_older_reloop(monkeypatch, cfg, log, clock, tmp_path)
    with caplog.at_level("INFO", logger="reloop.restore"):
        resumed = _train(cfg, log, clock, tmp_path)
    assert resumed.version == version
    assert any("differ only by settings added since" in r.getMessage() for r in caplog.records)
    resumed.abort()


def test_an_upgrade_that_sets_a_new_key_is_refused_naming_it(tmp_path, monkeypatch):
    from reloop.engine.runtime.restore import SnapshotMismatch

    log, clock, cfg = _joined(tmp_path, 300, seed=4)
    _written_by_an_older_reloop(monkeypatch, cfg, log, clock, tmp_path)
    with pytest.raises(SnapshotMismatch, match=r"changed: train.replay_size: \(not recorded\) -> 64\)"):
        _train(_config(tmp_path, train={"replay_size": 64}), log, clock, tmp_path)


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        ({"optimizer": {"small_steps_below": 256}}, None),  # the learner's default, written out
        ({"params": {"embedding_dim": 1}}, None),  # the backbone's default
        (
            {"optimizer": {"small_steps_below": 128}},
            r"model.optimizer.small_steps_below: \(not recorded\) -> 128",
        ),
    ],
)
def test_an_upgrade_whose_config_writes_out_a_learner_default_resumes(tmp_path, monkeypatch, model, refused):
    # model.optimizer and model.params are mappings: their keys' defaults are the learner's, and one
    # written out at its default was refused as a change.
    from reloop.engine.runtime.restore import SnapshotMismatch

    log, clock, cfg = _joined(tmp_path, 300, seed=4)
    version = _written_by_an_older_reloop(monkeypatch, cfg, log, clock, tmp_path)
    base = {"backbone": "lr", "strategy": "reloop", "alpha": 0.3, "spec": SPEC}
    upgraded = _config(tmp_path, model={**base, **model})
    if refused is not None:
        with pytest.raises(SnapshotMismatch, match=refused):
            _train(upgraded, log, clock, tmp_path)
        return
    resumed = _train(upgraded, log, clock, tmp_path)
    assert resumed.version == version
    resumed.abort()
