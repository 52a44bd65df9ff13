"""The Kafka TLS settings of a run config (kafka.security_protocol SSL, ssl_cafile, ssl_certfile, ssl_keyfile,
ssl_key_password; client_config's ssl_check_hostname) against real brokers that require them: LocalBrokers
whose client listener is SSL, one of them requiring a client certificate (mutual TLS). A CA, the brokers'
and a client's certificates are made here with the openssl command line. Every client is built from the
run config the way the engine builds it, with both client libraries."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from reloop.connectors.confluent.sink import ConfluentSink
from reloop.connectors.confluent.source import ConfluentSource
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.local_broker import BrokerTls, LocalBroker, _metadata_ok
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.checkpoint import SnapshotRegistry
from reloop.engine.runtime.config import RunConfig, load_config
from reloop.engine.streams import TlsRefused

from .test_kafka_sasl import received, run_exits_2, run_trains_and_keeps_the_secret, started
from .test_run_kafka import (
    _config,
    _kill_leftover_processors,  # noqa: F401 - autouse: no `reloop run` outlives a test
    _now_ms,
    _topics,
)

pytestmark = pytest.mark.kafka

KEY_PASSWORD = "cl13nt-K3y.pw"  # the client key's passphrase: must never be written anywhere
# kafka-python waits bootstrap_timeout_ms (default 30 s) before it gives up on a refused handshake.
FAST_FAIL = {"bootstrap_timeout_ms": 3000}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _leaf(pki: Path, name: str, san: str, *, passphrase: str | None = None) -> None:
    """``name``.key (PKCS#8, encrypted with ``passphrase`` if given) and ``name``.pem signed by ca.pem."""
    key_args = ["-aes256", "-pass", f"pass:{passphrase}"] if passphrase else []
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", *key_args,
             "-out", f"{name}.key", cwd=pki)  # fmt: skip
    passin = ["-passin", f"pass:{passphrase}"] if passphrase else []
    _openssl("req", "-new", "-key", f"{name}.key", *passin, "-subj", f"/CN={name}", "-out", f"{name}.csr",
             cwd=pki)  # fmt: skip
    (pki / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=pki)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, unavailable) -> Path:
    """ca.pem (the CA), otherca.pem (a CA that signed nothing here), broker.keystore.pem (the brokers' key
    and certificate, for 127.0.0.1 only: not for "localhost"), client.pem + client.key (encrypted)."""
    if shutil.which("openssl") is None:
        unavailable("no openssl command to make the test certificates")
    pki = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "otherca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
                 cwd=pki)  # fmt: skip
    _leaf(pki, "broker", "IP:127.0.0.1")
    (pki / "broker.keystore.pem").write_bytes(
        (pki / "broker.key").read_bytes() + (pki / "broker.pem").read_bytes()
    )
    _leaf(pki, "client", "DNS:client.example", passphrase=KEY_PASSWORD)
    return pki


@pytest.fixture(scope="module")
def ssl_broker(pki: Path, tmp_path_factory: pytest.TempPathFactory, unavailable) -> Iterator[LocalBroker]:
    """A LocalBroker whose only client listener is SSL (no client certificate asked)."""
    tls = BrokerTls(pki / "broker.keystore.pem", pki / "ca.pem")
    yield from started(LocalBroker(tmp_path_factory.mktemp("kafka-ssl"), tls=tls), "TLS", unavailable)


@pytest.fixture(scope="module")
def mtls_broker(pki: Path, tmp_path_factory: pytest.TempPathFactory, unavailable) -> Iterator[LocalBroker]:
    """A LocalBroker whose SSL listener requires a client certificate signed by the CA."""
    tls = BrokerTls(pki / "broker.keystore.pem", pki / "ca.pem", client_auth=True)
    yield from started(LocalBroker(tmp_path_factory.mktemp("kafka-mtls"), tls=tls), "TLS", unavailable)


def _tls(broker: LocalBroker, client: str, cafile: Path | None, **extra) -> dict:
    """The kafka section of a run config for ``broker`` (TLS, trusting ``cafile``)."""
    kafka: dict = {"bootstrap": broker.bootstrap, "client": client, "security_protocol": "SSL", **extra}
    if cafile is not None:
        kafka["ssl_cafile"] = str(cafile)
    return kafka


def _client_cert(pki: Path) -> dict:
    return {
        "ssl_certfile": str(pki / "client.pem"),
        "ssl_keyfile": str(pki / "client.key"),
        "ssl_key_password": KEY_PASSWORD,
    }


def _cfg(tmp: Path, broker: LocalBroker, topics: dict[str, str], kafka: dict) -> RunConfig:
    return load_config(_config(tmp, broker.bootstrap, topics, "correct", kafka=kafka), {})


def _round_trip(cfg: RunConfig, topic: str) -> None:
    """50 records through the sink and back through the source of cfg.kafka.client."""
    bootstrap = cfg.kafka.bootstrap
    confluent = cfg.kafka.client == "confluent"
    Sink, Source = (ConfluentSink, ConfluentSource) if confluent else (KafkaSink, KafkaSource)  # noqa: N806
    create_topics(bootstrap, {topic: 1}, client_config=cfg.kafka.connection("kafka-python"))
    sent = [(b"k%d" % i, b"v%d" % i) for i in range(50)]
    sink = Sink(bootstrap=bootstrap, topic=topic, client_config=cfg.producer_client_config())
    for key, value in sent:
        sink.send(value, key=key, timestamp_ms=_now_ms())
    sink.close()
    source = Source(bootstrap=bootstrap, topics=[topic], client_config=cfg.consumer_client_config())
    got = received(source, len(sent))
    assert sorted((r.key, r.value) for r in got) == sorted(sent)


def _partitions(cfg: RunConfig, topic: str) -> Callable[[], object]:
    """Building a source of cfg.kafka.client and asking for its partitions: its first broker contact
    (the source closed after, refused or not: a client left open kept retrying the module's broker)."""
    kind = ConfluentSource if cfg.kafka.client == "confluent" else KafkaSource

    def ask() -> object:
        source = kind(
            bootstrap=cfg.kafka.bootstrap, topics=[topic], client_config=cfg.consumer_client_config()
        )
        try:
            return source.partitions()
        finally:
            source.close()

    return ask


def _refused_tls(attempt: Callable[[], object], *, within_s: float) -> TlsRefused:
    """``attempt`` raises TlsRefused, naming the keys to check, within ``within_s`` seconds."""
    began = time.monotonic()
    with pytest.raises(TlsRefused) as refused:
        attempt()
    took = time.monotonic() - began
    text = str(refused.value)
    assert "kafka.ssl_cafile" in text and "kafka.ssl_certfile" in text, text
    assert KEY_PASSWORD not in text
    assert took < within_s, f"took {took:.1f} s: {text}"
    print(f"refused in {took:.1f} s: {text[:200]}")  # the time to fail, for `pytest -s`
    return refused.value


def test_broker_requires_tls(ssl_broker: LocalBroker, pki: Path) -> None:
    """The client listener is SSL only: a PLAINTEXT client gets nowhere, one trusting the CA does."""
    props = ssl_broker.config_path.read_text()
    assert f"listeners=SSL://{ssl_broker.bootstrap},CONTROLLER://" in props
    ok, detail = _metadata_ok(ssl_broker.bootstrap, timeout_s=1.0)
    assert not ok, detail
    settings = {"security_protocol": "SSL", "ssl_cafile": str(pki / "ca.pem")}
    ok, detail = _metadata_ok(ssl_broker.bootstrap, timeout_s=10.0, client_config=settings)
    assert ok, detail


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_records_round_trip_over_tls(
    ssl_broker: LocalBroker, pki: Path, unique_topic, tmp_path: Path, client: str
) -> None:
    topics = _topics(unique_topic)
    _round_trip(
        _cfg(tmp_path, ssl_broker, topics, _tls(ssl_broker, client, pki / "ca.pem")), topics["impressions"]
    )


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_an_untrusted_broker_is_refused_not_retried(
    ssl_broker: LocalBroker, pki: Path, unique_topic, tmp_path: Path, client: str
) -> None:
    """A broker certificate the client cannot verify (another CA given, or none: the system CAs) raises
    TlsRefused (exit 2 in `reloop run`), where the libraries report an outage: kafka-python "Unable to
    bootstrap" after its bootstrap timeout, librdkafka "Broker transport failure", both retrying forever."""
    topics = _topics(unique_topic)
    extra = {"client_config": FAST_FAIL} if client == "kafka-python" else {}
    for cafile in (pki / "otherca.pem", None):
        cfg = _cfg(tmp_path, ssl_broker, topics, _tls(ssl_broker, client, cafile, **extra))
        refused = _refused_tls(_partitions(cfg, topics["impressions"]), within_s=10)
        assert "certificate verify failed" in str(refused)


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_host_name_verification(
    ssl_broker: LocalBroker, pki: Path, unique_topic, tmp_path: Path, client
) -> None:
    """The broker's certificate names 127.0.0.1, not "localhost": both libraries check the host name by
    default (refused), and kafka.client_config turns the check off (kafka-python's ssl_check_hostname,
    librdkafka's ssl.endpoint.identification.algorithm; a kafka-python client_config's ssl_check_hostname
    reaches librdkafka for the parts on that client)."""
    topics = _topics(unique_topic)
    localhost = f"localhost:{ssl_broker.info.port}"
    extra = {"client_config": FAST_FAIL} if client == "kafka-python" else {}
    kafka = _tls(ssl_broker, client, pki / "ca.pem", **extra) | {"bootstrap": localhost}
    cfg = _cfg(tmp_path, ssl_broker, topics, kafka)
    refused = _refused_tls(_partitions(cfg, topics["impressions"]), within_s=10)
    assert "localhost" in str(refused)

    off = (
        {"ssl_check_hostname": False}
        if client == "kafka-python"
        else {"ssl.endpoint.identification.algorithm": "none"}
    )
    kafka["client_config"] = {**kafka.get("client_config", {}), **off}
    cfg = _cfg(tmp_path, ssl_broker, topics, kafka)
    unchecked = {**ssl_broker.client_settings, "ssl_check_hostname": False}
    create_topics(localhost, {topics["impressions"]: 2}, client_config=unchecked)
    assert len(_partitions(cfg, topics["impressions"])()) == 2
    if client == "kafka-python":  # the same setting, translated for a confluent part of the program
        kafka["client_config"] = off
        connection = _cfg(tmp_path, ssl_broker, topics, kafka).kafka.connection("confluent")
        source = ConfluentSource(
            bootstrap=localhost, topics=[topics["impressions"]], client_config=connection
        )
        assert len(source.partitions()) == 2
        source.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_mutual_tls(mtls_broker: LocalBroker, pki: Path, unique_topic, tmp_path: Path, client: str) -> None:
    """A broker that requires a client certificate: the client's (an encrypted key and its password from
    kafka.ssl_key_password) gets records through; without one the broker's refusal is TlsRefused."""
    topics = _topics(unique_topic)
    kafka = _tls(mtls_broker, client, pki / "ca.pem", **_client_cert(pki))
    _round_trip(_cfg(tmp_path, mtls_broker, topics, kafka), topics["impressions"])

    extra = {"client_config": FAST_FAIL} if client == "kafka-python" else {}
    cfg = _cfg(tmp_path, mtls_broker, topics, _tls(mtls_broker, client, pki / "ca.pem", **extra))
    refused = _refused_tls(_partitions(cfg, topics["impressions"]), within_s=10)
    assert "certificate" in str(refused)


@pytest.mark.parametrize("client", ["confluent"])  # kafka-python: the same settings, see test_mutual_tls
def test_reloop_run_trains_over_mutual_tls(
    mtls_broker: LocalBroker, pki: Path, unique_topic, tmp_path: Path, client: str
) -> None:
    """`reloop run` (join + train stages on ``client``) with only the config's TLS settings and a client
    certificate whose key is encrypted: it trains every sample and writes snapshots; the key's password is
    in none of its output (log, snapshots, manifests)."""
    topics = _topics(unique_topic)
    kafka = _tls(mtls_broker, client, pki / "ca.pem", **_client_cert(pki))
    config = _config(tmp_path, mtls_broker.bootstrap, topics, "correct", kafka=kafka)
    run_trains_and_keeps_the_secret(config, topics, mtls_broker.bootstrap, tmp_path, KEY_PASSWORD)


@pytest.mark.parametrize("client", ["kafka-python"])  # confluent: the same LoginWatch path as the sources
def test_reloop_run_with_an_untrusted_broker_exits_2(
    ssl_broker: LocalBroker, pki: Path, unique_topic, tmp_path: Path, client: str
) -> None:
    """`reloop run` that does not trust the broker's certificate trains nothing and exits 2 at once, with
    the keys to check, instead of retrying an "outage" for recovery.give_up_after_s (900 s here)."""
    topics = _topics(unique_topic)
    create_topics(
        ssl_broker.bootstrap,
        {t: 1 for k, t in topics.items() if k != "samples"},
        client_config=ssl_broker.client_settings,
    )
    extra = {"client_config": FAST_FAIL} if client == "kafka-python" else {}
    kafka = _tls(ssl_broker, client, pki / "otherca.pem", **extra)
    config = _config(tmp_path, ssl_broker.bootstrap, topics, "correct", kafka=kafka,
                     recovery={"give_up_after_s": 900.0})  # fmt: skip
    began = time.monotonic()
    log = run_exits_2(config, tmp_path, within_s=60)
    print(f"`reloop run` ({client}) exited 2 after {time.monotonic() - began:.1f} s")
    assert "TLS with the Kafka cluster" in log and "kafka.ssl_cafile" in log, log[-3000:]
    assert SnapshotRegistry(tmp_path / "snaps").latest_version() is None
