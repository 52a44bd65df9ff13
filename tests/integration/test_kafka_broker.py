"""The local broker as a user drives it: `reloop kafka up | status | down | fetch`, in a fresh folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from reloop.connectors.kafka.local_broker import LocalBroker, free_port, read_bootstrap

pytestmark = pytest.mark.kafka


def reloop_kafka(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "reloop.engine.runtime.cli", "kafka", *args, "--state-dir", str(state)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_fetch_skips_when_jars_are_complete(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path)
    lib = broker.ensure_jars()
    before = {p.name: p.stat().st_mtime_ns for p in lib.iterdir()}
    # With lib/ matching the pom, Maven is not needed at all: nothing is downloaded or copied again.
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert broker.ensure_jars() == lib
    assert {p.name: p.stat().st_mtime_ns for p in lib.iterdir()} == before
    assert broker.version.split(".")[0] in {"3", "4"}


def test_up_status_down(tmp_path: Path) -> None:
    state = tmp_path / "kafka"
    before = reloop_kafka("status", state=state)
    assert before.returncode == 1, before.stdout

    # Both ports chosen: the controller's was always a random one (a range of ports to keep to could not be).
    port, controller_port = free_port(), free_port()
    up = reloop_kafka("up", "--port", str(port), "--controller-port", str(controller_port), state=state)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        info = LocalBroker(state).status().info
        assert info is not None
        assert (info.port, info.controller_port) == (port, controller_port)
        listening = psutil.Process(info.pid).net_connections("tcp")
        assert {c.laddr.port for c in listening if c.status == "LISTEN"} == {port, controller_port}
        # `up` returned, yet the broker lives on: it was started detached.
        assert psutil.pid_exists(info.pid)
        assert read_bootstrap(state) == info.bootstrap

        status = reloop_kafka("status", state=state)
        assert status.returncode == 0, status.stdout
        assert f"Kafka {info.version} at {info.bootstrap}" in status.stdout
        assert "metadata: ok" in status.stdout, status.stdout

        again = reloop_kafka("up", state=state)
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    finally:
        down = reloop_kafka("down", state=state)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert _gone(info.pid)
    after = reloop_kafka("status", state=state)
    assert after.returncode == 1, after.stdout
    assert read_bootstrap(state) is None
    # The broker shut down cleanly on SIGTERM (Kafka logs the transition) rather than being killed.
    assert "SHUTTING_DOWN" in (state / "broker.log").read_text()

    # Up again from the same folder: same address (despite the old connections in TIME_WAIT), same cluster.
    again = reloop_kafka("up", state=state)
    try:
        assert again.returncode == 0, again.stderr + again.stdout
        restarted = LocalBroker(state).status()
        assert restarted.running and restarted.reachable and restarted.info is not None, restarted
        assert restarted.info.bootstrap == info.bootstrap
        assert restarted.info.cluster_id == info.cluster_id
    finally:
        assert reloop_kafka("down", state=state).returncode == 0
