"""Impression logging straight into a C producer's queue: no Python thread competes with scoring.

``ImpressionLogger`` (engine/serve/impression_log.py) hands events to a Python drain thread and, with
kafka-python, to kafka-python's Python sender thread: both take the GIL while requests are scored, and
a request that arrives while they hold it waits up to the interpreter's switch interval (5 ms). Measured
at 100 req/s x 100 candidates: p50 +1 ms, p99 5 -> 7 ms, and stalls of ~100 ms (docs/bench-serve.md).

``ProducerLogger`` encodes the request's shown items on the request thread (orjson, ~1.5 us each) and
offers each to a sink whose queue and network work live in C threads (``ConfluentSink.offer``:
librdkafka's bounded queue, never blocking). The only Python thread left wakes every ``poll_interval_s``
to serve delivery reports, which are requested for failures only.

The rules of the bounded buffer are unchanged (docs/operations.md): a request never fails or waits
because of logging; librdkafka's queue (``queue.buffering.max.messages`` = ``max_buffer``) holds what
Kafka has not acknowledged, retried without a time limit (``message.timeout.ms`` 0) while Kafka is
down; beyond ``max_buffer`` new events are dropped and counted (``queue_full``); an event over
``max_record_bytes`` is dropped at once (``oversized``); an event Kafka refuses for good (a timestamp it
rejects, a size it refuses) is dropped and counted (``rejected`` / ``oversized``) without holding back
the others; at close, what is still undelivered after ``close_timeout_s`` is counted (``shutdown``),
and ``close`` returns within that timeout + 2 s whatever Kafka does.

Kafka refuses a whole produce batch for one bad record (a timestamp beyond the broker's bound fails
every record batched with it). A record refused that way (``rejected``) is therefore sent again alone,
through a second producer that carries nothing else, by the poll thread: only the record that fails
alone is dropped (the rule of ImpressionLogger._isolate, kept).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from reloop.engine.events.schema import Impression
from reloop.engine.metrics.stats import STATS
from reloop.engine.serve.impression_log import export_drops_at_zero, full_buffer_log
from reloop.engine.streams import RecordTooLarge

log = logging.getLogger(__name__)

Encoder = Callable[[Impression], bytes]

RELEASE_S = 1.0  # what a producer is given to let go after its delivery time is up
_MIN_ISOLATION_S = 2.0  # less left at close: records waiting to be sent alone are not tried


class OfferSink(Protocol):
    def offer(self, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None) -> bool: ...

    def poll(self, timeout_s: float = 0.0) -> None: ...

    def pending(self) -> int: ...

    def close(self, timeout_s: float | None = None) -> None: ...


# Called for each accepted record that failed for good: (reason, detail, (value, key, timestamp_ms)).
# Reasons: "oversized" (Kafka refused its size), "rejected" (refused for good, e.g. its timestamp),
# "undelivered" (gave up on a retriable error), "shutdown" (still queued when the logger closed).
Payload = tuple[bytes, bytes | None, int | None]
FailureHook = Callable[[str, str, Payload | None], None]


class ProducerLogger:
    def __init__(
        self,
        *,
        make_sink: Callable[[FailureHook], OfferSink],
        encode: Encoder,
        max_record_bytes: int = 900 * 1024,
        poll_interval_s: float = 0.2,
        close_timeout_s: float = 10.0,
        arm: str = "default",
    ) -> None:
        self.encode = encode
        self.max_record_bytes = max_record_bytes
        self.poll_interval_s = poll_interval_s
        self.close_timeout_s = close_timeout_s
        self.arm = arm
        self._lock = threading.Lock()
        self._logged_metric = STATS.impressions_logged.child(arm)
        export_drops_at_zero()
        self._reported_sent = 0
        self._failed = 0  # accepted, then refused by Kafka for good
        self.accepted = 0
        self.dropped = 0
        self.send_errors = 0
        self.encode_errors = 0
        self.dropped_by_reason: dict[str, int] = {}
        self._full_log = full_buffer_log(arm)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._make_sink = make_sink
        self._isolate: list[Payload] = []  # refused in a batch: to be sent again alone
        self._isolating = 0
        self.sink = make_sink(self._on_failure)

    # ------------------------------------------------------------------ request path
    def log(self, impressions: Sequence[Impression]) -> int:
        """Encode and queue the impressions without blocking; returns how many were dropped."""
        if self._closed:
            self._drop("closed", len(impressions))
            return len(impressions)
        offer = self.sink.offer
        encode = self.encode
        limit = self.max_record_bytes
        taken = 0
        full = oversized = failed = 0
        for imp in impressions:
            try:
                value = encode(imp)
            except Exception:  # noqa: BLE001 - one bad event must not stop the others
                self.encode_errors += 1
                self._drop("encode_error", 1)
                log.exception("impression log: cannot encode impression %s", imp.impression_id[:64])
                continue
            if len(value) > limit:
                oversized += 1
                continue
            try:
                ok = offer(value, imp.impression_id.encode(), imp.event_time_ms)
            except RecordTooLarge:
                oversized += 1
                continue
            except Exception:  # noqa: BLE001 - a sink fault must cost the event, never the request
                failed += 1
                log.exception("impression log %s: the producer refused an impression", self.arm)
                continue
            if ok:
                taken += 1
            else:
                full += 1
        with self._lock:
            self.accepted += taken
        for reason, n in (("queue_full", full), ("oversized", oversized), ("sink_error", failed)):
            if n:
                self._drop(reason, n)
        if full:
            self._full_log.add({"queue_full": full})
        return full + oversized + failed

    def _drop(self, reason: str, n: int) -> None:
        with self._lock:
            self.dropped += n
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + n
        STATS.impressions_dropped.add(reason, n=n)

    def _on_failure(self, reason: str, detail: str, payload: Payload | None = None) -> None:
        """A record accepted earlier that was not delivered (called from poll/close, not a request)."""
        with self._lock:
            self.send_errors += 1
            if reason == "rejected" and payload is not None and not self._closed:
                self._isolate.append(payload)
                self._isolating += 1
                return
            self._failed += 1
        self._drop(reason, 1)
        if reason != "shutdown":
            log.warning(
                "impression log %s: an impression was not delivered (%s): %s", self.arm, reason, detail
            )

    # ------------------------------------------------------------------ counters
    @property
    def pending(self) -> int:
        return self.sink.pending()

    @property
    def sent(self) -> int:
        """Acknowledged by Kafka: accepted, not pending, not failed."""
        with self._lock:
            accepted, failed = self.accepted, self._failed
            isolating = self._isolating
        return max(0, accepted - failed - isolating - self.sink.pending())

    def _report(self) -> None:
        sent = self.sent
        if sent > self._reported_sent:
            self._logged_metric.add(sent - self._reported_sent)
            self._reported_sent = sent

    # ------------------------------------------------------------------ poll thread
    def start(self) -> ProducerLogger:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"impression-poll-{self.arm}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sink.poll(self.poll_interval_s)  # waits in C, without the GIL
                if self._isolate:
                    self._send_alone()
                self._report()
            except Exception:  # noqa: BLE001 - the poll thread must outlive a bad callback
                log.exception("impression log %s: poll failed", self.arm)
                self._stop.wait(self.poll_interval_s)

    def _send_alone(self, deadline: float | None = None) -> None:
        """Send each record refused within a batch on its own through a fresh producer (so it shares a
        batch with nothing); drop, counted as ``rejected``, exactly the ones refused alone. From close(),
        ``deadline`` ends the attempt: what is not acknowledged by then is counted as ``shutdown``; on
        the poll thread, close() ends it the same way (it does not wait for the poll thread)."""
        with self._lock:
            todo, self._isolate = self._isolate, []
        if not todo:
            return
        if deadline is not None and deadline - time.monotonic() < _MIN_ISOLATION_S:
            # No time left to build a producer (its start reads the topic's limit: seconds with Kafka
            # down): what waited to be sent alone is lost at shutdown, counted.
            with self._lock:
                self._isolating -= len(todo)
                self._failed += len(todo)
            self._drop("shutdown", len(todo))
            return
        verdict: list[str] = []
        sink = self._make_sink(lambda reason, detail, payload: verdict.append(reason))
        # Kafka down while isolating: each record waited close_timeout_s in turn (the poll thread, and
        # close(), stalled for N x 10 s), and one not acknowledged by then was counted as sent. Now the
        # first record not acknowledged in time is counted as undelivered (shutdown: the logger was
        # closing), and so is the rest of the lot without waiting again (if the isolation producer's
        # close still delivers that first record, it is counted twice: a drop too many, never a loss
        # unseen).
        gave_up: str | None = None
        try:
            for value, key, timestamp_ms in todo:
                verdict.clear()
                reason = "rejected"
                try:
                    wait = self.close_timeout_s
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                    if gave_up is None and wait <= 0:
                        gave_up = "shutdown"
                    if gave_up is not None:
                        reason = gave_up
                        verdict.append(f"{gave_up} (Kafka did not acknowledge the one before in time)")
                    elif not sink.offer(value, key, timestamp_ms):
                        verdict.append("rejected (the isolation producer's queue is full)")
                    else:
                        _flush(sink, wait, self._stop if deadline is None else None)
                        if not verdict and sink.pending():
                            reason = gave_up = "shutdown" if self._stop.is_set() else "undelivered"
                            verdict.append(f"{reason} (not acknowledged within {wait:.1f} s)")
                except Exception as exc:  # noqa: BLE001 - this record did not go: counted
                    verdict.append(f"rejected ({exc})")
                with self._lock:
                    self._isolating -= 1
                    if verdict:
                        self._failed += 1
                if verdict:
                    self._drop(reason, 1)
                    if reason != "shutdown":
                        log.warning(
                            "impression log %s: an impression sent alone was dropped: %s",
                            self.arm,
                            verdict[0],
                        )
        finally:
            try:
                sink.close(RELEASE_S)
            except Exception:  # noqa: BLE001 - a failed record was counted above
                log.debug("closing the isolation producer failed", exc_info=True)

    def close(self, timeout_s: float | None = None) -> None:
        """Deliver what is queued for up to ``timeout_s`` (``close_timeout_s``) in all, count what is not
        (``shutdown``), release the producer. Returns within ``timeout_s`` + 2 x ``RELEASE_S``."""
        if self._closed:
            return
        timeout = self.close_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + max(0.0, timeout)
        self._closed = True
        self._stop.set()  # the poll thread gives up a record it was sending alone at once
        if self._thread is not None:
            self._thread.join(
                min(self.poll_interval_s + 2 * RELEASE_S, max(0.0, deadline - time.monotonic()))
            )
        try:
            # Undelivered records after the timeout are purged and reported (reason "shutdown").
            self.sink.close(max(deadline - time.monotonic(), RELEASE_S))
        except Exception as exc:  # noqa: BLE001 - what was not delivered is counted by the hook
            log.warning("impression log %s: closing the producer: %s", self.arm, exc)
        if self._isolate:
            self._send_alone(deadline)
        self._report()


def _flush(sink: OfferSink, timeout_s: float, stop: threading.Event | None = None) -> None:
    """Serve the sink until it holds nothing, ``timeout_s`` passed or ``stop`` is set (its failures
    reach the hook)."""
    deadline = time.monotonic() + timeout_s
    while sink.pending() and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        sink.poll(0.05)
