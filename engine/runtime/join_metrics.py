"""The joiner's metrics, shared by the single-process pipeline and the join stage.

Events consumed per topic, joined samples per label, and the joiner's and dead-letter sink's own
counters, copied into ``EngineStats`` as deltas (a joiner counts since it was created or restored; the
exported counters count since the process started).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.dead_letter_reasons import KNOWN_REASONS
from reloop.engine.streams import Record


class JoinerMetrics:
    def __init__(self, stats: EngineStats) -> None:
        self._events = stats.events_consumed
        self._by_topic: dict[str, Any] = {}
        self._joined = {0: stats.joined_samples.child("0"), 1: stats.joined_samples.child("1")}
        self.pending = stats.joiner_pending
        self.watermark_s = stats.joiner_watermark_s
        self._expired = stats.joiner_expired
        self._late = stats.joiner_late_clicks
        self._orphans = stats.joiner_orphan_clicks
        self._stamped_ahead = stats.merge_stamped_ahead
        self._replays_abandoned = stats.join_replays_abandoned
        self._too_late = {kind: stats.joiner_too_late.child(kind) for kind in ("impression", "click")}
        self._dupes = stats.joiner_duplicates
        # By the bound that dropped them: pending impressions past join.max_pending or join.ttl_ms, and
        # early clicks past join.max_early_clicks (those were lost without a count before).
        self._bound = {
            b: stats.joiner_dropped_by_bound.child(b) for b in ("max_pending", "ttl", "max_early_clicks")
        }
        self._dead = stats.dead_letters
        # At zero from the start, as the alerts on them need: a series first exported at its first
        # event has no increase() over it.
        for reason in KNOWN_REASONS:
            self._dead.child(reason)
        self._stamped_ahead.child()
        self._replays_abandoned.child()
        self._orphans.child()
        for kind in ("impression", "click"):
            self._dupes.child(kind)
        self._last_dead: dict[str, int] = {}

    def consumed(self, records: list[Record]) -> None:
        counts: dict[str, int] = {}
        for r in records:
            counts[r.topic] = counts.get(r.topic, 0) + 1
        for topic, n in counts.items():
            child = self._by_topic.get(topic)
            if child is None:
                child = self._by_topic[topic] = self._events.child(topic)
            child.add(n)

    def joined(self, labels: list[int]) -> None:
        ones = sum(labels)
        self._joined[1].add(ones)
        self._joined[0].add(len(labels) - ones)

    def joiner_delta(self, now: dict[str, int], last: dict[str, int]) -> tuple[int, int]:
        """Add what a joiner's ``stats.as_dict()`` counted since ``last``; returns the impressions and
        the clicks dropped as too late in that span (worth a log line: ``log_too_late``)."""

        def delta(name: str) -> int:
            return now[name] - last.get(name, 0)

        self._expired.add(n=delta("negatives"))
        self._late.add("drop", n=delta("late_clicks_dropped"))
        self._late.add("correct", n=delta("late_clicks_corrected"))
        self._orphans.add(n=delta("orphan_clicks"))
        too_late = delta("too_late_impressions"), delta("too_late_clicks")
        self._too_late["impression"].add(too_late[0])
        self._too_late["click"].add(too_late[1])
        self._dupes.add("impression", n=delta("duplicate_impressions"))
        self._dupes.add("click", n=delta("duplicate_clicks"))
        self._bound["max_pending"].add(delta("evicted_pending"))
        self._bound["ttl"].add(delta("expired_ttl"))
        self._bound["max_early_clicks"].add(delta("evicted_early_clicks"))
        if "stamped_ahead" in now:  # the merge's count (not in snapshots: it restarts at 0 with its merger)
            self._stamped_ahead.add(n=max(0, delta("stamped_ahead")))
        if "replays_abandoned" in now:  # a join task's count (not in its checkpoints either)
            self._replays_abandoned.add(n=max(0, delta("replays_abandoned")))
        return too_late

    def dead_letters(self, counts: dict[str, int]) -> None:
        """The dead-letter sink's counts per reason (cumulative), exported as deltas."""
        if counts == self._last_dead:
            return
        for reason, n in counts.items():
            d = n - self._last_dead.get(reason, 0)
            if d:
                self._dead.add(reason, n=d)
        self._last_dead = dict(counts)


class TooLateLog:
    """WARNING lines for the events a join dropped as too late (their window closed and was forgotten:
    event times in seconds, a producer's clock hours behind, a replay of old events; or a click stamped
    long before its impression): the counters alone went unseen. The first at once, then at most one
    every ``every_s`` with the counts since the line before (a producer sending seconds logged a line
    per poll). Call it at every publish, with (0, 0) too: counts held back go out once ``every_s`` is up."""

    def __init__(
        self, logger: logging.Logger, *, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._every_s = every_s
        self._clock = clock
        self._next_at = float("-inf")
        self._impressions = self._clicks = 0

    def __call__(self, too_late: tuple[int, int], watermark_ms: int, **fields: object) -> None:
        self._impressions += too_late[0]
        self._clicks += too_late[1]
        if not (self._impressions or self._clicks):
            return
        now = self._clock()
        if now < self._next_at:
            return
        self._next_at = now + self._every_s
        self._logger.warning(
            "events dropped as too late (their window closed and was forgotten, or a click was stamped "
            "more than join.click_grace_ms before its impression: event_time_ms in milliseconds? a "
            "producer's clock behind?)",
            extra={"fields": {"impressions": self._impressions, "clicks": self._clicks,
                              "watermark_ms": watermark_ms, **fields}},
        )  # fmt: skip
        self._impressions = self._clicks = 0
