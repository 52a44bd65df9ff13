"""Impression logging off the request path: a bounded buffer drained by one background thread.

A scoring request only appends to an in-memory buffer (a lock and a list append) and never waits on
the sink. The drain thread batches events, encodes them and hands them to a ``reloop.engine.streams.Sink``
(Kafka in production, MemorySink in unit tests). When the sink is slow or down the buffer fills up to
``max_buffer`` events; beyond that new events are dropped and counted, so a Kafka outage costs logged
events (visible in ``dropped``) but never a failed or slow request.

A record the sink can NEVER take must not hold the others back (it used to go back to the front of the
buffer and be retried forever, so one 10 MB impression stopped all logging). So: an encoded event over
``max_record_bytes`` is dropped at once (reason ``oversized``); a flush that fails with an error that
says it will not succeed on retry (``retriable`` False on the error or its cause: a timestamp the broker
refuses, a record too large) makes the logger send that batch one record at a time, dropping (reason
``rejected``) exactly the records that fail that way. A retriable failure (broker unreachable) keeps the
whole batch for a retry after ``retry_backoff_s``. Every drop is counted by reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from reloop.engine.events.schema import Impression
from reloop.engine.metrics.stats import STATS
from reloop.engine.streams import RecordTooLarge, Sink

log = logging.getLogger(__name__)

Encoder = Callable[[Impression], bytes]


class ImpressionLogger:
    def __init__(
        self,
        *,
        sink: Sink,
        encode: Encoder,
        max_buffer: int = 100_000,
        batch_size: int = 500,
        linger_s: float = 0.02,
        retry_backoff_s: float = 0.5,
        max_record_bytes: int = 900 * 1024,
        flush_timeout_s: float = 10.0,
        arm: str = "default",
    ) -> None:
        if max_buffer < 1 or batch_size < 1:
            raise ValueError("impression log: max_buffer and batch_size must be >= 1")
        self.sink = sink
        self.encode = encode
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.retry_backoff_s = retry_backoff_s
        self.max_record_bytes = max_record_bytes
        self.flush_timeout_s = flush_timeout_s
        self.arm = arm
        self._logged_metric = STATS.impressions_logged.child(arm)
        self._buffer: deque[Impression] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._closed = False  # set by close() once what was left is counted: later events are dropped
        self._thread: threading.Thread | None = None
        # Counters (read by metrics and tests); only ever incremented.
        self.accepted = 0
        self.dropped = 0
        self.sent = 0
        self.send_errors = 0
        self.encode_errors = 0
        self.dropped_by_reason: dict[str, int] = {}

    # ------------------------------------------------------------------ request path
    def log(self, impressions: Sequence[Impression]) -> int:
        """Queue impressions without blocking; returns how many were dropped because the buffer is full."""
        with self._cond:
            closed = self._closed  # nothing drains the buffer any more: dropped and counted
            room = 0 if closed else self.max_buffer - len(self._buffer)
            take = impressions if room >= len(impressions) else impressions[: max(room, 0)]
            self._buffer.extend(take)
            dropped = len(impressions) - len(take)
            self.accepted += len(take)
            if take:
                self._cond.notify()
        if dropped:
            self._drop("closed" if closed else "queue_full", dropped)
        return dropped

    def _drop(self, reason: str, n: int) -> None:
        with self._cond:
            self.dropped += n
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n
        STATS.impressions_dropped.add(reason, n=n)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._buffer)

    # ------------------------------------------------------------------ drain thread
    def start(self) -> ImpressionLogger:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"impression-log-{self.arm}", daemon=True)
            self._thread.start()
        return self

    def _take_batch(self) -> list[Impression]:
        with self._cond:
            while not self._buffer and not self._stop:
                self._cond.wait(0.5)
            if self._buffer and len(self._buffer) < self.batch_size and not self._stop:
                # Linger briefly so a burst becomes one batch (fewer sink calls, one flush).
                self._cond.wait(self.linger_s)
            n = min(self.batch_size, len(self._buffer))
            return [self._buffer.popleft() for _ in range(n)]

    def _put_back(self, batch: list[Impression]) -> None:
        """Return an unsent batch to the front of the buffer; whatever no longer fits is dropped."""
        with self._cond:
            closed = self._closed  # close() gave up waiting for this batch: lost at shutdown, counted
            room = 0 if closed else self.max_buffer - len(self._buffer)
            keep = batch[: max(room, 0)]
            self._buffer.extendleft(reversed(keep))
        if len(keep) < len(batch):
            self._drop("shutdown" if closed else "sink_error", len(batch) - len(keep))

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._stop:
                    return
                continue
            unsent = self._send(batch)
            if unsent:
                self._put_back(unsent)
                if self._stop:
                    return
                time.sleep(self.retry_backoff_s)

    def _encode(self, batch: list[Impression]) -> list[tuple[Impression, bytes]]:
        out = []
        for imp in batch:
            try:
                value = self.encode(imp)
            except Exception:  # noqa: BLE001 - one bad event must not stop the others
                self.encode_errors += 1
                self._drop("encode_error", 1)
                log.exception("impression log: cannot encode impression %s", imp.impression_id)
                continue
            if len(value) > self.max_record_bytes:
                self._drop("oversized", 1)
                log.warning(
                    "impression log %s: impression %s is %d bytes (limit %d): dropped",
                    self.arm,
                    imp.impression_id[:64],
                    len(value),
                    self.max_record_bytes,
                )
                continue
            out.append((imp, value))
        return out

    def _send(self, batch: list[Impression]) -> list[Impression]:
        """Send a batch; returns the impressions to retry later (empty when done)."""
        payloads = self._encode(batch)
        try:
            sent = self._deliver(payloads)
        except Exception as exc:  # noqa: BLE001 - any sink failure: keep or isolate, never lose silently
            self.send_errors += 1
            if _retriable(exc):
                log.warning(
                    "impression log %s: sink failed (%s); %d events kept for retry",
                    self.arm,
                    exc,
                    len(payloads),
                )
                return [imp for imp, _ in payloads]
            log.warning(
                "impression log %s: sink refused a batch (%s); sending it record by record", self.arm, exc
            )
            return self._isolate(payloads)
        self._count_sent(sent)
        return []

    def _deliver(self, payloads: list[tuple[Impression, bytes]]) -> int:
        """Send and flush; a record the sink refuses for its size is dropped here. Returns how many went."""
        n = 0
        for imp, value in payloads:
            try:
                self.sink.send(value, key=imp.impression_id.encode(), timestamp_ms=imp.event_time_ms)
                n += 1
            except RecordTooLarge:
                self._drop("oversized", 1)
        self.sink.flush(timeout_s=self.flush_timeout_s)
        return n

    def _isolate(self, payloads: list[tuple[Impression, bytes]]) -> list[Impression]:
        """One record per flush: drop those refused for good, keep the rest from a retriable failure on."""
        for k, (imp, value) in enumerate(payloads):
            try:
                self._count_sent(self._deliver([(imp, value)]))
            except Exception as exc:  # noqa: BLE001 - classified below
                self.send_errors += 1
                if _retriable(exc):
                    return [i for i, _ in payloads[k:]]
                self._drop("rejected", 1)
                log.warning(
                    "impression log %s: impression %s rejected: %s", self.arm, imp.impression_id[:64], exc
                )
        return []

    def _count_sent(self, n: int) -> None:
        if n:
            self.sent += n
            self._logged_metric.add(n)

    def close(self, timeout_s: float = 10.0) -> None:
        """Drain what is buffered (up to ``timeout_s``), then close the sink."""
        deadline = time.monotonic() + timeout_s
        while self._thread is not None and self.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.1))
        # What is still buffered (Kafka down, or the timeout passed) is lost: count it as ``shutdown``
        # (docs/operations.md); a batch the drain thread still holds is counted by _put_back if it fails.
        with self._cond:
            left = len(self._buffer)
            self._buffer.clear()
            self._closed = True
        if left:
            self._drop("shutdown", left)
            log.warning("impression log %s: %d impressions not delivered before shutdown", self.arm, left)
        try:
            self.sink.close()
        except Exception:  # noqa: BLE001 - closing a dead sink must not hide the shutdown
            log.exception("impression log %s: closing the sink failed", self.arm)


def _retriable(exc: BaseException) -> bool:
    """False when the error (or an error it was raised from) says retrying cannot succeed: Kafka client
    errors carry a ``retriable`` flag; a RecordTooLarge never succeeds."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, RecordTooLarge) or getattr(seen, "retriable", True) is False:
            return False
        seen = seen.__cause__ or seen.__context__
    return True
