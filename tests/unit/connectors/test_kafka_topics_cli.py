"""`reloop kafka topics --config FILE`: which topics it asks for (the real broker: tests/integration)."""

from __future__ import annotations

import argparse

import yaml
from reloop.connectors.kafka import admin, local_broker_cli


def _asked(tmp_path, monkeypatch, sink: dict) -> dict[str, int]:
    config = tmp_path / "run.yaml"
    spec = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}
    document = {
        "kafka": {"bootstrap": "127.0.0.1:1"},
        "sink": sink,
        "model": {"backbone": "lr", "spec": spec},
    }
    config.write_text(yaml.safe_dump(document))
    asked: dict[str, int] = {}

    def counted(bootstrap, topics, **kwargs):
        asked.update(topics)
        return list(topics), dict(topics)

    monkeypatch.setattr(admin, "create_topics_counted", counted)
    parser = argparse.ArgumentParser()
    local_broker_cli.configure(parser)
    args = parser.parse_args(["topics", "--config", str(config), "--partitions", "2"])
    assert local_broker_cli.main(args) == 0
    return asked


def test_the_inputs_and_the_dead_letter_topic_are_asked_for(tmp_path, monkeypatch) -> None:
    assert _asked(tmp_path, monkeypatch, {}) == {"impressions": 2, "clicks": 2, "reloop.deadletter": 1}


def test_a_config_without_a_dead_letter_topic_asks_for_the_inputs_only(tmp_path, monkeypatch) -> None:
    # sink.dead_letter_topic: null was asked for as a topic named None.
    assert _asked(tmp_path, monkeypatch, {"dead_letter_topic": None}) == {"impressions": 2, "clicks": 2}


def test_a_refused_login_exits_2_as_the_stages_do(tmp_path, monkeypatch, capsys) -> None:
    # It exited 1, as for a broker that does not answer: a setting to fix read as an outage to wait out.
    from reloop.engine.streams import AuthenticationFailed

    def refused(bootstrap, topics, **kwargs):
        raise AuthenticationFailed(bootstrap, "Authentication failed: Invalid username or password")

    monkeypatch.setattr(admin, "create_topics_counted", refused)
    config = tmp_path / "run.yaml"
    spec = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}
    config.write_text(
        yaml.safe_dump({"kafka": {"bootstrap": "127.0.0.1:1"}, "model": {"backbone": "lr", "spec": spec}})
    )
    parser = argparse.ArgumentParser()
    local_broker_cli.configure(parser)
    assert local_broker_cli.main(parser.parse_args(["topics", "--config", str(config)])) == 2
    assert "refused the login" in capsys.readouterr().err


def test_timeout_bounds_the_wait_for_a_first_broker_too(tmp_path, monkeypatch) -> None:
    # `--timeout 5` against a broker that does not answer took 37 s: the client's own 30-s bootstrap wait.
    config = tmp_path / "run.yaml"
    spec = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}
    kafka = {"bootstrap": "127.0.0.1:1"}
    seen: list[tuple[float, dict]] = []

    def counted(bootstrap, topics, *, timeout_s, client_config, replication_factor):
        seen.append((timeout_s, client_config))
        return list(topics), dict(topics)

    monkeypatch.setattr(admin, "create_topics_counted", counted)
    parser = argparse.ArgumentParser()
    local_broker_cli.configure(parser)
    for given, client_config in ((["--timeout", "5"], {}), ([], {}), ([], {"bootstrap_timeout_ms": 1234})):
        document = {
            "kafka": {**kafka, "client_config": client_config},
            "model": {"backbone": "lr", "spec": spec},
        }
        config.write_text(yaml.safe_dump(document))
        assert local_broker_cli.main(parser.parse_args(["topics", "--config", str(config), *given])) == 0
    assert [(t, c["bootstrap_timeout_ms"]) for t, c in seen] == [(5.0, 5000), (30.0, 30000), (30.0, 1234)]
