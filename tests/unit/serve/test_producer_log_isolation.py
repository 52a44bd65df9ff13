"""ProducerLogger's records refused within a batch and sent again alone, while Kafka goes down: each is
delivered or counted, and the lot takes at most close_timeout_s."""

from __future__ import annotations

import time

from reloop.engine.events.codec import encode
from reloop.engine.serve.producer_log import ProducerLogger

from .test_producer_log import imp


class _Main:
    """The logger's producer: delivers everything at poll, except ``bad`` keys, refused in their batch."""

    def __init__(self, hook, bad: set[bytes]) -> None:
        self.hook, self.bad, self.queue = hook, bad, []

    def offer(self, value, key=None, timestamp_ms=None) -> bool:
        self.queue.append((value, key, timestamp_ms))
        return True

    def poll(self, timeout_s=0.0) -> None:
        batch, self.queue = self.queue, []
        for value, key, ts in batch:
            if key in self.bad:
                self.hook("rejected", "invalid timestamp in the batch", (value, key, ts))

    def pending(self) -> int:
        return len(self.queue)

    def close(self, timeout_s=None) -> None:
        self.poll()


class _Down:
    """The isolation producer while Kafka is down: takes records, never gets them acknowledged."""

    def __init__(self, hook) -> None:
        self.hook, self.queue = hook, []

    def offer(self, value, key=None, timestamp_ms=None) -> bool:
        self.queue.append(key)
        return True

    def poll(self, timeout_s=0.0) -> None:
        time.sleep(min(timeout_s, 0.01))

    def pending(self) -> int:
        return len(self.queue)

    def close(self, timeout_s=None) -> None:
        left, self.queue = self.queue, []
        for _ in left:
            self.hook("shutdown", "purged", None)


def test_records_not_delivered_alone_are_counted_and_waited_for_once():
    made: list[object] = []

    def make(hook):
        sink = _Main(hook, bad={b"imp1", b"imp2", b"imp3"}) if not made else _Down(hook)
        made.append(sink)
        return sink

    logger = ProducerLogger(make_sink=make, encode=encode, poll_interval_s=0.01, close_timeout_s=0.3)
    logger.start()
    started = time.monotonic()
    assert logger.log([imp(i) for i in range(5)]) == 0
    deadline = time.monotonic() + 5
    while logger.dropped < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    took = time.monotonic() - started
    logger.close(timeout_s=0.5)
    assert len(made) == 2  # the isolation producer was used
    assert logger.dropped_by_reason == {"undelivered": 3}
    assert logger.sent == 2 and logger.sent + logger.dropped == 5
    assert took < 0.3 * 3  # one timeout for the lot, not one per record


def test_close_does_not_wait_for_a_record_being_sent_alone():
    # The poll thread was waiting close_timeout_s (10 s) for a record sent alone while Kafka was down:
    # close() waited for it up to 5 s more than its own timeout, then closed the producer.
    made: list[object] = []

    def make(hook):
        sink = _Main(hook, bad={b"imp1"}) if not made else _Down(hook)
        made.append(sink)
        return sink

    logger = ProducerLogger(make_sink=make, encode=encode, poll_interval_s=0.01, close_timeout_s=30.0)
    logger.start()
    assert logger.log([imp(i) for i in range(3)]) == 0
    deadline = time.monotonic() + 5
    while len(made) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the poll thread waits for Kafka to take imp1 alone
    started = time.monotonic()
    logger.close(timeout_s=0.5)
    took = time.monotonic() - started
    assert took < 0.5 + 2.0, took
    assert logger.dropped_by_reason == {"shutdown": 1}
    assert logger.sent == 2 and logger.sent + logger.dropped == 3
