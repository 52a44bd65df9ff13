"""A real Prometheus server scrapes a running reloop exporter; we read the series back from its HTTP API."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from connectors.metrics.local_prometheus import LocalPrometheus, find_binary
from connectors.metrics.prometheus import serve_metrics
from engine.metrics import registry as reg
from engine.metrics.online import OnlineMetricsBook

pytestmark = pytest.mark.prometheus


def require_binary(name: str):
    path = find_binary(name)
    if path is None:
        message = f"{name} not found: run deploy/prometheus/fetch.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class FedExporter:
    """An exporter over its own registry, fed by a thread as the engine would feed it."""

    def __init__(self) -> None:
        self.registry = reg.MetricsRegistry()
        reg.ensure_canonical(self.registry)
        self.book = OnlineMetricsBook(window_size=2000, max_versions=2)
        self.book.bind(self.registry)
        self.server = serve_metrics(self.registry, port=0, process_metrics=False)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        rng = np.random.default_rng(0)
        consumed = self.registry.get(reg.EVENTS_CONSUMED.name).labels(topic="impressions")
        lag = self.registry.get(reg.CONSUMER_LAG.name).labels(topic="impressions", partition=0)
        while not self.stop.wait(0.05):
            for arm, version, skill in (("control", 1, 0.5), ("reloop", 2, 1.5), ("reloop", 1, 1.0)):
                y = rng.integers(0, 2, 50)
                # A higher skill separates the classes more: the AUC differs per arm/version.
                p = 1 / (1 + np.exp(-(skill * (2 * y - 1) + rng.normal(size=50))))
                for yi, pi in zip(y.tolist(), p.tolist(), strict=True):
                    self.book.update(arm, version, yi, pi)
            consumed.inc(150)
            lag.set(int(rng.integers(0, 100)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.server.close()


@pytest.fixture(scope="session")
def prometheus_binary():
    return require_binary("prometheus")


@pytest.fixture(scope="module")
def exporter() -> Iterator[FedExporter]:
    exp = FedExporter()
    yield exp
    exp.close()


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, exporter, tmp_path_factory) -> Iterator[LocalPrometheus]:
    prom = LocalPrometheus(
        targets={"reloop-processor": [f"127.0.0.1:{exporter.server.port}"]},
        workdir=tmp_path_factory.mktemp("prometheus"),
        binary=prometheus_binary,
    )
    with prom:
        yield prom


def test_rolling_auc_per_arm_and_version_is_scraped(prometheus):
    series = prometheus.wait_for("reloop_rolling_auc", timeout=30, min_results=3)
    by_key = {
        (s["metric"]["arm"], s["metric"]["model_version"], s["metric"]["slot"]): float(s["value"][1])
        for s in series
    }
    assert set(by_key) == {
        ("control", "1", "current"), ("reloop", "2", "current"), ("reloop", "1", "previous"),
    }
    assert all(0.0 <= v <= 1.0 for v in by_key.values())
    # The feeder separates classes better for reloop v2 than for control: the scraped values show it.
    assert by_key[("reloop", "2", "current")] > by_key[("control", "1", "current")]
    assert all(s["metric"]["job"] == "reloop-processor" for s in series)


def test_events_counter_increases_between_scrapes(prometheus):
    prometheus.wait_for("reloop_events_consumed_total", timeout=30)
    increase = prometheus.wait_for('increase(reloop_events_consumed_total{topic="impressions"}[5s]) > 0',
                                   timeout=20)
    assert float(increase[0]["value"][1]) > 0


def test_no_unbounded_labels_are_exported(prometheus):
    prometheus.wait_for("reloop_rolling_auc", timeout=30)
    names = prometheus.query('count by (__name__) ({job="reloop-processor", __name__=~"reloop_.*"})')
    exported = {s["metric"]["__name__"] for s in names}
    assert exported <= reg.exported_series_names()
    allowed = {"__name__", "job", "instance", "topic", "partition", "arm", "model_version", "slot"}
    for s in prometheus.query('{job="reloop-processor", __name__=~"reloop_.*"}'):
        assert set(s["metric"]) <= allowed, s["metric"]
