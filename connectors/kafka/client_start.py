"""kafka-python clients that leave no thread behind when they fail to start.

kafka-python 3.0.12 starts a client's network thread (``kafka-io-kafka-python-...``) in the constructor of
``KafkaConsumer``, ``KafkaProducer`` and ``KafkaAdminClient``, before it bootstraps, and raises from a
failed bootstrap (``KafkaTimeoutError``, a refused login) without stopping it. The thread then retried the
unreachable broker for the life of the process: one per failed start, such as each readiness probe of a
starting broker, a source built while the broker was down, or the join stage's retention lookup. Its
warnings ("No node available for metadata refresh") then turned up in whatever ran later.

A client's bootstrap waits up to ``bootstrap_timeout_ms`` (30 s) for a broker, and all that time the log
showed only kafka-python's own ECONNREFUSED lines: ``start_client`` first tries a TCP connection to each
bootstrap address (a second at most; PLAINTEXT listeners only, as a connection closed before its TLS or
SASL handshake shows in the broker's log as a failed login) and, when none answers, says so in one warning
naming the addresses and the wait ahead (at most one every ``WARN_EVERY_S`` per bootstrap list). It
changes nothing else: the client is built and bootstraps as before.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any, TypeVar

from reloop.engine.netaddr import bootstrap_addresses

Client = TypeVar("Client")
log = logging.getLogger(__name__)
WARN_EVERY_S = 10.0
_warned_at: dict[str, float] = {}
_warned_lock = threading.Lock()


def start_client(cls: type[Client], *, probe: bool = True, **config: Any) -> Client:
    """``cls(**config)``; when that raises, the network client it made is closed first (module doc).
    ``probe``: warn first when no bootstrap address accepts a connection (off for readiness probes)."""
    if probe:
        _warn_if_unreachable(config.get("bootstrap_servers"), cls, config)
    inner = config.pop("kafka_client", cls.DEFAULT_CONFIG["kafka_client"])  # type: ignore[attr-defined]
    made: list[Any] = []

    def network_client(**configs: Any) -> Any:
        made.append(inner(**configs))
        return made[-1]

    try:
        return cls(kafka_client=network_client, **config)
    except BaseException:
        for client in made:
            with contextlib.suppress(Exception):
                client.close()
        raise


def _warn_if_unreachable(bootstrap: Any, cls: type, config: dict[str, Any]) -> None:
    if not isinstance(bootstrap, str) or not bootstrap:
        return
    if str(config.get("security_protocol", "PLAINTEXT")).upper() != "PLAINTEXT":
        return  # a connection closed before its TLS or SASL handshake is a failed login in the broker's log
    refused = unreachable(bootstrap)
    if refused is None:
        return
    now = time.monotonic()
    with _warned_lock:
        if now - _warned_at.get(bootstrap, -WARN_EVERY_S) < WARN_EVERY_S:
            return
        _warned_at[bootstrap] = now
    defaults = getattr(cls, "DEFAULT_CONFIG", {})
    wait_ms = config.get("bootstrap_timeout_ms", defaults.get("bootstrap_timeout_ms"))
    log.warning(
        "no Kafka broker answers at %s (%s); the client keeps trying for up to %s ms (bootstrap_timeout_ms) "
        "before the attempt fails: is the broker up, and is kafka.bootstrap right?",
        bootstrap,
        refused,
        wait_ms,
    )


def unreachable(bootstrap: str, timeout_s: float = 1.0) -> str | None:
    """None when some address of ``bootstrap`` accepts a TCP connection within ``timeout_s`` in all (or
    when that cannot be told: no address parses, or the time ran out); else why each did not."""
    deadline = time.monotonic() + timeout_s
    why = []
    for host, port in bootstrap_addresses(bootstrap):
        left = deadline - time.monotonic()
        if left <= 0:
            return None  # out of time to decide: say nothing rather than something wrong
        try:
            with socket.create_connection((host, port), timeout=left):
                return None
        except OSError as exc:
            why.append(f"{host}:{port}: {exc.strerror or exc}")
    return "; ".join(why) or None
