from __future__ import annotations

import orjson
import pytest
import torch
from reloop.connectors.memory.memory import MemoryLog, MemorySink, MemorySource
from reloop.engine.checkpoint import SnapshotRegistry
from reloop.engine.deadletter import decode_raw
from reloop.engine.events.codec import decode_samples
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.build import build_pipeline
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.config import load_config_dict
from reloop.engine.runtime.synthetic import SPEC, generate
from reloop.engine.streams import TopicPartition
from reloop.engine.train.ledger import Ledger

BATCH = 16
START = 1_700_000_000_000  # the synthetic log starts here; the clock must not be far behind it


class EndAwareSource(MemorySource):
    """A memory source that knows its log ends (as a Kafka source knows its end offsets)."""

    def end_positions(self):
        return {tp: len(self.log._data[tp]) for tp in self.partitions()}


def _config(tmp_path, policy="correct", env=None, period=None, **train):
    return load_config_dict(
        {
            "join": {
                "window_ms": 2_000,
                "allowed_lateness_ms": 200,
                "click_grace_ms": 1_000,
                "idle_timeout_ms": 10**9,
                "retention_ms": 5_000,
                "late_click_policy": policy,
            },
            "model": {"backbone": "lr", "strategy": "reloop", "alpha": 0.3, "spec": SPEC},
            "train": {"batch_size": BATCH, "deterministic": True, **train},
            "period": period or {"every_samples": 4 * BATCH},
            "checkpoint": {
                "dir": str(tmp_path / "snaps"),
                "keep": 3,
                "ledger": str(tmp_path / "ledger.jsonl"),
            },
            "consumer": {"poll_max_records": 37},
        },
        env=env or {},
    )


def _log(synth) -> MemoryLog:
    log = MemoryLog()
    log.create("impressions")
    log.create("clicks")
    for r in synth.records:
        log.append(
            "impressions" if r.topic_kind == "impression" else "clicks", r.value, r.key, r.timestamp_ms
        )
    return log


def _pipeline(cfg, log, clock, samples=None):
    return build_pipeline(
        cfg,
        source=EndAwareSource(log, ["impressions", "clicks"]),
        clock=clock,
        samples_sink=samples,
        stats=EngineStats(),
    )


def _ends(log):
    return {
        TopicPartition("impressions", 0): len(log._data[TopicPartition("impressions", 0)]),
        TopicPartition("clicks", 0): len(log._data[TopicPartition("clicks", 0)]),
    }


def _run_to_end(p, log, clock, max_steps=10_000):
    ends = _ends(log)
    for _ in range(max_steps):
        p.step()
        clock.advance(10)
        if all(p.positions.get(tp, 0) >= n for tp, n in ends.items()):
            return
    raise AssertionError("pipeline did not reach the end of the log")


def test_samples_match_ground_truth(tmp_path):
    synth = generate(400, seed=3, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    out = MemoryLog()
    p = _pipeline(_config(tmp_path), log, clock, samples=MemorySink(out, "samples"))
    _run_to_end(p, log, clock)
    got, bad = decode_samples([r.value for r in out.read(TopicPartition("samples", 0), 0, 10**6)])
    assert not bad
    assert {(s.sample_id, s.is_correction): s.label for s in got} == synth.expected
    assert len(got) == len(synth.expected)
    st = p.joiner.stats
    assert st.orphan_clicks == synth.orphans
    assert st.duplicate_impressions == synth.cases["duplicate"]
    assert st.early_clicks_matched == synth.cases["early"]
    assert st.late_clicks_corrected == synth.cases["beyond"]
    assert p.dead_letters.total == synth.malformed
    assert p.trainer.counters.samples == len(synth.expected)  # padded: no partial batch left
    assert p.buffered_samples == 0
    p.close()
    ledger = Ledger.read(tmp_path / "ledger.jsonl")
    assert sorted((sid, corr) for _, sid, _, corr in ledger) == sorted(synth.expected)
    versions = SnapshotRegistry(tmp_path / "snaps").versions()
    assert len(versions) == 3 and versions[-1] > 3  # retention keeps 3 of the increasing versions


def test_drop_policy_counts(tmp_path):
    synth = generate(300, seed=5, policy="drop", pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    p = _pipeline(_config(tmp_path, policy="drop"), log, clock)
    _run_to_end(p, log, clock)
    assert p.joiner.stats.late_clicks_dropped == synth.cases["beyond"]
    assert p.joiner.stats.corrections == 0
    assert p.trainer.counters.samples == len(synth.expected)
    p.close()


def _params(p):
    return {k: v.clone() for k, v in p.trainer.learner.model.state_dict().items()}


def test_restart_from_snapshot_equals_uninterrupted(tmp_path):
    synth = generate(500, seed=9, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    ref = _pipeline(_config(tmp_path / "ref"), log, clock)
    _run_to_end(ref, log, clock)
    expected = _params(ref)
    ref_stats, ref_snapshots = ref.joiner.stats, ref.trainer.counters.samples // (4 * BATCH)
    ref.close()

    cfg = _config(tmp_path / "crash")
    restored = []
    p = _pipeline(cfg, log, clock)
    since = 0
    ends = _ends(log)
    while not all(p.positions.get(tp, 0) >= n for tp, n in ends.items()):
        p.step()
        clock.advance(10)
        since += 1
        # Crash a few steps after a new snapshot, so the work since it is lost and redone.
        if len(restored) < 3 and p.version is not None and p.version not in restored and since >= 3:
            # A crash also ends the background snapshot write: one still running would publish a
            # version the next pipeline's writer takes for another writer's (a race, not the test).
            p.writer.wait()
            p.ledger.close()
            p = _pipeline(cfg, log, clock)
            restored.append(p.version)
            since = 0
    assert len(restored) == 3
    got = _params(p)
    assert p.joiner.stats == ref_stats
    # Boundaries fall on the same sample counts as in the uninterrupted run.
    p.writer.wait()  # the last period snapshot is written in the background: on disk now
    assert p.registry.manifest(p.version)["meta"]["samples_trained"] == ref_snapshots * 4 * BATCH
    p.close()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    ledger = Ledger.read(tmp_path / "crash" / "ledger.jsonl")
    keys = [(sid, corr) for _, sid, _, corr in ledger]
    assert sorted(keys) == sorted(synth.expected) and len(keys) == len(set(keys))


def _ran_to_end(tmp_path, n: int, seed: int):
    """A pipeline run over n synthetic impressions to the end of its log and closed: (log, clock, version)."""
    log = _log(generate(n, seed=seed, pad_to_multiple=BATCH))
    clock = ManualClock(START)
    p = _pipeline(_config(tmp_path), log, clock)
    _run_to_end(p, log, clock)
    p.close()
    return log, clock, p.version


def test_fingerprint_mismatch_refused(tmp_path):
    log, clock, _ = _ran_to_end(tmp_path, 100, seed=1)
    import pytest
    from reloop.engine.runtime.restore import SnapshotMismatch

    with pytest.raises(
        SnapshotMismatch, match="fingerprint.*checkpoint.allow_fingerprint_change: true"
    ) as exc:
        _pipeline(_config(tmp_path, policy="drop"), log, clock)
    # "a fresh checkpoint dir" alone, followed, trained every sample twice: the new pipeline read the old
    # one's samples topic, and its join stage wrote them again.
    assert "stages.samples_topic and stages.join_group_id" in str(exc.value)
    # Which setting changed, from the config the snapshot recorded (it named two hashes only).
    assert "(changed: join.late_click_policy: 'correct' -> 'drop')" in str(exc.value)


def test_a_fingerprint_change_resumes_when_allowed_and_says_so(tmp_path, caplog):
    log, clock, version = _ran_to_end(tmp_path, 100, seed=1)
    allow = {"RELOOP__CHECKPOINT__ALLOW_FINGERPRINT_CHANGE": "true"}  # the documented one-start override
    changed = _config(tmp_path, policy="drop", env=allow)
    assert changed.checkpoint.allow_fingerprint_change
    with caplog.at_level("WARNING", logger="reloop.restore"):
        resumed = _pipeline(changed, log, clock)
    assert resumed.version == version and resumed.restored_from is not None
    (warning,) = [r for r in caplog.records if "changed config" in r.getMessage()]
    assert warning.fields["config"] == changed.fingerprint() != warning.fields["made_with"]
    resumed.close()


def test_an_optimizer_kind_changed_under_the_allowance_is_refused_at_start_not_at_each_step(tmp_path):
    # Allowed to resume under the changed fingerprint, SparseAdam took the snapshots' Adagrad state, and
    # each step then failed with KeyError('betas'), rebuilt and failed again until the give-up.
    import pytest
    from reloop.engine.runtime.restore import SnapshotMismatch

    log, clock, _ = _ran_to_end(tmp_path, 100, seed=1)
    env = {
        "RELOOP__CHECKPOINT__ALLOW_FINGERPRINT_CHANGE": "true",
        "RELOOP__MODEL__OPTIMIZER__EMBEDDING_OPTIMIZER": "adam",
    }
    # Stopped at the newest restore point (they all hold the old kind), not after refusing each.
    refused = "^checkpoint 1: .*embedding optimizer is adagrad, this config's is adam"
    with pytest.raises(SnapshotMismatch, match=refused):
        _pipeline(_config(tmp_path, env=env), log, clock)


def test_consumer_lag_and_snapshot_period_are_published(tmp_path):
    synth = generate(400, seed=4, pad_to_multiple=BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    stats = EngineStats()
    p = build_pipeline(
        _config(tmp_path),
        source=EndAwareSource(log, ["impressions", "clicks"]),
        clock=clock,
        stats=stats,
    )
    p.step()
    lag = stats.consumer_lag
    impressions_end = len(log._data[TopicPartition("impressions", 0)])
    first = lag.get("impressions", "0")
    assert 0 < first <= impressions_end  # one poll of 37 records cannot have read the whole log
    p._metrics._lag_interval_s = 0.0
    _run_to_end(p, log, clock)
    p.step()
    assert lag.get("impressions", "0") == 0
    assert lag.get("clicks", "0") == 0
    # A count-based period has no fixed wall length: the gauge holds the last observed interval.
    assert stats.snapshot_version.get() >= 2
    assert stats.snapshot_period_s.get() > 0
    # The scrape: the total loss alone, its terms under `part` (no total among them), counts.
    from prometheus_client.parser import text_string_to_metric_families
    from reloop.connectors.metrics.prometheus import render_metrics

    text = render_metrics(stats, process_metrics=False)[0].decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    loss = [k for k in got if k[0] == "reloop_train_loss"]
    assert loss == [("reloop_train_loss", ())] and got[loss[0]] > 0
    parts = {dict(k[1])["part"] for k in got if k[0] == "reloop_train_loss_part"}
    assert parts == {"ce", "sc", "kd"}
    assert got[("reloop_train_samples_total", ())] == p.trainer.counters.samples
    assert got[("reloop_consumer_lag_records", (("partition", "0"), ("topic", "clicks")))] == 0
    rates = {dict(k[1])["optimizer"]: v for k, v in got.items() if k[0] == "reloop_train_learning_rate"}
    assert rates == p.trainer.learner.learning_rates() and set(rates) == {"dense", "embedding"}
    p.close()


def test_too_late_events_are_exported_and_future_events_dead_lettered(tmp_path):
    """Watermark poisoning: an event far ahead of the clock is dead-lettered (bad_time); events that
    arrive after their window was forgotten are counted in reloop_joiner_too_late_total."""
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Impression

    def imp(iid: str, t: int) -> bytes:
        return encode(Impression(iid, "r", "u", "i", {"user": "u"}, t, 0.5, 0))

    log = MemoryLog()
    log.create("impressions")
    log.create("clicks")
    t0 = START
    log.append("impressions", imp("a", t0), b"a", t0)
    log.append("impressions", imp("year3000", 32_503_680_000_000), b"y", t0)  # dead-lettered
    log.append("impressions", imp("b", t0 + 1_000), b"b", t0 + 1_000)
    log.append("impressions", imp("late-but-in-bound", t0 + 60_000), b"c", t0 + 60_000)
    log.append("impressions", imp("too-late", t0 - 10_000), b"d", t0)  # retention 5 s: forgotten
    stats = EngineStats()
    clock = ManualClock(t0 + 60_000)
    dead = MemoryLog()
    p = build_pipeline(
        _config(tmp_path),
        source=EndAwareSource(log, ["impressions", "clicks"]),
        clock=clock,
        stats=stats,
        dead_letter_sink=MemorySink(dead, "dead"),
    )
    _run_to_end(p, log, clock)
    assert p.dead_letters.counts == {"bad_time": 1}
    [letter] = [orjson.loads(r.value) for r in dead.read(TopicPartition("dead", 0), 0, 10**6)]
    # validation.max_past_ms is unset: the detail says so (it read "allowed: -None .. +300000 ms").
    assert "allowed: unbounded .. +300000 ms" in str(letter), letter
    assert p.joiner.stats.too_late_impressions == 1
    assert p.joiner.watermark_ms < t0 + 61_000  # never moved to the year 3000
    assert stats.joiner_too_late.get("impression") == 1
    p.close()


def test_a_quiet_stream_publishes_no_version_until_something_is_trained(tmp_path):
    """A wall-clock boundary with nothing trained since the last one passes without a version (the
    same weights under a new number would push real versions out of ``checkpoint.keep``), and still
    counts as a boundary for the stale alert."""
    log = _log(generate(400, seed=4, pad_to_multiple=BATCH))
    clock = ManualClock(START)
    stats = EngineStats()
    p = build_pipeline(
        _config(tmp_path, period={"every_wall_s": 1}),
        source=EndAwareSource(log, ["impressions", "clicks"]),
        clock=clock,
        stats=stats,
    )
    _run_to_end(p, log, clock)
    for _ in range(3):  # what is left to train: a boundary after it
        clock.advance(1_000)
        p.step()
    p.writer.wait()  # snapshots are written in the background
    version, samples = stats.snapshot_version.get(), p.trainer.counters.samples
    assert version >= 1 and samples > 0
    idle_before, boundary_before = p.period.idle_boundaries, stats.period_boundary_time_s.get()
    for _ in range(10):  # ten quiet periods
        clock.advance(1_000)
        p.step()
    assert stats.snapshot_version.get() == version and p.trainer.counters.samples == samples
    assert SnapshotRegistry(tmp_path / "snaps").versions()[-1] == version
    assert p.period.idle_boundaries - idle_before == 10
    assert stats.period_boundary_time_s.get() >= boundary_before > 0
    # Samples again: they are published at the next boundary.
    start = max(clock(), p.joiner.watermark_ms) + 10_000
    clock.set(start)
    for r in generate(400, seed=5, pad_to_multiple=BATCH, start_ms=start).records:
        log.append(
            "impressions" if r.topic_kind == "impression" else "clicks", r.value, r.key, r.timestamp_ms
        )
    _run_to_end(p, log, clock)
    clock.advance(1_000)
    p.step()
    p.writer.wait()
    assert p.trainer.counters.samples > samples
    assert stats.snapshot_version.get() > version
    p.close()


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_quiet_stream_reaches_its_event_time_boundaries(tmp_path, deterministic):
    """Event-time periods were checked after training steps only: with no input none came, so the
    idle watermark's boundaries were never seen (the stale alert fired on a quiet stream). Where not
    deterministic, polls that release nothing check them too."""
    log = _log(generate(400, seed=4, pad_to_multiple=BATCH))
    clock = ManualClock(START)
    stats = EngineStats()
    cfg = _config(tmp_path, period={"every_event_ms": 10_000}, deterministic=deterministic)
    cfg = cfg.model_copy(update={"join": cfg.join.model_copy(update={"idle_timeout_ms": 1_000})})
    p = build_pipeline(cfg, source=EndAwareSource(log, ["impressions", "clicks"]), clock=clock, stats=stats)
    _run_to_end(p, log, clock)
    before = p.period.idle_boundaries
    for _ in range(60):  # a minute without input
        clock.advance(1_000)
        p.step()
    p.writer.wait()
    if deterministic:
        assert p.period.idle_boundaries == before
    else:
        assert p.period.idle_boundaries - before >= 4
        assert stats.snapshot_period_s.get() >= 10.0  # an event-time period's length at least
    p.close()


def test_a_restored_pipeline_exports_its_snapshot_version_and_time_at_once(tmp_path):
    """As the train stage does: a restored process that then stalls must trip the snapshot-stale alert
    without writing a snapshot first."""
    log, clock, version = _ran_to_end(tmp_path, 200, seed=6)
    assert version is not None and version >= 1
    created = SnapshotRegistry(tmp_path / "snaps").manifest(version)["created_unix"]
    stats = EngineStats()
    build_pipeline(_config(tmp_path), source=MemorySource(log, ["impressions", "clicks"]), clock=clock,
                   stats=stats)  # fmt: skip
    assert stats.snapshot_version.get() == version
    assert stats.snapshot_time_s.get() == created


def test_a_sample_the_model_cannot_learn_is_dead_lettered_not_ledgered(tmp_path):
    """1e30 under an identity transform passes every check but makes DCN's logit NaN: the step leaves
    the sample out, and the single-process pipeline dead-letters it (``unlearnable``, the sample as a
    samples-topic record) instead of writing it in the ledger as trained."""
    chosen: list[str] = []

    def add_x(impression_id, features) -> bool:
        if not chosen:
            chosen.append(impression_id)
        features["x"] = 1e30 if impression_id == chosen[0] else 0.5
        return True

    synth = generate(200, seed=5, pad_to_multiple=BATCH).with_features(add_x)
    spec = {"fields": [*SPEC["fields"], {"kind": "numeric", "name": "x"}]}
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": "dcn", "spec": spec})})
    dead = MemoryLog()
    p = build_pipeline(
        cfg,
        source=EndAwareSource(log, ["impressions", "clicks"]),
        clock=clock,
        dead_letter_sink=MemorySink(dead, "dead"),
        stats=EngineStats(),
    )
    _run_to_end(p, log, clock)
    p.train_remaining()
    left_out = sorted(k for k in synth.expected if k[0] == chosen[0])
    assert p.trainer.counters.skipped_samples == len(left_out) >= 1
    assert p.dead_letters.counts["unlearnable"] == len(left_out)
    p.close()
    letters = [orjson.loads(r.value) for r in dead.read(TopicPartition("dead", 0), 0, 10**6)]
    samples, bad = decode_samples([decode_raw(e["value"]) for e in letters if e["reason"] == "unlearnable"])
    assert not bad and sorted((s.sample_id, s.is_correction) for s in samples) == left_out
    ledger = Ledger.read(tmp_path / "ledger.jsonl")
    assert sorted((sid, corr) for _, sid, _, corr in ledger) == sorted(set(synth.expected) - set(left_out))


def test_a_stop_within_the_first_period_resumes_from_its_checkpoint(tmp_path):
    # The graceful stop's checkpoint had no period snapshot to follow (base_version None) and was never
    # used: the restart read and trained everything again from the start of the log.
    synth = generate(300, seed=6, pad_to_multiple=BATCH)
    log = _log(synth)
    ref_clock = ManualClock(START)
    ref = _pipeline(_first_period(tmp_path / "ref"), log, ref_clock)
    _run_to_end(ref, log, ref_clock)
    expected = _params(ref)
    ref.close()

    clock = ManualClock(START)
    p = _pipeline(_first_period(tmp_path / "stop"), log, clock)
    for _ in range(6):
        p.step()
        clock.advance(10)
    trained, positions = p.trainer.counters.samples, dict(p.positions)
    assert 0 < trained < len(synth.expected) and p.version is None
    assert p.close() == 1  # checkpoint 1, before any snapshot
    resumed = _pipeline(_first_period(tmp_path / "stop"), log, clock)
    assert resumed.restored_from == "checkpoint 1" and resumed.version is None
    assert resumed.trainer.counters.samples == trained and resumed.positions == positions
    _run_to_end(resumed, log, clock)
    got = _params(resumed)
    resumed.close()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    ledger = Ledger.read(tmp_path / "stop" / "ledger.jsonl")
    keys = [(sid, corr) for _, sid, _, corr in ledger]
    assert sorted(keys) == sorted(synth.expected) and len(keys) == len(set(keys))


def _first_period(root):
    cfg = _config(root)
    return cfg.model_copy(update={"period": cfg.period.model_copy(update={"every_samples": 10**9})})
