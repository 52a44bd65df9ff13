"""A kafka-python client whose bootstrap addresses all refuse a connection says so at once in one
warning: for the 30 s of its bootstrap the log showed only kafka-python's ECONNREFUSED lines."""

from __future__ import annotations

import logging
import socket

import pytest
from reloop.connectors.kafka import client_start
from reloop.connectors.kafka.client_start import start_client


class _Client:
    DEFAULT_CONFIG = {"kafka_client": lambda **_: None, "bootstrap_timeout_ms": 30000}

    def __init__(self, **config) -> None:
        self.config = config


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _fresh_rate_limit(monkeypatch):
    monkeypatch.setattr(client_start, "_warned_at", {})


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == client_start.log.name]


def test_no_broker_answering_is_one_warning_naming_the_address_and_the_wait(caplog) -> None:
    bootstrap = f"127.0.0.1:{_closed_port()}"
    with caplog.at_level(logging.WARNING):
        client = start_client(_Client, bootstrap_servers=bootstrap)
        start_client(_Client, bootstrap_servers=bootstrap)  # the stage's next client: no second line
    assert client.config["bootstrap_servers"] == bootstrap  # built as before
    [line] = _warnings(caplog)
    assert f"no Kafka broker answers at {bootstrap} ({bootstrap}: Connection refused)" in line
    assert "up to 30000 ms (bootstrap_timeout_ms)" in line


def test_a_broker_listening_or_a_secured_listener_or_a_readiness_probe_warns_nothing(caplog) -> None:
    with socket.socket() as server, caplog.at_level(logging.WARNING):
        server.bind(("127.0.0.1", 0))
        server.listen()
        start_client(_Client, bootstrap_servers=f"127.0.0.1:{server.getsockname()[1]}")
        closed = f"127.0.0.1:{_closed_port()}"
        # a connection closed before its handshake is a failed login in the broker's log: not probed
        start_client(_Client, bootstrap_servers=closed, security_protocol="SASL_SSL")
        start_client(_Client, probe=False, bootstrap_servers=closed)  # `reloop kafka up` waiting
    assert _warnings(caplog) == []
