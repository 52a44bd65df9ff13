"""A stop that finds no stage running exits 1 when the last attempt failed, and says why last: a SIGTERM
while the supervisor was retrying a stage that never worked (a broker down, a checkpoint folder it could
not write) exited 0, "nothing to save", as if the stage had stopped cleanly."""

from __future__ import annotations

import signal

import pytest
from reloop.engine.runtime.config import load_config_dict
from reloop.engine.runtime.stage_runner import StopRequest, run_supervised
from reloop.engine.streams import TopicNotFound

SPEC = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}


@pytest.fixture
def _root_logger_kept():
    import gc
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    gc.unfreeze()


def _stopped_after(error: Exception, capsys, owed: list | None = None) -> tuple[int, str]:
    """run_supervised over a build that fails with ``error``; the stop arrives during the back-off.
    ``owed``: told (an item) when the stop owes nothing, as a data-parallel rank tells its launcher."""
    cfg = load_config_dict({"model": {"backbone": "lr", "spec": SPEC}, "kafka": {"bootstrap": "127.0.0.1:1"}})
    stop = StopRequest(timeout_s=30)  # not installed: the build sets it, as a SIGTERM in its back-off would
    if owed is not None:
        stop.nothing_owed = lambda: owed.append(True)

    def build():
        stop.event.set()
        raise error

    code = run_supervised(
        "train", cfg, build, close=lambda s: None, describe=lambda s: {}, metrics_port=None, stop=stop
    )
    return code, capsys.readouterr().err


@pytest.mark.usefixtures("_root_logger_kept")
def test_a_stop_while_retrying_a_failed_stage_exits_1_naming_the_last_error(capsys) -> None:
    owed: list = []
    code, err = _stopped_after(ConnectionError("broker unreachable (injected)"), capsys, owed)
    assert code == 1 and owed == []
    last = err.strip().splitlines()[-1]
    assert last == (
        "reloop train: stopped while the stage was failing; "
        "last error: ConnectionError('broker unreachable (injected)')"
    )


@pytest.mark.usefixtures("_root_logger_kept")
def test_a_stop_while_waiting_for_a_topic_still_exits_0(capsys) -> None:
    # A topic the join stage has not created yet is a state of a new deployment, not a failure.
    owed: list = []
    code, err = _stopped_after(TopicNotFound("samples"), capsys, owed)
    assert code == 0 and "stopped while the stage was failing" not in err
    # A rank of `reloop train --world-size` marks it: its launcher said "the ranks were stopped before
    # their final checkpoint" (exit 1) although nothing had been read.
    assert owed == [True]


@pytest.mark.parametrize(("failure", "expected"), [(None, 0), ("OSError('read-only file system')", 1)])
def test_a_stop_during_a_rebuild_exits_by_whether_the_last_attempt_failed(
    failure, expected, monkeypatch, capsys
) -> None:
    exits: list[int] = []
    monkeypatch.setattr("reloop.engine.runtime.stage_runner.os._exit", exits.append)
    stop = StopRequest(timeout_s=30)
    stop.starting = lambda: True  # within build(): the stage is being (re)built
    stop.failure = lambda: failure
    stop.stage = "join"
    stop._on_signal(signal.SIGTERM, None)
    stop.disarm()  # the real os._exit never returns; the stub does, and the watchdog it armed would fire
    assert exits == [expected]
    err = capsys.readouterr().err
    assert ("reloop join: stopped while the stage was failing" in err) == (failure is not None)
