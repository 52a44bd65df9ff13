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

    def ask_to_stop(self) -> None:
        pass

    def stop(self, timeout_s: float, hurry=None) -> int:
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

    def serve_in_thread(self, port: int | None = None) -> str:
        return "http://127.0.0.1:1"  # nothing answers: the demo waits for the service

    def close(self) -> None:
        FakeStack.closed = True


@pytest.fixture
def fakes(monkeypatch):
    FakeTrainer.started, FakeTrainer.stopped, FakeStack.closed = [], [], False
    monkeypatch.setattr(demo, "TrainerProcess", FakeTrainer)
    monkeypatch.setattr(serve_stack, "ServingStack", FakeStack)
    monkeypatch.setattr(admin, "create_topics", lambda *a, **kw: None)
    monkeypatch.setattr(demo, "_broker_problem", lambda config, bootstrap: None)  # 127.0.0.1:1 is no broker
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


def test_a_workdir_a_demo_runs_in_is_refused_to_a_second_one(fakes, tmp_path, capsys):
    # The second demo's trainers waited on the first's checkpoint folders while its service served the
    # first's snapshots, and its summary said it published them (exit 0).
    config = demo.DemoConfig.model_validate(demo.read_yaml(demo.DEFAULT_CONFIG))
    first = demo.claim_workdir(tmp_path, config)
    assert isinstance(first, int)
    try:
        assert _main(tmp_path) == 2
        assert f"is in use by another demo (pid {os.getpid()})" in capsys.readouterr().err
        assert FakeTrainer.started == []
    finally:
        os.close(first)
    assert isinstance(again := demo.claim_workdir(tmp_path, config), int)  # free once the first ended
    os.close(again)


def test_a_workdir_with_a_previous_run_is_refused(fakes, tmp_path, capsys):
    # Run again in the same folder, every trainer failed to resume the old snapshots (they name the old
    # run's topics) in a loop, while the demo showed them running and served the old versions.
    config = demo.DemoConfig.model_validate(demo.read_yaml(demo.DEFAULT_CONFIG))
    (tmp_path / config.arms[0].name / "snapshots").mkdir(parents=True)
    assert _main(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"holds a previous demo run (its arm folder(s) {config.arms[0].name})" in err
    assert FakeTrainer.started == []


def test_a_bootstrap_no_broker_answers_at_is_one_line_before_anything_starts(tmp_path):
    import socket

    config = demo.DemoConfig.model_validate(demo.read_yaml(demo.DEFAULT_CONFIG))
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        assert demo._broker_problem(config, f"127.0.0.1:{port}") is None
    said = demo._broker_problem(config, f"127.0.0.1:{port}")
    assert said is not None and said.startswith(f"no Kafka broker answers at 127.0.0.1:{port}")


def _trainer(tmp_path, on_start: str) -> demo.TrainerProcess:
    """A TrainerProcess around a stand-in child that runs ``on_start`` and then sleeps 60 s."""
    import subprocess
    import sys

    trainer = object.__new__(demo.TrainerProcess)
    trainer.plan = SimpleNamespace(name="A")
    trainer._log = open(tmp_path / "trainer.log", "ab")  # noqa: SIM115 - the trainer closes it
    trainer._asked = False
    trainer.proc = subprocess.Popen(
        [sys.executable, "-c",
         f"import signal, sys, time; {on_start}; print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert trainer.proc.stdout.readline() == "ready\n"
    return trainer


def test_a_trainer_asked_to_stop_before_the_wait_gets_one_sigterm(tmp_path):
    # The demo asks every trainer at once, then waits for each: a second SIGTERM is `reloop run`'s "exit
    # at once", and a trainer that had begun its final snapshot died by it (exit -15).
    counting = (
        "signal.signal(signal.SIGTERM, lambda *_: (print('term', flush=True), signal.alarm(1))); "
        "signal.signal(signal.SIGALRM, lambda *_: sys.exit(0))"  # a final snapshot: 1 s after the SIGTERM
    )
    trainer = _trainer(tmp_path, counting)
    trainer.ask_to_stop()
    time.sleep(0.2)
    assert trainer.stop(30.0) == 0
    assert trainer.proc.stdout.read().count("term") == 1


def test_a_second_signal_kills_a_trainer_still_writing_its_final_snapshot(tmp_path):
    import threading

    trainer = _trainer(tmp_path, "signal.signal(signal.SIGTERM, signal.SIG_IGN)")  # slow to stop
    hurry = threading.Event()
    threading.Timer(0.5, hurry.set).start()
    began = time.monotonic()
    assert trainer.stop(30.0, hurry) == -signal.SIGKILL
    assert time.monotonic() - began < 10  # not the 30 s the first signal grants
