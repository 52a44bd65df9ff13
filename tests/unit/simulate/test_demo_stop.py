"""Ctrl-C / SIGTERM while `reloop demo` starts (engine/runtime/demo.py main), with fakes for the broker's
topics, the trainers and the service: no broker or trainer process is started."""

from __future__ import annotations

import argparse
import os
import signal
import time
from types import SimpleNamespace

import pytest
import reloop.connectors.kafka.admin as admin
import reloop.engine.serve.stack as serve_stack
from reloop.engine.runtime import demo


class FakeTrainer:
    started: list[str] = []
    stopped: list[str] = []

    def __init__(self, plan) -> None:
        self.plan = plan
        FakeTrainer.started.append(plan.name)

    @property
    def returncode(self) -> int | None:
        return None

    def stop(self, timeout_s: float) -> int:
        FakeTrainer.stopped.append(self.plan.name)
        return 0

    def log_tail(self, lines: int = 15) -> str:
        return ""


class FakeStack:
    closed = False

    def __init__(self, config) -> None:
        self.arms = {a.name: SimpleNamespace(logger=None, memory=None, counters=None) for a in config.arms}

    def start(self) -> FakeStack:
        return self

    def serve_in_thread(self, port: int) -> str:
        return "http://127.0.0.1:1"  # nothing answers: the demo waits for the service

    def close(self) -> None:
        FakeStack.closed = True


@pytest.fixture
def fakes(monkeypatch):
    FakeTrainer.started, FakeTrainer.stopped, FakeStack.closed = [], [], False
    monkeypatch.setattr(demo, "TrainerProcess", FakeTrainer)
    monkeypatch.setattr(serve_stack, "ServingStack", FakeStack)
    monkeypatch.setattr(admin, "create_topics", lambda *a, **kw: None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield monkeypatch
    for s, h in handlers.items():  # demo.main installs its own
        signal.signal(s, h)


def _main(tmp_path) -> int:
    parser = argparse.ArgumentParser()
    demo.configure(parser)
    return demo.main(
        parser.parse_args(["--bootstrap", "127.0.0.1:1", "--workdir", str(tmp_path), "--no-live"])
    )


def test_sigterm_while_waiting_for_the_service_stops_at_once_and_cleans_up(fakes, tmp_path):
    # It waited out the 60 s for a service that would never be ready. The SIGTERM comes at the first
    # readiness probe, not after a fixed second: the start-up's checks (each arm's model, the extras)
    # took longer than that on a busy machine, and the signal found pytest's own handler.
    asked: list[float] = []

    def not_ready(self) -> bool:
        if not asked:
            asked.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    fakes.setattr("reloop.engine.simulate.http.HttpScorer.ready", not_ready)
    assert _main(tmp_path) == 1
    assert asked and time.monotonic() - asked[0] < 15
    assert FakeStack.closed and sorted(FakeTrainer.stopped) == sorted(FakeTrainer.started) != []


def test_ctrl_c_while_the_broker_starts_starts_no_trainer(fakes, tmp_path):
    # The trainers were started (and the service) only to be stopped again.
    fakes.setattr(admin, "create_topics", lambda *a, **kw: os.kill(os.getpid(), signal.SIGINT))
    fakes.setattr("reloop.engine.simulate.http.HttpScorer.ready", lambda self: True)
    assert _main(tmp_path) == 1
    assert FakeTrainer.started == [] and not FakeStack.closed
