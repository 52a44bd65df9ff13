"""``reloop serve --workers 2`` with an arm whose counters count its impression log
(``arms[].counters.shown_from: impressions``), on the real broker: whichever worker answers, each request
is served the counts of everything either worker showed before it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from reloop.connectors.kafka.admin import create_topics
from reloop.engine.events.codec import decode_impression

from ..unit.ports import free_consecutive_ports
from .test_serve_kafka import _body, _read_all, counted_arm

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]


def _family(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=5).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_two_workers_serve_the_counts_of_what_either_showed(kafka_broker, unique_topic, tmp_path):
    impressions, samples = unique_topic("impressions"), unique_topic("samples")
    create_topics(kafka_broker.bootstrap, {impressions: 2, samples: 1})
    arm = counted_arm(tmp_path, impressions, samples, shown_from="impressions")  # one state file for both
    serve = {"workers": 2, "log": {"linger_s": 0.0}}
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump({"serve": serve, "kafka": {"bootstrap": kafka_broker.bootstrap}, "arms": [arm]})
    )
    port = free_consecutive_ports(3)  # the service's, and each worker's /metrics
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reloop.engine.runtime.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    metrics = [f"http://127.0.0.1:{port + 1 + i}/metrics" for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        ready = [False, False]
        # Each worker's own /metrics answers once its stack started: its counters feed is open then.
        while not all(ready) and time.monotonic() < deadline:
            assert proc.poll() is None, "reloop serve exited"
            for i, m in enumerate(metrics):
                with contextlib.suppress(httpx.HTTPError):
                    ready[i] = ready[i] or httpx.get(m, timeout=1).status_code == 200
            time.sleep(0.2)
        assert all(ready)
        first = _body(0)
        body = first
        requests = 12
        for k in range(requests):
            with httpx.Client(base_url=url) as http:  # a new connection: the kernel picks the worker
                reply = http.post("/score", json={**body, "request_id": f"req-{k}"})
            assert reply.status_code == 200, reply.text
            if k == 0:  # later requests: the five items shown first, all shown again
                shown = {x["item_id"] for x in reply.json()["ranking"]}
                body = {**body, "candidates": [c for c in body["candidates"] if c["item_id"] in shown]}
            end = time.monotonic() + 30
            while time.monotonic() < end:  # both workers have counted this request's five impressions
                counted = [_family(m, "reloop_serve_feed_samples_total", outcome="shown") for m in metrics]
                if counted == [5.0 * (k + 1)] * 2:
                    break
                time.sleep(0.05)
            assert counted == [5.0 * (k + 1)] * 2
        answered = [_family(m, "reloop_serve_requests_total") for m in metrics]
        assert sum(answered) == requests and all(n > 0 for n in answered), answered  # both workers served
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    logged = [
        decode_impression(r.value) for r in _read_all(kafka_broker.bootstrap, impressions, 5 * requests)
    ]
    assert len(logged) == 5 * requests
    for k in range(requests):
        part = [imp for imp in logged if imp.request_id == f"req-{k}"]
        assert [imp.features["user_id#seen"] for imp in part] == pytest.approx(
            [np.log1p(5 * k) * 0.2] * 5, rel=1e-5
        )
        assert [imp.features["item_id#seen"] for imp in part] == pytest.approx(
            [np.log1p(k) * 0.2] * 5, rel=1e-5
        )
