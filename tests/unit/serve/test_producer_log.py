"""ProducerLogger: the request path only encodes and offers; every event is delivered or counted."""

from __future__ import annotations

import logging
import threading
import time

from reloop.engine.events.codec import decode_impression, encode
from reloop.engine.events.schema import Impression
from reloop.engine.serve.producer_log import ProducerLogger
from reloop.engine.streams import RecordTooLarge


class FakeProducer:
    """A bounded queue 'delivered' by poll(); ``refuse`` = keys whose delivery fails with a reason."""

    def __init__(self, capacity: int, refuse: dict[bytes, str] | None = None) -> None:
        self.capacity = capacity
        self.queue: list[tuple[bytes, bytes | None, int | None]] = []
        self.delivered: list[bytes] = []
        self.refuse = refuse or {}
        self.failure = None
        self.down = False
        self.lock = threading.Lock()

    def offer(self, value, key=None, timestamp_ms=None) -> bool:
        if len(value) > 10_000:
            raise RecordTooLarge("too big")
        with self.lock:
            if len(self.queue) >= self.capacity:
                return False
            self.queue.append((value, key, timestamp_ms))
            return True

    def poll(self, timeout_s=0.0) -> None:
        if self.down:
            time.sleep(min(timeout_s, 0.01))
            return
        with self.lock:
            batch, self.queue = self.queue, []
        for value, key, _ in batch:
            if key in self.refuse:
                self.failure(self.refuse[key], "refused")
            else:
                self.delivered.append(value)

    def pending(self) -> int:
        return len(self.queue)

    def close(self, timeout_s=None) -> None:
        self.poll(0)
        with self.lock:
            left, self.queue = self.queue, []
        for _ in left:
            self.failure("shutdown", "purged")


def _logger(producer: FakeProducer) -> ProducerLogger:
    def make(failure):
        producer.failure = failure
        return producer

    return ProducerLogger(make_sink=make, encode=encode, poll_interval_s=0.01, arm="A")


def imp(i: int, **kw) -> Impression:
    fields = {"features": {"x": str(i)}, "event_time_ms": 1000 + i, **kw}
    return Impression(
        impression_id=f"imp{i}",
        request_id="r",
        user_id="u",
        item_id=f"i{i}",
        served_prediction=0.5,
        model_version=1,
        arm="A",
        **fields,
    )


def test_everything_is_delivered_or_counted():
    producer = FakeProducer(capacity=1000, refuse={b"imp7": "rejected"})
    logger = _logger(producer).start()
    events = [imp(i) for i in range(50)]
    events[3] = imp(3, features={"blob": "x" * 20_000})  # the sink refuses its size at once
    assert logger.log(events) == 1
    deadline = time.monotonic() + 5
    while logger.sent < 48 and time.monotonic() < deadline:
        time.sleep(0.01)
    logger.close()
    assert logger.sent == 48 and logger.accepted == 49
    assert logger.dropped_by_reason == {"oversized": 1, "rejected": 1}
    got = [decode_impression(v).impression_id for v in producer.delivered]
    assert got == [f"imp{i}" for i in range(50) if i not in (3, 7)]


def test_a_full_queue_drops_and_counts_without_blocking(caplog):
    producer = FakeProducer(capacity=20)
    producer.down = True  # Kafka down: nothing leaves the queue
    logger = _logger(producer).start()
    began = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="reloop.engine.serve.impression_log"):
        for r in range(10):
            logger.log([imp(r * 10 + j) for j in range(10)])
    assert time.perf_counter() - began < 0.5
    assert logger.accepted == 20 and logger.dropped_by_reason == {"queue_full": 80}
    # Said in the log too, once (then once a minute): only the metrics said it.
    (line,) = [r for r in caplog.records if "buffer full" in r.getMessage()]
    assert line.fields["queue_full"] == 10
    assert logger.pending == 20 and logger.sent == 0
    logger.close()  # still down: what is left is counted, not lost silently
    assert logger.dropped_by_reason == {"queue_full": 80, "shutdown": 20}
    assert logger.accepted + logger.dropped - logger.dropped_by_reason["shutdown"] == 100
    assert logger.sent == 0


def test_an_encode_error_costs_one_event():
    producer = FakeProducer(capacity=100)
    logger = _logger(producer).start()
    bad = imp(1, features={1: "not a str key"})
    logger.log([imp(0), bad, imp(2)])
    logger.close()
    assert logger.sent == 2 and logger.dropped_by_reason == {"encode_error": 1}
