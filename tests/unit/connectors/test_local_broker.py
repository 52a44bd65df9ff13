"""LocalBroker pieces that need no Java: cluster ids, the port bookkeeping, and the `reloop kafka` CLI's
decisions with a fake `java` and a fake `mvn`."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import psutil
import pytest
from reloop.connectors.kafka import local_broker, local_broker_cli
from reloop.connectors.kafka.local_broker import _port_is_free, new_cluster_id


def test_cluster_ids_never_look_like_options() -> None:
    # uuid4 bytes whose base64 starts with "-" (0xFB...) must be skipped, not handed to the storage tool.
    dash_first = mock.Mock(bytes=bytes([0xFB]) + bytes(15))
    normal = mock.Mock(bytes=bytes(16))
    with mock.patch.object(local_broker.uuid, "uuid4", side_effect=[dash_first, normal]):
        assert new_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"
    ids = {new_cluster_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_a_listening_port_is_busy_and_a_closed_one_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not _port_is_free(port)
    assert _port_is_free(port)


# ---------------------------------------------------------------------------------------------------
# The CLI's decisions with a fake `java` (a Python script: the storage tool succeeds, "kafka.Kafka"
# prints the ready line and sleeps) and a fake Kafka home (a pom, a kafka jar, the marker): no JVM.

FAKE_JAVA = """#!{python}
import os, sys, time
if "kafka.tools.StorageTool" in sys.argv:
    time.sleep(0.3)  # widen the window in which two `up`s race
    sys.exit(0)
if not os.environ.get("FAKE_NEVER_READY"):
    print("[fake] INFO [KafkaRaftServer nodeId=1] Kafka Server started", flush=True)
time.sleep(120)
"""


def _brokers_of(state: Path) -> list[psutil.Process]:
    """Live (not zombie) processes that run as the broker of ``state`` (our fakes)."""
    config = str(state.resolve() / "server.properties")
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if "kafka.Kafka" in cmdline and config in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _on_path(bin_dir: Path, name: str, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake ``name`` (``script`` run by this Python) first on PATH."""
    bin_dir.mkdir()
    tool = bin_dir / name
    tool.write_text(script.format(python=sys.executable))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def fake_kafka(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A Kafka home with a fake jar set and a fake `java` first on PATH; kills the fakes it started."""
    home = tmp_path / "kafka-home"
    (home / "lib").mkdir(parents=True)
    (home / "pom.xml").write_text("<project>fake</project>\n")
    (home / "log4j2.xml").write_text("<Configuration/>\n")
    (home / "lib" / "kafka_2.13-9.9.9.jar").write_bytes(b"")
    digest = hashlib.sha256((home / "pom.xml").read_bytes()).hexdigest()
    (home / "lib" / ".complete").write_text(digest + "\n")
    _on_path(tmp_path / "bin", "java", FAKE_JAVA, monkeypatch)
    monkeypatch.setattr(local_broker, "default_kafka_home", lambda: home)
    monkeypatch.setattr(local_broker, "_metadata_ok", lambda *a, **k: (True, "fake cluster answers"))
    try:
        yield home
    finally:
        for proc in _brokers_of(tmp_path / "state"):
            proc.kill()


def _cli(action: str, state: Path, port: int | None = None) -> int:
    args = argparse.Namespace(action=action, state_dir=state, port=port, timeout=20.0)
    return local_broker_cli.main(args)


def test_two_concurrent_ups_start_one_broker(
    fake_kafka: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two shells running `reloop kafka up` on one state folder: the second must wait for the first and
    # report it, not format the storage again and launch a second JVM on the same data dir.
    state = tmp_path / "state"
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(_cli("up", state))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    out = capsys.readouterr().out
    assert codes == [0, 0], out
    assert len(_brokers_of(state)) == 1
    assert out.count("started at") == 1 and out.count("already running") == 1, out
    assert _cli("down", state) == 0
    assert _brokers_of(state) == []


def test_up_on_a_busy_port_says_which_port_and_starts_nothing(
    fake_kafka: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert _cli("up", state, port=port) == 1
        err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err, err
    assert f"pid {os.getpid()}" in err, err  # who listens there, when the OS says
    assert _brokers_of(state) == []
    assert not (state / "data").exists()  # nothing formatted for a broker that cannot bind


def test_up_with_another_port_than_the_running_broker_fails(
    fake_kafka: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert _cli("up", state) == 0
    info = local_broker.LocalBroker(state).status().info
    assert info is not None
    capsys.readouterr()
    other = local_broker.free_port()
    assert other != info.port
    # Exit 0 with "already running" would leave the user's clients pointed at a port nobody serves.
    assert _cli("up", state, port=other) == 1
    err = capsys.readouterr().err
    assert info.bootstrap in err and f"not on port {other}" in err and "reloop kafka down" in err, err
    # The same port (or none) is the idempotent case.
    assert _cli("up", state, port=info.port) == 0
    assert "already running" in capsys.readouterr().out
    assert len(_brokers_of(state)) == 1
    assert _cli("down", state) == 0


def test_status_exit_codes_and_output(
    fake_kafka: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert _cli("status", state) == 1
    assert "not running" in capsys.readouterr().out
    assert _cli("up", state) == 0
    up_out = capsys.readouterr().out
    assert f"log: {state / 'broker.log'}" in up_out, up_out
    assert _cli("status", state) == 0
    out = capsys.readouterr().out
    assert out.startswith("running:") and "metadata: ok" in out and str(state / "broker.log") in out, out
    # Alive but not answering metadata: non-zero, and says so.
    monkeypatch.setattr(local_broker, "_metadata_ok", lambda *a, **k: (False, "no answer"))
    assert _cli("status", state) == 1
    assert "metadata: FAILED: no answer" in capsys.readouterr().out
    assert _cli("down", state) == 0
    assert _cli("status", state) == 1


def test_down_never_signals_a_recycled_pid(
    fake_kafka: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # broker.json names a pid that now belongs to another program (the broker died, the pid was reused).
    state = tmp_path / "state"
    state.mkdir()
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = local_broker.BrokerInfo(stranger.pid, 1, 2, "9.9.9", "x", time.time(), 1.0, "log")
        (state / "broker.json").write_text(json.dumps(dataclasses.asdict(info)))
        assert _cli("status", state) == 1
        assert _cli("down", state) == 0
        assert "no running broker" in capsys.readouterr().out
        assert stranger.poll() is None  # alive: never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_down_in_an_empty_folder_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "never-used"
    assert _cli("down", state) == 0
    assert "no running broker" in capsys.readouterr().out
    assert not state.exists()


def test_sigterm_during_up_stops_the_broker_it_launched(fake_kafka: Path, tmp_path: Path) -> None:
    # A closed terminal (SIGHUP) or `timeout reloop kafka up` (SIGTERM) while the broker starts: the
    # detached JVM must not outlive `up` unrecorded (no broker.json: `down` could not find it).
    state = tmp_path / "state"
    wrapper = (
        "import argparse, sys\n"
        "from pathlib import Path\n"
        "from reloop.connectors.kafka import local_broker, local_broker_cli\n"
        "local_broker.default_kafka_home = lambda: Path(sys.argv[1])\n"
        "args = argparse.Namespace(action='up', state_dir=Path(sys.argv[2]), port=None, timeout=60.0)\n"
        "sys.exit(local_broker_cli.main(args))\n"
    )
    env = {**os.environ, "FAKE_NEVER_READY": "1"}
    cli = subprocess.Popen([sys.executable, "-c", wrapper, str(fake_kafka), str(state)], env=env)
    try:
        deadline = time.monotonic() + 30
        while not _brokers_of(state):
            assert cli.poll() is None and time.monotonic() < deadline, "the fake broker never started"
            time.sleep(0.05)
        broker = _brokers_of(state)[0]
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(30) == 128 + signal.SIGTERM
        broker.wait(15)  # raises TimeoutExpired if the broker was left running
        assert not (state / "broker.json").exists()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()


def test_a_ctrl_c_to_the_owners_group_does_not_reach_its_broker_but_the_owners_death_does(
    fake_kafka: Path, tmp_path: Path
) -> None:
    # `reloop demo` stopped by a Ctrl-C in its terminal: the broker it had started was in its process
    # group and got the SIGINT too, so the demo's orderly stop (trainers' final snapshots, then the
    # broker) ran against a broker already gone: 58 s of bootstrap timeouts, no snapshot published.
    state = tmp_path / "state"
    owner_script = (
        "import signal, sys, time\n"
        "from pathlib import Path\n"
        "from reloop.connectors.kafka import local_broker\n"
        "local_broker.default_kafka_home = lambda: Path(sys.argv[1])\n"
        "local_broker._metadata_ok = lambda *a, **k: (True, 'fake')\n"
        "signal.signal(signal.SIGINT, lambda *_: print('interrupted', flush=True))\n"
        "local_broker.LocalBroker(Path(sys.argv[2])).start(timeout_s=60)\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_script, str(fake_kafka), str(state)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "started\n"
        (broker,) = _brokers_of(state)
        os.killpg(owner.pid, signal.SIGINT)  # the terminal's Ctrl-C
        assert owner.stdout.readline() == "interrupted\n"
        time.sleep(0.5)
        assert broker.is_running() and broker.status() != psutil.STATUS_ZOMBIE
        owner.kill()  # an owner that dies without stopping it still takes it along
        broker.wait(15)  # raises TimeoutExpired if the broker outlived its owner
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.wait()


# ---------------------------------------------------------------------------------------------------
# Fetching the jars with a fake `mvn` (copies a fake jar set into <pom dir>/lib).

FAKE_MVN = """#!{python}
import pathlib, sys, time
home = pathlib.Path(sys.argv[sys.argv.index("-f") + 1]).parent
with open(home.parent / "mvn-calls", "a") as calls:
    calls.write("call\\n")
fail = (home.parent / "mvn-fail").exists()
time.sleep(0.5)
(home / "lib").mkdir(exist_ok=True)
(home / "lib" / "kafka_2.13-9.9.9.jar").write_bytes(b"jar")
if fail:
    sys.exit(1)  # interrupted midway: the kafka jar is there, the rest is not
(home / "lib" / "kafka-clients-9.9.9.jar").write_bytes(b"jar")
"""


@pytest.fixture
def fake_mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kafka-home"
    home.mkdir()
    (home / "pom.xml").write_text("<project>fake</project>\n")
    _on_path(tmp_path / "mvn-bin", "mvn", FAKE_MVN, monkeypatch)
    return home


def test_concurrent_fetches_download_once(fake_mvn: Path, tmp_path: Path) -> None:
    # Two processes (two test runs, two `up`s from different state folders) share one Kafka home: the
    # second must not wipe lib/ while the first's Maven copies into it.
    results: list[object] = []

    def fetch() -> None:
        try:
            results.append(local_broker.LocalBroker(tmp_path / "s", kafka_home=fake_mvn).ensure_jars())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [fake_mvn / "lib"] * 2
    assert (tmp_path / "mvn-calls").read_text().count("call") == 1
    assert sorted(p.name for p in (fake_mvn / "lib").glob("*.jar")) == [
        "kafka-clients-9.9.9.jar",
        "kafka_2.13-9.9.9.jar",
    ]


def test_an_interrupted_fetch_is_never_used(fake_mvn: Path, tmp_path: Path) -> None:
    broker = local_broker.LocalBroker(tmp_path / "s", kafka_home=fake_mvn)
    (tmp_path / "mvn-fail").touch()
    with pytest.raises(local_broker.BrokerError, match="failed"):
        broker.ensure_jars()
    assert (fake_mvn / "lib" / "kafka_2.13-9.9.9.jar").exists() and not (
        fake_mvn / "lib" / ".complete"
    ).exists()
    (tmp_path / "mvn-fail").unlink()
    assert broker.ensure_jars() == fake_mvn / "lib"  # fetched again, not taken as it was
    assert (tmp_path / "mvn-calls").read_text().count("call") == 2
    assert (fake_mvn / "lib" / "kafka-clients-9.9.9.jar").exists()


def test_missing_java_or_maven_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "kafka-home"
    home.mkdir()
    (home / "pom.xml").write_text("<project>fake</project>\n")
    monkeypatch.setattr(local_broker.shutil, "which", lambda name: None)
    monkeypatch.setattr(local_broker, "default_kafka_home", lambda: home)
    assert _cli("up", tmp_path / "state") == 1
    assert "'java' is not on PATH" in capsys.readouterr().err
    assert _cli("fetch", tmp_path / "state") == 1
    err = capsys.readouterr().err
    assert "Maven ('mvn') is not on PATH" in err and "install" in err, err


def test_sasl_plain_refuses_what_the_config_cannot_carry(tmp_path: Path) -> None:
    for bad in [("", "pw"), ("user", ""), ('a"b', "pw"), ("user", "p w"), ("user", "p\\w")]:
        with pytest.raises(ValueError, match="sasl_plain"):
            local_broker.LocalBroker(tmp_path, kafka_home=tmp_path, sasl_plain=bad)


def test_fetched_jars_in_a_folder_that_cannot_take_the_lock_are_used(fake_mvn: Path, tmp_path: Path) -> None:
    # A read-only Kafka folder (an image with the jars fetched at build time) cannot hold the fetch lock:
    # what is fetched is used without it, and only a fetch still to do needs it.
    broker = local_broker.LocalBroker(tmp_path / "s", kafka_home=fake_mvn)
    broker.ensure_jars()
    (fake_mvn / ".fetch.lock").unlink(missing_ok=True)
    (fake_mvn / ".fetch.lock").mkdir()  # open(..., "a") fails on it, as on a read-only folder
    assert broker.ensure_jars() == fake_mvn / "lib"
    assert (tmp_path / "mvn-calls").read_text().count("call") == 1
    (fake_mvn / "pom.xml").write_text((fake_mvn / "pom.xml").read_text() + "<!-- changed -->\n")
    with pytest.raises(local_broker.BrokerError, match="cannot lock the Kafka folder"):
        broker.ensure_jars()
