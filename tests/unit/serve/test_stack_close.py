"""ServingStack.close: the arms' impression loggers close together, each within its own bound."""

from __future__ import annotations

import threading
import time

import pytest
from reloop.engine.serve.config import serve_config_from_dict
from reloop.engine.serve.stack import CLOSE_SLACK_S, ServingStack

SPEC = {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}


class _SlowLogger:
    """A logger whose close waits for the other arms' closes (a flush timeout while Kafka is down)."""

    def __init__(self, barrier: threading.Barrier, fail: bool = False) -> None:
        self.barrier = barrier
        self.fail = fail
        self.closed = False

    def close(self, timeout_s: float = 10.0) -> None:
        self.barrier.wait(timeout=3.0)  # broken (raises) unless every arm's close runs meanwhile
        self.closed = True
        if self.fail:
            raise RuntimeError("the producer would not close")


def test_the_loggers_of_all_arms_close_at_once_and_one_failure_skips_none(tmp_path):
    arms = [
        {
            "name": n,
            "registry": str(tmp_path / n),
            "impressions_topic": f"imp-{n}",
            "cold_start": {"backbone": "lr", "spec": SPEC},
        }
        for n in ("A", "B", "C")
    ]
    config = serve_config_from_dict({"serve": {"port": 0, "log": {"enabled": False}}, "arms": arms})
    stack = ServingStack(config).start()
    barrier = threading.Barrier(3)
    loggers = [_SlowLogger(barrier, fail=name == "A") for name in stack.arms]
    for arm, logger in zip(stack.arms.values(), loggers, strict=True):
        arm.logger = logger
    stack.close()
    assert [lg.closed for lg in loggers] == [True, True, True]


class _Released:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_a_sink_built_after_the_lazy_sink_closed_is_released_not_kept():
    # The logger thread was building the producer (~35 s against a broker that does not answer) when
    # the service closed: the producer it finished was then kept and used, never closed.
    from reloop.engine.serve.stack import LazySink

    building, go = threading.Event(), threading.Event()
    made = _Released()

    def make():
        building.set()
        go.wait(5)
        return made

    lazy = LazySink(make)
    errors: list[BaseException] = []

    def send():
        try:
            lazy.send(b"v")
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    assert building.wait(5)
    lazy.close(timeout_s=1.0)
    go.set()
    t.join(5)
    assert made.aborted and errors
    with pytest.raises(RuntimeError):
        lazy.send(b"again")


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_the_stack_stops_within_its_shutdown_timeout_with_kafka_unreachable_and_counts_the_rest(
    tmp_path, client
):
    # kafka-python: the logger thread was connecting with a batch in hand; close returned after 10 s
    # with those impressions counted nowhere. A closed port: nothing listens there.
    from reloop.connectors.kafka.local_broker import free_port

    from .test_impression_log import _imp

    arms = [{"name": "A", "registry": str(tmp_path / "A"), "cold_start": {"backbone": "lr", "spec": SPEC}}]
    config = serve_config_from_dict(
        {
            "serve": {"port": 0, "shutdown_timeout_s": 2.0},
            "arms": arms,
            "kafka": {"bootstrap": f"127.0.0.1:{free_port()}", "client": client},
        }
    )
    stack = ServingStack(config).start()
    logger = stack.arms["A"].logger
    logger.log([_imp(i) for i in range(30)])
    time.sleep(0.5)  # the logger is trying to reach the broker
    started = time.monotonic()
    stack.close()
    took = time.monotonic() - started
    assert took < 2.0 + CLOSE_SLACK_S, took
    assert logger.sent == 0
    assert logger.dropped_by_reason == {"shutdown": 30}, logger.dropped_by_reason
