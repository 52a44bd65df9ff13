"""Telling a refused login from an unreachable broker, for confluent-kafka (librdkafka).

librdkafka reports the broker's refusal of a SASL login only to the client's ``error_cb`` (code
``_AUTHENTICATION``, served by ``poll``) and to its log; the call that needed the broker fails with "Broker
transport failure", as it does for a broker that is down, and librdkafka keeps retrying. A ``LoginWatch``
is a client's ``error_cb``: it keeps the refusal, and ``check`` turns it into ``AuthenticationFailed``.

A TLS handshake that fails on a certificate (the broker's not verified: wrong CA or host name; the client's
refused by the broker's alert) is reported and retried the same way (codes ``_SSL`` and ``_TRANSPORT``);
it becomes ``TlsRefused``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError
from reloop.engine.streams import AuthenticationFailed, TlsRefused

# "SSL handshake failed: ... certificate verify failed: broker certificate could not be verified ..." (_SSL),
# "Receive failed: ... ssl/tls alert bad certificate: SSL alert number 42" (_TRANSPORT: the broker refused
# the client's certificate, or wanted one). Not "Disconnected" or a reset: those are outages.
_TLS_REFUSAL = re.compile(r"certificate|alert unknown ca", re.IGNORECASE)
#: The longest a call that waits on the cluster goes without serving the error callbacks, where a refusal
#: shows (a topic listing, a flush).
LOGIN_CHECK_S = 1.0


class LoginWatch:
    """A librdkafka client's ``error_cb``; ``then`` gets every error too (the sink counts them)."""

    def __init__(self, bootstrap: str, then: Callable[[KafkaError], None] | None = None) -> None:
        self.bootstrap = bootstrap
        self.then = then
        self.refused: str | None = None
        self.kind: type[AuthenticationFailed] = AuthenticationFailed

    def __call__(self, err: KafkaError) -> None:
        if err.code() == KafkaError._AUTHENTICATION:
            # "sasl_plaintext://host:port/bootstrap: SASL authentication error: <the broker's words> (...)"
            self.refused, self.kind = err.str(), AuthenticationFailed
        elif err.code() in (KafkaError._SSL, KafkaError._TRANSPORT) and _TLS_REFUSAL.search(err.str()):
            self.refused, self.kind = err.str(), TlsRefused
        if self.then is not None:
            self.then(err)

    def check(self, client: Any = None) -> None:
        """Raise ``AuthenticationFailed`` when the cluster refused the login. ``client``: one whose error
        callbacks may be served here (a producer or admin client, or a consumer with nothing assigned,
        whose poll cannot take a record)."""
        if client is not None and self.refused is None:
            client.poll(0)
        if self.refused is not None:
            raise self.kind(self.bootstrap, self.refused)
