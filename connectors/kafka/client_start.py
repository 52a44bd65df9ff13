"""kafka-python clients that leave no thread behind when they fail to start.

kafka-python 3.0.12 starts a client's network thread (``kafka-io-kafka-python-...``) in the constructor of
``KafkaConsumer``, ``KafkaProducer`` and ``KafkaAdminClient``, before it bootstraps, and raises from a
failed bootstrap (``KafkaTimeoutError``, a refused login) without stopping it. The thread then retried the
unreachable broker for the life of the process: one per failed start, such as each readiness probe of a
starting broker, a source built while the broker was down, or the join stage's retention lookup. Its
warnings ("No node available for metadata refresh") then turned up in whatever ran later.
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeVar

Client = TypeVar("Client")


def start_client(cls: type[Client], **config: Any) -> Client:
    """``cls(**config)``; when that raises, the network client it made is closed first (module doc)."""
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
