"""A plain in-process stats registry: counters, gauges and histograms with fixed label names.

The engine increments these on hot paths; the one Prometheus adapter
(``connectors/metrics/prometheus.py``) reads them at scrape time, so an event costs a dict
lookup and an add, never a prometheus_client call.

Naming (Prometheus conventions, see https://prometheus.io/docs/practices/naming/):

* every name starts with ``reloop_``;
* counters end in ``_total`` (the full name is given here, suffix included);
* base units in the name: ``_seconds``, ``_bytes``, ``_records``, ``_ratio``; timestamps are
  ``_timestamp_seconds`` (Unix time, float);
* label values are bounded: topic, partition, arm, model_version, slot, a small fixed set of
  reasons; never user, item, request or impression ids.

Usage on a hot path: resolve the child once, then only ``inc``/``set``/``observe`` it::

    >>> reg = MetricsRegistry()
    >>> consumed = Counter("reloop_demo_events_total", "Events read.", ("topic",), registry=reg)
    >>> child = consumed.labels(topic="clicks")
    >>> child.inc(); child.inc(2)
    >>> child.get()
    3.0
    >>> [(s.name, s.labels, s.value) for s in reg.collect()[0].samples]
    [('reloop_demo_events_total', {'topic': 'clicks'}, 3.0)]

Threading: one writer thread per child plus any number of scraping readers is safe. Creating
a child and ``collect`` take the registry lock, so a reader never sees a dict change size while
iterating; ``inc`` is a plain read-add-store without a lock, so two threads incrementing the
SAME child may lose an increment (give each thread its own labelled child, or batch and inc
once). The canonical metric set at the bottom of this module lives in the process-wide
``REGISTRY``; tests use their own ``MetricsRegistry`` or call ``REGISTRY.reset()``.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

MetricType = Literal["counter", "gauge", "histogram"]

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# Serving latency of one scoring request (seconds): 0.25 ms .. 2.5 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


@dataclass(frozen=True)
class Sample:
    """One exported value. For histograms ``name`` carries the ``_bucket``/``_sum``/``_count`` suffix."""

    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class MetricFamily:
    name: str
    help: str
    type: MetricType
    labelnames: tuple[str, ...]
    samples: list[Sample] = field(default_factory=list)


class MetricsRegistry:
    """Holds metrics by name; ``collect()`` returns a consistent-enough copy of all values."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._hooks: list[Callable[[], None]] = []
        self.lock = threading.RLock()

    def register(self, metric: _Metric) -> None:
        with self.lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name!r} is already registered")
            self._metrics[metric.name] = metric

    def get(self, name: str) -> _Metric:
        return self._metrics[name]

    def __contains__(self, name: str) -> bool:
        return name in self._metrics

    def names(self) -> list[str]:
        return list(self._metrics)

    def add_collect_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` at the start of every ``collect()``: state that is costly to publish per
        event (rolling AUC, consumer lag) is copied into gauges only when someone reads them."""
        with self.lock:
            self._hooks.append(hook)

    def remove_collect_hook(self, hook: Callable[[], None]) -> None:
        with self.lock:
            self._hooks = [h for h in self._hooks if h is not hook]

    def collect(self) -> list[MetricFamily]:
        with self.lock:
            hooks = list(self._hooks)
        for hook in hooks:
            hook()
        with self.lock:
            metrics = list(self._metrics.values())
            return [m.family() for m in metrics]

    def reset(self) -> None:
        """Drop every labelled child (values restart at zero); metrics stay registered."""
        with self.lock:
            for metric in self._metrics.values():
                metric.clear()


REGISTRY = MetricsRegistry()


class _Metric:
    type: MetricType

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        registry: MetricsRegistry | None = REGISTRY,
    ) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}: {labelnames}")
        if not help:
            raise ValueError(f"metric {name} needs help text")
        self.name = name
        self.help = help
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        self._lock = registry.lock if registry is not None else threading.RLock()
        if registry is not None:
            registry.register(self)

    def labels(self, **values: object):
        """The child for these label values (created on first use). Values become ``str``."""
        try:
            key = tuple(str(values[n]) for n in self.labelnames)
        except KeyError as exc:
            raise ValueError(f"{self.name} needs labels {self.labelnames}, got {sorted(values)}") from exc
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} needs labels {self.labelnames}, got {sorted(values)}")
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = self._new_child()
                    self._children[key] = child
        return child

    def remove(self, **values: object) -> None:
        key = tuple(str(values[n]) for n in self.labelnames)
        with self._lock:
            self._children.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._children.clear()

    def label_values(self) -> list[tuple[str, ...]]:
        with self._lock:
            return list(self._children)

    def clone_into(self, registry: MetricsRegistry) -> _Metric:
        """The same definition registered in another registry (for tests with their own)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._children = {}
        clone._lock = registry.lock
        registry.register(clone)
        return clone

    def _unlabelled(self):
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: call .labels(...) first")
        return self.labels()

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def family(self) -> MetricFamily:
        with self._lock:
            items = list(self._children.items())
        samples: list[Sample] = []
        for key, child in items:
            samples.extend(child.samples(self.name, dict(zip(self.labelnames, key, strict=True))))
        return MetricFamily(self.name, self.help, self.type, self.labelnames, samples)


class _Child:
    def samples(self, name: str, labels: dict[str, str]) -> list[Sample]:
        raise NotImplementedError


class _CounterChild(_Child):
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, n: float = 1.0) -> None:
        if n < 0:
            raise ValueError("a counter only goes up")
        self.value += n

    def get(self) -> float:
        return self.value

    def samples(self, name: str, labels: dict[str, str]) -> list[Sample]:
        return [Sample(name, labels, float(self.value))]


class _GaugeChild(_Child):
    __slots__ = ("value", "function")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def set(self, v: float) -> None:
        self.value = v

    def inc(self, n: float = 1.0) -> None:
        self.value += n

    def dec(self, n: float = 1.0) -> None:
        self.value -= n

    def set_to_current_time(self) -> None:
        self.value = time.time()

    def set_function(self, fn: Callable[[], float] | None) -> None:
        """Read the value from ``fn()`` at scrape time (for state the engine already keeps)."""
        self.function = fn

    def get(self) -> float:
        return float(self.function()) if self.function is not None else float(self.value)

    def samples(self, name: str, labels: dict[str, str]) -> list[Sample]:
        return [Sample(name, labels, self.get())]


class _HistogramChild(_Child):
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # One slot per finite bound plus +Inf; non-cumulative here, cumulated at read time.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v

    def count(self) -> int:
        return sum(self.counts)

    def samples(self, name: str, labels: dict[str, str]) -> list[Sample]:
        counts = list(self.counts)
        out: list[Sample] = []
        running = 0
        for bound, c in zip((*self.bounds, math.inf), counts, strict=True):
            running += c
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(Sample(name + "_bucket", {**labels, "le": le}, float(running)))
        out.append(Sample(name + "_sum", labels, float(self.sum)))
        out.append(Sample(name + "_count", labels, float(running)))
        return out


class Counter(_Metric):
    """Monotonic count; the name must end in ``_total``."""

    type: MetricType = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), **kw) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        super().__init__(name, help, labelnames, **kw)

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def labels(self, **values: object) -> _CounterChild:
        return super().labels(**values)

    def inc(self, n: float = 1.0) -> None:
        self._unlabelled().inc(n)


class Gauge(_Metric):
    type: MetricType = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def labels(self, **values: object) -> _GaugeChild:
        return super().labels(**values)

    def set(self, v: float) -> None:
        self._unlabelled().set(v)

    def inc(self, n: float = 1.0) -> None:
        self._unlabelled().inc(n)

    def dec(self, n: float = 1.0) -> None:
        self._unlabelled().dec(n)

    def set_to_current_time(self) -> None:
        self._unlabelled().set_to_current_time()

    def set_function(self, fn: Callable[[], float] | None) -> None:
        self._unlabelled().set_function(fn)


class Histogram(_Metric):
    """Fixed-bucket histogram; ``observe(v)`` is a bisect over the bounds and two adds."""

    type: MetricType = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Iterable[float] = LATENCY_BUCKETS,
        **kw,
    ) -> None:
        bounds = tuple(float(b) for b in buckets if b != math.inf)
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram {name} needs strictly increasing buckets, got {bounds}")
        self.buckets = bounds
        super().__init__(name, help, labelnames, **kw)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def labels(self, **values: object) -> _HistogramChild:
        return super().labels(**values)

    def observe(self, v: float) -> None:
        self._unlabelled().observe(v)


# ---------------------------------------------------------------------------------------------
# The canonical metric set. Import these; do not invent parallel names.
#
# Who writes what:
#   connectors/kafka + runtime : EVENTS_CONSUMED, CONSUMER_LAG
#   events validation          : DEAD_LETTERS
#   join/                      : JOINED_SAMPLES, JOINER_*
#   train/                     : TRAIN_*
#   checkpoint/ + runtime      : SNAPSHOT_*
#   metrics/online.py          : ROLLING_* (published by OnlineMetricsBook.bind())
#   serve/                     : SERVE_*, IMPRESSIONS_*
# ---------------------------------------------------------------------------------------------

EVENTS_CONSUMED = Counter(
    "reloop_events_consumed_total", "Records read from the input topics.", ("topic",))
DEAD_LETTERS = Counter(
    "reloop_dead_letters_total",
    "Malformed or rejected events sent to the dead-letter sink, by reason (a small fixed set).",
    ("reason",))
JOINED_SAMPLES = Counter(
    "reloop_joined_samples_total", "Labelled samples emitted by the joiner, by label (0 or 1).", ("label",))
JOIN_TASKS = Gauge(
    "reloop_join_tasks", "Join tasks (co-partitioned partition pairs) this join process owns.")
JOINER_PENDING = Gauge(
    "reloop_joiner_pending", "Impressions waiting in the joiner for a click or for the window to close.")
JOINER_EXPIRED = Counter(
    "reloop_joiner_expired_total", "Impressions whose attribution window closed without a click (negatives).")
JOINER_LATE_CLICKS = Counter(
    "reloop_joiner_late_clicks_total",
    "Clicks that arrived after their impression was emitted as a negative, by the policy applied.",
    ("policy",))
JOINER_ORPHAN_CLICKS = Counter(
    "reloop_joiner_orphan_clicks_total", "Clicks whose impression the joiner never saw.")
JOINER_TOO_LATE = Counter(
    "reloop_joiner_too_late_total",
    "Events dropped because their window was already closed and forgotten (retention passed), by kind "
    "(impression or click). A jump means the watermark moved far ahead of the data.", ("kind",))
JOINER_DUPLICATES = Counter(
    "reloop_joiner_duplicates_total", "Duplicate events ignored by the joiner (kind: impression or click).",
    ("kind",))
JOINER_DROPPED_BY_BOUND = Counter(
    "reloop_joiner_dropped_by_bound_total",
    "Pending impressions evicted because the joiner reached its memory bound.")
JOINER_WATERMARK = Gauge(
    "reloop_joiner_watermark_timestamp_seconds", "The joiner's event-time watermark (Unix seconds).")

TRAIN_STEPS = Counter("reloop_train_steps_total", "Optimizer steps taken.")
TRAIN_SAMPLES = Counter("reloop_train_samples_total", "Samples trained on.")
TRAIN_DUPLICATES = Counter(
    "reloop_train_duplicates_dropped_total",
    "Samples the train stage received again (a join task resumed from its checkpoint) and dropped.")
TRAIN_LOSS = Gauge(
    "reloop_train_loss",
    "Loss of the last mini-batch, by part: ce, sc (ReLoop self-correction), kd, total.", ("part",))
TRAIN_SC_ACTIVE = Gauge(
    "reloop_train_sc_active_ratio",
    "Fraction of the last mini-batch where the ReLoop self-correction term was active (0..1).")

ROLLING_AUC = Gauge(
    "reloop_rolling_auc",
    "Exact ROC AUC over the last N labelled samples served by this arm and model version "
    "(slot: current or previous version of the arm).", ("arm", "model_version", "slot"))
ROLLING_LOGLOSS = Gauge(
    "reloop_rolling_logloss", "Mean log loss over the same rolling window.", ("arm", "model_version", "slot"))
ROLLING_MEAN_PREDICTION = Gauge(
    "reloop_rolling_mean_prediction", "Mean served prediction over the rolling window (calibration).",
    ("arm", "model_version", "slot"))
ROLLING_OBSERVED_CTR = Gauge(
    "reloop_rolling_observed_ctr", "Observed click rate over the rolling window (calibration).",
    ("arm", "model_version", "slot"))
ROLLING_SAMPLES = Gauge(
    "reloop_rolling_window_samples", "Samples currently in the rolling window.",
    ("arm", "model_version", "slot"))

SNAPSHOT_VERSION = Gauge("reloop_snapshot_version", "Version number of the last snapshot written.")
SNAPSHOT_TIMESTAMP = Gauge(
    "reloop_snapshot_timestamp_seconds", "Wall-clock time the last snapshot was written (Unix seconds).")
SNAPSHOT_PERIOD = Gauge(
    "reloop_snapshot_period_seconds",
    "Expected wall-clock seconds between snapshots: the configured period when it is wall-clock based, "
    "otherwise the last observed interval (the stale-snapshot alert fires at twice this).")
SNAPSHOTS = Counter("reloop_snapshots_total", "Snapshots written.")
SNAPSHOT_RESTORE_FALLBACKS = Counter(
    "reloop_snapshot_restore_fallbacks_total",
    "Snapshots or checkpoints refused at restore (corrupt, unloadable) before an older one was used.")
PIPELINE_RESTARTS = Counter(
    "reloop_pipeline_restarts_total",
    "Times the stream processor was rebuilt from its last snapshot after a failure that was not about "
    "one record (a sink or broker failure, a bug).")

CONSUMER_LAG = Gauge(
    "reloop_consumer_lag_records", "End offset minus the consumer position, per topic and partition.",
    ("topic", "partition"))

SERVE_REQUESTS = Counter("reloop_serve_requests_total", "Scoring requests answered.", ("arm",))
SERVE_LATENCY = Histogram(
    "reloop_serve_latency_seconds", "Time to score one request.", ("arm",), buckets=LATENCY_BUCKETS)
SERVE_RELOADS = Counter(
    "reloop_serve_reloads_total", "Snapshot reloads by the scoring service (outcome: ok or refused).",
    ("outcome",))
SERVE_FALLBACK = Gauge(
    "reloop_serve_snapshot_fallback",
    "1 while an arm serves an older snapshot than the newest in its registry because the newer ones "
    "were refused (checksum, format, unloadable); 0 otherwise.", ("arm",))
SERVE_MODEL_VERSION = Gauge(
    "reloop_serve_model_version", "Snapshot version the scoring service is serving, per arm.", ("arm",))
IMPRESSIONS_LOGGED = Counter(
    "reloop_impressions_logged_total", "Impression events written to the impressions topic.", ("arm",))
IMPRESSIONS_DROPPED = Counter(
    "reloop_impressions_dropped_total", "Impression events not logged (reason: queue_full, sink_error).",
    ("reason",))

CANONICAL: tuple[_Metric, ...] = (
    EVENTS_CONSUMED, DEAD_LETTERS, JOINED_SAMPLES, JOIN_TASKS,
    JOINER_PENDING, JOINER_EXPIRED, JOINER_LATE_CLICKS, JOINER_ORPHAN_CLICKS, JOINER_TOO_LATE,
    JOINER_DUPLICATES,
    JOINER_DROPPED_BY_BOUND, JOINER_WATERMARK,
    TRAIN_STEPS, TRAIN_SAMPLES, TRAIN_DUPLICATES, TRAIN_LOSS, TRAIN_SC_ACTIVE,
    ROLLING_AUC, ROLLING_LOGLOSS, ROLLING_MEAN_PREDICTION, ROLLING_OBSERVED_CTR, ROLLING_SAMPLES,
    SNAPSHOT_VERSION, SNAPSHOT_TIMESTAMP, SNAPSHOT_PERIOD, SNAPSHOTS, SNAPSHOT_RESTORE_FALLBACKS,
    PIPELINE_RESTARTS,
    CONSUMER_LAG,
    SERVE_REQUESTS, SERVE_LATENCY, SERVE_RELOADS, SERVE_FALLBACK, SERVE_MODEL_VERSION,
    IMPRESSIONS_LOGGED, IMPRESSIONS_DROPPED,
)


def ensure_canonical(registry: MetricsRegistry) -> None:
    """Register the canonical set in ``registry`` where missing (``REGISTRY`` already has it)."""
    for metric in CANONICAL:
        if metric.name not in registry:
            metric.clone_into(registry)


def exported_series_names() -> frozenset[str]:
    """Every series name a scrape of the canonical set can contain (histogram suffixes included)."""
    names: set[str] = set()
    for m in CANONICAL:
        if m.type == "histogram":
            names.update({m.name + "_bucket", m.name + "_sum", m.name + "_count"})
        else:
            names.add(m.name)
    return frozenset(names)
