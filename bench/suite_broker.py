"""A local Kafka broker for the figures that need one, started and stopped by the figure's process."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_broker() -> Iterator[str]:
    """Start the project's local broker (deploy/kafka) in a temporary directory; yields its bootstrap."""
    from reloop.connectors.kafka.local_broker import LocalBroker

    with tempfile.TemporaryDirectory(prefix="reloop-bench-kafka-") as tmp:
        broker = LocalBroker(Path(tmp) / "kafka")
        info = broker.start()
        try:
            yield info.bootstrap
        finally:
            broker.stop()
