"""run_workers' parent loop with fake worker processes (no real `reloop serve` started)."""

from __future__ import annotations

import errno
import signal
import subprocess
import types

import pytest
from reloop.engine.serve import workers


class _Proc:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.returncode: int | None = None
        self.terminated = False

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.terminated = True
        self.returncode = -signal.SIGTERM

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.returncode = -signal.SIGKILL


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_worker_that_cannot_be_forked_is_started_again_and_stop_ends_all(monkeypatch, handlers):
    # fork failing once (EAGAIN) raised out of the parent: a traceback, the other worker an orphan.
    calls: list[str] = []
    made: list[_Proc] = []

    def popen(argv, preexec_fn=None):
        assert preexec_fn is not None  # each worker dies with the parent
        port = argv[-1]
        calls.append(port)
        if len(calls) == 2:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        proc = _Proc(argv)
        made.append(proc)
        if len(made) == 2:  # both workers run: the operator stops the service
            signal.raise_signal(signal.SIGTERM)
        return proc

    # Only the module's view of subprocess: the real one stays for everything else in the process.
    fake = types.SimpleNamespace(Popen=popen, TimeoutExpired=subprocess.TimeoutExpired)
    monkeypatch.setattr(workers, "subprocess", fake)
    status = workers.run_workers(["--config", "x.yaml"], 2, "127.0.0.1", 0, metrics_port=40000)
    assert status == 0
    assert calls == ["40000", "40001", "40001"]  # worker 1 tried again (after its 1 s pause)
    assert [p.terminated for p in made] == [True, True]


class _SlowToStop(_Proc):
    """A worker whose close takes ``stop_s`` after SIGTERM (its impression loggers draining)."""

    def __init__(self, argv: list[str], stop_s: float) -> None:
        super().__init__(argv)
        self.stop_s = stop_s
        self.killed = False

    def terminate(self) -> None:
        self.terminated = True

    def wait(self, timeout: float | None = None) -> int | None:
        if self.terminated and self.returncode is None:
            if timeout is not None and timeout < self.stop_s:
                raise subprocess.TimeoutExpired("reloop serve", timeout)
            self.returncode = 0
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.returncode = -signal.SIGKILL


@pytest.mark.parametrize(("shutdown_timeout_s", "killed"), [(20.0, True), (60.0, False)])
def test_a_stop_gives_each_worker_its_shutdown_timeout_before_a_sigkill(
    monkeypatch, handlers, caplog, shutdown_timeout_s, killed
):
    # The parent SIGKILLed its workers 30 s after SIGTERM whatever serve.shutdown_timeout_s said: a
    # worker given 60 s to deliver its impression log was cut short at 30.
    caplog.set_level("INFO", logger="reloop.engine.serve.workers")
    made: list[_SlowToStop] = []

    def popen(argv, preexec_fn=None):
        proc = _SlowToStop(argv, stop_s=45.0)
        made.append(proc)
        signal.raise_signal(signal.SIGTERM)
        return proc

    monkeypatch.setattr(
        workers, "subprocess", types.SimpleNamespace(Popen=popen, TimeoutExpired=subprocess.TimeoutExpired)
    )
    status = workers.run_workers(
        ["--config", "x.yaml"], 1, "127.0.0.1", 0, shutdown_timeout_s=shutdown_timeout_s
    )
    assert [(p.terminated, p.killed) for p in made] == [(True, killed)]
    # A killed worker's stop was not clean, and is said: it was a silent exit 0.
    assert status == (1 if killed else 0)
    said = [r.getMessage() for r in caplog.records if r.name == "reloop.engine.serve.workers"]
    assert said[0].startswith("stopping on SIGTERM (pid ") and said[0].endswith("): 1 worker")
    assert ("serving worker 0 had not stopped" in said[1]) is killed
    assert said[-1].startswith("stopped in ")
