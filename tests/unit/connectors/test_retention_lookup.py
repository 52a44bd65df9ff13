"""The topics' settings lookup (the join stage's warning of records stamped longer ago, its refusal of a
compacted samples topic) never stops a build: with no broker to ask, both clients give up within their
timeout, say so, and return nothing."""

from __future__ import annotations

import logging
import time

import pytest
from reloop.connectors.confluent.admin import topic_settings as confluent_settings
from reloop.connectors.kafka.admin import topic_settings


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_no_broker_gives_no_settings_within_the_timeout_and_a_warning(client, caplog):
    nobody = "127.0.0.1:9"  # discard: nothing listens
    topics = ["a", "b", "c", "d", "e", "f", "a"]
    began = time.monotonic()
    with caplog.at_level(logging.WARNING):
        if client == "confluent":
            found = confluent_settings({}, nobody, topics, ["retention.ms"], timeout_s=1.0)
        else:
            found = topic_settings(nobody, topics, ["retention.ms"], timeout_s=1.0)
    assert found == {}
    assert time.monotonic() - began < 3.5  # one timeout for the six topics, not one each
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "could not read the settings" in warned
