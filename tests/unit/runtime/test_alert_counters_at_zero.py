"""The counters the alerts take increase() or rate() of are exported at zero as the stage starts: a series
that first appeared at its first event (1, or a burst of dead letters) had no increase over it, so
ReloopSamplesMissing, ReloopJoinInputDeletedUnread and the first burst of ReloopDeadLettersRising never
fired, and ReloopPipelineRestarting counted three restarts as two."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from reloop.connectors.memory.memory import MemoryLog
from reloop.connectors.metrics.prometheus import render_metrics
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.dead_letter_reasons import KNOWN_REASONS
from reloop.engine.runtime.supervisor import RetryPolicy, Supervisor

from .test_stages import START, _config, _join, _train

ROOT = Path(__file__).resolve().parents[3]
# Counters no stage exports: serve's (created with the app, at import: engine/serve/app.py; and with its
# impression loggers: tests/unit/serve/test_impression_log.py checks those at zero).
NOT_THE_STAGES = {"reloop_serve_failed_requests_total", "reloop_impressions_dropped_total"}


def _exported(stats: EngineStats) -> dict[str, list[dict[str, str]]]:
    text = render_metrics(stats, process_metrics=False)[0].decode()
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s.labels)
    return out


def _alerted_counters() -> set[str]:
    text = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    return set(re.findall(r"(?:increase|rate)\((reloop_\w+_total)\[", text)) - NOT_THE_STAGES


def test_every_counter_an_alert_counts_is_at_zero_once_the_stages_are_built(tmp_path) -> None:
    log = MemoryLog()
    for topic in ("impressions", "clicks", "samples", "dead"):
        log.create(topic, 1)
    cfg, clock = _config(tmp_path), ManualClock(START)
    join_stats, train_stats = EngineStats(), EngineStats()
    _join(cfg, log, clock, tmp_path, stats=join_stats)
    _train(cfg, log, clock, tmp_path, stats=train_stats)
    for stats in (join_stats, train_stats):  # each process runs under a supervisor
        Supervisor(lambda: None, stop=threading.Event(), policy=RetryPolicy(), stats=stats)
    exported = {**_exported(train_stats), **_exported(join_stats)}
    missing = sorted(name for name in _alerted_counters() if name not in exported)
    assert not missing, missing
    join = _exported(join_stats)
    for name in (
        "reloop_join_input_deleted_unread_total",
        "reloop_join_input_restarted_below_total",
        "reloop_events_consumed_total",  # it was exported from the first record on
    ):
        assert sorted(labels["topic"] for labels in join[name]) == ["clicks", "impressions"]
    for stats in (join_stats, train_stats):
        reasons = {labels["reason"] for labels in _exported(stats)["reloop_dead_letters_total"]}
        assert reasons == set(KNOWN_REASONS)
    assert {"reloop_train_samples_missing_total", "reloop_pipeline_restarts_total"} <= set(
        _exported(train_stats)
    )
