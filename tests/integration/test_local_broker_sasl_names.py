"""LocalBroker(sasl_plain=...) with the user names and passwords real deployments use: an e-mail as the
user (the JAAS option name ``user_<name>`` must be quoted) and a non-ASCII password (server.properties is
read as ISO-8859-1). One real broker; a client logs in with exactly those credentials."""

from __future__ import annotations

from pathlib import Path

import pytest
from reloop.connectors.kafka.local_broker import BrokerError, LocalBroker, _metadata_ok

pytestmark = pytest.mark.kafka

USER = "alice@example.com"
PASSWORD = "pä;s's/wö#rd=1"


def test_email_user_and_non_ascii_password_log_in(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "kafka", sasl_plain=(USER, PASSWORD))
    try:
        try:
            broker.start(timeout_s=60)
        except BrokerError as exc:
            # Before the fix: "Value not specified for key 'user_alice' in JAAS config" and an exit.
            pytest.fail(f"the SASL broker did not start: {exc}")
        ok, detail = _metadata_ok(broker.bootstrap, timeout_s=20, client_config=broker.client_settings)
        assert ok, detail
    finally:
        broker.stop()
