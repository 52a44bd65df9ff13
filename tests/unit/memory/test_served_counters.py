"""A serving arm's click counters (engine/memory/served_counters.py): the service fills each candidate's
counter inputs, scores with them, logs them with the impression and counts what it shows; the samples
feed counts clicks; state and positions survive a restart; a model without the inputs is not served."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reloop.connectors.memory.memory import MemoryLog, MemorySink, MemorySource
from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.counters import ClickCounters, CounterSettings, with_counter_fields
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.memory.feed import SamplesFeed
from reloop.engine.memory.served_counters import ServedCounters
from reloop.engine.models.registry import build_learner
from reloop.engine.serve.arms import ArmRouter
from reloop.engine.serve.bundle import ModelBundle, ModelHolder
from reloop.engine.serve.schema import ScoreRequest
from reloop.engine.serve.service import ArmRuntime, NotReady, ScoringService

BASE = FeatureSpec(
    fields=(CategoricalField(name="user", buckets=40), CategoricalField(name="item", buckets=40))
)
SETTINGS = CounterSettings(fields=("user", "item"), prior_strength=5.0, windows_s=(600.0,))
SPEC = with_counter_fields(BASE, SETTINGS)


class _Clock:
    def __init__(self, ms: int = 1_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


class _ListLogger:
    def __init__(self) -> None:
        self.impressions: list = []

    def log(self, impressions) -> int:
        self.impressions += impressions
        return len(impressions)


def _bundle(version: int = 1, spec: FeatureSpec = SPEC) -> ModelBundle:
    learner = build_learner("dcn", spec, "ce", 0.0, seed=0, hidden_units=(8,), embedding_dim=4)
    return ModelBundle(version=version, learner=learner.clone_frozen(), featurizer=Featurizer(spec))


def _service(bundle: ModelBundle, counters: ServedCounters, clock: _Clock, logger: _ListLogger):
    arm = ArmRuntime("A", ModelHolder(bundle), logger=logger, counters=counters)
    return ScoringService(router=ArmRouter([("A", 1.0)], salt="t"), arms={"A": arm}, top_k=3, clock_ms=clock)


def _request(user: str, items: range) -> ScoreRequest:
    return ScoreRequest.model_validate(
        {
            "request_id": "r",
            "user_id": user,
            "context": {"user": user},
            "candidates": [{"item_id": f"i{j}", "features": {"item": f"i{j}"}} for j in items],
        }
    )


def test_spec_gets_the_counter_inputs_once_and_refuses_what_it_cannot_count() -> None:
    names = [f.name for f in SPEC.fields]
    assert names == ["user", "item", "user#ctr", "user#seen", "user#ctr@600s", "user#seen@600s",
                     "item#ctr", "item#seen", "item#ctr@600s", "item#seen@600s"]  # fmt: skip
    assert with_counter_fields(SPEC, SETTINGS) is SPEC  # a snapshot's spec has them already
    with pytest.raises(ValueError, match="'device' is not a categorical field"):
        with_counter_fields(BASE, CounterSettings(fields=("device",)))
    with pytest.raises(ValueError, match="distinct"):
        CounterSettings(fields=("user",), windows_s=(60.0, 60.0))


def test_service_scores_with_the_counter_inputs_logs_them_and_counts_what_it_shows() -> None:
    clock, logger = _Clock(), _ListLogger()
    bundle = _bundle()
    counters = ServedCounters(SETTINGS, clock_ms=clock)
    service = _service(bundle, counters, clock, logger)

    first = service.score(_request("u1", range(5)))
    assert counters.shown == 3 and len(logger.impressions) == 3
    # Nothing counted yet: every rate is the prior's (1/2, logit 0), nothing seen.
    for imp in logger.impressions:
        assert imp.features["user#ctr"] == 0.0 and imp.features["item#seen@600s"] == 0.0

    clock.ms += 60_000
    logger.impressions.clear()
    second = service.score(_request("u1", range(5)))
    shown_before = {r.item_id for r in first.ranking}
    for imp in logger.impressions:
        assert imp.features["user#seen"] == pytest.approx(math.log1p(3) * 0.2, rel=1e-6)
        assert imp.features["user#seen@600s"] == pytest.approx(math.log1p(3 * math.exp(-0.1)) * 0.2, rel=1e-6)
        seen_item = math.log1p(1) * 0.2 if imp.item_id in shown_before else 0.0
        assert imp.features["item#seen"] == pytest.approx(seen_item, rel=1e-6)
    # The logged features reproduce the served scores: the trainer learns what was scored.
    logged = {imp.item_id: imp for imp in logger.impressions}
    for item in second.ranking:
        features = {k: v for k, v in logged[item.item_id].features.items() if k != "user"}
        again = bundle.score_request({"user": "u1"}, [features])[0]
        assert again == pytest.approx(item.score, rel=1e-6)
    # ...and the counter inputs changed the score: the same row without them scores otherwise.
    top = second.ranking[0]
    plain = bundle.score_request({"user": "u1"}, [{"item": top.item_id}])[0]
    assert plain != pytest.approx(top.score, rel=1e-6)


def test_a_model_trained_without_the_counter_inputs_is_not_served() -> None:
    clock = _Clock()
    service = _service(_bundle(spec=BASE), ServedCounters(SETTINGS, clock_ms=clock), clock, _ListLogger())
    with pytest.raises(NotReady, match=r"lacks the counter inputs .*model.counters"):
        service.score(_request("u1", range(3)))


def test_an_arm_counting_more_than_its_model_reads_serves_it_with_the_inputs_it_reads() -> None:
    # docs/models.md: to add a field, give it to the arm first, then to the trainer. The arm refused every
    # request to the model that did not read it yet (and /readyz said not ready).
    clock, logger = _Clock(), _ListLogger()
    user_only = with_counter_fields(BASE, CounterSettings(fields=("user",), windows_s=(600.0,)))
    bundle = _bundle(spec=user_only)
    service = _service(bundle, ServedCounters(SETTINGS, clock_ms=clock), clock, logger)
    service.score(_request("u1", range(5)))
    clock.ms += 60_000
    logger.impressions.clear()
    served = service.score(_request("u1", range(5)))
    assert service.ready()
    # Every input the arm counts is logged (the trainer that adds item's learns them as served)...
    assert all("item#seen" in imp.features and "user#seen" in imp.features for imp in logger.impressions)
    # ...and the model scored with the user's, at their columns: its scores are the logged rows' scores.
    logged = {imp.item_id: imp for imp in logger.impressions}
    for item in served.ranking:
        features = {k: v for k, v in logged[item.item_id].features.items() if k.startswith(("item", "user#"))}
        again = bundle.score_request({"user": "u1"}, [features])[0]
        assert again == pytest.approx(item.score, rel=1e-6)
    assert logged[served.ranking[0].item_id].features["user#seen"] > 0


def test_the_refusal_names_every_counter_input_the_model_lacks() -> None:
    """It named the first four only (the user's: the item's were left out)."""
    clock = _Clock()
    service = _service(_bundle(spec=BASE), ServedCounters(SETTINGS, clock_ms=clock), clock, _ListLogger())
    with pytest.raises(NotReady) as refused:
        service.score(_request("u1", range(3)))
    names = ["user#ctr", "user#seen", "user#ctr@600s", "user#seen@600s",
             "item#ctr", "item#seen", "item#ctr@600s", "item#seen@600s"]  # fmt: skip
    assert str(names) in str(refused.value)
    # More than NAMED_INPUTS: every field, with how many of its inputs the spec lacks.
    many = CounterSettings(fields=("user", "item", "user*item"), windows_s=(60.0, 600.0))
    service = _service(_bundle(spec=BASE), ServedCounters(many, clock_ms=clock), clock, _ListLogger())
    with pytest.raises(NotReady, match=r"of the fields user \(6\), item \(6\), user\*item \(6\), 18 in all"):
        service.score(_request("u1", range(3)))


def test_readiness_says_which_arm_serves_a_model_without_its_counter_inputs() -> None:
    """Every request to such an arm is refused (503): /readyz said ready all the same, so an orchestrator
    sent it traffic. Not ready now, naming the arm and why, until a version with the inputs loads; an
    arm without a model is not ready as before, and one serving a model with the inputs is ready."""
    from fastapi.testclient import TestClient
    from reloop.engine.serve.app import create_app

    clock = _Clock()
    counted = ArmRuntime("A", ModelHolder(_bundle(1, spec=BASE)), logger=_ListLogger(),
                         counters=ServedCounters(SETTINGS, clock_ms=clock))  # fmt: skip
    plain = ArmRuntime("B", ModelHolder(_bundle(1, spec=BASE)), logger=_ListLogger())
    service = ScoringService(router=ArmRouter([("A", 1.0), ("B", 1.0)], salt="t"),
                             arms={"A": counted, "B": plain}, top_k=3, clock_ms=clock)  # fmt: skip
    client = TestClient(create_app(service))
    r = client.get("/readyz")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["ready"] is False and body["versions"] == {"A": 1, "B": 1}
    assert list(body["not_ready"]) == ["A"]  # B reads no counters: it serves
    assert body["not_ready"]["A"].startswith("version 1: the model's spec lacks the counter inputs [")
    assert "item#seen@600s" in body["not_ready"]["A"] and "model.counters" in body["not_ready"]["A"]
    assert not service.ready()

    counted.holder.swap(_bundle(2))  # trained with the arm's counters
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True, "versions": {"A": 2, "B": 1}}
    assert service.ready()
    assert service.score(_request("u1", range(3))).model_version == 2

    counted.holder.swap(_bundle(3, spec=BASE))  # and back: not ready again
    assert client.get("/readyz").status_code == 503 and not service.ready()
    none = ArmRuntime("C", ModelHolder(), counters=ServedCounters(SETTINGS, clock_ms=clock))
    service = ScoringService(router=ArmRouter([("C", 1.0)], salt="t"), arms={"C": none})
    r = TestClient(create_app(service)).get("/readyz")
    assert r.status_code == 503 and r.json()["not_ready"] == {"C": "no model loaded yet"}


def _publish(mlog: MemoryLog, rows: list[tuple[str, str, int]], first_seq: int, time_ms: int) -> None:
    samples = [
        LabeledSample(
            f"s{first_seq + i}",
            {"user": u, "item": it},
            y,
            served_prediction=0.5,
            served_version=1,
            event_time_ms=time_ms,
        )  # fmt: skip
        for i, (u, it, y) in enumerate(rows)
    ]
    MemorySink(mlog, "samples").send(encode_batch(batch_from_samples(samples, task=0, first_seq=first_seq)))


def _feed(mlog: MemoryLog, counters: ServedCounters, state) -> SamplesFeed:
    return SamplesFeed(name="A", source=MemorySource(mlog, ["samples"]), target=counters,
                       holder=ModelHolder(_bundle()), state_path=state, poll_timeout_s=0)  # fmt: skip


def test_feed_counts_the_clicks_of_the_samples_topic_and_resumes_from_its_state(tmp_path) -> None:
    mlog = MemoryLog()
    mlog.create("samples", 1)
    clock = _Clock()
    state = tmp_path / "counters.npz"
    counters = ServedCounters(SETTINGS, clock_ms=clock)
    feed = _feed(mlog, counters, state)
    feed.step()  # a fresh feed starts at the end of the topic
    bundle = _bundle()
    rows = bundle.featurizer.transform([{"user": "u1", "item": "i1"}, {"user": "u2", "item": "i2"}])
    counters.count_shown(SPEC, np.repeat(rows.cat, 4, axis=0), clock.ms)  # each shown 4 times
    _publish(mlog, [("u1", "i1", 1), ("u1", "i1", 1), ("u2", "i2", 0)], 0, clock.ms)
    clock.ms += 1_000
    assert feed.step() == 3 and counters.written == 2  # negatives are never counted
    values = counters.fill(SPEC, bundle.featurizer.transform([{"user": "u1"}, {"user": "u2"}]), clock.ms)
    prior = math.log(0.3 / 0.7)  # (2 clicks + 1) / (8 shown + 2)
    assert values[0, 0] > prior > values[1, 0]  # u1 clicked 2 of 4, u2 none of 4
    # What a ClickCounters given the same events serves.
    ref = ClickCounters(SPEC, SETTINGS.fields, SETTINGS.prior_strength, SETTINGS.windows_s)
    ref.count_shown(np.repeat(rows.cat, 4, axis=0), 1_000_000)
    ref.count_clicks(rows.cat[[0, 0]], np.ones(2), 1_001_000, np.full(2, 1_000_000.0))
    u = bundle.featurizer.transform([{"user": "u1"}, {"user": "u2"}])
    assert np.allclose(values, ref.values(u.cat, clock.ms))
    feed.close()

    again = ServedCounters(SETTINGS, clock_ms=clock)
    resumed = _feed(mlog, again, state)
    _publish(mlog, [("u2", "i2", 1)], 3, clock.ms)
    assert resumed.step() == 1 and again.written == 1  # only what came after the saved position
    ref.count_clicks(rows.cat[[1]], np.ones(1), clock.ms, np.full(1, float(clock.ms)))
    assert np.allclose(again.fill(SPEC, bundle.featurizer.transform([{"user": "u1"}, {"user": "u2"}]),
                                  clock.ms), ref.values(u.cat, clock.ms))  # fmt: skip
    resumed.close()


def test_saved_counts_of_other_settings_are_refused(tmp_path) -> None:
    counters = ServedCounters(SETTINGS)
    counters.rekey(_bundle())
    counters.save(tmp_path / "c.npz")
    with pytest.raises(ValueError, match="holds counts of"):
        ServedCounters(CounterSettings(fields=("user", "item"), prior_strength=2.0, windows_s=(600.0,))).load(
            tmp_path / "c.npz"
        )
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable"):
        ServedCounters(SETTINGS).load(tmp_path / "bad.npz")


def test_a_spec_that_lays_the_fields_out_otherwise_starts_the_counts_afresh() -> None:
    clock = _Clock()
    counters = ServedCounters(SETTINGS, clock_ms=clock)
    bundle = _bundle()
    rows = bundle.featurizer.transform([{"user": "u1", "item": "i1"}])
    counters.count_shown(SPEC, rows.cat, clock.ms)
    counters.rekey(_bundle(2))  # same layout: kept
    assert counters.resets == 0 and counters.fill(SPEC, rows, clock.ms)[0, 1] > 0
    wider = with_counter_fields(
        FeatureSpec(
            fields=(CategoricalField(name="user", buckets=80), CategoricalField(name="item", buckets=40))
        ),
        SETTINGS,
    )
    counters.rekey(_bundle(3, spec=wider))
    assert counters.resets == 1
    fresh = _bundle(3, spec=wider).featurizer.transform([{"user": "u1", "item": "i1"}])
    assert counters.fill(wider, fresh, clock.ms)[0, 1] == 0.0


def test_configs_agree_on_the_counter_inputs_and_refuse_what_cannot_work(tmp_path) -> None:
    from reloop.engine.runtime.config import ConfigError, load_config_dict, load_feature_spec
    from reloop.engine.serve.config import ServeConfig
    from reloop.engine.serve.loader import cold_start_bundle

    counters = {"fields": ["user", "item"], "windows_s": [600]}
    run = load_config_dict(
        {"model": {"backbone": "dcn", "spec": BASE.model_dump(), "counters": counters}}, env={}
    )
    assert load_feature_spec(run.model) == SPEC  # the trainer's spec
    arm = {"name": "A", "registry": str(tmp_path), "counters": {**counters, "samples_topic": "s"},
           "cold_start": {"backbone": "dcn", "spec": BASE.model_dump()}}  # fmt: skip
    serve = ServeConfig.model_validate({"arms": [arm]})
    assert cold_start_bundle(serve.arms[0].cold_start, serve.arms[0].counters).featurizer.spec == SPEC
    # By default the impression log is counted: any number of workers; but the log must be on.
    assert serve.arms[0].counters.shown_from == "impressions"
    assert ServeConfig.model_validate({"arms": [arm], "workers": 2}).workers == 2
    with pytest.raises(ValueError, match=r"serve.log.enabled: arms \['A'\] .*impression log"):
        ServeConfig.model_validate({"arms": [arm], "log": {"enabled": False}})
    local = {**arm, "counters": {**counters, "samples_topic": "s", "shown_from": "requests"}}
    with pytest.raises(ValueError, match=r"serve.workers: .*workers: 1, or .*shown_from: impressions"):
        ServeConfig.model_validate({"arms": [local], "workers": 2})
    with pytest.raises(ValueError, match="counters do not fit cold_start.spec: .*'device'"):
        ServeConfig.model_validate(
            {"arms": [{**arm, "counters": {"fields": ["device"], "samples_topic": "s"}}]}
        )
    bad = load_config_dict(
        {"model": {"backbone": "dcn", "spec": BASE.model_dump(), "counters": {"fields": ["device"]}}}, env={}
    )
    with pytest.raises(ConfigError, match="model.counters: .*'device'"):
        load_feature_spec(bad.model)


def test_an_arm_serves_a_cross_of_the_user_with_each_genre_of_the_item() -> None:
    base = FeatureSpec.model_validate(
        {
            "fields": [
                {"kind": "categorical", "name": "user", "buckets": 40},
                {"kind": "categorical", "name": "item", "buckets": 40},
                {"kind": "multi", "name": "genres", "buckets": 16, "max_len": 3},
            ]
        }
    )
    settings = CounterSettings(fields=("user*genres",))
    spec = with_counter_fields(base, settings)
    clock, logger = _Clock(), _ListLogger()
    counters = ServedCounters(settings, clock_ms=clock)
    bundle = _bundle(spec=spec)
    service = _service(bundle, counters, clock, logger)

    def ask(user: str) -> None:
        service.score(
            ScoreRequest.model_validate(
                {
                    "request_id": "r",
                    "user_id": user,
                    "context": {"user": user},
                    "candidates": [
                        {"item_id": "war", "features": {"item": "w", "genres": ["war"]}},
                        {"item_id": "drama", "features": {"item": "d", "genres": ["drama", "war"]}},
                    ],
                    "top_k": 2,
                }
            )
        )

    ask("u1")
    # u1 clicked the war film: the feed counts the click of its pair (u1, war) only.
    clicked = bundle.featurizer.transform([{"user": "u1", "item": "w", "genres": ["war"]}])
    counters.write(bundle, clicked, np.ones(1), np.full(1, float(clock.ms)))
    logger.impressions.clear()
    ask("u1")
    ask("u2")
    served = {(imp.user_id, imp.item_id): imp.features["user*genres#ctr"] for imp in logger.impressions}
    # u1's war pair: shown once, clicked once; drama: shown once, never clicked; u2: nothing counted.
    assert served[("u1", "war")] > served[("u1", "drama")] > served[("u2", "drama")]
    assert served[("u2", "war")] == served[("u2", "drama")]  # the prior, for every pair never seen


def test_clicks_re_emitted_by_a_resumed_join_task_count_once_across_a_restart(tmp_path) -> None:
    mlog = MemoryLog()
    mlog.create("samples", 1)
    clock = _Clock()
    state = tmp_path / "counters.npz"

    def publish(first_seq: int, n: int, incarnation: str = "a") -> None:
        samples = [
            LabeledSample(
                f"s{first_seq + i}",
                {"user": "u1", "item": "i1"},
                1,
                served_prediction=0.5,
                served_version=1,
                event_time_ms=clock.ms,
            )  # fmt: skip
            for i in range(n)
        ]
        batch = batch_from_samples(samples, task=3, first_seq=first_seq, incarnation=incarnation)
        MemorySink(mlog, "samples").send(encode_batch(batch))

    from reloop.engine.metrics.stats import STATS

    was = dict(STATS.serve_feed_samples.items())  # (the process's: other tests' feeds named "A" too)
    before = (was.get(("A", "counters", "written"), 0), was.get(("A", "counters", "duplicate"), 0))
    counters = ServedCounters(SETTINGS, clock_ms=clock)
    feed = _feed(mlog, counters, state)
    feed.step()
    publish(0, 3)
    publish(1, 4)  # the task resumed from its checkpoint at seq 1: 1 and 2 again, then 3 and 4 new
    assert feed.step() == 5 and counters.written == 5 and feed.duplicates == 2
    feed.close()
    again = ServedCounters(SETTINGS, clock_ms=clock)
    resumed = _feed(mlog, again, state)
    publish(3, 3)  # 3 and 4 again, after the service's restart too; 5 new
    publish(0, 2, incarnation="b")  # a new numbering of the task (its checkpoint lost): new samples
    assert resumed.step() == 3 and again.written == 3 and resumed.duplicates == 2
    assert resumed.stats()["duplicates"] == 2
    resumed.close()
    # and for Prometheus (reloop_serve_feed_samples_total): both feeds of this process, added up
    exported = dict(STATS.serve_feed_samples.items())
    assert exported[("A", "counters", "written")] - before[0] == 5 + 3
    assert exported[("A", "counters", "duplicate")] - before[1] == 2 + 2


def test_the_saved_counts_are_loaded_before_the_feed_starts_not_on_its_thread(tmp_path) -> None:
    import threading

    saved = ServedCounters(SETTINGS)
    saved.rekey(_bundle())
    saved.positions = {"samples:0": 7}
    saved.save(tmp_path / "c.npz")
    release = threading.Event()

    class SlowSource(MemorySource):  # a broker slow to answer: the thread is stuck opening it
        def open(self, positions=None) -> None:
            release.wait(10)
            super().open(positions)

    mlog = MemoryLog()
    mlog.create("samples", 1)
    counters = ServedCounters(SETTINGS)
    feed = SamplesFeed(name="A", source=SlowSource(mlog, ["samples"]), target=counters,
                       holder=ModelHolder(_bundle()), state_path=tmp_path / "c.npz")  # fmt: skip
    feed.start()
    try:
        assert counters.positions == {"samples:0": 7}  # the first request reads the saved counts
    finally:
        release.set()
        feed.close()


class _LogSink:
    """An impression logger writing to a MemoryLog topic, as the arm's Kafka producer does."""

    def __init__(self, mlog: MemoryLog, topic: str) -> None:
        from reloop.engine.events.codec import encode

        self.sink, self.encode, self.impressions = MemorySink(mlog, topic), encode, []

    def log(self, impressions) -> int:
        self.impressions += impressions
        for imp in impressions:
            self.sink.send(self.encode(imp), key=imp.impression_id.encode())
        return len(impressions)


def test_processes_counting_the_impression_log_share_what_any_of_them_showed(tmp_path) -> None:
    """``shown_from: impressions``: two processes of one arm (workers, replicas) count what either showed,
    read back from the impression log, and serve exactly what one process counting its own requests
    would; the log's and the samples' positions are saved with the counts, in one state."""
    from reloop.engine.serve.config import ArmCountersConfig

    shared = ArmCountersConfig(fields=("user", "item"), windows_s=(600.0,), samples_topic="samples",
                               shown_from="impressions")  # fmt: skip
    mlog = MemoryLog()
    for topic in ("samples", "impressions"):
        mlog.create(topic, 2 if topic == "impressions" else 1)
    clock = _Clock()
    bundle = _bundle()
    procs = []
    for i in range(2):
        counters = ServedCounters(shared, clock_ms=clock)
        logger = _LogSink(mlog, "impressions")
        feed = SamplesFeed(name="A", source=MemorySource(mlog, ["samples", "impressions"]), target=counters,
                           holder=ModelHolder(bundle), state_path=tmp_path / f"c{i}.npz", poll_timeout_s=0,
                           shown_topic="impressions")  # fmt: skip
        feed.step()  # opens at the end of both topics
        procs.append((_service(bundle, counters, clock, logger), counters, feed, logger))
    # The reference: one process counting its requests (shown_from: requests), seeing both processes' traffic.
    ref = ServedCounters(SETTINGS, clock_ms=clock)
    ref_service = _service(bundle, ref, clock, _ListLogger())
    ref_feed = _feed(mlog, ref, None)
    ref_feed.step()

    def serve(k: int, user: str, items: range) -> None:
        procs[k][0].score(_request(user, items))
        ref_service.score(_request(user, items))
        for _, _, feed, _ in procs:
            feed.step()  # the log read back at once (live, tens of ms later: counted then)
        clock.ms += 1_000

    serve(0, "u1", range(5))
    serve(1, "u1", range(2, 7))
    serve(0, "u2", range(5))
    _publish(mlog, [("u1", "i3", 1)], 0, clock.ms)
    clock.ms += 1_000
    assert ref_feed.step() == 1
    for _, counters, feed, _ in procs:
        feed.step()
        assert counters.shown == 9 and counters.written == 1
    # Process 1 serves u1 what the reference would, though process 0 showed u1 three of the six items.
    probe = bundle.featurizer.transform([{"user": "u1", "item": f"i{j}"} for j in range(7)])
    expected = ref.fill(SPEC, probe, clock.ms)
    procs[1][0].score(_request("u1", range(7)))
    for imp in procs[1][3].impressions[-3:]:
        row = expected[int(imp.item_id[1:])]
        assert [imp.features[n] for n in ref.names] == pytest.approx(row.tolist(), rel=1e-6)
        assert imp.features["user#seen"] == pytest.approx(math.log1p(6) * 0.2, rel=1e-6)
    for _, _, feed, _ in procs:
        feed.step()
    ref.count_shown(
        SPEC,
        bundle.featurizer.transform(
            [{"user": "u1", "item": imp.item_id} for imp in procs[1][3].impressions[-3:]]
        ),
        clock.ms,
    )
    for _, counters, feed, _ in procs:
        assert np.allclose(counters.fill(SPEC, probe, clock.ms), ref.fill(SPEC, probe, clock.ms))
        feed.close()
    # Each saved state holds the counts with both topics' positions; a process started from either
    # resumes where it stopped: only impressions logged after that count.
    again = ServedCounters(shared, clock_ms=clock)
    resumed = SamplesFeed(name="A", source=MemorySource(mlog, ["samples", "impressions"]), target=again,
                          holder=ModelHolder(bundle), state_path=tmp_path / "c0.npz", poll_timeout_s=0,
                          shown_topic="impressions")  # fmt: skip
    resumed.step()
    assert again.shown == 0 and sorted(again.positions) == ["impressions:0", "impressions:1", "samples:0"]
    assert np.allclose(again.fill(SPEC, probe, clock.ms), ref.fill(SPEC, probe, clock.ms))
    resumed.close()


def test_the_impression_log_feed_skips_what_it_cannot_count_and_counts_the_rest() -> None:
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Impression
    from reloop.engine.serve.config import ArmCountersConfig

    shared = ArmCountersConfig(fields=("user", "item"), samples_topic="samples", shown_from="impressions")
    mlog = MemoryLog()
    for topic in ("samples", "impressions"):
        mlog.create(topic, 1)
    counters = ServedCounters(shared, clock_ms=_Clock())
    feed = SamplesFeed(name="A", source=MemorySource(mlog, ["samples", "impressions"]), target=counters,
                       holder=ModelHolder(_bundle()), poll_timeout_s=0,
                       shown_topic="impressions")  # fmt: skip
    feed.step()

    def imp(i: int, arm: str = "A", **extra: object) -> bytes:
        features = {"user": "u1", "item": "i1", **extra}
        return encode(Impression(f"m{i}", "r", "u1", "i1", features, 1, 0.5, 1, arm=arm))

    sink = MemorySink(mlog, "impressions")
    for value in (imp(0), b"{not json", imp(1, arm="B"), imp(2, **{"user#ctr": "high"}), imp(3)):
        sink.send(value)
    feed.step()
    assert counters.shown == 2 and feed.undecodable == 1 and feed.refused == 1
    assert feed.poll_max_records == 256 and _feed(mlog, counters, None).poll_max_records == 64
    feed.close()


class _NeverOpens(MemorySource):
    """A source whose broker is down: every open fails (the feed's thread retries)."""

    def open(self, positions=None) -> None:
        raise ConnectionError("broker down")


class _NoTopic(MemorySource):
    """A source whose samples topic is not created yet: every open says so (the feed waits for it)."""

    def open(self, positions=None) -> None:
        from reloop.engine.streams import TopicNotFound

        raise TopicNotFound("topic 'samples' does not exist")


class _SlowOpen(MemorySource):
    """A source whose open takes a while (connecting, asking for the ends)."""

    def open(self, positions=None) -> None:
        import time

        time.sleep(0.2)
        super().open(positions)


@pytest.mark.parametrize("broker_up", [True, False, "no topic"])
def test_serving_starts_once_the_impression_log_is_open_or_after_a_bounded_wait(
    tmp_path, monkeypatch, caplog, broker_up
) -> None:
    """With ``shown_from: impressions`` and no saved positions the feed opens at the log's end, so
    ``start`` waits for it before anything is shown; a broker down at start costs a bounded wait and a
    warning, not the service. The warning says why when the feed knows (a topic not created yet)."""
    import time

    from reloop.engine.serve import stack as stack_module
    from reloop.engine.serve.config import serve_config_from_dict

    monkeypatch.setattr(stack_module, "FEED_OPEN_WAIT_S", 0.5)
    mlog = MemoryLog()
    for topic in ("samples", "imp"):
        mlog.create(topic, 1)
    counters = {"fields": ["user", "item"], "samples_topic": "samples", "shown_from": "impressions"}
    arm = {"name": "A", "registry": str(tmp_path / "r"), "impressions_topic": "imp", "counters": counters,
           "cold_start": {"backbone": "lr", "spec": BASE.model_dump()}}  # fmt: skip
    config = serve_config_from_dict({"serve": {"port": 0}, "arms": [arm]})
    kind = {True: _SlowOpen, False: _NeverOpens, "no topic": _NoTopic}[broker_up]
    stack = stack_module.ServingStack(
        config,
        sink_factory=lambda a: MemorySink(mlog, a.impressions_topic),
        samples_source_factory=lambda a, topics: kind(mlog, topics),
    )
    t0 = time.monotonic()
    stack.start()
    waited = time.monotonic() - t0
    feed = stack.feeds["A counters"]
    try:
        assert feed.caught_up.is_set() is (broker_up is True)
        if broker_up is not True:
            assert waited >= 0.5
            said = "its feed (the samples topic and the impression log imp) is not read up to date after 0.5"
            assert said in caplog.text
            if broker_up == "no topic":
                assert "(waiting for a topic (topic 'samples' does not exist))" in caplog.text
                assert "broker down?" not in caplog.text
    finally:
        stack.close()


class _SlowPoll(MemorySource):
    """A source whose every poll takes 20 ms (a fetch from a broker), and that knows its partitions'
    ends, as a Kafka source does."""

    def poll(self, max_records, timeout_s):
        import time

        time.sleep(0.02)
        return super().poll(max_records, timeout_s)

    def end_positions(self):
        return {tp: len(self.log.read(tp, 0, 10**9)) for tp in self.partitions()}


def test_a_restarted_server_serves_once_it_has_read_what_was_shown_since_its_last_save(tmp_path) -> None:
    """Resuming from saved positions, the feed first reads the impressions logged after the last save
    (by the other workers, or by this one before it stopped); start() waits for that, so the first
    request is served whole counts."""
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Impression
    from reloop.engine.serve.config import serve_config_from_dict
    from reloop.engine.serve.stack import ServingStack

    mlog = MemoryLog()
    for topic in ("samples", "imp"):
        mlog.create(topic, 1)
    state = tmp_path / "c.npz"
    counters = {"fields": ["user", "item"], "samples_topic": "samples", "state_file": str(state)}
    arm = {"name": "A", "registry": str(tmp_path / "r"), "impressions_topic": "imp", "counters": counters,
           "cold_start": {"backbone": "lr", "spec": BASE.model_dump()}}  # fmt: skip
    config = serve_config_from_dict({"serve": {"port": 0}, "arms": [arm]})

    def stack() -> ServingStack:
        return ServingStack(
            config,
            sink_factory=lambda a: MemorySink(mlog, a.impressions_topic),
            samples_source_factory=lambda a, topics: _SlowPoll(mlog, topics),
        ).start()

    first = stack()
    first.close()  # saved: nothing counted, positions at the (empty) ends
    sink = MemorySink(mlog, "imp")
    for i in range(640):  # shown by another worker meanwhile: 10 polls of the feed's 64
        sink.send(
            encode(Impression(f"m{i}", "r", "u1", "i1", {"user": "u1", "item": "i1"}, 1, 0.5, 1, arm="A"))
        )
    again = stack()
    try:
        assert again.arms["A"].counters.shown == 640  # read before start() returned
    finally:
        again.close()


def test_switching_shown_from_reads_the_impression_log_from_its_end_and_back_drops_its_positions(
    tmp_path, caplog
) -> None:
    """A state saved while the arm counted its requests names no impression log: switched to
    ``impressions``, the feed reads the log from its end (from its beginning it would count the log's
    whole retention as shown now). Switched back, the log's saved positions are left out, not refused."""
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Impression
    from reloop.engine.serve.config import ArmCountersConfig

    mlog = MemoryLog()
    for topic in ("samples", "imp"):
        mlog.create(topic, 1)
    state = tmp_path / "c.npz"
    sink = MemorySink(mlog, "imp")

    def shown(i: int) -> bytes:
        return encode(Impression(f"m{i}", "r", "u1", "i1", {"user": "u1", "item": "i1"}, 1, 0.5, 1, arm="A"))

    def feed(shown_from: str) -> SamplesFeed:
        settings = ArmCountersConfig(fields=("user", "item"), samples_topic="samples", shown_from=shown_from)
        topics = ["samples", "imp"] if shown_from == "impressions" else ["samples"]
        return SamplesFeed(name="A", source=_SlowPoll(mlog, topics), target=ServedCounters(settings),
                           holder=ModelHolder(_bundle()), state_path=state, poll_timeout_s=0,
                           shown_topic="imp" if shown_from == "impressions" else None)  # fmt: skip

    local = feed("requests")
    local.step()
    local.close()  # state: the samples topic's position only
    for i in range(50):
        sink.send(shown(i))  # the arm's log, while it counted its requests
    logged = feed("impressions")
    logged.step()
    assert logged.target.shown == 0 and logged.caught_up.is_set()
    sink.send(shown(50))
    logged.step()
    assert logged.target.shown == 1
    logged.close()  # state: both topics' positions
    again = feed("requests")
    again.step()
    assert again.caught_up.is_set() and "saved positions of ['imp'] left out" in caplog.text
    again.close()


class _LateBroker(_SlowPoll):
    """A source whose broker is down for its first open, and that can say where a time starts in its
    partitions (as the Kafka sources' ``positions_at``)."""

    opens = 0

    def open(self, positions=None) -> None:
        type(self).opens += 1
        if type(self).opens == 1:
            raise ConnectionError("broker down")
        super().open(positions)

    def positions_at(self, timestamp_ms: int):
        out = {}
        for tp in self.partitions():
            records = self.log.read(tp, 0, 10**9)
            out[tp] = next((r.offset for r in records if r.timestamp_ms >= timestamp_ms), len(records))
        return out


def test_a_fresh_feed_counts_the_impression_log_from_its_creation_however_late_it_opens() -> None:
    """Shown while the feed could not open (the broker down at start, the topic made by the first
    impression): still counted once it opens; what was logged before the feed was made is not."""
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Impression
    from reloop.engine.serve.config import ArmCountersConfig

    shared = ArmCountersConfig(fields=("user", "item"), samples_topic="samples")
    mlog = MemoryLog()
    for topic in ("samples", "imp"):
        mlog.create(topic, 1)
    sink = MemorySink(mlog, "imp")

    def shown(i: int, at_ms: int) -> None:
        imp = Impression(f"m{i}", "r", "u1", "i1", {"user": "u1", "item": "i1"}, at_ms, 0.5, 1, arm="A")
        sink.send(encode(imp), timestamp_ms=at_ms)

    counters = ServedCounters(shared, clock_ms=_Clock())
    feed = SamplesFeed(name="A", source=_LateBroker(mlog, ["samples", "imp"]), target=counters,
                       holder=ModelHolder(_bundle()), poll_timeout_s=0, shown_topic="imp")  # fmt: skip
    shown(0, feed.created_ms - 60_000)  # before the feed was made: another life's
    with pytest.raises(ConnectionError):
        feed.step()  # the broker is down: the feed's thread retries
    shown(1, feed.created_ms)
    shown(2, feed.created_ms + 5)
    feed.step()
    assert counters.shown == 2 and feed.caught_up.is_set()
    feed.close()


def test_the_feed_exports_how_far_it_is_behind_each_topic() -> None:
    """``reloop_serve_feed_lag_records{arm, target, topic}``: the log end minus the feed's position, summed
    over the topic's partitions (ReloopServeFeedBehind alerts on it)."""
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Impression
    from reloop.engine.metrics.stats import STATS
    from reloop.engine.serve.config import ArmCountersConfig

    shared = ArmCountersConfig(fields=("user", "item"), samples_topic="samples")
    mlog = MemoryLog()
    mlog.create("samples", 1)
    mlog.create("imp", 2)
    feed = SamplesFeed(name="lagged", source=_SlowPoll(mlog, ["samples", "imp"]),
                       target=ServedCounters(shared, clock_ms=_Clock()), holder=ModelHolder(_bundle()),
                       poll_timeout_s=0, shown_topic="imp")  # fmt: skip
    feed.step()  # opens
    sink = MemorySink(mlog, "imp")
    for i in range(300):
        imp = Impression(f"m{i}", "r", "u1", "i1", {"user": "u1", "item": "i1"}, 1, 0.5, 1, arm="lagged")
        sink.send(encode(imp), key=f"m{i}".encode(), partition=i % 2)
    feed._lag_at = float("-inf")  # due now
    feed.step()  # reads 256 of the 300
    assert feed.target.shown == 256
    assert STATS.serve_feed_lag.get("lagged", "counters", "imp") == 44.0
    assert STATS.serve_feed_lag.get("lagged", "counters", "samples") == 0.0
    feed.close()


def test_a_feed_waiting_for_its_topic_says_so_in_one_line_a_try(tmp_path, caplog) -> None:
    # A samples topic not created yet (or misnamed: docs/models.md's example named "samples") logged a
    # full traceback at every back-off, while the arm served on.
    import logging
    import time

    from reloop.engine.streams import TopicNotFound

    class Missing(MemorySource):
        def poll(self, max_records=None, timeout_s=0.0):
            raise TopicNotFound("Kafka topic 'samples' does not exist")

    mlog = MemoryLog()
    mlog.create("samples", 1)
    feed = SamplesFeed(name="A", source=Missing(mlog, ["samples"]), target=ServedCounters(SETTINGS),
                       holder=ModelHolder(_bundle()), poll_timeout_s=0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="reloop"):
        feed.start()
        deadline = time.monotonic() + 10
        while feed.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        feed.close()
    assert feed.failures >= 3
    # Once a minute, not at every 1-s retry (a service started before the trainer logged 100 lines in 40 s).
    [record] = [r for r in caplog.records if "feed" in r.getMessage() or "topic" in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert "waiting for a topic (Kafka topic 'samples' does not exist)" in record.getMessage()
