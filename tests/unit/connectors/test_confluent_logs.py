"""librdkafka's log lines reach Python's logging (and so reloop's JSON log), not raw stderr."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaException
from reloop.connectors.confluent.source import ConfluentSource


def test_librdkafka_lines_go_through_python_logging_not_stderr(caplog, capfd) -> None:
    # They went to stderr as "%3|<time>|FAIL|rdkafka#consumer-1|...", past the JSON log.
    caplog.set_level(logging.INFO, logger="librdkafka")
    source = ConfluentSource(bootstrap="127.0.0.1:1", topics=["t"], metadata_timeout_s=1.0)
    with pytest.raises(KafkaException):
        source.partitions()  # no broker; the failed metadata call serves the client's callbacks
    source.close(timeout_s=1.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "librdkafka"]
    assert any("127.0.0.1:1" in line and "refused" in line.lower() for line in lines), lines
    assert "|FAIL|" not in capfd.readouterr().err


def test_settings_librdkafka_refuses_at_build_are_a_config_error(tmp_path):
    # A CA file librdkafka cannot load (or an unknown key) failed every build with a KafkaException, which
    # the supervisor retried as an outage until recovery.give_up_after_s.
    from reloop.connectors.confluent.sink import ConfluentSink
    from reloop.engine.config_common import ConfigError

    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    tls = {"security.protocol": "SSL", "ssl.ca.location": str(ca)}
    with pytest.raises(ConfigError, match="librdkafka refuses the Kafka settings: .*ssl.ca.location"):
        ConfluentSink(bootstrap="127.0.0.1:1", topic="t", client_config=tls)
    with pytest.raises(ConfigError, match="no.such.setting"):
        source = ConfluentSource(bootstrap="127.0.0.1:1", topics=["t"], client_config={"no.such.setting": 1})
        source.partitions()
