"""`reloop simulate` against a service whose arms the config does not list (engine/simulate/cli.py
kafka_click_sinks): their clicks went to the default topic `clicks` without a word."""

from __future__ import annotations

import logging

import pytest
import reloop.connectors.kafka.sink as kafka_sink
from reloop.engine.simulate.cli import clicks_topics, kafka_click_sinks


class FakeSink:
    def __init__(self, *, bootstrap, topic, client_config) -> None:
        self.topic = topic


@pytest.fixture
def sinks(monkeypatch):
    monkeypatch.setattr(kafka_sink, "KafkaSink", FakeSink)
    doc = {"arms": [{"name": "reloop", "clicks_topic": "clicks.reloop"}, {"name": "ce"}]}
    return kafka_click_sinks("127.0.0.1:1", clicks_topics(doc))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_arm_the_config_does_not_list_warns_once_naming_it_and_the_topic(sinks, caplog):
    caplog.set_level(logging.WARNING)
    assert sinks("A").topic == "clicks"
    assert sinks("A").topic == "clicks"  # (a new simulator's sink, or a second try): no second warning
    assert sinks("B").topic == "clicks"
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    first, second = warnings
    assert "'A'" in first and "'clicks'" in first and "--config" in first and "serve config" in first
    assert "reloop, ce" in first or "ce, reloop" in first
    assert "'B'" in second


def test_the_arms_the_config_lists_warn_nothing(sinks, caplog):
    caplog.set_level(logging.WARNING)
    assert sinks("reloop").topic == "clicks.reloop"
    assert sinks("ce").topic == "clicks"  # listed without a topic: serve's default too
    assert _warnings(caplog) == []
