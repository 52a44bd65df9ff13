"""The plain stats registry: values, labels, histogram buckets, validation, concurrent scraping."""

from __future__ import annotations

import threading

import pytest
from reloop.engine.metrics import registry as reg


def by_name(registry: reg.MetricsRegistry) -> dict[str, reg.MetricFamily]:
    return {f.name: f for f in registry.collect()}


def test_counter_labels_and_values():
    r = reg.MetricsRegistry()
    c = reg.Counter("reloop_x_total", "x", ("topic",), registry=r)
    c.labels(topic="a").inc()
    c.labels(topic="a").inc(2)
    c.labels(topic="b").inc(5)
    samples = {s.labels["topic"]: s.value for s in by_name(r)["reloop_x_total"].samples}
    assert samples == {"a": 3.0, "b": 5.0}
    assert by_name(r)["reloop_x_total"].type == "counter"
    with pytest.raises(ValueError):
        c.labels(topic="a").inc(-1)
    with pytest.raises(ValueError):
        c.labels(partition="0")
    with pytest.raises(ValueError):
        c.labels(topic="a", partition="0")
    with pytest.raises(ValueError):
        c.inc()  # labelled metric needs .labels first


def test_label_values_become_strings_and_share_a_child():
    r = reg.MetricsRegistry()
    g = reg.Gauge("reloop_lag", "lag", ("topic", "partition"), registry=r)
    g.labels(topic="t", partition=0).set(4)
    assert g.labels(topic="t", partition="0").get() == 4.0
    assert g.label_values() == [("t", "0")]


def test_gauge_ops_and_function():
    r = reg.MetricsRegistry()
    g = reg.Gauge("reloop_g", "g", registry=r)
    g.set(3)
    g.inc(2)
    g.dec()
    assert by_name(r)["reloop_g"].samples[0].value == 4.0
    state = {"v": 10}
    g.set_function(lambda: state["v"])
    state["v"] = 11
    assert by_name(r)["reloop_g"].samples[0].value == 11.0


def test_histogram_buckets_are_cumulative_and_le_inclusive():
    r = reg.MetricsRegistry()
    h = reg.Histogram("reloop_lat_seconds", "lat", ("arm",), buckets=(0.1, 1.0), registry=r)
    child = h.labels(arm="a")
    for v in (0.05, 0.1, 0.5, 3.0):
        child.observe(v)
    s = {(x.name, x.labels.get("le")): x.value for x in by_name(r)["reloop_lat_seconds"].samples}
    assert s[("reloop_lat_seconds_bucket", "0.1")] == 2
    assert s[("reloop_lat_seconds_bucket", "1.0")] == 3
    assert s[("reloop_lat_seconds_bucket", "+Inf")] == 4
    assert s[("reloop_lat_seconds_count", None)] == 4
    assert s[("reloop_lat_seconds_sum", None)] == pytest.approx(3.65)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: reg.Counter("reloop_no_suffix", "x", registry=r),
        lambda r: reg.Gauge("bad-name", "x", registry=r),
        lambda r: reg.Gauge("reloop_g", "x", ("le",), registry=r),
        lambda r: reg.Gauge("reloop_g", "", registry=r),
        lambda r: reg.Histogram("reloop_h", "x", buckets=(1.0, 0.5), registry=r),
    ],
)
def test_invalid_definitions_are_refused(make):
    with pytest.raises(ValueError):
        make(reg.MetricsRegistry())


def test_duplicate_registration_is_refused():
    r = reg.MetricsRegistry()
    reg.Gauge("reloop_g", "x", registry=r)
    with pytest.raises(ValueError, match="already registered"):
        reg.Gauge("reloop_g", "x", registry=r)


def test_collect_hook_runs_before_reading_and_reset_zeroes():
    r = reg.MetricsRegistry()
    g = reg.Gauge("reloop_g", "x", registry=r)
    calls = []
    hook = lambda: (calls.append(1), g.set(len(calls)))  # noqa: E731
    r.add_collect_hook(hook)
    assert by_name(r)["reloop_g"].samples[0].value == 1.0
    assert by_name(r)["reloop_g"].samples[0].value == 2.0
    r.remove_collect_hook(hook)
    r.reset()
    assert by_name(r)["reloop_g"].samples == []


def test_canonical_names_follow_conventions_and_clone_into_a_fresh_registry():
    names = [m.name for m in reg.CANONICAL]
    assert len(names) == len(set(names))
    for m in reg.CANONICAL:
        assert m.name.startswith("reloop_")
        assert (m.type == "counter") == m.name.endswith("_total")
        assert not {"user_id", "item_id", "request_id", "impression_id"} & set(m.labelnames)
        assert reg.REGISTRY.get(m.name) is m
    r = reg.MetricsRegistry()
    reg.ensure_canonical(r)
    reg.ensure_canonical(r)  # idempotent
    assert set(r.names()) == set(names)
    r.get("reloop_events_consumed_total").labels(topic="clone-only").inc()
    assert ("clone-only",) not in reg.EVENTS_CONSUMED.label_values()


def test_scraping_while_a_writer_creates_children_never_breaks():
    r = reg.MetricsRegistry()
    c = reg.Counter("reloop_c_total", "x", ("partition",), registry=r)
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape():
        try:
            while not stop.is_set():
                r.collect()
        except BaseException as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    t = threading.Thread(target=scrape)
    t.start()
    for i in range(20000):
        c.labels(partition=i % 500).inc()
    stop.set()
    t.join()
    assert not errors
    assert sum(s.value for s in by_name(r)["reloop_c_total"].samples) == 20000
