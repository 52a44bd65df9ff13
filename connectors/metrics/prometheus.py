"""The one Prometheus adapter: the only place that knows metric names, help texts, types and labels.

Nothing here runs per event. The engine adds to plain numbers in ``reloop.engine.metrics.stats``
(``EngineStats``: a dict lookup and an add); when Prometheus scrapes, ``EngineCollector.collect``
runs the stats' scrape hooks (which copy rolling AUC and friends from ``OnlineMetricsBook`` into
their levels) and turns every field into a prometheus_client metric family, as ``SERIES`` says.
``build_collector_registry`` adds ``reloop_build_info`` and prometheus_client's standard process,
platform (``python_info``) and GC collectors.

    >>> from reloop.engine.metrics.stats import EngineStats
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> stats = EngineStats()
    >>> stats.events_consumed.add("clicks", n=3)
    >>> prom = CollectorRegistry()
    >>> prom.register(EngineCollector(stats, build_info=False))
    >>> [line for line in generate_latest(prom).decode().splitlines() if line.startswith("reloop_events")]
    ['reloop_events_consumed_total{topic="clicks"} 3.0']
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    make_asgi_app,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from reloop.engine.metrics.stats import STATS, Buckets, EngineStats, Level, Tally
from reloop.engine.netaddr import http_url

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Series:
    """How one ``EngineStats`` field is exported. Counter names include ``_total``."""

    field: str
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()


_VERSIONED = ("arm", "model_version", "slot")

# Conventions (https://prometheus.io/docs/practices/naming/): prefix reloop_, counters end in _total,
# base units in the name, timestamps are _timestamp_seconds (Unix). Label values are bounded: topic,
# partition, arm, model_version, slot and small fixed sets; never user, item, request or impression
# ids. Every label splits a whole into parts, so a sum over a label is meaningful (or, for the
# per-arm/version gauges and the learning rate per optimizer, names distinct series); a total never
# sits beside its own parts.
SERIES: tuple[Series, ...] = (
    Series("events_consumed", "reloop_events_consumed_total", "counter",
           "Records read from the input topics.", ("topic",)),
    Series("dead_letters", "reloop_dead_letters_total", "counter",
           "Malformed or rejected events sent to the dead-letter sink, by reason (a small fixed set).",
           ("reason",)),
    Series("joined_samples", "reloop_joined_samples_total", "counter",
           "Labelled samples emitted by the joiner, by label (0 or 1). A late click's correction is a "
           "label-1 sample for an impression emitted as 0 before (reloop_joiner_late_clicks_total, policy "
           "correct): the sum over labels counts samples, not impressions.", ("label",)),
    Series("join_tasks", "reloop_join_tasks", "gauge",
           "Join tasks (co-partitioned partition pairs) this join process owns."),
    Series("join_checkpoint_seconds", "reloop_join_checkpoint_seconds", "gauge",
           "How long the last checkpoint of every join task of this process took (its whole join state)."),
    Series("join_checkpoint_interval_seconds", "reloop_join_checkpoint_interval_seconds", "gauge",
           "Seconds until the next join checkpoint: join_checkpoint_every_s, or longer when checkpoints "
           "are slow (they take at most join_checkpoint_max_share of the time)."),
    Series("joiner_pending", "reloop_joiner_pending", "gauge",
           "Impressions waiting in the joiner for a click or for the window to close."),
    Series("joiner_expired", "reloop_joiner_expired_total", "counter",
           "Impressions whose attribution window closed without a click (negatives)."),
    Series("joiner_late_clicks", "reloop_joiner_late_clicks_total", "counter",
           "Clicks that arrived after their impression was emitted as a negative, by the policy applied.",
           ("policy",)),
    Series("joiner_orphan_clicks", "reloop_joiner_orphan_clicks_total", "counter",
           "Clicks whose impression the joiner never saw."),
    Series("merge_stamped_ahead", "reloop_merge_stamped_ahead_total", "counter",
           "Input records stamped over 1 s ahead of a record after them in their partition (a producer's "
           "clock), merged with their successors. Many, or runs: consider LogAppendTime for the topic."),
    Series("join_replays_abandoned", "reloop_join_replays_abandoned_total", "counter",
           "Join tasks that gave up taking their merge journal's decisions again after a crash: an input "
           "sat at its end short of a decision's position (the broker lost records). Samples sent before "
           "the crash may then be named again by other samples: lost or trained twice."),
    Series("join_input_deleted_unread", "reloop_join_input_deleted_unread_total", "counter",
           "Input records deleted (by the topic's retention) before a join task read them, by topic: a "
           "task that lagged, or was down, longer than the retention. They are lost.", ("topic",)),
    Series("join_input_restarted_below", "reloop_join_input_restarted_below_total", "counter",
           "Input partitions a join process read again from below its position, by topic: the partition's "
           "log now ends below it (the topic deleted and created again, or truncated by an unclean leader "
           "election). Its records are read as new ones: samples may be trained twice.", ("topic",)),
    Series("join_record_age_s", "reloop_join_record_age_seconds", "gauge",
           "Wall clock minus the timestamp of the last record the join stage checked, by topic: the first "
           "and the last record of each poll of an input topic, each message it writes to the samples "
           "topic (stamped with its task's watermark). How far behind in time it reads and writes.",
           ("topic",)),
    Series("topic_retention_s", "reloop_topic_retention_seconds", "gauge",
           "The topic's time-based retention (retention.ms) as the join stage read it at its start, by "
           "topic (topics without one are left out): the broker deletes records stamped longer ago, read "
           "or not.", ("topic",)),
    Series("joiner_too_late", "reloop_joiner_too_late_total", "counter",
           "Events dropped because their window was already closed and forgotten (retention passed), by "
           "kind (impression or click). A jump means the watermark moved far ahead of the data.", ("kind",)),
    Series("joiner_duplicates", "reloop_joiner_duplicates_total", "counter",
           "Duplicate events ignored by the joiner (kind: impression or click).", ("kind",)),
    Series("joiner_dropped_by_bound", "reloop_joiner_dropped_by_bound_total", "counter",
           "Events the joiner dropped at a bound, by reason: pending impressions past join.max_pending "
           "(max_pending) or older than join.ttl_ms (ttl), clicks waiting for their impression past "
           "join.max_early_clicks (max_early_clicks); closed windows forgotten before join.retention_ms "
           "past join.max_closed (max_closed: nothing lost, a duplicate or late click for them is not "
           "recognised).", ("reason",)),
    Series("joiner_watermark_s", "reloop_joiner_watermark_timestamp_seconds", "gauge",
           "The joiner's event-time watermark (Unix seconds)."),
    Series("train_steps", "reloop_train_steps_total", "counter", "Optimizer steps taken."),
    Series("train_samples", "reloop_train_samples_total", "counter", "Samples trained on."),
    Series("train_skipped_steps", "reloop_train_skipped_steps_total", "counter",
           "Optimizer steps not applied because a gradient was not finite (the model kept its weights)."),
    Series("train_skipped_samples", "reloop_train_skipped_samples_total", "counter",
           "Samples not learnt: those of skipped steps, and rows left out of a step because a dense input "
           "was not finite (a numeric value beyond float32)."),
    Series("train_replayed_samples", "reloop_train_replayed_samples_total", "counter",
           "Samples of the replay buffer learnt again (train.replay_size; not in "
           "reloop_train_samples_total)."),
    Series("train_version_mismatches", "reloop_train_version_mismatches_total", "counter",
           "Samples served by another model version than the trainer's previous snapshot, whose y_last "
           "train.version_mismatch decided (use_logged, recompute or skip_sc)."),
    Series("train_duplicates_dropped", "reloop_train_duplicates_dropped_total", "counter",
           "Samples the train stage received again (a join task resumed from its checkpoint) and dropped."),
    Series("train_samples_missing", "reloop_train_samples_missing_total", "counter",
           "Samples a join task numbered that the train stage never found on the samples topic (a jump in "
           "the task's seqs: the topic deleted, recreated or cut by retention before they were trained)."),
    Series("train_join_task_restarts", "reloop_train_join_task_restarts_total", "counter",
           "Join tasks that started a new numbering (at seq 0, under a new incarnation) after the train "
           "stage took samples of an earlier one: the task started without its checkpoint folder. Its new "
           "samples are trained; what it joined again from the oldest input retained is trained twice."),
    Series("train_samples_refused", "reloop_train_samples_refused_total", "counter",
           "Samples the train stage did not train: their features are values its feature spec cannot read "
           "(their message is dead-lettered with reason bad_feature; its other samples train)."),
    Series("train_loss", "reloop_train_loss", "gauge",
           "Loss of the last mini-batch: the optimized total, alpha * (sc or kd) + (1 - alpha) * ce."),
    Series("train_loss_parts", "reloop_train_loss_part", "gauge",
           "Terms of the last mini-batch's loss, unweighted: ce, sc (ReLoop self-correction), kd "
           "(at most one of sc and kd is non-zero). Their weighted sum is reloop_train_loss.", ("part",)),
    Series("train_sc_active", "reloop_train_sc_active_ratio", "gauge",
           "Fraction of the last mini-batch where the ReLoop self-correction term was active (0..1)."),
    Series("train_learning_rate", "reloop_train_learning_rate", "gauge",
           "Learning rate of the last step per optimizer: dense (Adam) and embedding (the tables'). The "
           "small-step rates while steps average under model.optimizer.small_steps_below samples.",
           ("optimizer",)),
    Series("rolling_auc", "reloop_rolling_auc", "gauge",
           "Exact ROC AUC over the last N labelled samples served by this arm and model version "
           "(slot: current or previous version of the arm).", _VERSIONED),
    Series("rolling_logloss", "reloop_rolling_logloss", "gauge",
           "Mean log loss over the same rolling window.", _VERSIONED),
    Series("rolling_mean_prediction", "reloop_rolling_mean_prediction", "gauge",
           "Mean served prediction over the rolling window (calibration).", _VERSIONED),
    Series("rolling_observed_ctr", "reloop_rolling_observed_ctr", "gauge",
           "Observed click rate over the rolling window (calibration).", _VERSIONED),
    Series("rolling_samples", "reloop_rolling_window_samples", "gauge",
           "Samples currently in the rolling window.", _VERSIONED),
    Series("rolling_untracked_samples", "reloop_rolling_untracked_samples_total", "counter",
           "Samples of arms beyond metrics.max_arms, left out of the rolling metrics."),
    Series("snapshot_version", "reloop_snapshot_version", "gauge",
           "Version number of the last snapshot written."),
    Series("snapshot_time_s", "reloop_snapshot_timestamp_seconds", "gauge",
           "Wall-clock time the last snapshot was written (Unix seconds)."),
    Series("snapshot_period_s", "reloop_snapshot_period_seconds", "gauge",
           "Expected wall-clock seconds between snapshots: the configured period when it is wall-clock "
           "based, otherwise the last observed interval (the stale-snapshot alert fires at twice this)."),
    Series("period_boundary_time_s", "reloop_period_boundary_timestamp_seconds", "gauge",
           "Wall-clock time of the last period boundary (Unix seconds): a snapshot written, or a boundary "
           "passed without one because nothing was trained since the last (a quiet stream)."),
    Series("snapshots", "reloop_snapshots_total", "counter", "Snapshots written."),
    Series("snapshot_restore_fallbacks", "reloop_snapshot_restore_fallbacks_total", "counter",
           "Snapshots or checkpoints refused at restore (corrupt, unloadable) before an older one was used."),
    Series("pipeline_restarts", "reloop_pipeline_restarts_total", "counter",
           "Times the stream processor was rebuilt from its last snapshot after a failure that was not "
           "about one record (a sink or broker failure, a bug)."),
    Series("consumer_lag", "reloop_consumer_lag_records", "gauge",
           "End offset minus the consumer position, per topic and partition.", ("topic", "partition")),
    Series("serve_requests", "reloop_serve_requests_total", "counter",
           "Scoring requests answered with a ranking (200).", ("arm",)),
    Series("serve_failed_requests", "reloop_serve_failed_requests_total", "counter",
           "Scoring requests answered without one, by HTTP status: 413 (body too large), 415 (a "
           "Content-Encoding), 422 (invalid), "
           "503 (no model loaded yet, or shed after serve.limits.max_queue_ms), 500 (scoring failed); 408: "
           "connections closed at "
           "serve.read_timeout_s before their request arrived whole.", ("status",)),
    Series("serve_unread_requests", "reloop_serve_unread_requests_total", "counter",
           "Scoring requests whose context and candidates carry none of the fields the model reads "
           "(scored with every input missing: feature names that do not match the spec).", ("arm",)),
    Series("serve_latency_s", "reloop_serve_latency_seconds", "histogram", "Time to score one request.",
           ("arm",)),
    Series("serve_reloads", "reloop_serve_reloads_total", "counter",
           "Snapshot reloads by the scoring service (outcome: ok or refused).", ("outcome",)),
    Series("serve_fallback", "reloop_serve_snapshot_fallback", "gauge",
           "1 while an arm serves an older snapshot than the newest in its registry because the newer "
           "ones were refused (checksum, format, unloadable); 0 otherwise.", ("arm",)),
    Series("serve_model_version", "reloop_serve_model_version", "gauge",
           "Snapshot version the scoring service is serving, per arm.", ("arm",)),
    Series("impressions_logged", "reloop_impressions_logged_total", "counter",
           "Impression events written to the impressions topic.", ("arm",)),
    Series("impressions_dropped", "reloop_impressions_dropped_total", "counter",
           "Impression events not logged (reason: queue_full, sink_error, oversized, rejected, "
           "undelivered, encode_error, shutdown, closed).", ("reason",)),
    Series("impressions_pending", "reloop_impressions_pending", "gauge",
           "Impression events an arm's logger accepted and Kafka has not acknowledged yet (held while the "
           "broker is unreachable, up to serve.log.max_buffer; beyond it they are dropped, queue_full).",
           ("arm",)),
    Series("serve_feed_samples", "reloop_serve_feed_samples_total", "counter",
           "Joined samples a serving arm's samples feed took (target: memory, ReLoop2's error memory, or "
           "counters, the click counters; outcome: written, or for counters the clicks counted; duplicate, "
           "re-emitted by a resumed join task; undecodable; refused, values the live spec cannot read; "
           "failed, a write that raised).", ("arm", "target", "outcome")),
    Series("serve_feed_lag", "reloop_serve_feed_lag_records", "gauge",
           "Records a serving arm's feed is behind the end of a topic it reads (the samples topic; for "
           "counters that count the impression log, that log too), summed over the topic's partitions.",
           ("arm", "target", "topic")),
)

BUILD_INFO = "reloop_build_info"
_BUILD_LABELS = ("version", "python", "torch")


def build_info() -> dict[str, str]:
    """What ``reloop_build_info`` carries: the installed reloop and torch versions and the Python one."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"version": version("reloop"), "python": platform.python_version(), "torch": version("torch")}


def exported_series_names() -> frozenset[str]:
    """Every reloop_* series name a scrape can contain (histogram suffixes included)."""
    names = {BUILD_INFO}
    for s in SERIES:
        if s.kind == "histogram":
            names.update({s.name + "_bucket", s.name + "_sum", s.name + "_count"})
        else:
            names.add(s.name)
    return frozenset(names)


class EngineCollector(Collector):
    """Reads an ``EngineStats`` at scrape time and yields one metric family per ``SERIES`` entry."""

    def __init__(self, stats: EngineStats = STATS, *, build_info: bool = True) -> None:
        self.stats = stats
        self.info = _build_info_family() if build_info else None

    def describe(self) -> list[Metric]:
        # Empty: prometheus_client then skips its duplicate-name check instead of running a full
        # collect (and the scrape hooks) at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        self.stats.run_hooks()
        if self.info is not None:
            yield self.info
        for s in SERIES:
            yield family(s, getattr(self.stats, s.field))


def _build_info_family() -> Metric:
    info = InfoMetricFamily(BUILD_INFO.removesuffix("_info"), "The running reloop build.", labels=())
    info.add_metric([], build_info())
    return info


def family(s: Series, source: Tally | Level | Buckets) -> Metric:
    """One ``SERIES`` entry's current values as a prometheus_client family."""
    names = list(s.labels)
    if s.kind == "histogram":
        out: Metric = HistogramMetricFamily(s.name, s.help, labels=names)
        for key, bins in source.items():
            running, buckets = 0, []
            for bound, count in zip((*bins.bounds, float("inf")), bins.counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), float(running)))
            out.add_metric([str(v) for v in key], buckets, float(bins.sum))
        return out
    if s.kind == "counter":
        # prometheus_client appends _total itself.
        out = CounterMetricFamily(s.name.removesuffix("_total"), s.help, labels=names)
    else:
        out = GaugeMetricFamily(s.name, s.help, labels=names)
    for key, value in source.items():
        out.add_metric([str(v) for v in key], float(value))
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
        return http_url(self.host, self.port, "/metrics")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def build_collector_registry(
    stats: EngineStats = STATS, *, process_metrics: bool = True
) -> CollectorRegistry:
    """A fresh prometheus_client registry holding our collector with ``reloop_build_info``, and with
    ``process_metrics`` the standard process (CPU, memory, fds), platform (``python_info``) and GC ones."""
    prom = CollectorRegistry(auto_describe=False)
    prom.register(EngineCollector(stats))
    if process_metrics:
        ProcessCollector(registry=prom)
        PlatformCollector(registry=prom)
        GCCollector(registry=prom)
    return prom


def serve_metrics(
    stats: EngineStats = STATS,
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    process_metrics: bool = True,
) -> MetricsServer:
    """Serve ``stats`` at http://host:port/metrics from a daemon thread. ``port=0`` picks a free one.

    Binds to loopback by default; pass ``host="0.0.0.0"`` in a container so Prometheus can reach it.
    """
    prom = build_collector_registry(stats, process_metrics=process_metrics)
    server, thread = start_http_server(port, addr=host, registry=prom)
    return MetricsServer(server, thread, host, server.server_port, prom)


def render_metrics(stats: EngineStats = STATS, *, process_metrics: bool = True) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``stats`` and its content type, for an app's ``GET /metrics``."""
    prom = build_collector_registry(stats, process_metrics=process_metrics)
    return generate_latest(prom), CONTENT_TYPE_LATEST


def metrics_asgi_app(stats: EngineStats = STATS, *, process_metrics: bool = True):
    """An ASGI app serving the metrics, for the FastAPI scoring service: ``app.mount("/metrics", ...)``."""
    return make_asgi_app(registry=build_collector_registry(stats, process_metrics=process_metrics))
