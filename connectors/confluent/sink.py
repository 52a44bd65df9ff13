"""ConfluentSink: a reloop.connectors.base.Sink over confluent-kafka (librdkafka), writing one topic.

Same contract and durability as ``reloop.connectors.kafka.sink.KafkaSink`` (``acks=all``, idempotent, order
kept within a partition, the first delivery error raised by the next ``flush``, ``RecordTooLarge`` for
one record too large, ``abort``), and the same partitioner as the Java client and kafka-python
(``murmur2_random``; librdkafka's default is crc32): an impression and its click, keyed by the impression
id, land on the same partition number of their topics whichever client wrote them.

What differs is where the work runs: batching, compression, network I/O and retries run in librdkafka's
C threads, without the GIL. ``send`` only copies the record into librdkafka's queue (~1-2 us), so a
process that also serves requests does not share its interpreter with a Python producer loop
(kafka-python's sender thread: docs/bench-serve.md). Delivery reports are requested for failures only
(``delivery.report.only.error``) and served by whoever calls ``poll``/``flush``.

``offer`` is the never-blocking send for callers that must not wait (the impression logger of the
scoring service): it returns False when librdkafka's queue is full (``queue.buffering.max.messages``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from reloop.connectors.confluent.admin import record_limit
from reloop.connectors.confluent.login import LOGIN_CHECK_S, LoginWatch
from reloop.connectors.confluent.logs import built
from reloop.connectors.confluent.settings import PRODUCER_RESERVED as _RESERVED
from reloop.engine.streams import RecordTooLarge

# Bytes a record adds to its key and value inside a produce request (record + batch headers, with room).
_RECORD_OVERHEAD = 256
_SIZE_ERRORS = {KafkaError.MSG_SIZE_TOO_LARGE}

# (error, the failed message: .value(), .key(), the timestamp it was sent with) per record failed for good.
ErrorHook = Callable[[KafkaError, Any, int | None], None]


def failure_reason(err: KafkaError) -> str:
    """Why a record was not delivered, in the impression logger's drop reasons."""
    code = err.code()
    if code in _SIZE_ERRORS:
        return "oversized"
    if code in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
        return "shutdown"
    return "undelivered" if err.retriable() else "rejected"


class ConfluentSinkError(RuntimeError):
    """At least one queued record could not be delivered (``undelivered``: how many, when known)."""

    undelivered: int | None = None
    retriable: bool = True  # set from the broker's error where there is one


class ConfluentSink:
    """Sends raw-bytes records to ``topic``.

    ``client_config`` goes to ``confluent_kafka.Producer`` unchanged (librdkafka names: ``linger.ms``,
    ``security.protocol``, ``sasl.mechanism`` ...), except the settings in ``_RESERVED``. ``on_error``
    (optional) is called with (KafkaError, message, timestamp_ms) for each record that failed for good,
    from the thread that calls ``poll``/``flush``.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        client_config: Mapping[str, Any] | None = None,
        on_error: ErrorHook | None = None,
    ) -> None:
        for key in client_config or {}:
            if key in _RESERVED:
                raise ValueError(f"client_config[{key!r}] is not allowed: {_RESERVED[key]}")
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_config = dict(client_config or {})
        config: dict[str, Any] = {
            "linger.ms": 5,
            "message.max.bytes": 1_000_000,
            **self.client_config,
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "delivery.report.only.error": True,
            "error_cb": LoginWatch(bootstrap, then=self._on_client_error),
        }
        self.max_request_size = int(config["message.max.bytes"])
        self._limit_name = "message.max.bytes"
        topic_limit = record_limit(self.client_config, bootstrap, topic)
        if topic_limit is not None and topic_limit < self.max_request_size:
            # Above it the broker refuses the record after ``send`` returned (see KafkaSink). The limit
            # holds for a whole batch of records, and librdkafka, unlike kafka-python, does not split
            # a batch the broker refused: batches are capped at it too.
            self.max_request_size = topic_limit
            self._limit_name = "the topic's max.message.bytes"
            if "batch.size" not in self.client_config:
                config["batch.size"] = topic_limit
        self._on_error_hook = on_error
        self._lock = threading.Lock()
        self._error: KafkaError | None = None
        self._failed = 0
        self.client_errors = 0
        self._login: LoginWatch = config["error_cb"]
        self._producer: Producer | None = built(Producer, config)

    # ------------------------------------------------------------------ sending
    def _check_size(self, value: bytes, key: bytes | None) -> None:
        size = len(value) + len(key or b"") + _RECORD_OVERHEAD
        if size > self.max_request_size:
            raise RecordTooLarge(
                f"record of ~{size} bytes exceeds {self._limit_name} {self.max_request_size} "
                f"for {self.topic!r}"
            )

    def _produce(
        self, value: bytes, key: bytes | None, timestamp_ms: int | None, partition: int | None = None
    ) -> None:
        assert self._producer is not None
        extra = {} if partition is None else {"partition": partition}
        try:
            # A failed message's report does not carry its timestamp: the closure keeps it.
            self._producer.produce(
                self.topic,
                value,
                key,
                timestamp=timestamp_ms or 0,
                on_delivery=lambda err, msg: self._on_delivery(err, msg, timestamp_ms),
                **extra,
            )
        except KafkaException as exc:
            if exc.args and exc.args[0].code() in _SIZE_ERRORS:
                raise RecordTooLarge(f"{self.topic!r}: {exc}") from exc
            raise

    def send(
        self,
        value: bytes,
        key: bytes | None = None,
        timestamp_ms: int | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue one record; while librdkafka's queue is full, serve delivery reports and wait."""
        if self._producer is None:
            raise RuntimeError("send on a closed ConfluentSink")
        self._check_size(value, key)
        while True:
            try:
                self._produce(value, key, timestamp_ms, partition)
                return
            except BufferError:
                self._producer.poll(0.05)

    def offer(self, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None) -> bool:
        """Queue one record without ever blocking; False when the queue is full (the caller drops it)."""
        if self._producer is None:
            raise RuntimeError("offer on a closed ConfluentSink")
        self._check_size(value, key)
        try:
            self._produce(value, key, timestamp_ms)
        except BufferError:
            return False
        return True

    def _on_delivery(self, err: KafkaError | None, msg: Any, timestamp_ms: int | None) -> None:
        if err is None:
            return
        with self._lock:
            self._failed += 1
            if self._error is None:
                self._error = err
        if self._on_error_hook is not None:
            self._on_error_hook(err, msg, timestamp_ms)

    def _on_client_error(self, err: KafkaError) -> None:
        # Transport errors (broker down, ...) that librdkafka retries by itself: counted, not raised;
        # a record that finally fails reaches _on_delivery.
        self.client_errors += 1

    # ------------------------------------------------------------------ state
    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports (failures only); waits up to ``timeout_s`` without holding the GIL."""
        if self._producer is not None:
            self._producer.poll(timeout_s)

    def pending(self) -> int:
        """Records queued or in flight, not yet acknowledged."""
        return 0 if self._producer is None else len(self._producer)

    def wait_for_partitions(self, count: int, timeout_s: float) -> bool:
        """Whether this producer knows at least ``count`` partitions of its topic, asking the cluster
        until it does or ``timeout_s`` passed: as the kafka-python sink's (librdkafka refuses a record
        for a partition it does not know yet: "Local: Unknown partition"; a metadata request made
        through the producer updates what it knows)."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("wait_for_partitions on a closed ConfluentSink")
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            found = producer.list_topics(self.topic, timeout=max(0.5, left)).topics.get(self.topic)
            if found is not None and found.error is None and len(found.partitions) >= count:
                return True
            if left <= 0:
                return False
            time.sleep(0.2)

    def flush(self, timeout_s: float | None = None) -> None:
        if self._producer is None:
            return
        # In waits of at most LOGIN_CHECK_S, each serving the error callbacks: a refused login is told
        # within one instead of after the whole timeout (and a flush without one never ended).
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = LOGIN_CHECK_S if deadline is None else min(LOGIN_CHECK_S, deadline - time.monotonic())
            left = self._producer.flush(max(wait, 0.0))
            self._login.check()  # flush served the error callbacks
            if not left or (deadline is not None and time.monotonic() >= deadline):
                break
        if left:
            raise ConfluentSinkError(
                f"{left} record(s) to {self.topic!r} still undelivered after {timeout_s} s"
            )
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        with self._lock:
            error, failed = self._error, self._failed
            self._error, self._failed = None, 0
        if error is not None:
            exc = ConfluentSinkError(f"{failed} record(s) to {self.topic!r} were not delivered: {error}")
            exc.retriable = bool(error.retriable())  # read by the impression logger
            raise exc from KafkaException(error)

    def abort(self) -> None:
        """Release the producer at once, without waiting for what it still holds."""
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.purge(in_queue=True, in_flight=True)
                producer.flush(0)

    def close(self, timeout_s: float | None = None) -> None:
        """Deliver what is queued (up to ``timeout_s``; None: for as long as librdkafka retries), then
        purge what is left, its failures reported to ``on_error`` (``_PURGE_*``: reason ``shutdown``),
        and raise ``ConfluentSinkError`` with ``undelivered`` = how many were purged."""
        if self._producer is None:
            return
        producer, self._producer = self._producer, None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        left = producer.flush(-1 if deadline is None else max(0.0, deadline - time.monotonic()))
        if left:
            with contextlib.suppress(Exception):
                producer.purge(in_queue=True, in_flight=True)
                producer.flush(0)
            exc = ConfluentSinkError(f"{left} record(s) to {self.topic!r} not delivered before close")
            exc.undelivered = left
            raise exc
        self._raise_if_failed()
