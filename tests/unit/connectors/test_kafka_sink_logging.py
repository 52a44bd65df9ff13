"""kafka-python's ERROR for an idempotent producer closed before its first request was answered is INFO
(nothing was sent); any other error of its transaction manager stays an ERROR."""

from __future__ import annotations

import logging

import pytest
import reloop.connectors.kafka.sink  # noqa: F401 - installs the filter

CANCELLED = (
    "Fatal Error handling request InitProducerIdRequest: KafkaError: Could not execute transactional "
    "request for unknown reasons: Cancelled"
)


def test_a_cancelled_init_is_info_and_other_errors_stay_errors(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("kafka.producer.transaction_manager")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.error(CANCELLED)
        log.error("Fatal Error handling request InitProducerIdRequest: ClusterAuthorizationFailed")
    mine = [r for r in caplog.records if r.name == log.name]  # not a stray client's records
    assert [(r.levelname, r.getMessage().endswith("Cancelled")) for r in mine] == [
        ("INFO", True),
        ("ERROR", False),
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.error(CANCELLED)
    assert [r for r in caplog.records if r.name == log.name] == []
