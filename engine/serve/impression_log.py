"""Impression logging off the request path: a bounded buffer drained by one background thread.

A scoring request only appends to an in-memory buffer (a lock and a list append) and never waits on
the sink. The drain thread batches events, encodes them and hands them to a ``connectors.base.Sink``
(Kafka in production, MemorySink in unit tests). When the sink is slow or down the buffer fills up to
``max_buffer`` events; beyond that new events are dropped and counted, so a Kafka outage costs logged
events (visible in ``dropped``) but never a failed or slow request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from connectors.base import Sink
from engine.events.schema import Impression
from engine.metrics.registry import IMPRESSIONS_DROPPED, IMPRESSIONS_LOGGED

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
        self.arm = arm
        self._logged_metric = IMPRESSIONS_LOGGED.labels(arm=arm)
        self._buffer: deque[Impression] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        # Counters (read by metrics and tests); only ever incremented.
        self.accepted = 0
        self.dropped = 0
        self.sent = 0
        self.send_errors = 0
        self.encode_errors = 0

    # ------------------------------------------------------------------ request path
    def log(self, impressions: Sequence[Impression]) -> int:
        """Queue impressions without blocking; returns how many were dropped because the buffer is full."""
        with self._cond:
            room = self.max_buffer - len(self._buffer)
            take = impressions if room >= len(impressions) else impressions[: max(room, 0)]
            self._buffer.extend(take)
            dropped = len(impressions) - len(take)
            self.accepted += len(take)
            self.dropped += dropped
            if take:
                self._cond.notify()
        return dropped

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
            room = self.max_buffer - len(self._buffer)
            keep = batch[: max(room, 0)]
            if len(keep) < len(batch):
                self.dropped += len(batch) - len(keep)
                IMPRESSIONS_DROPPED.labels(reason="sink_error").inc(len(batch) - len(keep))
            self._buffer.extendleft(reversed(keep))

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._stop:
                    return
                continue
            if not self._send(batch):
                self._put_back(batch)
                if self._stop:
                    return
                time.sleep(self.retry_backoff_s)

    def _send(self, batch: list[Impression]) -> bool:
        payloads: list[tuple[bytes, bytes, int]] = []
        for imp in batch:
            try:
                payloads.append((self.encode(imp), imp.impression_id.encode(), imp.event_time_ms))
            except Exception:  # noqa: BLE001 - one bad event must not stop the others
                self.encode_errors += 1
                log.exception("impression log: cannot encode impression %s", imp.impression_id)
        try:
            for value, key, ts in payloads:
                self.sink.send(value, key=key, timestamp_ms=ts)
            self.sink.flush(timeout_s=10.0)
        except Exception as exc:  # noqa: BLE001 - any sink failure means: keep the events, retry later
            self.send_errors += 1
            log.warning(
                "impression log %s: sink failed (%s); %d events kept for retry", self.arm, exc, len(batch)
            )
            return False
        self.sent += len(payloads)
        self._logged_metric.inc(len(payloads))
        return True

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
        try:
            self.sink.close()
        except Exception:  # noqa: BLE001 - closing a dead sink must not hide the shutdown
            log.exception("impression log %s: closing the sink failed", self.arm)
