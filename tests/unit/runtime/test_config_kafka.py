"""The Kafka sections (kafka, consumer, producer), the one environment scheme of run and serve, the keys
that moved and the secrets that never print."""

from __future__ import annotations

import json
import logging
import re

import pytest
from reloop.engine.config_common import KafkaSection
from reloop.engine.runtime import kafka_stages
from reloop.engine.runtime.config import MOVED, ConfigError, load_config_dict
from reloop.engine.serve.config import MOVED as SERVE_MOVED
from reloop.engine.serve.config import MOVED_ENV, serve_config_from_dict

MODEL = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}}
PASSWORD = "hunter2-never-print-me"
SERVE_DOC = {"arms": [{"name": "A", "registry": "/tmp/reg-a"}]}


def _run(data: dict | None = None, env: dict | None = None):
    return load_config_dict({"model": MODEL, **(data or {})}, env=env or {})


def _nested(path: tuple[str, ...], value: object) -> dict:
    for part in reversed(path):
        value = {part: value}
    return value  # type: ignore[return-value]


@pytest.mark.parametrize("path", sorted(MOVED))
def test_each_moved_run_key_is_refused_naming_the_new_key(path):
    new = MOVED[path].split(" ")[0]
    with pytest.raises(ConfigError) as err:
        _run(_nested(path, {} if path[-1] == "client_config" else "x"))
    assert f"{'.'.join(path)} moved to {new}" in str(err.value)
    # The same through the environment.
    with pytest.raises(ConfigError, match=f"{'.'.join(path)} moved to {new}"):
        _run(env={"RELOOP__" + "__".join(p.upper() for p in path): "{}" if "config" in path[-1] else "x"})


@pytest.mark.parametrize("path", sorted(SERVE_MOVED))
def test_each_moved_serve_key_is_refused_naming_the_new_key(path):
    new = SERVE_MOVED[path].split(" ")[0]
    with pytest.raises(ConfigError, match=f"{'.'.join(path)} moved to {new}"):
        serve_config_from_dict({**SERVE_DOC, **_nested(path, {})}, env={})


@pytest.mark.parametrize("old", sorted(MOVED_ENV))
def test_former_serve_environment_names_are_refused_naming_the_new_one(old):
    with pytest.raises(ConfigError, match=f"{old} was renamed {MOVED_ENV[old]}"):
        serve_config_from_dict(SERVE_DOC, env={old: "x"})


def test_run_environment_is_nested_typed_and_over_the_file():
    cfg = _run(
        {
            "kafka": {"bootstrap": "file:1", "client_config": {"client_id": "file"}},
            "consumer": {"group_id": "g"},
        },
        env={
            "RELOOP__KAFKA__BOOTSTRAP": "env:2",
            "reloop__kafka__client": "confluent",
            "RELOOP__KAFKA__CLIENT_CONFIG__REQUEST__TIMEOUT__MS": "5000",
            "RELOOP__CONSUMER__CLIENT_CONFIG": '{"fetch.wait.max.ms": 50}',
            "RELOOP__CONSUMER__POLL_MAX_RECORDS": "17",
            "RELOOP__CONSUMER__GROUP_ID": "null",
            "RELOOP__TRAIN__DETERMINISTIC": "true",
            "RELOOP__MODEL__PARAMS__HIDDEN_UNITS": "[8, 4]",
        },
    )
    assert cfg.kafka.bootstrap == "env:2" and cfg.kafka.client == "confluent"
    # The file's client_config keys stay; the environment adds (a nested key) or replaces.
    assert cfg.kafka.client_config == {"client_id": "file", "request": {"timeout": {"ms": 5000}}}
    assert cfg.consumer.client_config == {"fetch.wait.max.ms": 50}
    assert cfg.consumer.poll_max_records == 17 and cfg.consumer.group_id is None
    assert cfg.train.deterministic is True and cfg.model.params == {"hidden_units": [8, 4]}


def test_serve_environment_uses_the_same_scheme():
    env = {
        "RELOOP__SERVE__PORT": "8081",
        "RELOOP__SERVE__LOG__ENABLED": "false",
        "RELOOP__SERVE__AUTH_TOKEN": PASSWORD,
        "RELOOP__KAFKA__BOOTSTRAP": "k:9092",
        "RELOOP__KAFKA__SASL_PASSWORD": PASSWORD,
        "RELOOP__TRAIN__BATCH_SIZE": "5",  # the processor's section in a shared environment: ignored here
    }
    cfg = serve_config_from_dict({**SERVE_DOC, "serve": {"port": 1}}, env=env)
    assert cfg.port == 8081 and cfg.log.enabled is False and cfg.kafka.bootstrap == "k:9092"
    assert cfg.auth_token is not None and cfg.auth_token.get_secret_value() == PASSWORD
    assert cfg.kafka.connection()["sasl.password"] == PASSWORD  # confluent: the service's default client
    for shown in (repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump())):
        assert PASSWORD not in shown
    with pytest.raises(ConfigError, match=r"serve\.port: .*\(environment variable RELOOP__SERVE__PORT\)"):
        serve_config_from_dict(SERVE_DOC, env={"RELOOP__SERVE__PORT": "http"})


def test_one_environment_holds_both_programs_settings():
    """`reloop run` leaves the service's sections to it (and the service the processor's): the demo and a
    compose file give both programs one environment. A section neither program has is still refused."""
    env = {
        "RELOOP__SERVE__AUTH_TOKEN": PASSWORD,
        "RELOOP__SERVE__PORT": "8081",
        "RELOOP__SALT": "s",
        "RELOOP__TRAIN__BATCH_SIZE": "5",
        "RELOOP__KAFKA__BOOTSTRAP": "k:9092",
    }
    run = _run(env=env)
    assert run.train.batch_size == 5 and run.kafka.bootstrap == "k:9092"
    serve = serve_config_from_dict(SERVE_DOC, env=env)
    assert serve.port == 8081 and serve.kafka.bootstrap == "k:9092"
    with pytest.raises(ConfigError, match="RELOOP__SERVEE__PORT: unknown section 'servee'"):
        _run(env={"RELOOP__SERVEE__PORT": "1"})
    with pytest.raises(ConfigError, match="RELOOP__SERVEE__PORT: unknown section 'servee'"):
        serve_config_from_dict(SERVE_DOC, env={"RELOOP__SERVEE__PORT": "1"})  # it was ignored in silence


def test_a_consumer_only_setting_in_the_shared_section_is_refused_naming_consumer_client_config():
    with pytest.raises(ConfigError, match=r"fetch_max_wait_ms.*consumer\.client_config"):
        _run({"kafka": {"client_config": {"fetch_max_wait_ms": 100}}})
    with pytest.raises(ConfigError, match=r"kafka\.sasl_password"):
        _run({"kafka": {"client_config": {"sasl_plain_password": "x"}}})
    with pytest.raises(ConfigError, match=r"\['fetch_max_wiat_ms'\] are not kafka-python settings"):
        _run({"kafka": {"client_config": {"fetch_max_wiat_ms": 1}}})


def test_client_settings_no_client_would_take_are_refused_at_load_naming_the_key():
    """A setting reloop sets itself (group_id) was refused by the connector inside the supervised stage and
    retried until recovery.give_up_after_s (exit 1); an unknown or producer-only consumer setting was
    refused only after the producers had connected, naming no config key."""
    cases = [
        (
            {"consumer": {"client_config": {"group_id": "g"}}},
            r"consumer\.client_config\.group_id: .*consumer\.group_id",
        ),
        (
            {"stages": {"join_client_config": {"enable_auto_commit": True}}},
            r"stages\.join_client_config\.enable_",
        ),
        ({"producer": {"client_config": {"acks": 1}}}, r"producer\.client_config\.acks: "),
        (
            {"kafka": {"client_config": {"linger_ms": 5}}},
            r"\['linger_ms'\] .*put them in producer\.client_config",
        ),
        (
            {"consumer": {"client_config": {"fetch_max_wait": 5}}},
            r"consumer\.client_config: \['fetch_max_wait'\]",
        ),
        ({"producer": {"client_config": {"lingerms": 5}}}, r"producer\.client_config: \['lingerms'\]"),
        (
            {"kafka": {"client": "confluent"}, "consumer": {"client_config": {"group.id": "g"}}},
            r"client_config\.group\.id",
        ),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            _run(data)
    with pytest.raises(
        ConfigError, match=r"group_id: .*\(environment variable RELOOP__CONSUMER__CLIENT_CONFIG__GROUP_ID\)"
    ):
        _run(env={"RELOOP__CONSUMER__CLIENT_CONFIG__GROUP_ID": "g"})
    _run(
        {
            "consumer": {"client_config": {"fetch_max_wait_ms": 5}},
            "producer": {"client_config": {"linger_ms": 5}},
        }
    )


def test_an_empty_value_is_refused_not_taken():
    """An unset variable expanded to "" (RELOOP__SERVE__HOST=$HOST) was taken: serve.host "" bound every
    interface, checkpoint.dir "" wrote snapshots into the working folder, kafka.bootstrap "" failed later."""
    for name, key in [
        ("RELOOP__KAFKA__BOOTSTRAP", "kafka.bootstrap"),
        ("RELOOP__CHECKPOINT__DIR", "checkpoint.dir"),
        ("RELOOP__SOURCE__IMPRESSIONS_TOPIC", "source.impressions_topic"),
        ("RELOOP__METRICS__PROMETHEUS_HOST", "metrics.prometheus_host"),
        ("RELOOP__KAFKA__SASL_PASSWORD", "kafka.sasl_password"),
    ]:
        with pytest.raises(ConfigError, match=rf"{key}: .*\(environment variable {name}\)"):
            _run(env={name: ""})
    with pytest.raises(ConfigError, match=r"serve\.host: .*\(environment variable RELOOP__SERVE__HOST\)"):
        serve_config_from_dict(SERVE_DOC, env={"RELOOP__SERVE__HOST": ""})
    assert _run(env={"RELOOP__KAFKA__CLIENT_CONFIG__CLIENT_ID": ""}).kafka.client_config == {"client_id": ""}


class _Recorder:
    made: list[tuple[str, dict]] = []

    def __init__(self, *, bootstrap, client_config, **kw):
        kind = "producer" if "topic" in kw else "consumer"
        _Recorder.made.append((kind, dict(client_config)))

    def close(self):
        pass

    def commit(self, positions):
        pass


def test_consumer_settings_reach_consumers_only_and_producer_settings_producers_only(monkeypatch):
    from kafka import KafkaConsumer, KafkaProducer
    from reloop.engine.runtime import build

    cfg = _run(
        {
            "kafka": {"sasl_username": "u", "sasl_password": PASSWORD, "client_config": {"client_id": "c"}},
            "consumer": {"client_config": {"fetch_max_wait_ms": 200}},
            "producer": {"client_config": {"linger_ms": 5}},
            "stages": {"join_client_config": {"session_timeout_ms": 6000}},
        }
    )
    _Recorder.made = []
    monkeypatch.setattr(kafka_stages, "_clients", lambda cfg: (_Recorder, _Recorder, _Recorder))
    monkeypatch.setattr(kafka_stages, "_ensure_samples_topic", lambda cfg: None)
    monkeypatch.setattr(kafka_stages, "_retention", lambda cfg: {})
    monkeypatch.setattr(build, "build_join_stage", lambda *a, **k: "join")
    monkeypatch.setattr(build, "build_train_stage", lambda *a, **k: "train")
    assert kafka_stages.join_stage_factory(cfg)() == "join"
    assert kafka_stages.train_stage_factory(cfg)() == "train"
    kinds = [kind for kind, _ in _Recorder.made]
    assert kinds.count("consumer") == 2 and kinds.count("producer") == 3  # samples + 2 dead-letter sinks
    for kind, settings in _Recorder.made:
        assert settings["sasl_plain_password"] == PASSWORD and settings["client_id"] == "c"
        known = KafkaConsumer.DEFAULT_CONFIG if kind == "consumer" else KafkaProducer.DEFAULT_CONFIG
        assert set(settings) <= set(known), (kind, settings)  # the client would refuse anything else
        assert ("fetch_max_wait_ms" in settings) == (kind == "consumer")
        assert ("linger_ms" in settings) == (kind == "producer")
    join_consumer = next(s for k, s in _Recorder.made if k == "consumer" and "session_timeout_ms" in s)
    assert join_consumer["fetch_max_wait_ms"] == 200


@pytest.mark.parametrize("where", ["file", "env"])
def test_a_sasl_password_never_prints_but_reaches_the_clients(where, caplog):
    data = {"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"}}
    env = {}
    if where == "file":
        data["kafka"]["sasl_password"] = PASSWORD
    else:
        env["RELOOP__KAFKA__SASL_PASSWORD"] = PASSWORD
    cfg = _run(data, env)
    with caplog.at_level(logging.INFO):
        logging.getLogger("reloop.test").info("config: %s / %r", cfg, cfg.kafka)
    shown = [repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump()), caplog.text]
    shown.append(json.dumps(cfg.redacted_dump()))  # what snapshot manifests hold
    for text in shown:
        assert PASSWORD not in text
    assert cfg.redacted_dump()["kafka"]["sasl_password"] == "**********"
    assert cfg.consumer_client_config()["sasl_plain_password"] == PASSWORD
    assert cfg.producer_client_config()["sasl_plain_password"] == PASSWORD
    assert cfg.kafka.connection("confluent")["sasl.password"] == PASSWORD
    # A bad value elsewhere in the section: the error names the key, never the secret.
    with pytest.raises(ConfigError) as err:
        _run({"kafka": {**data["kafka"], "sasl_password": PASSWORD, "security_protocol": "SASL"}}, env)
    assert "kafka.security_protocol" in str(err.value) and PASSWORD not in str(err.value)


def test_credential_like_keys_in_client_config_are_redacted_in_manifests():
    cfg = _run({"producer": {"client_config": {"sasl_oauth_token_provider": PASSWORD}}})
    assert PASSWORD not in json.dumps(cfg.redacted_dump())


def test_an_inline_private_key_is_redacted_in_manifests():
    # librdkafka's ssl.key.pem holds the client's private key as text: snapshot manifests kept it.
    client = {"ssl.key.pem": PASSWORD, "sasl.kerberos.keytab": PASSWORD}
    cfg = _run({"kafka": {"client": "confluent", "client_config": client}})
    assert PASSWORD not in json.dumps(cfg.redacted_dump())


@pytest.mark.parametrize(
    "text",
    [
        f'kafka:\n  bootstrap: "127.0.0.1:1"\n  sasl_password: "{PASSWORD}" : x\n',  # a syntax error
        f"kafka:\n  sasl_password: {PASSWORD}\n  sasl_password: {PASSWORD}\n",  # a key twice
    ],
)
def test_a_config_that_does_not_parse_is_refused_without_quoting_its_lines(tmp_path, text):
    # PyYAML's error quotes the line it stopped at: a password on it was printed with the refusal.
    from reloop.engine.runtime.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert PASSWORD not in str(err.value) and "line 3" in str(err.value), err.value


def test_connection_in_the_other_clients_names(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    k = KafkaSection(client="kafka-python", ssl_cafile=str(ca), client_config={"client_id": "x"})
    assert k.connection("confluent") == {"ssl.ca.location": str(ca), "client.id": "x"}
    c = KafkaSection(client="confluent", client_config={"client.id": "x"})
    with pytest.raises(ConfigError, match="kafka-python"):
        c.connection("kafka-python")


@pytest.mark.parametrize("key", ["ssl_cafile", "ssl_certfile", "ssl_keyfile"])
def test_an_ssl_file_that_cannot_be_read_fails_the_config_naming_its_key(tmp_path, key):
    # It failed later: kafka-python after its bootstrap timeout (as a TLS error), librdkafka when the
    # client was built, in its own words ("ssl.ca.location failed"), retried by the supervisor.
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=rf"kafka\.{key}.*missing\.pem' does not exist"):
        load_config_dict({"kafka": {"security_protocol": "SSL", key: str(missing)}}, env={})


@pytest.mark.parametrize(
    ("bootstrap", "why"),
    [
        ("a b c::", "'a b c::' is not host:port"),
        ("127.0.0.1:99999", "port 99999 is not in 1..65535"),
        ("127.0.0.1:9092,,b:1", "entries separated by commas"),
        ("host:port", "'host:port' is not host:port"),
    ],
)
def test_a_malformed_bootstrap_fails_the_config_naming_the_key(bootstrap, why):
    # It was taken: kafka-python then failed inside the client ("invalid literal for int()"), retried by
    # the supervisor, and serve logged a failed sink every half second; a port over 65535 never connected.
    with pytest.raises(ConfigError, match=rf"kafka\.bootstrap.*{re.escape(why)}"):
        _run({"kafka": {"bootstrap": bootstrap}})
    with pytest.raises(ConfigError, match=rf"kafka\.bootstrap.*{re.escape(why)}"):
        serve_config_from_dict({**SERVE_DOC, "kafka": {"bootstrap": bootstrap}}, env={})


@pytest.mark.parametrize(
    "bootstrap", ["127.0.0.1:9092", "kafka:9092,kafka-1:9092", "[::1]:9092", "broker", "SSL://b:9093"]
)
def test_bootstrap_lists_kafka_takes_are_accepted(bootstrap):
    assert _run({"kafka": {"bootstrap": bootstrap}}).kafka.bootstrap == bootstrap


@pytest.mark.parametrize(
    ("kafka", "refused"),
    [
        ({"sasl_mechanism": "PLAIN", "sasl_username": "u"}, "sasl_password must be set"),
        ({"sasl_mechanism": "SCRAM-SHA-512"}, "sasl_username and sasl_password must be set"),
        ({"sasl_username": "u"}, "sasl_password must be set"),  # kafka-python's default mechanism: PLAIN
        ({"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": PASSWORD}, None),
        ({"sasl_mechanism": "OAUTHBEARER"}, None),  # no name and password to give
        ({"client": "confluent"}, None),  # librdkafka's default mechanism, GSSAPI, takes neither
    ],
)
def test_a_sasl_login_by_name_without_its_name_or_password_is_a_config_error(kafka, refused):
    # kafka-python retried the login it could not make ("expected str instance, NoneType found") as a
    # broker outage for recovery.give_up_after_s: a Kubernetes Secret not mounted looked like Kafka down.
    data = {"kafka": {"security_protocol": "SASL_PLAINTEXT", **kafka}}
    if refused is None:
        _run(data)
        return
    with pytest.raises(ConfigError, match=f"kafka: {refused} with security_protocol SASL_PLAINTEXT"):
        _run(data)
