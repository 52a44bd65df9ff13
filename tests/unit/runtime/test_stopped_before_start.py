"""A SIGTERM that reaches a stream processor before it installed its stop handling (torch still importing
on a loaded machine) exits 0, "nothing read": it ended by the signal, exit -15, and `reloop demo` (and an
orchestrator) read that as a failed trainer. Other commands keep the signal's default."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

_SLOW_START = """
import sys, time, types
from reloop.engine.runtime import cli
slow = types.SimpleNamespace(configure=lambda parser: None,
                             main=lambda args: (print("starting", flush=True), time.sleep(60)))
cli._load = lambda name: slow
sys.exit(cli.main([sys.argv[1]]))
"""


@pytest.mark.parametrize(("command", "expected"), [("run", 0), ("join", 0), ("train", 0), ("replay", -15)])
def test_a_sigterm_while_a_stream_processor_is_starting_exits_0(command, expected):
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_START, command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "starting\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == expected, err
    if expected == 0:
        assert f"reloop {command}: stopped (SIGTERM) before it started" in err


def test_called_in_process_the_callers_handler_is_put_back() -> None:
    from reloop.engine.runtime import cli

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):  # argparse's --help exits
        cli.main(["join", "--help"])
    assert signal.getsignal(signal.SIGTERM) is before
