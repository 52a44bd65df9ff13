"""ImpressionLogger at shutdown: every accepted impression ends up sent or counted as dropped."""

from __future__ import annotations

import threading
import time

from reloop.engine.serve.impression_log import ImpressionLogger

from .test_impression_log import PickySink, _encode, _imp, _wait


def _accounted(logger: ImpressionLogger, offered: int) -> None:
    assert logger.pending == 0
    assert logger.sent + logger.dropped == offered, (logger.sent, logger.dropped_by_reason)


def test_what_kafka_never_took_before_close_is_counted_as_shutdown():
    sink = PickySink(refused=set())
    sink.down = True  # Kafka down for the whole run: nothing can be delivered
    logger = ImpressionLogger(sink=sink, encode=_encode, batch_size=5, retry_backoff_s=0.01).start()
    logger.log([_imp(i) for i in range(12)])
    _wait(lambda: sink.flushes >= 2)
    started = time.monotonic()
    logger.close(timeout_s=0.3)
    assert time.monotonic() - started < 2.0  # bounded by the timeout
    assert logger.sent == 0
    assert logger.dropped_by_reason == {"shutdown": 12}
    _accounted(logger, 12)


class _SlowDownSink(PickySink):
    """Down, and each flush takes a while: close() gives up while the drain thread holds a batch."""

    def __init__(self) -> None:
        super().__init__(refused=set())
        self.down = True
        self.in_flush = threading.Event()

    def flush(self, timeout_s=None):
        self.in_flush.set()
        time.sleep(0.3)
        super().flush(timeout_s)


def test_a_batch_in_flight_when_close_gives_up_is_counted_too():
    sink = _SlowDownSink()
    logger = ImpressionLogger(sink=sink, encode=_encode, batch_size=4, linger_s=0.0).start()
    logger.log([_imp(i) for i in range(10)])
    assert sink.in_flush.wait(5)
    logger.close(timeout_s=0.05)  # returns while the thread is still in its flush
    _wait(lambda: logger.sent + logger.dropped == 10)  # the held batch fails after close returned
    assert logger.dropped_by_reason == {"shutdown": 10}
    _accounted(logger, 10)


def test_impressions_logged_after_close_are_counted_not_kept():
    sink = PickySink(refused=set())
    logger = ImpressionLogger(sink=sink, encode=_encode).start()
    logger.close()
    assert logger.log([_imp(i) for i in range(3)]) == 3
    assert logger.pending == 0 and logger.dropped_by_reason == {"closed": 3}


class _StuckSink:
    """A sink the drain thread is stuck in (a Kafka producer still connecting to a broker that does not
    answer: ~35 s), whose close waits for ever unless given a timeout (kafka-python's close did: until
    every batch expired, 120 s)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.unstick = threading.Event()
        self.closed_with: list[float | None] = []

    def send(self, value, key=None, timestamp_ms=None):
        self.entered.set()
        self.unstick.wait()
        raise ConnectionError("broker unreachable")

    def flush(self, timeout_s=None):
        pass

    def close(self, timeout_s=None):
        self.closed_with.append(timeout_s)
        self.unstick.wait(timeout_s)  # None: until the broker answers


def test_close_is_bounded_and_counts_the_batch_the_stuck_drain_thread_holds():
    # The drain thread held a batch inside the sink: close() returned without counting it (counted only
    # when the thread gave up, after the process had exited), then closed the sink without a bound.
    sink = _StuckSink()
    logger = ImpressionLogger(sink=sink, encode=_encode, batch_size=4, linger_s=0.0).start()
    logger.log([_imp(i) for i in range(4)])
    assert sink.entered.wait(5)
    logger.log([_imp(i) for i in range(4, 10)])
    closer = threading.Thread(target=logger.close, kwargs={"timeout_s": 0.5}, daemon=True)
    started = time.monotonic()
    closer.start()
    closer.join(10)
    took = time.monotonic() - started
    sink.unstick.set()
    assert not closer.is_alive(), "close() waited for the sink without a bound"
    assert took < 0.5 + 1.0 + 0.5, took  # its timeout + the sink's release + slack
    assert sink.closed_with and sink.closed_with[0] is not None
    assert logger.dropped_by_reason == {"shutdown": 10}  # the held batch too, when close returned
    _accounted(logger, 10)
    time.sleep(0.1)  # the thread, unstuck, fails its send: counted already, not counted again
    assert logger.dropped == 10 and logger.sent == 0


def test_a_sink_whose_close_takes_no_timeout_is_still_closed():
    sink = PickySink(refused=set())  # close(self): a Sink written before close had a timeout
    closed = []
    sink.close = lambda: closed.append(True)
    logger = ImpressionLogger(sink=sink, encode=_encode).start()
    logger.log([_imp(1)])
    logger.close(timeout_s=2.0)
    assert closed == [True] and logger.sent == 1
