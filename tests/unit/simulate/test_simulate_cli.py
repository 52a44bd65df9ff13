"""`reloop simulate` before its scoring service answers: it says what it waits for, and Ctrl-C ends the
wait (it sat silent for 60 s and Ctrl-C there ended in a traceback)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_ctrl_c_while_waiting_for_the_service_ends_at_once_with_a_message() -> None:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "reloop.engine.runtime.cli", "simulate",
            "--config", str(ROOT / "deploy" / "config" / "demo.yaml"),
            "--url", "http://127.0.0.1:1", "--bootstrap", "127.0.0.1:1", "--duration", "5",
        ],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    seen = ""
    while "waiting for the scoring service" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert "waiting for the scoring service at http://127.0.0.1:1" in seen
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert time.monotonic() - start < 5
    assert "stopped while waiting" in rest and "Traceback" not in rest
