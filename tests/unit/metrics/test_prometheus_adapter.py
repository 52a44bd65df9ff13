"""The Prometheus adapter renders the plain registry faithfully (checked with prometheus_client's parser)."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from reloop.connectors.metrics.prometheus import RegistryCollector, render_metrics, serve_metrics
from reloop.engine.metrics import registry as reg
from reloop.engine.metrics.online import OnlineMetricsBook


def parse(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fed_registry() -> reg.MetricsRegistry:
    r = reg.MetricsRegistry()
    reg.ensure_canonical(r)
    r.get("reloop_events_consumed_total").labels(topic="clicks").inc(7)
    r.get("reloop_consumer_lag_records").labels(topic="clicks", partition=1).set(42)
    lat = r.get("reloop_serve_latency_seconds").labels(arm="a")
    for v in (0.0004, 0.003, 0.003, 3.0):
        lat.observe(v)
    return r


def test_counters_gauges_histograms_round_trip():
    prom = CollectorRegistry()
    prom.register(RegistryCollector(fed_registry()))
    got = parse(generate_latest(prom).decode())
    assert got[("reloop_events_consumed_total", (("topic", "clicks"),))] == 7
    assert got[("reloop_consumer_lag_records", (("partition", "1"), ("topic", "clicks")))] == 42
    bucket = {dict(k[1])["le"]: v for k, v in got.items() if k[0] == "reloop_serve_latency_seconds_bucket"}
    assert bucket["0.0005"] == 1 and bucket["0.005"] == 3 and bucket["2.5"] == 3 and bucket["+Inf"] == 4
    assert got[("reloop_serve_latency_seconds_count", (("arm", "a"),))] == 4
    assert abs(got[("reloop_serve_latency_seconds_sum", (("arm", "a"),))] - 3.0064) < 1e-9


def test_scrape_reads_current_values_and_runs_hooks():
    r = reg.MetricsRegistry()
    book = OnlineMetricsBook(window_size=10)
    book.bind(r)
    body, ctype = render_metrics(r, process_metrics=False)
    assert "text/plain" in ctype
    assert "reloop_rolling_auc{" not in body.decode()
    book.update("a", 1, 1, 0.9)
    book.update("a", 1, 0, 0.2)
    got = parse(render_metrics(r, process_metrics=False)[0].decode())
    assert got[("reloop_rolling_auc", (("arm", "a"), ("model_version", "1"), ("slot", "current")))] == 1.0
    r.get("reloop_events_consumed_total").labels(topic="t").inc()
    got = parse(render_metrics(r, process_metrics=False)[0].decode())
    assert got[("reloop_events_consumed_total", (("topic", "t"),))] == 1


def test_serve_metrics_binds_loopback_and_serves_the_registry():
    server = serve_metrics(fed_registry(), port=0)
    try:
        assert server.host == "127.0.0.1"
        text = httpx.get(server.url, timeout=5).text
        assert 'reloop_events_consumed_total{topic="clicks"} 7.0' in text
        assert "process_cpu_seconds_total" in text
    finally:
        server.close()
