"""The one Prometheus adapter: exports the plain in-process registry at scrape time.

Nothing here runs per event. The engine adds to ``reloop.engine.metrics.registry`` children (an int add);
when Prometheus scrapes, ``RegistryCollector.collect`` runs the registry's collect hooks (which
copy rolling AUC and friends from ``OnlineMetricsBook`` into gauges) and converts each family
into prometheus_client's metric families.

    >>> from reloop.engine.metrics.registry import MetricsRegistry, Counter
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> plain = MetricsRegistry()
    >>> Counter("reloop_demo_total", "Demo.", ("topic",), registry=plain).labels(topic="t").inc(3)
    >>> prom = CollectorRegistry()
    >>> prom.register(RegistryCollector(plain))
    >>> print(generate_latest(prom).decode().splitlines()[2])
    reloop_demo_total{topic="t"} 3.0
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    make_asgi_app,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from reloop.engine.metrics.registry import REGISTRY, MetricFamily, MetricsRegistry


class RegistryCollector(Collector):
    """A prometheus_client collector over a plain ``MetricsRegistry``."""

    def __init__(self, registry: MetricsRegistry = REGISTRY) -> None:
        self.registry = registry

    def describe(self) -> list[Metric]:
        # Empty: prometheus_client then skips its duplicate-name check instead of running a
        # full collect (and its hooks) at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            yield convert(family)


def convert(family: MetricFamily) -> Metric:
    names = list(family.labelnames)
    if family.type == "counter":
        # prometheus_client appends _total itself.
        out: Metric = CounterMetricFamily(family.name.removesuffix("_total"), family.help, labels=names)
        for s in family.samples:
            out.add_metric([s.labels[n] for n in names], s.value)
        return out
    if family.type == "gauge":
        out = GaugeMetricFamily(family.name, family.help, labels=names)
        for s in family.samples:
            out.add_metric([s.labels[n] for n in names], s.value)
        return out
    out = HistogramMetricFamily(family.name, family.help, labels=names)
    per_child: dict[tuple[str, ...], dict[str, object]] = {}
    for s in family.samples:
        key = tuple(s.labels[n] for n in names)
        child = per_child.setdefault(key, {"buckets": [], "sum": 0.0})
        if s.name.endswith("_bucket"):
            child["buckets"].append((s.labels["le"], s.value))
        elif s.name.endswith("_sum"):
            child["sum"] = s.value
    for key, child in per_child.items():
        out.add_metric(list(key), child["buckets"], child["sum"])
    return out


@dataclass
class MetricsServer:
    """A running /metrics endpoint; ``close()`` stops it."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    collector_registry: CollectorRegistry

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def build_collector_registry(
    registry: MetricsRegistry = REGISTRY, *, process_metrics: bool = True
) -> CollectorRegistry:
    """A fresh prometheus_client registry holding our collector (and process CPU/memory)."""
    prom = CollectorRegistry(auto_describe=False)
    prom.register(RegistryCollector(registry))
    if process_metrics:
        ProcessCollector(registry=prom)
    return prom


def serve_metrics(
    registry: MetricsRegistry = REGISTRY,
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    process_metrics: bool = True,
) -> MetricsServer:
    """Serve ``registry`` at http://host:port/metrics from a daemon thread. ``port=0`` picks a free one.

    Binds to loopback by default; pass ``host="0.0.0.0"`` in a container so Prometheus can reach it.
    """
    prom = build_collector_registry(registry, process_metrics=process_metrics)
    server, thread = start_http_server(port, addr=host, registry=prom)
    return MetricsServer(server, thread, host, server.server_port, prom)


def render_metrics(
    registry: MetricsRegistry = REGISTRY, *, process_metrics: bool = True
) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type, for an app's ``GET /metrics``."""
    prom = build_collector_registry(registry, process_metrics=process_metrics)
    return generate_latest(prom), CONTENT_TYPE_LATEST


def metrics_asgi_app(registry: MetricsRegistry = REGISTRY, *, process_metrics: bool = True):
    """An ASGI app serving the metrics, for the FastAPI scoring service: ``app.mount("/metrics", ...)``."""
    return make_asgi_app(registry=build_collector_registry(registry, process_metrics=process_metrics))
