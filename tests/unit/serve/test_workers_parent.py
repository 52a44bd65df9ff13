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
