"""``reloop serve`` says its stop in the log, as ``reloop run`` does: its last line used to be the last
reload, so a stop could not be told from a hang or a kill (and, with --workers, which process it was)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import yaml


def test_a_sigterm_is_logged_as_stopping_then_stopped(tmp_path):
    cold = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "item", "buckets": 8}]}}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "serve": {"port": 0, "log": {"enabled": False}},
        "arms": [{"name": "A", "registry": str(tmp_path / "reg"), "cold_start": cold}],
    }))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while "listening on" not in (line := proc.stdout.readline()):
            assert line, "reloop serve ended before it listened"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    logger = " reloop.engine.serve: "
    said = [ln.split(logger, 1)[1] for ln in err.splitlines() if logger + "st" in ln]
    assert len(said) == 2 and said[0] == f"stopping on SIGTERM (pid {proc.pid})", said
    assert re.fullmatch(rf"stopped in \d+\.\d s \(pid {proc.pid}\)", said[1]), said
