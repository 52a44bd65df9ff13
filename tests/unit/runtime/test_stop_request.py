"""StopRequest: one stop delivered twice within a second (Ctrl-C reaches `reloop run` and its stages,
which `reloop run` forwards it to as well) is one graceful stop; a later second signal forces the exit."""

from __future__ import annotations

import os
import signal

import pytest
from reloop.engine.runtime.stage_runner import StopRequest


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(StopRequest, "_force", staticmethod(lambda why, in_time=True: calls.append(why)))
    return calls


def test_the_same_stop_twice_within_a_second_stays_graceful(forced: list[str]) -> None:
    now = [100.0]
    stop = StopRequest(timeout_s=30, clock=lambda: now[0])
    stop._on_signal(signal.SIGINT, None)
    now[0] += 0.2
    stop._on_signal(signal.SIGINT, None)
    stop.disarm()
    assert stop.event.is_set() and forced == []


def test_a_second_signal_later_forces_the_exit(forced: list[str]) -> None:
    now = [100.0]
    stop = StopRequest(timeout_s=30, clock=lambda: now[0])
    stop._on_signal(signal.SIGTERM, None)
    first_watchdog = stop._timer
    now[0] += StopRequest.SAME_STOP_S + 0.5
    stop._on_signal(signal.SIGINT, None)  # the real _force exits here; the stub returns
    for timer in (first_watchdog, stop._timer):  # no watchdog may outlive the stub
        timer.cancel()
    assert forced == ["a second SIGINT"]


@pytest.mark.parametrize("saved", [None, 7])
def test_a_forced_exit_says_whether_the_final_checkpoint_was_written(
    saved: int | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A stop whose checkpoint was written and only the clients' close hung (a broker down) said
    # "exiting without a final checkpoint" at CRITICAL: a false alarm about the one thing that mattered.
    exits: list[int] = []
    monkeypatch.setattr("reloop.engine.runtime.stage_runner.os._exit", exits.append)
    stop = StopRequest(timeout_s=30)
    stop.final_saved = lambda: saved
    stop._force("30 s after SIGTERM")
    assert exits == [1]
    (record,) = [r for r in caplog.records if r.name == "reloop.run"]
    if saved is None:
        assert record.levelname == "CRITICAL" and "without a final checkpoint" in record.getMessage()
    else:
        assert record.levelname == "ERROR" and "after the final checkpoint" in record.getMessage()
        assert record.fields["final_checkpoint"] == saved


def _unreachable_broker_config(tmp_path):
    import yaml

    path = tmp_path / "run.yaml"
    spec = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}
    path.write_text(yaml.safe_dump({"model": {"backbone": "lr", "spec": spec},
                                    "kafka": {"bootstrap": "127.0.0.1:1"},
                                    "checkpoint": {"dir": str(tmp_path / "ckpt")}}))  # fmt: skip
    return path


def _start(command: str, config, *extra: str):
    """``reloop COMMAND --config CONFIG EXTRA...`` in a session of its own, its output in one pipe."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", command, "--config", str(config), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["join", "train", "run"])
def test_a_stop_while_the_stage_is_still_connecting_exits_at_once(tmp_path, command: str) -> None:
    # A stage built against an unreachable broker sat in kafka-python's 30 s bootstrap after SIGTERM:
    # `reloop run` stopping its join because the train stage refused its config took 33 s to say so.
    import time

    proc = _start(command, _unreachable_broker_config(tmp_path))
    assert proc.stdout is not None
    for line in proc.stdout:  # the first refused connection: building, past the imports
        if "ECONNREFUSED" in line:
            break
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 10, out[-2000:]
    assert proc.returncode == 0, out[-2000:]
    assert "stopping before the stage started: nothing to save" in out


def test_a_stop_while_data_parallel_ranks_are_still_connecting_exits_0(tmp_path) -> None:
    # Each rank exited 0 at once ("nothing to save"), but the launcher knew only a mark written after a
    # final checkpoint: it said "stopped before their final checkpoint" and exited 1.
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # rank r serves /metrics on port + r: their "metrics" lines
    config = _unreachable_broker_config(tmp_path)
    proc = _start("train", config, "--world-size", "2", "--metrics-port", str(port))
    assert proc.stdout is not None
    seen: list[str] = []
    ranks_up, refused = 0, False
    try:
        for line in proc.stdout:  # both ranks past their group and their /metrics, then building
            seen.append(line)
            ranks_up += '"msg":"metrics"' in line
            # (Either order: a loaded machine logged a rank's first refusals before the other's
            # metrics line, and kafka-python's errors pass once in 10 s: waiting for a refusal after
            # both once read on to the ranks' bootstrap timeout, 200 s, and failed.)
            refused = refused or "ECONNREFUSED" in line
            if ranks_up == 2 and refused:
                break
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(seen) + out
    assert time.monotonic() - start < 30, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert out.count("stopping before the stage started: nothing to save") == 2, out[-3000:]
    assert "stopped before their final checkpoint" not in out
    # the launcher's own last line (the ranks' were the last ones)
    import json

    said = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert said[-1]["msg"] == "launcher stopped" and said[-1]["stage"] == "train launcher", said[-1]
    assert said[-1]["exit_code"] == 0 and said[-1]["ranks_owing_a_final_checkpoint"] == [], said[-1]


def test_the_stop_says_which_stage_and_process_stops(
    forced: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    # `reloop run` merges its stages' logs under one logger: "stopping" could not be told apart.
    stop = StopRequest(timeout_s=30)
    stop.stage = "join"
    caplog.set_level("INFO", logger="reloop.run")
    stop._on_signal(signal.SIGTERM, None)
    stop.disarm()
    (record,) = [r for r in caplog.records if r.getMessage() == "stopping"]
    assert record.fields == {"stage": "join", "pid": os.getpid(), "signal": "SIGTERM", "exit_within_s": 30}
