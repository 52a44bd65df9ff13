"""Telling a refused login from an unreachable broker, for confluent-kafka (librdkafka).

librdkafka reports the broker's refusal of a SASL login only to the client's ``error_cb`` (code
``_AUTHENTICATION``, served by ``poll``) and to its log; the call that needed the broker fails with "Broker
transport failure", as it does for a broker that is down, and librdkafka keeps retrying. A ``LoginWatch``
is a client's ``error_cb``: it keeps the refusal, and ``check`` turns it into ``AuthenticationFailed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError
from reloop.engine.streams import AuthenticationFailed


class LoginWatch:
    """A librdkafka client's ``error_cb``; ``then`` gets every error too (the sink counts them)."""

    def __init__(self, bootstrap: str, then: Callable[[KafkaError], None] | None = None) -> None:
        self.bootstrap = bootstrap
        self.then = then
        self.refused: str | None = None

    def __call__(self, err: KafkaError) -> None:
        if err.code() == KafkaError._AUTHENTICATION:
            # "sasl_plaintext://host:port/bootstrap: SASL authentication error: <the broker's words> (...)"
            self.refused = err.str()
        if self.then is not None:
            self.then(err)

    def check(self, client: Any = None) -> None:
        """Raise ``AuthenticationFailed`` when the cluster refused the login. ``client``: one whose error
        callbacks may be served here (a producer or admin client, or a consumer with nothing assigned,
        whose poll cannot take a record)."""
        if client is not None and self.refused is None:
            client.poll(0)
        if self.refused is not None:
            raise AuthenticationFailed(self.bootstrap, self.refused)
