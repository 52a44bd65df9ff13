"""The scoring service over HTTP with the real Kafka broker: what it returns is what it logs;
hot reload under concurrent requests fails none; a Kafka outage fails none."""

from __future__ import annotations

import functools
import threading
import time

import httpx
import numpy as np
import pytest
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.local_broker import free_port
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.events.codec import decode_impression
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import build_learner
from reloop.engine.serve.config import ServeConfig
from reloop.engine.serve.stack import ServingStack
from reloop.engine.simulate.spec import world_spec_dict
from reloop.engine.simulate.world import World, WorldConfig

pytestmark = pytest.mark.kafka

WORLD = World(WorldConfig(seed=0, n_candidates=30))


@functools.cache
def _body(i: int) -> dict:
    req = WORLD.sample_request(float(i))
    ctx = WORLD.context_features(req)
    return {
        "request_id": f"req-{i}",
        "user_id": ctx["user_id"],
        "context": ctx,
        "candidates": [
            {"item_id": World.item_id(it), "features": WORLD.item_features(it)}
            for it in req.candidates.tolist()
        ],
        "top_k": 5,
    }


class Trainer:
    """Publishes snapshots of a (really trained) FM learner, as the streaming trainer would."""

    def __init__(self, root, *, bundle: bool = False) -> None:
        self.bundle = bundle  # also write the serving bundle before each snapshot, as Pipeline.snapshot does
        self.spec = FeatureSpec.from_dict(world_spec_dict(id_buckets=512))
        self.learner = build_learner("fm", self.spec, "ce", 0.0, seed=0, embedding_dim=4)
        self.registry = SnapshotRegistry(root, keep=3)
        self.rng = np.random.default_rng(0)

    def publish(self) -> int:
        rows = [
            {**c["features"], **_body(int(self.rng.integers(1000)))["context"]}
            for c in _body(0)["candidates"]
        ]
        self.learner.learn(
            Featurizer(self.spec).transform(rows), (self.rng.random(len(rows)) < 0.3).astype(float)
        )
        if self.bundle:
            from reloop.engine.serve.bundle_format import publish_serving_bundle

            publish_serving_bundle(self.registry, self.learner)
        return self.registry.publish({"learner": self.learner.state_dict()}, meta={})


def _stack(tmp_path, bootstrap: str, topic: str, shutdown_timeout_s: float = 20.0, **log) -> ServingStack:
    """The service with impression logging on (kafka.client: confluent unless ``client=``)."""
    client = log.pop("client", "confluent")
    config = ServeConfig.model_validate(
        {
            "arms": [{"name": "A", "registry": str(tmp_path / "reg"), "impressions_topic": topic}],
            "kafka": {"bootstrap": bootstrap, "client": client},
            "reload_interval_s": 0.05,
            "shutdown_timeout_s": shutdown_timeout_s,
            "log": log,
        }
    )
    return ServingStack(config).start()


def _read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0):
    source = KafkaSource(bootstrap=bootstrap, topics=[topic])
    source.open()
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        out.extend(source.poll(1000, 0.2))
    # One more short poll: more than expected would be a bug too.
    out.extend(source.poll(1000, 0.5))
    source.close()
    return out


def test_logged_impressions_are_exactly_the_served_ranking(kafka_broker, unique_topic, tmp_path):
    topic = unique_topic("impressions")
    create_topics(kafka_broker.bootstrap, {topic: 2})
    Trainer(tmp_path / "reg").publish()
    stack = _stack(tmp_path, kafka_broker.bootstrap, topic)
    url = stack.serve_in_thread(port=0)
    with httpx.Client(base_url=url) as client:
        assert client.get("/readyz").status_code == 200
        responses = [client.post("/score", json=_body(i)).json() for i in range(40)]
    stack.close()
    records = _read_all(kafka_broker.bootstrap, topic, 40 * 5)
    logged = {}
    for r in records:
        imp = decode_impression(r.value)
        assert r.key == imp.impression_id.encode() and r.timestamp_ms == imp.event_time_ms
        assert imp.impression_id not in logged
        logged[imp.impression_id] = imp
    served = {}
    for i, resp in enumerate(responses):
        body = _body(i)
        feats = {c["item_id"]: {**body["context"], **c["features"]} for c in body["candidates"]}
        scores = {s["item_id"]: s["score"] for s in resp["scores"]}
        assert [x["item_id"] for x in resp["ranking"]] == sorted(scores, key=lambda k: -scores[k])[:5]
        for x in resp["ranking"]:
            served[x["impression_id"]] = (
                x["score"],
                resp["model_version"],
                resp["arm"],
                body["request_id"],
                body["user_id"],
                x["item_id"],
                feats[x["item_id"]],
            )
    assert set(logged) == set(served)
    for imp_id, (score, version, arm, req_id, user, item, features) in served.items():
        imp = logged[imp_id]
        assert (imp.served_prediction, imp.model_version, imp.arm) == (score, version, arm)
        assert (imp.request_id, imp.user_id, imp.item_id, imp.features) == (req_id, user, item, features)


@pytest.mark.parametrize("bundle", [False, True], ids=["snapshot", "serving-bundle"])
def test_hot_reload_under_concurrent_requests_fails_nothing(kafka_broker, unique_topic, tmp_path, bundle):
    topic = unique_topic("impressions")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    trainer = Trainer(tmp_path / "reg", bundle=bundle)
    trainer.publish()
    stack = _stack(tmp_path, kafka_broker.bootstrap, topic)
    url = stack.serve_in_thread(port=0)
    stop = threading.Event()
    failures: list[str] = []
    seen: dict[int, list[int]] = {}
    shown: dict[str, int] = {}
    lock = threading.Lock()

    def client(tid: int) -> None:
        versions = seen.setdefault(tid, [])
        with httpx.Client(base_url=url, timeout=10) as http:
            i = 0
            while not stop.is_set():
                try:
                    r = http.post("/score", json=_body(tid * 10_000 + i))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                i += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                body = r.json()
                versions.append(body["model_version"])
                with lock:
                    shown.update({x["impression_id"]: body["model_version"] for x in body["ranking"]})

    refused: list[int] = []

    def hostile() -> None:
        """Oversized requests at the same time: each refused (413 / 422), none disturbs the others."""
        too_big = b'{"request_id":"r","user_id":"u","candidates":[' + b'{"item_id":"x"},' * 200_000 + b"]}"
        too_many = {**_body(0), "candidates": [{"item_id": f"i{j}"} for j in range(3000)]}
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                r = http.post("/score", content=too_big, headers={"content-type": "application/json"})
                refused.append(r.status_code)
                refused.append(http.post("/score", json=too_many).status_code)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(3)]
    threads.append(threading.Thread(target=hostile))
    for t in threads:
        t.start()
    published = [1]
    for _ in range(5):
        time.sleep(0.4)
        published.append(trainer.publish())
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join()
    stack.close()
    assert failures == []
    assert refused and set(refused[0::2]) == {413} and set(refused[1::2]) == {422}
    assert stack.arms["A"].holder.version == published[-1]
    for versions in seen.values():
        assert versions == sorted(versions)
    assert len({v for vs in seen.values() for v in vs}) >= 3  # the swaps happened while clients ran
    records = _read_all(kafka_broker.bootstrap, topic, len(shown))
    logged = {
        imp.impression_id: imp.model_version for imp in map(decode_impression, (r.value for r in records))
    }
    assert logged == shown  # every impression carries the version that scored it


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_kafka_outage_fails_no_request(tmp_path, client):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: the broker is down for the whole test
    Trainer(tmp_path / "reg").publish()
    # Closing waits out shutdown_timeout_s with Kafka down (tests/unit/serve/test_stack_close.py): short.
    stack = _stack(
        tmp_path, dead, "impressions", shutdown_timeout_s=2.0, max_buffer=50, batch_size=10, client=client
    )
    url = stack.serve_in_thread(port=0)
    with httpx.Client(base_url=url, timeout=10) as client:
        codes = [client.post("/score", json=_body(i)).status_code for i in range(60)]
        stats = client.get("/stats").json()["arms"]["A"]
    assert codes == [200] * 60
    assert stats["impressions_accepted"] + stats["impressions_dropped"] == 60 * 5
    assert stats["impressions_dropped"] >= 60 * 5 - 50 - 10
    assert stats["impressions_sent"] == 0
    stack.close()


def test_undeliverable_impressions_are_dropped_and_counted_not_retried_for_ever(kafka_broker, unique_topic):
    """A 10 MB impression and one stamped 2 h in the future (the broker refuses both) used to go back to
    the front of the buffer for ever: 3,000 pending, 0 sent. Now they are dropped with a reason and
    everything around them is delivered."""
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Impression
    from reloop.engine.serve.impression_log import ImpressionLogger
    from reloop.engine.serve.stack import LazySink

    topic = unique_topic("impressions")
    create_topics(kafka_broker.bootstrap, {topic: 1})

    def make():
        from reloop.connectors.kafka.sink import KafkaSink

        return KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topic, client_config={"max_block_ms": 5000})

    now = int(time.time() * 1000)

    def imp(i: int, **kw) -> Impression:
        fields = {"features": {"x": str(i)}, "event_time_ms": now, **kw}
        return Impression(
            impression_id=f"imp{i}",
            request_id="r",
            user_id="u",
            item_id=f"i{i}",
            served_prediction=0.5,
            model_version=1,
            **fields,
        )

    logger = ImpressionLogger(
        sink=LazySink(make), encode=encode, batch_size=500, retry_backoff_s=0.05
    ).start()
    batch = [imp(i) for i in range(3000)]
    batch[700] = imp(700, features={"blob": "x" * 10_000_000})
    batch[1900] = imp(1900, event_time_ms=now + 2 * 3_600_000)
    logger.log(batch)
    deadline = time.monotonic() + 120
    while logger.sent + logger.dropped < 3000 and time.monotonic() < deadline:
        time.sleep(0.1)
    logger.close()
    assert logger.sent == 2998 and logger.pending == 0
    assert logger.dropped_by_reason == {"oversized": 1, "rejected": 1}
    src = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    src.open()
    keys: set[bytes] = set()
    deadline = time.monotonic() + 30
    while len(keys) < 2998 and time.monotonic() < deadline:
        keys |= {r.key for r in src.poll(5000, 0.5)}
    src.close()
    assert keys == {f"imp{i}".encode() for i in range(3000) if i not in (700, 1900)}


def test_confluent_logger_drops_and_counts_what_kafka_refuses_and_delivers_the_rest(
    kafka_broker, unique_topic
):
    """The same hostile pair as above through the default (confluent) logger: a 10 MB impression is
    dropped before it is queued, one stamped 2 h ahead is refused by the broker and counted; every
    other impression is delivered."""
    from reloop.engine.events.schema import Impression
    from reloop.engine.serve.config import ServeConfig
    from reloop.engine.serve.stack import confluent_logger

    topic = unique_topic("impressions")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    config = ServeConfig.model_validate(
        {
            "arms": [{"name": "A", "registry": "/nonexistent", "impressions_topic": topic}],
            "kafka": {"bootstrap": kafka_broker.bootstrap},
        }
    )
    logger = confluent_logger(config, config.arms[0]).start()
    now = int(time.time() * 1000)

    def imp(i: int, **kw) -> Impression:
        fields = {"features": {"x": str(i)}, "event_time_ms": now, **kw}
        return Impression(
            impression_id=f"imp{i}",
            request_id="r",
            user_id="u",
            item_id=f"i{i}",
            served_prediction=0.5,
            model_version=1,
            **fields,
        )

    batch = [imp(i) for i in range(3000)]
    batch[700] = imp(700, features={"blob": "x" * 10_000_000})
    batch[1900] = imp(1900, event_time_ms=now + 2 * 3_600_000)
    began = time.perf_counter()
    for i in range(0, 3000, 10):
        logger.log(batch[i : i + 10])
    assert time.perf_counter() - began < 1.0  # the request path never waits
    deadline = time.monotonic() + 60
    while logger.sent + logger.dropped < 3000 and time.monotonic() < deadline:
        time.sleep(0.1)
    logger.close()
    assert logger.sent == 2998 and logger.pending == 0
    assert logger.dropped_by_reason == {"oversized": 1, "rejected": 1}
    src = KafkaSource(bootstrap=kafka_broker.bootstrap, topics=[topic])
    src.open()
    keys: set[bytes] = set()
    deadline = time.monotonic() + 30
    while len(keys) < 2998 and time.monotonic() < deadline:
        keys |= {r.key for r in src.poll(5000, 0.5)}
    src.close()
    assert keys == {f"imp{i}".encode() for i in range(3000) if i not in (700, 1900)}


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_memory_feed_reads_with_the_kafka_client_from_the_log_end(kafka_broker, unique_topic, client):
    """arms[].memory's samples source is kafka.client's (the one kafka section of the service), opened at
    the log end the way the feed opens it, and reads what comes after."""
    from reloop.connectors.kafka.sink import KafkaSink
    from reloop.engine.serve.stack import kafka_samples_source_factory

    topic = unique_topic("samples")
    create_topics(kafka_broker.bootstrap, {topic: 1})
    sink = KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topic)
    sink.send(b"before", key=b"k")
    sink.flush(timeout_s=10)
    # A producer setting (the impression log's) made kafka-python's consumer refuse to start, retried for
    # as long as the service ran.
    linger = {"kafka-python": {"linger_ms": 5}, "confluent": {"linger.ms": 5}}[client]
    config = ServeConfig.model_validate(
        {
            "arms": [{"name": "A", "registry": "/nonexistent", "memory": {"samples_topic": topic}}],
            "kafka": {"bootstrap": kafka_broker.bootstrap, "client": client, "client_config": linger},
        }
    )
    source = kafka_samples_source_factory(config)(config.arms[0], [topic])
    assert type(source).__name__ == {"confluent": "ConfluentSource", "kafka-python": "KafkaSource"}[client]
    source.open(None)
    source.open(source.end_positions())
    sink.send(b"after", key=b"k")
    sink.flush(timeout_s=10)
    got: list = []
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        got += source.poll(100, 0.2)
    source.close()
    sink.close()
    assert [r.value for r in got] == [b"after"]


def counted_arm(tmp_path, impressions: str, samples: str, **counters) -> dict:
    """Arm A of a cold-start FM on the simulated world's spec, with counters of its user and item
    (``counters``: more of ``arms[].counters``; the state file in ``tmp_path``)."""
    return {
        "name": "A",
        "registry": str(tmp_path / "reg"),
        "impressions_topic": impressions,
        "cold_start": {
            "backbone": "fm",
            "spec": world_spec_dict(id_buckets=512),
            "params": {"embedding_dim": 4},
        },
        "counters": {
            "fields": ["user_id", "item_id"],
            "samples_topic": samples,
            "state_file": str(tmp_path / "counters.npz"),
            **counters,
        },
    }


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_an_arm_with_counters_logs_the_values_it_served_and_counts_clicks_once_across_a_restart(
    kafka_broker, unique_topic, tmp_path, client
):
    """arms[].counters on the real broker, counting the requests it answers (``shown_from: requests``):
    the impression log carries each item's counter inputs as served; the clicks of the samples topic are
    counted (a re-emitted one once), and the counts come back after a restart before the first request
    is scored."""
    from reloop.connectors.kafka.sink import KafkaSink
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
    from reloop.engine.events.schema import LabeledSample

    impressions, samples = unique_topic("impressions"), unique_topic("samples")
    create_topics(kafka_broker.bootstrap, {impressions: 1, samples: 1})
    config = ServeConfig.model_validate(
        {
            "arms": [counted_arm(tmp_path, impressions, samples, shown_from="requests", save_every_s=0.2)],
            "kafka": {"bootstrap": kafka_broker.bootstrap, "client": client},
        }
    )
    body = _body(0)

    def score(url: str, request: dict) -> dict:
        with httpx.Client(base_url=url) as http:
            return http.post("/score", json=request).json()

    stack = ServingStack(config).start()
    url = stack.serve_in_thread(port=0)  # one server per stack: close() stops the one it started
    first = score(url, body)
    counters = stack.arms["A"].counters
    top = first["ranking"][0]["item_id"]
    # Later requests: the five items shown first, all shown again.
    shown = {x["item_id"] for x in first["ranking"]}
    body = {**body, "candidates": [c for c in body["candidates"] if c["item_id"] in shown]}
    features = {**body["context"], **next(c["features"] for c in body["candidates"] if c["item_id"] == top)}
    clicked = [LabeledSample("s0", features, 1, served_prediction=0.5, served_version=0, event_time_ms=1)]
    sink = KafkaSink(bootstrap=kafka_broker.bootstrap, topic=samples)
    deadline = time.monotonic() + 20
    while stack.feeds["A counters"].target.positions == {} and time.monotonic() < deadline:
        time.sleep(0.05)  # the feed opens at the end of the topic: publish once it is there
    for _ in range(2):  # the second: the same sample, as a join task resumed from its checkpoint sends it
        sink.send(encode_batch(batch_from_samples(clicked, task=0, first_seq=0)), key=b"0")
    sink.flush(timeout_s=10)
    sink.close()
    while counters.written < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # (the duplicate is read too)
    assert counters.written == 1 and stack.feeds["A counters"].duplicates == 1
    score(url, body)
    stack.close()

    again = ServingStack(config).start()
    score(again.serve_in_thread(port=0), body)
    again.close()
    logged = [decode_impression(r.value) for r in _read_all(kafka_broker.bootstrap, impressions, 15)]
    assert len(logged) == 15
    by_request = [logged[i : i + 5] for i in (0, 5, 10)]
    # The user was shown 0, 5, then 10 items, each item 0, 1, then 2 times (the last request after the
    # restart: the counts came back before it was scored).
    for k, part in enumerate(by_request):
        assert {imp.item_id for imp in part} == shown
        assert part[0].features["user_id#seen"] == pytest.approx(np.log1p(5 * k) * 0.2, rel=1e-5)
        assert [imp.features["item_id#seen"] for imp in part] == pytest.approx(
            [np.log1p(k) * 0.2] * 5, rel=1e-5
        )
        ctr = {imp.item_id: imp.features["item_id#ctr"] for imp in part}
        others = max(v for item, v in ctr.items() if item != top)
        # the clicked item reads a higher rate than the others once its click is counted, not before
        assert ctr[top] > others if k else ctr[top] == others


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_two_servers_of_an_arm_counting_its_impression_log_count_what_either_showed(
    kafka_broker, unique_topic, tmp_path, client
):
    """arms[].counters.shown_from: impressions on the real broker: two servers of one arm (two workers
    or replicas) each count every impression either logged, read back from the impression log's
    partitions, so a user served by the second is served the counts of what the first showed; one state
    file serves both and a server started from it resumes where the last save stopped."""
    impressions, samples = unique_topic("impressions"), unique_topic("samples")
    create_topics(kafka_broker.bootstrap, {impressions: 2, samples: 1})
    config = ServeConfig.model_validate(
        {
            "arms": [counted_arm(tmp_path, impressions, samples, shown_from="impressions", save_every_s=0.2)],
            "kafka": {"bootstrap": kafka_broker.bootstrap, "client": client},
            "workers": 2,
            "log": {"linger_s": 0.0},
        }
    )
    body = _body(0)
    stacks = [ServingStack(config).start() for _ in range(2)]
    feeds = [s.feeds["A counters"] for s in stacks]
    # start() returns once each feed is open at the end of both topics: nothing shown after is missed
    assert all(f.caught_up.is_set() for f in feeds)
    urls = [s.serve_in_thread(port=0) for s in stacks]

    def score(k: int, request: dict) -> dict:
        with httpx.Client(base_url=urls[k]) as http:
            return http.post("/score", json=request).json()

    def counted(n: int) -> None:
        end = time.monotonic() + 30
        while any(f.target.shown < n for f in feeds) and time.monotonic() < end:
            time.sleep(0.05)
        assert [f.target.shown for f in feeds] == [n, n]

    first = score(0, body)
    counted(5)  # both servers counted the first's five impressions
    # Later requests: the five items shown first, all shown again.
    shown = {x["item_id"] for x in first["ranking"]}
    body = {**body, "candidates": [c for c in body["candidates"] if c["item_id"] in shown]}
    score(1, body)
    counted(10)
    score(0, body)
    counted(15)
    for s in stacks:
        s.close()
    logged = [decode_impression(r.value) for r in _read_all(kafka_broker.bootstrap, impressions, 15)]
    assert len(logged) == 15
    by_request = sorted(logged, key=lambda imp: imp.features["user_id#seen"])
    for k in range(3):  # the second request (served by the other server) read the first's five too
        part = by_request[5 * k : 5 * k + 5]
        assert [imp.features["user_id#seen"] for imp in part] == pytest.approx(
            [np.log1p(5 * k) * 0.2] * 5, rel=1e-5
        )
        assert {imp.item_id for imp in part} == shown
        assert [imp.features["item_id#seen"] for imp in part] == pytest.approx(
            [np.log1p(k) * 0.2] * 5, rel=1e-5
        )

    # A server started later loads the last save: the counts of all 15, positions past them.
    again = ServingStack(config).start()
    try:
        deadline = time.monotonic() + 20
        feed = again.feeds["A counters"]
        while feed.target.counters is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the saved counts are laid out by the first model's spec
        time.sleep(0.5)  # (nothing more to read)
        assert feed.target.shown == 0 and feed.target.counters.total_shown == 15
    finally:
        again.close()


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_a_source_says_where_a_time_starts_in_each_partition(kafka_broker, unique_topic, client):
    """``positions_at``: the first offset stamped at or after a time, or the log end (a fresh counters
    feed opens the impression log there)."""
    from reloop.connectors.confluent.source import ConfluentSource
    from reloop.connectors.kafka.sink import KafkaSink
    from reloop.engine.streams import TopicPartition

    topic = unique_topic("stamped")
    create_topics(kafka_broker.bootstrap, {topic: 2})
    t0 = 1_700_000_000_000
    sink = KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topic)
    for partition, stamps in ((0, (t0 - 1000, t0, t0 + 1000)), (1, (t0 - 5000,))):
        for ts in stamps:
            sink.send(b"x", key=b"k", timestamp_ms=ts, partition=partition)
    sink.flush(timeout_s=10)
    sink.close()
    kind = ConfluentSource if client == "confluent" else KafkaSource
    source = kind(bootstrap=kafka_broker.bootstrap, topics=[topic])
    try:
        p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        assert source.positions_at(t0) == {p0: 1, p1: 1}  # partition 1: nothing that recent, its end
        assert source.positions_at(t0 + 1) == {p0: 2, p1: 1}
        assert source.positions_at(0) == {p0: 0, p1: 0}
        assert source.positions_at(t0 + 60_000) == {p0: 3, p1: 1}
    finally:
        source.close()
