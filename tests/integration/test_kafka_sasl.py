"""The Kafka SASL settings of a run config (kafka.security_protocol, sasl_mechanism, sasl_username,
sasl_password) against a real broker that requires them: a LocalBroker whose client listener is
SASL_PLAINTEXT with mechanism PLAIN. Every client is built from the run config the way the engine builds
it (``kafka.connection(client)``, ``consumer_client_config()``, ``producer_client_config()``)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from kafka.errors import KafkaError
from reloop.connectors.confluent.admin import ensure_topic_like as confluent_ensure_topic_like
from reloop.connectors.confluent.sink import ConfluentSink
from reloop.connectors.confluent.source import ConfluentSource
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.admin import ensure_topic_like as kafka_ensure_topic_like
from reloop.connectors.kafka.local_broker import BrokerError, LocalBroker, _metadata_ok
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.checkpoint import SnapshotRegistry
from reloop.engine.runtime.config import RunConfig, load_config
from reloop.engine.runtime.synthetic import generate
from reloop.engine.streams import AuthenticationFailed

from .test_run_kafka import (
    PERIOD,
    _config,
    _kill_leftover_processors,  # noqa: F401 - autouse: no `reloop run` outlives a test
    _now_ms,
    _start,
    _stop,
    _topics,
    _wait_trained,
)

pytestmark = pytest.mark.kafka

USER = "reloop-sasl"
PASSWORD = "s3cret-Pw.1"
WRONG = "wrong-password"
AUTH_FAILED = "Authentication failed: Invalid username or password"  # the broker's words, both clients
# kafka-python with a wrong password: the broker's SaslAuthenticate error response reaches the client on
# only some attempts (on the others the connection just closes: "socket disconnected"; measured ~40%
# auth errors here). Reconnecting every <=0.3 s gives a bootstrap window enough attempts that one of
# them carries the authentication error (kafka-python's default backoff grows to 30 s).
RETRY_FAST = {"reconnect_backoff_max_ms": 300}


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory, unavailable) -> Iterator[LocalBroker]:
    """A LocalBroker that takes only SASL/PLAIN clients (user USER, password PASSWORD)."""
    broker = LocalBroker(tmp_path_factory.mktemp("kafka-sasl"), sasl_plain=(USER, PASSWORD))
    yield from started(broker, "SASL", unavailable)


def started(broker: LocalBroker, kind: str, unavailable: Callable[[str], NoReturn]) -> Iterator[LocalBroker]:
    """``broker`` started for a module's tests and stopped after them; one that does not start is
    ``unavailable`` (conftest: a failure with CI=true, a skip elsewhere)."""
    try:
        broker.start()
    except (BrokerError, OSError) as exc:
        broker.stop()
        unavailable(f"the local {kind} Kafka broker did not start: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


def _sasl(broker: LocalBroker, client: str = "kafka-python", password: str = PASSWORD, **extra) -> dict:
    """The kafka section of a run config for ``broker``."""
    return {
        "bootstrap": broker.bootstrap,
        "client": client,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_username": USER,
        "sasl_password": password,
        **extra,
    }


def _run_config(tmp: Path, broker: LocalBroker, topics: dict[str, str], **overrides: dict) -> Path:
    """test_run_kafka's run config (a small DCN, fast join settings) for ``broker``."""
    return _config(tmp, broker.bootstrap, topics, "correct", **overrides)


def test_broker_requires_sasl(sasl_broker: LocalBroker) -> None:
    """The client listener is SASL only (no PLAINTEXT way in): what the other tests prove needs it."""
    props = sasl_broker.config_path.read_text()
    assert sasl_broker.config_path.stat().st_mode & 0o077 == 0  # the users' passwords: owner-only
    assert f"listeners=SASL_PLAINTEXT://{sasl_broker.bootstrap},CONTROLLER://" in props
    assert f"advertised.listeners=SASL_PLAINTEXT://{sasl_broker.bootstrap}\n" in props
    ok, detail = _metadata_ok(sasl_broker.bootstrap, timeout_s=2.0)
    assert not ok, detail
    ok, detail = _metadata_ok(
        sasl_broker.bootstrap, timeout_s=10.0, client_config=sasl_broker.client_settings
    )
    assert ok, detail


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_records_round_trip_with_sasl(sasl_broker: LocalBroker, unique_topic, tmp_path: Path, client) -> None:
    """Admin (create topics), sink and source of ``client``, each from the run config's connection."""
    topics = _topics(unique_topic)
    cfg: RunConfig = load_config(
        _run_config(tmp_path, sasl_broker, topics, kafka=_sasl(sasl_broker, client)), {}
    )
    bootstrap, topic, derived = cfg.kafka.bootstrap, topics["impressions"], topics["samples"]
    # The engine's admin calls: create_topics (kafka-python) and ensure_topic_like (each client's, as
    # `reloop run` creates the samples topic like the impressions topic).
    assert create_topics(bootstrap, {topic: 2}, client_config=cfg.kafka.connection("kafka-python")) == [topic]
    if client == "confluent":
        Sink, Source = ConfluentSink, ConfluentSource  # noqa: N806 - classes
        confluent_ensure_topic_like(cfg.kafka.connection(), bootstrap, derived, like=topic)
    else:
        Sink, Source = KafkaSink, KafkaSource  # noqa: N806 - classes
        kafka_ensure_topic_like(cfg.kafka.connection(), bootstrap, derived, like=topic)

    sent = [(b"k%d" % i, b"v%d" % i) for i in range(50)]
    for name in (topic, derived):
        sink = Sink(bootstrap=bootstrap, topic=name, client_config=cfg.producer_client_config())
        for key, value in sent:
            sink.send(value, key=key, timestamp_ms=_now_ms())
        sink.close()

    for name in (topic, derived):
        source = Source(bootstrap=bootstrap, topics=[name], client_config=cfg.consumer_client_config())
        assert len(source.partitions()) == 2, "ensure_topic_like copies the partition count"
        got = received(source, len(sent))
        assert sorted((r.key, r.value) for r in got) == sorted(sent), name


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_reloop_run_trains_over_sasl(sasl_broker: LocalBroker, unique_topic, tmp_path: Path, client) -> None:
    """`reloop run` (join + train stages on ``client``) with only the config's SASL settings: it creates
    the samples topic, joins, trains every sample and writes snapshots; the password is in none of its
    output (log, snapshots, manifests)."""
    topics = _topics(unique_topic)
    config = _run_config(tmp_path, sasl_broker, topics, kafka=_sasl(sasl_broker, client))
    run_trains_and_keeps_the_secret(config, topics, sasl_broker.bootstrap, tmp_path, PASSWORD)


def run_trains_and_keeps_the_secret(
    config: dict, topics: dict, bootstrap: str, tmp_path: Path, secret: str
) -> None:
    """A synthetic log written to ``topics`` over ``config``'s own connection; `reloop run` with ``config``
    trains every sample, writes snapshots, stops with 0, and ``secret`` is in none of its output (log,
    snapshots, manifests)."""
    synth = generate(PERIOD * 2, seed=5, policy="correct", pad_to_multiple=PERIOD, start_ms=_now_ms())
    connection = load_config(config, env={}).kafka.connection("kafka-python")
    create_topics(bootstrap, {t: 1 for k, t in topics.items() if k != "samples"}, client_config=connection)
    sinks = {
        kind: KafkaSink(bootstrap=bootstrap, topic=topics[kind + "s"], client_config=connection)
        for kind in ("impression", "click")
    }
    for r in synth.records:
        sinks[r.topic_kind].send(r.value, key=r.key, timestamp_ms=r.timestamp_ms)
    for s in sinks.values():
        s.close()

    reg = SnapshotRegistry(tmp_path / "snaps")
    proc = _start(config, tmp_path)
    _wait_trained(proc, reg, len(synth.expected), tmp_path, timeout_s=60)
    assert _stop(proc) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert reg.latest_version() is not None
    written = [tmp_path / "run.log", *(p for p in (tmp_path / "snaps").rglob("*") if p.is_file())]
    assert not [p for p in written if secret.encode() in p.read_bytes()], "the secret was written"


def _refused(exc: AuthenticationFailed) -> None:
    """The error names the broker's refusal and the keys to check, never the password."""
    text = str(exc)
    assert AUTH_FAILED in text and "kafka.sasl_password" in text, text
    assert WRONG not in text


def _refused_within(tries: int, attempt: Callable[[], object]) -> None:
    """kafka-python drops the broker's refusal when it arrives with the connection's close (its socket
    reader discards the bytes read before an EOF), so one bootstrap can end with only "socket
    disconnected", an outage to anyone: the supervisor's next build then tells. ``attempt`` is that
    build; one of ``tries`` must raise AuthenticationFailed, the others only a Kafka error."""
    for _ in range(tries):
        try:
            attempt()
        except AuthenticationFailed as exc:
            _refused(exc)
            return
        except KafkaError:
            continue
        raise AssertionError("a client with a wrong password was built")
    raise AssertionError(f"no AuthenticationFailed in {tries} tries")


def test_wrong_password_is_refused_login(sasl_broker: LocalBroker, unique_topic, tmp_path: Path) -> None:
    """A wrong password: the sources, sinks and admin clients of both libraries raise AuthenticationFailed
    with the broker's words, where the libraries themselves raise kafka-python's "Unable to bootstrap"
    timeout and librdkafka's "Broker transport failure", what an unreachable broker gives."""
    topics = _topics(unique_topic)
    impressions = [topics["impressions"]]
    kafka_python = _sasl(
        sasl_broker, password=WRONG, client_config=RETRY_FAST | {"bootstrap_timeout_ms": 4000}
    )
    cfg = load_config(_run_config(tmp_path, sasl_broker, topics, kafka=kafka_python), {})
    bootstrap = sasl_broker.bootstrap
    began = time.monotonic()

    def source() -> None:
        KafkaSource(
            bootstrap=bootstrap, topics=impressions, client_config=cfg.consumer_client_config()
        ).partitions()

    _refused_within(4, source)
    _refused_within(
        4,
        lambda: KafkaSink(
            bootstrap=bootstrap, topic=impressions[0], client_config=cfg.producer_client_config()
        ),
    )
    _refused_within(
        4, lambda: kafka_ensure_topic_like(cfg.kafka.connection(), bootstrap, "derived", impressions[0])
    )
    assert time.monotonic() - began < 100

    cfg = load_config(
        _run_config(tmp_path, sasl_broker, topics, kafka=_sasl(sasl_broker, "confluent", WRONG)), {}
    )
    began = time.monotonic()
    source = ConfluentSource(
        bootstrap=bootstrap,
        topics=impressions,
        client_config=cfg.consumer_client_config(),
        metadata_timeout_s=5,
    )
    with pytest.raises(AuthenticationFailed) as refused:
        source.partitions()
    source.close()
    _refused(refused.value)
    # The admin client's wait (10 s) and a flush's own timeout are not waited out: librdkafka serves the
    # refusal to the error callback only when asked, so they ask at least every second.
    asked = time.monotonic()
    with pytest.raises(AuthenticationFailed) as refused:
        confluent_ensure_topic_like(cfg.kafka.connection(), bootstrap, "derived", impressions[0])
    _refused(refused.value)
    assert time.monotonic() - asked < 5
    sink = ConfluentSink(
        bootstrap=bootstrap, topic=impressions[0], client_config=cfg.producer_client_config()
    )
    sink.send(b"x")
    asked = time.monotonic()
    with pytest.raises(AuthenticationFailed) as refused:
        sink.flush(30.0)
    assert time.monotonic() - asked < 5
    sink.abort()
    _refused(refused.value)
    assert time.monotonic() - began < 40


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_reloop_run_with_wrong_password_exits_2(
    sasl_broker: LocalBroker, unique_topic, tmp_path: Path, client: str
) -> None:
    """`reloop run` with a wrong password trains nothing and exits 2 with the broker's refusal, long
    before recovery.give_up_after_s (900 s here: the default): a refused login is not retried like an
    outage. The password is never logged."""
    topics = _topics(unique_topic)
    create_topics(
        sasl_broker.bootstrap,
        {t: 1 for k, t in topics.items() if k != "samples"},
        client_config=sasl_broker.client_settings,
    )
    # kafka-python: short bootstraps, so that a build which missed the refusal (see _refused_within) is
    # soon followed by one that sees it.
    fast = RETRY_FAST | {"bootstrap_timeout_ms": 5000}
    extra = {"client_config": fast} if client == "kafka-python" else {}
    kafka = _sasl(sasl_broker, client, password=WRONG, **extra)
    config = _run_config(tmp_path, sasl_broker, topics, kafka=kafka, recovery={"give_up_after_s": 900.0})
    log = run_exits_2(config, tmp_path, within_s=150)
    assert "refused the login" in log and AUTH_FAILED in log, log[-3000:]
    assert '"msg":"giving up"' not in log
    assert SnapshotRegistry(tmp_path / "snaps").latest_version() is None
    assert WRONG not in log, "the password must never be logged"


def run_exits_2(config: dict, tmp_path: Path, within_s: float) -> str:
    """`reloop run` with ``config`` exits 2 within ``within_s``; its log."""
    proc = _start(config, tmp_path)
    try:
        code = proc.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(
            f"still running after {within_s} s: " + (tmp_path / "run.log").read_text()[-3000:]
        ) from None
    log = (tmp_path / "run.log").read_text()
    assert code == 2, log[-3000:]
    return log


def received(source, count: int) -> list:
    """Up to ``count`` records from ``source`` (opened here and closed), within 20 s."""
    got: list = []
    try:
        source.open()
        deadline = time.monotonic() + 20
        while len(got) < count and time.monotonic() < deadline:
            got += source.poll(1000, 0.2)
    finally:
        source.close()
    return got
