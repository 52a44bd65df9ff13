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

``close(timeout_s)`` is bounded: it lets the drain thread deliver for up to ``timeout_s``, then counts
everything not delivered as dropped (``shutdown``: what is buffered and the batch the drain thread still
holds, e.g. in a flush to a broker that does not answer or while it connects), and gives the sink
``RELEASE_S`` to let go of its producer (``Sink.close(timeout_s)``: past it, what the producer holds
is given up). It returns within ``timeout_s`` + ``RELEASE_S`` (+ ~1 s for a Kafka producer's sender
thread to stop), whatever the broker does. A batch whose delivery was still under way when close gave up
is counted as ``shutdown`` even if Kafka takes it after all: a drop too many, never a loss unseen.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from reloop.engine.events.schema import Impression
from reloop.engine.metrics.stats import STATS
from reloop.engine.runtime.jsonlog import ThrottledCountLog
from reloop.engine.streams import RecordTooLarge, Sink

log = logging.getLogger(__name__)

Encoder = Callable[[Impression], bytes]

# Every reason an impression is dropped for, by this logger or the librdkafka one (producer_log.py).
DROP_REASONS = (
    "queue_full",
    "closed",
    "sink_error",
    "shutdown",
    "oversized",
    "rejected",
    "encode_error",
    "undelivered",
)


def full_buffer_log(arm: str) -> ThrottledCountLog:
    """The WARNING for impressions dropped at a full buffer (the first at once, then once a minute with
    the count since): only the metrics said so, and an operator reading the log saw nothing."""
    return ThrottledCountLog(
        log,
        f"arm {arm}: impression events dropped, the buffer full (serve.log.max_buffer): Kafka unreachable "
        "or too slow; they are never joined nor trained on",
        every_s=60.0,
    )


def export_drops_at_zero() -> None:
    """Each reason's series from the start: it appeared only at its first drop, so increase() over it
    missed that burst."""
    for reason in DROP_REASONS:
        STATS.impressions_dropped.child(reason)


# What close() gives the sink to release its producer after the delivery time is up (what the producer
# still holds then was counted as dropped already).
RELEASE_S = 1.0


class _Outcome:
    """What became of one batch: applied to the counters when the drain thread is done with it, unless
    close() gave up on the batch meanwhile (and counted all of it as ``shutdown``)."""

    __slots__ = ("drops", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.drops: dict[str, int] = {}

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n


def close_sink(sink: object, timeout_s: float | None) -> None:
    """``sink.close(timeout_s=...)``; a sink whose close takes no timeout (written before
    ``Sink.close`` had one) is closed without."""
    close = sink.close  # type: ignore[attr-defined]
    try:
        params = inspect.signature(close).parameters
    except (TypeError, ValueError):
        params = {}
    if "timeout_s" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        close(timeout_s=timeout_s)
    else:
        close()


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
        export_drops_at_zero()
        self._failing_since: float | None = None  # the first failed send of the current outage
        self._buffer: deque[Impression] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._closed = False  # set by close() once what was left is counted: later events are dropped
        self._held: list[Impression] | None = None  # the batch the drain thread is sending
        self._thread: threading.Thread | None = None
        # Counters (read by metrics and tests); only ever incremented.
        self.accepted = 0
        self.dropped = 0
        self.sent = 0
        self.send_errors = 0
        self.encode_errors = 0
        self.dropped_by_reason: dict[str, int] = {}
        self._full_log = full_buffer_log(arm)

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
            if not closed:
                self._full_log.add({"queue_full": dropped})
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
            batch = [self._buffer.popleft() for _ in range(n)]
            self._held = batch or None
            return batch

    def _settle(self, batch: list[Impression], outcome: _Outcome, unsent: list[Impression]) -> bool:
        """Count what became of ``batch`` and put its unsent part back at the front of the buffer
        (whatever no longer fits is dropped). False when close() gave up on the batch: counted there."""
        with self._cond:
            if self._held is not batch:
                return False
            self._held = None
            closed = self._closed
            room = 0 if closed else self.max_buffer - len(self._buffer)
            keep = unsent[: max(room, 0)]
            self._buffer.extendleft(reversed(keep))
        if len(keep) < len(unsent):
            outcome.drop("shutdown" if closed else "sink_error", len(unsent) - len(keep))
        for reason, n in outcome.drops.items():
            self._drop(reason, n)
        self._count_sent(outcome.sent)
        return True

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._stop:
                    return
                continue
            outcome = _Outcome()
            unsent = self._send(batch, outcome)
            if not self._settle(batch, outcome, unsent):
                return  # close() gave up on this batch and closed the sink
            if unsent:
                if self._stop:
                    return
                time.sleep(self.retry_backoff_s)

    def _encode(self, batch: list[Impression], outcome: _Outcome) -> list[tuple[Impression, bytes]]:
        out = []
        for imp in batch:
            try:
                value = self.encode(imp)
            except Exception:  # noqa: BLE001 - one bad event must not stop the others
                self.encode_errors += 1
                outcome.drop("encode_error")
                log.exception("impression log: cannot encode impression %s", imp.impression_id)
                continue
            if len(value) > self.max_record_bytes:
                outcome.drop("oversized")
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

    def _send(self, batch: list[Impression], outcome: _Outcome) -> list[Impression]:
        """Send a batch; returns the impressions to retry later (empty when done)."""
        payloads = self._encode(batch, outcome)
        try:
            sent = self._deliver(payloads, outcome)
        except Exception as exc:  # noqa: BLE001 - any sink failure: keep or isolate, never lose silently
            self.send_errors += 1
            if _retriable(exc):
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
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
            return self._isolate(payloads, outcome)
        outcome.sent += sent
        if self._failing_since is not None:  # "kept for retry" was the last word: say it is over
            log.info(
                "impression log %s: the sink delivers again after %.0f s of failures",
                self.arm,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        return []

    def _deliver(self, payloads: list[tuple[Impression, bytes]], outcome: _Outcome) -> int:
        """Send and flush; a record the sink refuses for its size is dropped here and taken out of
        ``payloads`` (so a retry of the rest does not send and count it again). Returns how many went."""
        i = 0
        while i < len(payloads):
            imp, value = payloads[i]
            try:
                self.sink.send(value, key=imp.impression_id.encode(), timestamp_ms=imp.event_time_ms)
                i += 1
            except RecordTooLarge:
                outcome.drop("oversized")
                del payloads[i]
        self.sink.flush(timeout_s=self.flush_timeout_s)
        return len(payloads)

    def _isolate(self, payloads: list[tuple[Impression, bytes]], outcome: _Outcome) -> list[Impression]:
        """One record per flush: drop those refused for good, keep the rest from a retriable failure on."""
        for k, (imp, value) in enumerate(payloads):
            one = [(imp, value)]
            try:
                outcome.sent += self._deliver(one, outcome)
            except Exception as exc:  # noqa: BLE001 - classified below
                self.send_errors += 1
                if _retriable(exc):
                    return [i for i, _ in one] + [i for i, _ in payloads[k + 1 :]]
                if not one:  # refused for its size (counted) before the flush failed
                    continue
                outcome.drop("rejected")
                log.warning(
                    "impression log %s: impression %s rejected: %s", self.arm, imp.impression_id[:64], exc
                )
        return []

    def _count_sent(self, n: int) -> None:
        if n:
            self.sent += n
            self._logged_metric.add(n)

    def close(self, timeout_s: float = 10.0) -> None:
        """Let the drain thread deliver what is buffered for up to ``timeout_s``, count what it did not
        (``shutdown``), then close the sink with ``RELEASE_S`` more. Returns within ``timeout_s`` +
        ``RELEASE_S`` + the sink's own release (about 1 s for a Kafka producer)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self._draining() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 0.0))
        # What is still buffered, and the batch the drain thread still holds (a flush to a broker that
        # does not answer, a producer still connecting), is lost: counted as ``shutdown`` now
        # (docs/operations.md), not when that thread gives up, maybe after the process exited.
        with self._cond:
            held, self._held = self._held, None
            left = len(self._buffer) + (len(held) if held else 0)
            self._buffer.clear()
            self._closed = True
        if left:
            self._drop("shutdown", left)
            log.warning("impression log %s: %d impressions not delivered before shutdown", self.arm, left)
        try:
            close_sink(self.sink, RELEASE_S)
        except Exception as exc:  # noqa: BLE001 - closing a dead sink must not hide the shutdown
            # What the sink gave up on belongs to batches counted above.
            log.warning("impression log %s: closing the sink: %s", self.arm, exc)

    def _draining(self) -> bool:
        """Whether the drain thread runs and has something to deliver (buffered or in hand)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return False
        with self._cond:
            return bool(self._buffer) or self._held is not None


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
