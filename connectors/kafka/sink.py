"""KafkaSink: a reloop.connectors.base.Sink over kafka-python, writing one topic.

Durability settings are explicit (kafka-python 3.x changed its defaults once; a future change must not
change ours): ``acks='all'`` and the idempotent producer, so a retried batch is never written twice and
order within a partition holds. The caller picks the key (the impression id for impressions and
clicks), so the default murmur2 partitioner puts an impression and its click on the same partition
number of their topics, as the Java client would.

A send that fails is not lost silently: the first error is kept and raised by the next ``flush``.
A record too large for the producer's ``max_request_size``, or for the topic's ``max.message.bytes``
(read from the cluster when the sink opens, when that is lower), raises ``RecordTooLarge`` at ``send``
(the sink stays usable: the caller splits or dead-letters that one record). Without the topic's limit
such a record would pass ``send``, be refused by the broker after the caller let go of it, and fail
every ``flush`` after each restart. ``max_block_ms`` defaults to 10 s, not
kafka-python's 60 s, so a send waiting for metadata of an unreachable broker cannot hold a stop request
for a minute.

``close(timeout_s)`` is bounded: what Kafka has not acknowledged when ``timeout_s`` ends is given up
(the producer is closed at once, as ``abort`` does) and counted in the ``KafkaSinkError`` it raises
(``undelivered``). kafka-python's own ``close`` flushes first, without a bound of ours: with the broker
down it waited for every batch to expire (``delivery_timeout_ms``, 120 s), and ``close(timeout=0)``
raised from that flush without closing anything (the producer and its sender thread were left running).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, UnknownError
from reloop.connectors.kafka.admin import record_limit
from reloop.connectors.kafka.client_start import start_client
from reloop.connectors.kafka.login import login_checked
from reloop.connectors.kafka.settings import PRODUCER_RESERVED as _RESERVED
from reloop.engine.streams import RecordTooLarge

_FLUSH_ATTEMPTS = 10
# How long a producer given up on (close past its timeout, abort) may take to stop its sender thread.
_RELEASE_S = 1.0


class _CancelledInitIsInfo(logging.Filter):
    """kafka-python logs an ERROR "Fatal Error handling request InitProducerIdRequest: ... Cancelled"
    when an idempotent producer is closed before the broker answered its first request: every short-lived
    sink, and every stage that stops early. Nothing was lost (no record had been sent), so it is INFO, as
    kafka-python's own fetcher logs a cancelled fetch."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if record.levelno >= logging.ERROR and "InitProducerIdRequest" in text and text.endswith("Cancelled"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


logging.getLogger("kafka.producer.transaction_manager").addFilter(_CancelledInitIsInfo())
# Bytes a record adds to its key and value inside a produce request (record + batch headers, with room).
_RECORD_OVERHEAD = 256


class KafkaSinkError(RuntimeError):
    """At least one queued record could not be delivered (``undelivered``: how many, when known)."""

    def __init__(self, message: str, undelivered: int | None = None) -> None:
        super().__init__(message)
        self.undelivered = undelivered


class KafkaSink:
    """Sends raw-bytes records to ``topic``.

    ``client_config`` goes to ``kafka.KafkaProducer`` unchanged (SASL/SSL, ``linger_ms``, ``batch_size``,
    ``compression_type`` ...), except the settings listed in ``_RESERVED``.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        client_config: Mapping[str, Any] | None = None,
    ) -> None:
        for key in client_config or {}:
            if key in _RESERVED:
                raise ValueError(f"client_config[{key!r}] is not allowed: {_RESERVED[key]}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_config = dict(client_config or {})
        config: dict[str, Any] = {
            "linger_ms": 5,  # small batches under load, ~no added latency when idle
            # An upper bound, not a wait: 16 KiB (the default) holds ~19 impressions of ~850 bytes;
            # 256 KiB measured 1.3-1.6x the produce rate in bench/kafka_clients (docs/bench-kafka.md).
            "batch_size": 262_144,
            "max_in_flight_requests_per_connection": 5,  # the most idempotence allows while keeping order
            "max_block_ms": 10_000,
            **self.client_config,
        }
        default_max = KafkaProducer.DEFAULT_CONFIG["max_request_size"]
        self.max_request_size = int(config.get("max_request_size", default_max))
        self._limit_name = "max_request_size"
        topic_limit = record_limit(bootstrap, topic, self.client_config)
        if topic_limit is not None and topic_limit < self.max_request_size:
            self.max_request_size = topic_limit
            self._limit_name = "the topic's max.message.bytes"
            if "batch_size" not in self.client_config:  # a batch over the limit is refused, then split
                config["batch_size"] = min(config["batch_size"], topic_limit)
        with login_checked(bootstrap):
            self._producer: KafkaProducer | None = start_client(
                KafkaProducer,
                bootstrap_servers=bootstrap,
                acks="all",
                enable_idempotence=True,
                **config,
            )
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._failed = 0
        self._unacked = 0  # sent, neither acknowledged nor failed yet
        self._gave_up = False  # closed past its timeout: a flush still running delivered nothing for sure

    def send(
        self,
        value: bytes,
        key: bytes | None = None,
        timestamp_ms: int | None = None,
        partition: int | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``on_failure(error)`` runs (on the producer's thread) if this record is given up on: a sender
        that resends exactly the failed records (``reloop simulate``'s clicks after a long outage)."""
        if self._producer is None:
            raise RuntimeError("send on a closed KafkaSink")
        size = len(value) + len(key or b"") + _RECORD_OVERHEAD
        if size > self.max_request_size:
            raise RecordTooLarge(
                f"record of ~{size} bytes exceeds {self._limit_name} {self.max_request_size} "
                f"for {self.topic!r}"
            )
        try:
            future = self._producer.send(
                self.topic, value=value, key=key, timestamp_ms=timestamp_ms, partition=partition
            )
        except MessageSizeTooLargeError as exc:
            raise RecordTooLarge(f"{self.topic!r}: {exc}") from exc
        with self._lock:
            self._unacked += 1
        future.add_callback(self._on_sent)
        future.add_errback(self._on_error)
        if on_failure is not None:
            future.add_errback(on_failure)

    def wait_for_partitions(self, count: int, timeout_s: float) -> bool:
        """Whether this producer knows at least ``count`` partitions of its topic, asking the cluster
        again until it does or ``timeout_s`` passed. A producer learns of partitions added to its topic
        at its metadata refresh (every 5 minutes by default) and refuses a record for one it does not
        know yet ("Unrecognized partition"): a join task taken on a grown samples topic failed its stage
        at its first send."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("wait_for_partitions on a closed KafkaSink")
        deadline = time.monotonic() + timeout_s
        while True:
            if len(producer.partitions_for(self.topic)) >= count:  # cached once known; fetched before
                return True
            if time.monotonic() >= deadline:
                return False
            # kafka-python has no public refresh: what its own send does for a topic it does not know.
            producer._metadata.request_update()  # noqa: SLF001
            producer._sender.wakeup()  # noqa: SLF001
            time.sleep(0.1)

    def _on_sent(self, _metadata: Any) -> None:
        with self._lock:
            self._unacked -= 1

    def _on_error(self, exc: BaseException) -> None:
        with self._lock:
            self._unacked -= 1
            self._failed += 1
            if self._error is None:
                self._error = exc

    def flush(self, timeout_s: float | None = None) -> None:
        producer = self._producer
        if producer is None:
            return
        self._flush(producer, timeout_s)
        self._raise_if_failed()
        if self._gave_up:  # close() gave up on the records meanwhile: this flush did not deliver them
            raise KafkaSinkError(f"the sink to {self.topic!r} was closed before its records were delivered")

    @staticmethod
    def _flush(producer: KafkaProducer, timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for _ in range(_FLUSH_ATTEMPTS):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                producer.flush(timeout=remaining)
                return
            except UnknownError:
                # kafka-python 3.0 raises UnknownError('Future not done') from flush when the broker
                # rejected a batch as too large and the producer split it and re-queued the halves;
                # flushing again waits for those (their failures reach _on_error as usual).
                continue
        producer.flush(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _raise_if_failed(self) -> None:
        with self._lock:
            error, failed = self._error, self._failed
            self._error, self._failed = None, 0
        if error is not None:
            raise KafkaSinkError(
                f"{failed} record(s) to {self.topic!r} were not delivered: {error!r}", failed
            ) from error

    def abort(self) -> None:
        """Release the producer at once, without waiting for what it still holds (a failed pipeline
        is rebuilt from its last snapshot, which sends those records again)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            _give_up(producer)

    def close(self, timeout_s: float | None = None) -> None:
        """Deliver what is queued, then release the producer. With ``timeout_s``, the whole close takes
        at most about ``timeout_s`` + 1 s: what is not acknowledged by then is given up and counted
        (``KafkaSinkError.undelivered``). None waits as long as the producer retries
        (``delivery_timeout_ms``). Calling it twice is harmless."""
        if self._producer is None:
            return
        producer, self._producer = self._producer, None
        if timeout_s is None:
            try:
                self._flush(producer, None)
            finally:
                producer.close()
            self._raise_if_failed()
            return
        deadline = time.monotonic() + max(0.0, timeout_s)
        try:
            self._flush(producer, timeout_s)
        except BaseException as exc:
            self._gave_up = True
            if not isinstance(exc, Exception):  # KeyboardInterrupt ...: released, not reworded
                _give_up(producer)
                raise
            _give_up(producer)  # the records it held fail now (reaching _on_error)
            with self._lock:
                failed, unacked = self._failed, self._unacked
                error = self._error
                self._error, self._failed = None, 0
            undelivered = failed + max(unacked, 0)
            raise KafkaSinkError(
                f"{undelivered} record(s) to {self.topic!r} not delivered within the close timeout of "
                f"{timeout_s} s" + (f" ({error!r})" if error is not None else ""),
                undelivered,
            ) from error
        with contextlib.suppress(KafkaTimeoutError):  # nothing is left to send: only the sender stops
            producer.close(timeout=max(0.0, deadline - time.monotonic()) + _RELEASE_S)
        self._raise_if_failed()


def _give_up(producer: KafkaProducer) -> None:
    """Close ``producer`` without delivering what it holds: its unsent and in-flight batches fail at
    once (their futures' errbacks run). kafka-python's ``close(timeout=0)`` flushes first and raises from
    that flush, closing nothing, while a batch is pending: the sender is force-closed first here."""
    sender = getattr(producer, "_sender", None)
    force = getattr(sender, "force_close", None)
    with contextlib.suppress(Exception):  # a broken producer is being thrown away
        if force is not None:
            force()
        producer.close(timeout=_RELEASE_S)
