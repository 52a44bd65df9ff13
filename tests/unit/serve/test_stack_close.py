"""ServingStack.close: the arms' impression loggers close together, each within its own bound."""

from __future__ import annotations

import threading

from reloop.engine.serve.config import serve_config_from_dict
from reloop.engine.serve.stack import ServingStack

SPEC = {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}


class _SlowLogger:
    """A logger whose close waits for the other arms' closes (a flush timeout while Kafka is down)."""

    def __init__(self, barrier: threading.Barrier, fail: bool = False) -> None:
        self.barrier = barrier
        self.fail = fail
        self.closed = False

    def close(self) -> None:
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
