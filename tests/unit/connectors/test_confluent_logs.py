"""librdkafka's log lines reach Python's logging (and so reloop's JSON log), not raw stderr."""

from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import KafkaException, Producer
from reloop.connectors.confluent.logs import LIBRDKAFKA_LOG, REPEATED_LINES, RepeatedLines, logged
from reloop.connectors.confluent.source import ConfluentSource


def test_librdkafka_lines_go_through_python_logging_not_stderr(caplog, capfd) -> None:
    # They went to stderr as "%3|<time>|FAIL|rdkafka#consumer-1|...", past the JSON log.
    caplog.set_level(logging.INFO, logger="librdkafka")
    REPEATED_LINES.forget()  # another test's client may have logged the same refusal just now
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


def _line(text: str, level: int = logging.ERROR) -> logging.LogRecord:
    # As confluent-kafka hands librdkafka's lines to a logger: facility, client name, text.
    return logging.LogRecord(
        "librdkafka", level, __file__, 1, "%s [%s] %s", ("FAIL", "rdkafka#consumer-1", text), None
    )


def test_one_line_of_a_kind_per_interval_and_the_next_says_how_many_it_stood_for() -> None:
    now = [0.0]
    lines = RepeatedLines(10.0, clock=lambda: now[0])
    refused = "127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after {}ms)"
    assert lines.filter(_line(refused.format(0)))
    passed = []
    for i in range(1, 40):  # a reconnect attempt every 250 ms, each with its own timing
        now[0] = i * 0.25
        record = _line(refused.format(i))
        if lines.filter(record):
            passed.append(record.getMessage())
    assert len(passed) == 0  # all within the first 10 s: one kind
    now[0] = 10.0
    record = _line(refused.format(7))
    assert lines.filter(record)
    assert record.getMessage().endswith("(39 more like it since the last one logged)"), record.getMessage()
    # Another text, or the same text at another level, is another kind.
    assert lines.filter(_line("127.0.0.1:9092/1: Disconnected (after 5ms in state UP)"))
    assert lines.filter(_line(refused.format(1), level=logging.WARNING))


def test_it_remembers_a_bounded_number_of_kinds() -> None:
    lines = RepeatedLines(10.0, clock=lambda: 0.0, max_kinds=3)
    for word in ("alpha", "beta", "gamma", "delta"):  # names, not numbers: four kinds
        assert lines.filter(_line(f"topic {word} unknown"))
    assert len(lines._kinds) == 3
    assert lines.filter(_line("topic alpha unknown"))  # the oldest was forgotten: logged again
    assert not lines.filter(_line("topic delta unknown"))


def test_a_client_retrying_an_absent_broker_logs_each_kind_once_per_interval(caplog) -> None:
    """The filter sits on the logger every reloop client is built with (``logged``): a producer left
    retrying a closed port for 3 s logged a refusal at each attempt (8 in 5 s here, more per broker
    address in a cluster) and now logs one."""
    caplog.set_level(logging.DEBUG, logger="librdkafka")
    REPEATED_LINES.forget()
    producer = Producer(logged({"bootstrap.servers": "127.0.0.1:1", "reconnect.backoff.max.ms": 100}))
    assert logged({})["logger"] is LIBRDKAFKA_LOG
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        producer.poll(0.1)
    refusals = [r for r in caplog.records if r.name == "librdkafka" and "refused" in r.getMessage().lower()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]


def test_a_coordinator_still_loading_at_start_is_info_not_a_warning(caplog) -> None:
    # 4 of 6 demo logs began with this WARNING; the client retries it itself.
    text = (
        "GETPID [rdkafka#producer-2] [thrd:main]: Failed to acquire idempotence PID from broker "
        "127.0.0.1:19093/1: Broker: Coordinator load in progress: retrying"
    )
    REPEATED_LINES.forget()
    with caplog.at_level(logging.INFO, logger="librdkafka"):
        LIBRDKAFKA_LOG.warning(text)
        LIBRDKAFKA_LOG.warning("FAIL [rdkafka#producer-2]: Connect to ipv4#127.0.0.1:1 failed")
    assert [(r.levelname, r.getMessage()[:6]) for r in caplog.records] == [
        ("INFO", "GETPID"),
        ("WARNING", "FAIL ["),
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="librdkafka"):
        REPEATED_LINES.forget()
        LIBRDKAFKA_LOG.warning(text)
    assert caplog.records == []
