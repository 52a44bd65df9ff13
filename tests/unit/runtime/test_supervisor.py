"""A failure that is not about one record never loses or repeats a sample: the supervisor rebuilds the
pipeline from its last snapshot (memory connectors; the Kafka version is in tests/integration)."""

from __future__ import annotations

import threading

import pytest
import torch
from reloop.connectors.memory.memory import MemoryLog, MemorySink
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.build import build_pipeline
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.supervisor import GaveUp, RetryPolicy, Supervisor
from reloop.engine.runtime.synthetic import generate
from reloop.engine.train.ledger import Ledger

from .test_pipeline import BATCH, START, EndAwareSource, _config, _ends, _log


class FlakySink(MemorySink):
    """Fails (like a broker that went away) on chosen calls to send or flush."""

    def __init__(self, log: MemoryLog, topic: str, fail_sends: set[int], fail_flushes: set[int]) -> None:
        super().__init__(log, topic)
        self.fail_sends, self.fail_flushes = fail_sends, fail_flushes
        self.sends = self.flushes = 0

    def send(self, value, key=None, timestamp_ms=None):
        self.sends += 1
        if self.sends in self.fail_sends:
            raise ConnectionError("broker unreachable (injected)")
        super().send(value, key, timestamp_ms)

    def flush(self, timeout_s=None):
        self.flushes += 1
        if self.flushes in self.fail_flushes:
            raise TimeoutError("flush timed out (injected)")


class _Done(threading.Event):
    """Stop once the whole log is processed (the supervisor's loop checks this between steps)."""

    def __init__(self, log, clock, holder) -> None:
        super().__init__()
        self.ends, self.clock, self.holder = _ends(log), clock, holder

    def is_set(self) -> bool:
        p = self.holder.pipeline
        self.clock.advance(10)
        return p is not None and all(p.positions.get(tp, 0) >= n for tp, n in self.ends.items())

    def wait(self, timeout=None) -> bool:  # back-off waits cost no test time
        return False


def _run(tmp_path, log, clock, make_sink, policy=None):
    cfg = _config(tmp_path)
    holder = type("H", (), {"pipeline": None})()
    stop = _Done(log, clock, holder)

    def build():
        return build_pipeline(
            cfg,
            source=EndAwareSource(log, ["impressions", "clicks"]),
            clock=clock,
            samples_sink=make_sink(),
            stats=EngineStats(),
        )

    sup = Supervisor(
        build,
        stop=stop,
        policy=policy or RetryPolicy(backoff_initial_s=0.01),
        on_pipeline=lambda p: setattr(holder, "pipeline", p),
        close=lambda p: p.close(final="snapshot"),
        stats=EngineStats(),
    )
    sup.run()
    return sup


def test_sink_failures_mid_run_lose_and_repeat_nothing(tmp_path):
    synth = generate(600, seed=21, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    ref = _run(tmp_path / "ref", log, ManualClock(START), lambda: MemorySink(MemoryLog(), "samples"))
    assert ref.restarts == 0
    out = MemoryLog()
    # The first sink fails at its 150th send (a batch half-accepted), the second at its second flush
    # (a snapshot), the rest work: two rebuilds from the last snapshot.
    plans = iter([({150}, set()), (set(), {2})])
    sinks: list[FlakySink] = []

    def make_sink():
        sends, flushes = next(plans, (set(), set()))
        sinks.append(FlakySink(out, "samples", sends, flushes))
        return sinks[-1]

    got = _run(tmp_path / "flaky", log, ManualClock(START), make_sink)
    assert got.restarts == 2 and len(sinks) == 3
    keys = [(sid, corr) for _, sid, _, corr in Ledger.read(tmp_path / "flaky" / "ledger.jsonl")]
    assert sorted(keys) == sorted(synth.expected) and len(keys) == len(set(keys))
    a, b = ref.pipeline.trainer.learner.model.state_dict(), got.pipeline.trainer.learner.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gives_up_after_the_budget_without_a_snapshot(tmp_path):
    synth = generate(200, seed=3, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    now = [0.0]

    def always_failing():
        class Dead(MemorySink):
            def send(self, *a, **k):
                now[0] += 100.0
                raise ConnectionError("down")

        return Dead(MemoryLog(), "samples")

    with pytest.raises(GaveUp, match="without writing a snapshot"):
        cfg = _config(tmp_path)
        clock = ManualClock(START)
        sup = Supervisor(
            lambda: build_pipeline(
                cfg,
                source=EndAwareSource(log, ["impressions", "clicks"]),
                clock=clock,
                samples_sink=always_failing(),
                stats=EngineStats(),
            ),
            stop=threading.Event(),
            policy=RetryPolicy(backoff_initial_s=0.001, backoff_max_s=0.001, give_up_after_s=250.0),
            monotonic=lambda: now[0],
            stats=EngineStats(),
        )
        sup.run()
    assert sup.restarts == 4  # failed at t=100, 200, 300 (>= 250 since the first at 100: give up)


def test_a_config_the_client_refuses_fails_fast_instead_of_retrying():
    from reloop.engine.runtime.config import ConfigError

    calls = []

    def build():
        calls.append(1)
        raise ConfigError("Kafka client settings refused: Unrecognized configs: {'fetch_max_wait_ms'}")

    sup = Supervisor(
        build, stop=threading.Event(), policy=RetryPolicy(backoff_initial_s=0.001), stats=EngineStats()
    )
    with pytest.raises(ConfigError, match="fetch_max_wait_ms"):
        sup.run()
    assert calls == [1] and sup.restarts == 0


def test_a_diverged_model_stops_the_stage_instead_of_being_rebuilt():
    # Rebuilt from the same snapshot, it diverged again on the same samples, for recovery.give_up_after_s.
    from reloop.engine.models.finite import TrainingDiverged

    builds, aborted = [], []

    class Diverging:
        snapshots_written = 0

        def run(self, stop, on_step):
            raise TrainingDiverged("training diverged: the learner's 'model.bias' is NaN")

        def abort(self):
            aborted.append(1)

    def build():
        builds.append(1)
        return Diverging()

    sup = Supervisor(
        build, stop=threading.Event(), policy=RetryPolicy(backoff_initial_s=0.001), stats=EngineStats()
    )
    with pytest.raises(TrainingDiverged, match="model.bias"):
        sup.run()
    assert builds == [1] and aborted == [1] and sup.restarts == 0


def test_max_consecutive_skipped_reaches_the_trainer():
    from reloop.engine.runtime.build import build_trainer
    from reloop.engine.runtime.config import ConfigError, load_config_dict

    spec = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}
    model = {"backbone": "lr", "spec": spec}
    cfg = load_config_dict({"model": model, "train": {"max_consecutive_skipped": 7}})
    assert build_trainer(cfg).config.max_consecutive_skipped == 7
    with pytest.raises(ConfigError, match="max_consecutive_skipped"):
        load_config_dict({"train": {"max_consecutive_skipped": -1}})


def _refusal(make) -> BaseException:
    try:
        make()
    except Exception as exc:  # noqa: BLE001 - the client's own exception is the subject
        return exc
    raise AssertionError("the client accepted the settings")


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: __import__("kafka").KafkaConsumer(bootstrap_servers="127.0.0.1:1", bogus_ms=1), "bogus_ms"),
        # librdkafka's two refusals: an unknown name (kafka-python's spelling given to the confluent
        # client) and a bad value. Neither was taken for a config error once (retried for good).
        (
            lambda: __import__("confluent_kafka").Consumer(
                {"bootstrap.servers": "127.0.0.1:1", "group.id": "g", "heartbeat_interval_ms": 1}
            ),
            "heartbeat_interval_ms",
        ),
        (
            lambda: __import__("confluent_kafka").Consumer(
                {"bootstrap.servers": "127.0.0.1:1", "group.id": "g", "session.timeout.ms": "soon"}
            ),
            "session.timeout.ms",
        ),
    ],
)
def test_the_clients_refusals_of_their_settings_are_config_errors(make, key):
    from reloop.engine.runtime.config import ConfigError
    from reloop.engine.runtime.kafka_stages import _fail_fast_on_config

    with pytest.raises(ConfigError, match=key):
        _fail_fast_on_config(_refusal(make))
    _fail_fast_on_config(ConnectionError("broker unreachable"))  # a failure to retry: no ConfigError


def test_a_missing_topic_is_waited_for_with_one_line_each_try_and_no_traceback(tmp_path, caplog):
    # `reloop train` started before `reloop join` has created the samples topic logged a traceback per
    # attempt; the wait is expected (the join creates it), so each try is one warning naming the topic.
    from reloop.engine.streams import TopicNotFound

    synth = generate(200, seed=3, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    holder = type("H", (), {"pipeline": None})()
    tries = [0]

    def build():
        tries[0] += 1
        if tries[0] <= 2:
            raise TopicNotFound("Kafka topic 'samples' does not exist at 127.0.0.1:9092")
        return build_pipeline(
            cfg, source=EndAwareSource(log, ["impressions", "clicks"]), clock=clock, stats=EngineStats()
        )

    stats = EngineStats()
    sup = Supervisor(
        build,
        stop=_Done(log, clock, holder),
        policy=RetryPolicy(backoff_initial_s=0.01),
        on_pipeline=lambda p: setattr(holder, "pipeline", p),
        close=lambda p: p.close(final="snapshot"),
        stats=stats,
    )
    sup.run()
    waits = [
        r for r in caplog.records if r.name == "reloop.supervisor" and r.getMessage() == "waiting for a topic"
    ]
    # Not rebuilds: reloop_pipeline_restarts_total counted them, and its alert (3 in 15 min) fired on a
    # train stage that only waited for the join stage to create the samples topic.
    assert len(waits) == 2 and sup.restarts == 0 and stats.pipeline_restarts.get() == 0
    assert all(r.exc_info is None and "'samples'" in r.fields["error"] for r in waits)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert holder.pipeline.trainer.counters.samples > 0


@pytest.mark.timeout(20)
def test_a_planned_rebuild_is_one_info_line_and_no_restart(caplog):
    # The train stage seeing the samples topic grown (the growth the docs prescribe) asks to be rebuilt to
    # read the new partitions: it was logged as "pipeline failed" with a traceback, after a back-off,
    # and counted towards ReloopPipelineRestarting.
    from reloop.engine.runtime.train_stage import SamplesTopicGrew

    stop = threading.Event()
    runs: list[int] = []

    class Stage:
        snapshots_written = 0

        def run(self, stop, on_step=None) -> None:
            runs.append(1)
            if len(runs) == 1:
                raise SamplesTopicGrew("the samples topic has partitions this stage does not read: s:1")
            stop.set()

        def abort(self) -> None:
            pass

    stats = EngineStats()
    policy = RetryPolicy(backoff_initial_s=30, give_up_after_s=60)  # a back-off would fail the timeout
    sup = Supervisor(Stage, stop=stop, policy=policy, close=lambda p: None, stats=stats)
    with caplog.at_level("INFO", logger="reloop.supervisor"):
        sup.run()
    assert len(runs) == 2 and sup.restarts == 0 and stats.pipeline_restarts.get() == 0 and sup.failure is None
    said = [r for r in caplog.records if r.name == "reloop.supervisor"]
    assert [(r.levelname, r.getMessage()) for r in said] == [("INFO", "rebuilding from the last save")]
    assert said[0].exc_info is None and "s:1" in said[0].fields["reason"]


class _SnapshotThenFail:
    """A stage whose every run writes a snapshot and then fails in that same step (the join stage publishes
    a checkpoint, then sending its unsent samples raises), or whose snapshot becomes durable only while it
    is aborted (the train stage's write in flight, which abort waits for). 100 s pass per run."""

    def __init__(self, now: list[float], in_abort: bool) -> None:
        self.now, self.in_abort = now, in_abort
        self.snapshots_written = 0

    def run(self, stop, on_step=None) -> None:
        self.now[0] += 100.0
        if not self.in_abort:
            self.snapshots_written += 1
        raise ConnectionError("broker unreachable (injected)")

    def abort(self) -> None:
        if self.in_abort:
            self.snapshots_written += 1


@pytest.mark.parametrize("in_abort", [False, True])
def test_a_snapshot_written_by_the_failing_step_restarts_the_give_up_clock(in_abort):
    # Each rebuild moved the restart point on (a snapshot per run), yet no step after the snapshot ran to
    # say so: the supervisor gave up after give_up_after_s as if nothing had been written.
    now = [0.0]
    builds = []
    stop = threading.Event()

    def build():
        builds.append(1)
        if len(builds) == 8:
            stop.set()
        return _SnapshotThenFail(now, in_abort)

    sup = Supervisor(
        build,
        stop=stop,
        policy=RetryPolicy(backoff_initial_s=0.001, backoff_max_s=0.001, give_up_after_s=250.0),
        monotonic=lambda: now[0],
        stats=EngineStats(),
    )
    sup.run()  # GaveUp at the fourth failure (300 s) before
    assert sup.restarts == 8 and sup._attempt == 1
