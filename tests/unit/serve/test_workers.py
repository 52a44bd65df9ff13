"""``reloop serve --workers 2``: two processes answer on one port, each scores with the same arm
routing; a worker that dies is replaced while the other keeps answering."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from reloop.connectors.kafka.local_broker import free_port
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import build_learner
from reloop.engine.serve.bundle_format import publish_serving_bundle

from ..ports import free_consecutive_ports

REPO = Path(__file__).resolve().parents[3]
SPEC = {"fields": [{"kind": "categorical", "name": "item", "buckets": 64}]}


def _body(i: int) -> dict:
    return {
        "request_id": f"r{i}",
        "user_id": f"u{i}",
        "candidates": [{"item_id": f"i{j}", "features": {"item": f"i{j}"}} for j in range(5)],
    }


def _wait(url: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "reloop serve exited"
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("not ready")


def _pids(url: str, n: int = 60) -> set[int]:
    # A new connection each time: the kernel picks a worker per connection.
    return {httpx.get(url + "/stats", timeout=5).json()["pid"] for _ in range(n)}


def _both_workers_answer(url: str, proc: subprocess.Popen) -> set[int]:
    """The two workers' pids, once the service is ready and each has answered."""
    _wait(url, proc)
    deadline = time.monotonic() + 60
    pids: set[int] = set()
    while len(pids) < 2 and time.monotonic() < deadline:
        pids |= _pids(url, 20)
    assert len(pids) == 2
    return pids


def _served(metrics_url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=5).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "reloop_serve_requests_total"
    )


def test_two_workers_share_the_port_and_a_dead_one_is_replaced(tmp_path):
    learner = build_learner("dcn", FeatureSpec.from_dict(SPEC), "ce", 0.0, embedding_dim=4, hidden_units=[8])
    reg = SnapshotRegistry(tmp_path / "reg")
    publish_serving_bundle(reg, learner)
    reg.publish({"model": learner.state_dict()})
    config = tmp_path / "serve.yaml"
    arms = [{"name": "A", "registry": str(reg.root)}]
    config.write_text(yaml.safe_dump({"serve": {"log": {"enabled": False}}, "arms": arms}))
    port = free_consecutive_ports(3)  # the service's, and each worker's /metrics
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", str(config),
         "--port", str(port),
         "--workers", "2"],
        cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        pids = _both_workers_answer(url, proc)
        scores = {}
        for i in range(30):
            r = httpx.post(url + "/score", json=_body(i), timeout=10)
            assert r.status_code == 200 and r.json()["model_version"] == 1
            scores[i] = [s["score"] for s in r.json()["scores"]]
        assert all(s == scores[0] for s in scores.values())  # one model, whichever worker answered
        # Each worker serves its own /metrics on port + 1 + i.
        answered = [_served(f"http://127.0.0.1:{port + 1 + i}/metrics") for i in range(2)]
        assert sum(answered) == 30 and all(n > 0 for n in answered), answered
        # The shared port's answered for whichever worker a connection reached (each scrape another's
        # counters): it refuses, naming the workers' own ports.
        for _ in range(4):  # fresh connections: either worker
            shared = httpx.get(url + "/metrics", timeout=10)
            assert shared.status_code == 404 and f"{port + 1}, {port + 2};" in shared.text, shared.text
            assert f"this one's is {port + 1}" in shared.text or f"this one's is {port + 2}" in shared.text
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        # The connections the dead worker held (accepted or queued on its socket) are reset; once its
        # socket is gone the kernel sends every new connection to the other worker.
        time.sleep(0.5)
        codes = [httpx.post(url + "/score", json=_body(i), timeout=10).status_code for i in range(20)]
        assert codes == [200] * 20  # the other worker answers meanwhile
        deadline = time.monotonic() + 60
        now: set[int] = set()
        while (len(now) < 2 or victim in now) and time.monotonic() < deadline:
            now = _pids(url, 20) - {victim}
            time.sleep(0.2)
        assert len(now) == 2 and victim not in now  # replaced
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)


def test_workers_that_cannot_start_with_the_config_stop_the_service(tmp_path):
    # A worker exits 2 when it cannot start with this config (here: a token file it cannot read); the
    # parent restarted such workers every second for ever instead of saying so and exiting.
    config = tmp_path / "serve.yaml"
    serve = {"log": {"enabled": False}, "auth_token_file": str(tmp_path / "missing-token")}
    config.write_text(yaml.safe_dump({"serve": serve, "arms": [{"name": "A", "registry": str(tmp_path)}]}))
    proc = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", str(config),
         "--port", "0", "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing-token" in proc.stderr


def test_a_workers_own_metrics_port_needs_the_token_too(tmp_path):
    # The token guarded the shared port's /metrics; each worker's own /metrics port answered anyone.
    learner = build_learner("dcn", FeatureSpec.from_dict(SPEC), "ce", 0.0, embedding_dim=4, hidden_units=[8])
    reg = SnapshotRegistry(tmp_path / "reg")
    reg.publish({"model": learner.state_dict()})
    (tmp_path / "token").write_text("s3cret\n")
    serve = {"log": {"enabled": False}, "auth_token_file": str(tmp_path / "token")}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"serve": serve, "arms": [{"name": "A", "registry": str(reg.root)}]}))
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", str(config),
         "--port", str(port), "--worker", "--worker-metrics-port", str(metrics_port)],
        cwd=REPO,
    )  # fmt: skip
    try:
        _wait(f"http://127.0.0.1:{port}", proc)
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 30
        while True:  # the worker's metrics port starts just after the serving one
            try:
                refused = httpx.get(metrics, timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        assert refused.status_code == 401
        allowed = httpx.get(metrics, headers={"authorization": "Bearer s3cret"}, timeout=5)
        assert allowed.status_code == 200 and "reloop_serve_requests_total" in allowed.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for init to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_stop_when_the_parent_is_sigkilled(tmp_path):
    # A SIGKILLed parent (the OOM killer, kill -9) left its workers serving on the port as orphans; a
    # restarted service then shared the port with them.
    learner = build_learner("dcn", FeatureSpec.from_dict(SPEC), "ce", 0.0, embedding_dim=4, hidden_units=[8])
    reg = SnapshotRegistry(tmp_path / "reg")
    reg.publish({"model": learner.state_dict()})
    config = tmp_path / "serve.yaml"
    arms = [{"name": "A", "registry": str(reg.root)}]
    config.write_text(yaml.safe_dump({"serve": {"log": {"enabled": False}}, "arms": arms}))
    port = free_consecutive_ports(3)  # the service's, and each worker's /metrics
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", str(config),
         "--port", str(port), "--workers", "2"],
        cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    try:
        _wait(url, proc)
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            pids |= _pids(url, 20)
        assert len(pids) == 2
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 15
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(p) for p in pids), "workers outlived their SIGKILLed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids:  # the old code's orphans must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_read_a_config_given_as_a_pipe(tmp_path):
    # `reloop serve --workers 2 --config <(envsubst < serve.yaml)`: the parent read the pipe, and each
    # worker then found it drained. A relative cold_start.spec_file in it is taken from the working folder.
    reg = SnapshotRegistry(tmp_path / "reg")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    cold = {"backbone": "dcn", "spec_file": "spec.yaml", "params": {"embedding_dim": 4, "hidden_units": [8]}}
    doc = {
        "serve": {"log": {"enabled": False}},
        "arms": [{"name": "A", "registry": str(reg.root), "cold_start": cold}],
    }
    port = free_consecutive_ports(3)
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", f"/dev/fd/{read}",
         "--port", str(port), "--workers", "2"],
        pass_fds=(read,), cwd=tmp_path,
    )  # fmt: skip
    os.close(read)
    with os.fdopen(write, "w") as out:
        out.write(yaml.safe_dump(doc))
    url = f"http://127.0.0.1:{port}"
    try:
        _both_workers_answer(url, proc)  # both started with the config
        r = httpx.post(url + "/score", json=_body(0), timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == 0  # the cold start, from spec.yaml
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)
    assert proc.returncode == 0
