"""A refused Kafka login told from an outage, without a broker: the notes kafka-python's log gives and the
error callback librdkafka calls (the real broker's refusal: tests/integration/test_kafka_sasl.py)."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError
from kafka.errors import KafkaTimeoutError, SaslAuthenticationFailedError
from reloop.connectors.confluent.login import LoginWatch
from reloop.connectors.kafka.login import login_checked
from reloop.engine.streams import AuthenticationFailed

BROKER_WORDS = "Authentication failed: Invalid username or password"


def _kafka_python_logs_refusal() -> None:
    """What kafka-python logs when the broker's SaslAuthenticate answer is an error (connection.py)."""
    exc = SaslAuthenticationFailedError(f"SaslAuthenticationFailedError: {BROKER_WORDS}")
    logging.getLogger("kafka.net.connection").error("%s: Connection lost: %s", "<KafkaConnection>", exc)


def test_a_bootstrap_timeout_after_a_logged_refusal_is_a_refused_login() -> None:
    with pytest.raises(AuthenticationFailed, match=BROKER_WORDS) as refused, login_checked("broker:9092"):
        _kafka_python_logs_refusal()
        raise KafkaTimeoutError("Unable to bootstrap from broker:9092")
    assert "broker:9092" in str(refused.value) and "kafka.sasl_password" in str(refused.value)


def test_a_bootstrap_timeout_without_a_refusal_stays_an_outage() -> None:
    _kafka_python_logs_refusal()  # an earlier client's: not this one's
    with pytest.raises(KafkaTimeoutError), login_checked("broker:9092"):
        logging.getLogger("kafka.net.connection").error("%s: Connection lost: %s", "c", "socket disconnected")
        raise KafkaTimeoutError("Unable to bootstrap from broker:9092")


def test_the_client_raising_the_refusal_itself_is_a_refused_login() -> None:
    with pytest.raises(AuthenticationFailed, match=BROKER_WORDS), login_checked("broker:9092"):
        raise SaslAuthenticationFailedError(f"SaslAuthenticationFailedError: {BROKER_WORDS}")


def test_librdkafka_error_callback_keeps_the_refusal_and_passes_every_error_on() -> None:
    seen: list[int] = []
    watch = LoginWatch("broker:9092", then=lambda err: seen.append(err.code()))
    watch(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    watch.check()  # an outage: nothing to raise
    watch(KafkaError(KafkaError._AUTHENTICATION, f"sasl_plaintext://broker:9092/bootstrap: {BROKER_WORDS}"))
    with pytest.raises(AuthenticationFailed, match=BROKER_WORDS):
        watch.check()
    assert seen == [KafkaError._ALL_BROKERS_DOWN, KafkaError._AUTHENTICATION]


def test_check_serves_the_callbacks_of_the_client_it_is_given() -> None:
    watch = LoginWatch("broker:9092")

    class Client:
        def poll(self, timeout: float) -> None:
            watch(KafkaError(KafkaError._AUTHENTICATION, BROKER_WORDS))

    with pytest.raises(AuthenticationFailed):
        watch.check(Client())
