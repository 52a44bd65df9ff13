"""The Prometheus adapter renders the engine's plain counters faithfully (checked with prometheus_client's
parser), adds build info and the standard collectors, and does no work per event."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from reloop.connectors.metrics.prometheus import (
    SERIES,
    EngineCollector,
    exported_series_names,
    render_metrics,
    serve_metrics,
)
from reloop.engine.metrics.online import OnlineMetricsBook
from reloop.engine.metrics.stats import EngineStats, Tally


def parse(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fed_stats() -> EngineStats:
    stats = EngineStats()
    stats.events_consumed.add("clicks", n=7)
    stats.consumer_lag.set(42, "clicks", "1")
    lat = stats.serve_latency_s.child("a")
    for v in (0.0004, 0.003, 0.003, 3.0):
        lat.observe(v)
    return stats


def test_counters_gauges_histograms_round_trip():
    prom = CollectorRegistry()
    prom.register(EngineCollector(fed_stats()))
    got = parse(generate_latest(prom).decode())
    assert got[("reloop_events_consumed_total", (("topic", "clicks"),))] == 7
    assert got[("reloop_consumer_lag_records", (("partition", "1"), ("topic", "clicks")))] == 42
    bucket = {dict(k[1])["le"]: v for k, v in got.items() if k[0] == "reloop_serve_latency_seconds_bucket"}
    assert bucket["0.0005"] == 1 and bucket["0.005"] == 3 and bucket["2.5"] == 3 and bucket["+Inf"] == 4
    assert got[("reloop_serve_latency_seconds_count", (("arm", "a"),))] == 4
    assert abs(got[("reloop_serve_latency_seconds_sum", (("arm", "a"),))] - 3.0064) < 1e-9


def test_scrape_reads_current_values_and_runs_hooks():
    r = EngineStats()
    book = OnlineMetricsBook(window_size=10)
    book.bind(r)
    body, ctype = render_metrics(r, process_metrics=False)
    assert "text/plain" in ctype
    assert "reloop_rolling_auc{" not in body.decode()
    book.update("a", 1, 1, 0.9)
    book.update("a", 1, 0, 0.2)
    got = parse(render_metrics(r, process_metrics=False)[0].decode())
    assert got[("reloop_rolling_auc", (("arm", "a"), ("model_version", "1"), ("slot", "current")))] == 1.0
    r.events_consumed.add("t")
    got = parse(render_metrics(r, process_metrics=False)[0].decode())
    assert got[("reloop_events_consumed_total", (("topic", "t"),))] == 1


def test_serve_metrics_binds_loopback_and_serves_the_registry():
    server = serve_metrics(fed_stats(), port=0)
    try:
        assert server.host == "127.0.0.1"
        text = httpx.get(server.url, timeout=5).text
        assert 'reloop_events_consumed_total{topic="clicks"} 7.0' in text
        assert "process_cpu_seconds_total" in text
    finally:
        server.close()


def test_serve_metrics_on_ipv6_loopback_gives_a_url_that_reaches_it(unavailable):
    # The URL (logged as the stage's "metrics" line) was http://::1:PORT/metrics, which does not parse.
    try:
        server = serve_metrics(fed_stats(), host="::1", port=0)
    except OSError as exc:  # a machine without IPv6; CI's machines have it, so there it is a failure
        unavailable(f"no IPv6 loopback here: {exc}")
    try:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        assert 'reloop_events_consumed_total{topic="clicks"} 7.0' in httpx.get(server.url, timeout=5).text
    finally:
        server.close()


def test_every_engine_field_is_exported_once_with_one_label_per_tuple_value():
    stats = EngineStats()
    fields = [s.field for s in SERIES]
    assert sorted(fields) == sorted(stats.metrics())
    names = [s.name for s in SERIES]
    assert len(names) == len(set(names))
    for s in SERIES:
        assert s.name.startswith("reloop_") and s.help
        assert (s.kind == "counter") == s.name.endswith("_total"), s.name
        assert not {"user_id", "item_id", "request_id", "impression_id", "le"} & set(s.labels)
        kind = type(getattr(stats, s.field)).__name__
        assert {"counter": "Tally", "gauge": "Level", "histogram": "Buckets"}[s.kind] == kind, s.field
    # A scrape of every field touched once with as many label values as the series has labels parses.
    for s in SERIES:
        metric = getattr(stats, s.field)
        values = tuple(f"v{i}" for i in range(len(s.labels)))
        if s.kind == "counter":
            metric.add(*values)
        elif s.kind == "gauge":
            metric.set(1.0, *values)
        else:
            metric.observe(0.01, *values)
    got = parse(render_metrics(stats, process_metrics=False)[0].decode())
    assert {k[0] for k in got if k[0].startswith("reloop_")} == exported_series_names()


def test_build_info_carries_the_installed_versions():
    got = parse(render_metrics(EngineStats(), process_metrics=False)[0].decode())
    ((key, value),) = [(k, v) for k, v in got.items() if k[0] == "reloop_build_info"]
    labels = dict(key[1])
    assert value == 1.0
    assert labels["version"] == importlib.metadata.version("reloop")
    assert labels["torch"] == importlib.metadata.version("torch")
    assert labels["python"] == platform.python_version()
    assert "reloop_build_info" in exported_series_names()


def test_standard_process_platform_and_gc_collectors_are_in_the_scrape():
    text = render_metrics(EngineStats())[0].decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "python_info" in names
    assert {"python_gc_objects_collected_total", "python_gc_collections_total"} <= names
    if sys.platform.startswith("linux"):  # the process collector reads /proc
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names


def test_train_loss_total_is_its_own_series_and_the_parts_do_not_include_it():
    stats = EngineStats()
    stats.train_loss.set(0.42)
    for part, v in (("ce", 0.5), ("sc", 0.1), ("kd", 0.0)):
        stats.train_loss_parts.set(v, part)
    got = parse(render_metrics(stats, process_metrics=False)[0].decode())
    assert [v for k, v in got.items() if k[0] == "reloop_train_loss"] == [0.42]
    assert got[("reloop_train_loss", ())] == 0.42
    parts = {dict(k[1])["part"]: v for k, v in got.items() if k[0] == "reloop_train_loss_part"}
    assert parts == {"ce": 0.5, "sc": 0.1, "kd": 0.0}


def test_an_event_costs_no_prometheus_client_call_and_the_scrape_has_every_one():
    stats = EngineStats()
    prom = CollectorRegistry(auto_describe=False)
    prom.register(EngineCollector(stats, build_info=False))
    calls: list[str] = []

    def profile(frame, event, arg):
        where = frame.f_code.co_filename if event == "call" else getattr(arg, "__module__", "") or ""
        if "prometheus_client" in where:
            calls.append(where)

    hot = stats.events_consumed.child("clicks")
    sys.setprofile(profile)
    try:
        for _ in range(1000):
            stats.events_consumed.add("clicks")
            hot.add()
            stats.serve_latency_s.observe(0.002, "a")
            stats.consumer_lag.set(3, "clicks", "0")
    finally:
        sys.setprofile(None)
    assert calls == []
    for _ in range(100_000 - 2000):
        stats.events_consumed.add("clicks")
    assert isinstance(stats.events_consumed, Tally)
    got = parse(generate_latest(prom).decode())
    assert got[("reloop_events_consumed_total", (("topic", "clicks"),))] == 100_000
    assert got[("reloop_serve_latency_seconds_count", (("arm", "a"),))] == 1000
