"""``reloop serve`` says its stop in the log, as ``reloop run`` does: its last line used to be the last
reload, so a stop could not be told from a hang or a kill (and, with --workers, which process it was)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import yaml


def _serve(tmp_path, *command: str) -> subprocess.Popen:
    """``python COMMAND serve --config`` a service of one cold-started arm, on a free port, not logging."""
    cold = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "item", "buckets": 8}]}}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "serve": {"port": 0, "log": {"enabled": False}},
        "arms": [{"name": "A", "registry": str(tmp_path / "reg"), "cold_start": cold}],
    }))  # fmt: skip
    return subprocess.Popen(
        [sys.executable, *command, "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_sigterm_is_logged_as_stopping_then_stopped(tmp_path):
    proc = _serve(tmp_path, "-m", "reloop.engine.runtime.cli")
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


# `reloop serve` with its serving stack's import held up 2 s (torch's import on a loaded machine), and
# "importing" printed as it begins: a SIGTERM then ended the service by the signal (exit -15, a failure to
# an orchestrator stopping a pod that was still starting).
_SLOW_STACK_IMPORT = """
import importlib.abc, importlib.util, sys, time

class SlowStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "reloop.engine.serve.stack":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        real = spec.loader.exec_module
        def exec_module(module):
            print("importing", flush=True)
            time.sleep(2)
            real(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, SlowStack())
from reloop.engine.runtime import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_sigterm_while_the_service_imports_stops_it_once_started(tmp_path):
    proc = _serve(tmp_path, "-c", _SLOW_STACK_IMPORT)
    try:
        assert proc.stdout.readline() == "importing\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"stopping on SIGTERM (pid {proc.pid})" in err
