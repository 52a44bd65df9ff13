"""The joiner's metrics, shared by the single-process pipeline and the join stage.

Events consumed per topic, joined samples per label, and the joiner's and dead-letter sink's own
counters, copied into ``EngineStats`` as deltas (a joiner counts since it was created or restored; the
exported counters count since the process started).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.dead_letter_reasons import KNOWN_REASONS
from reloop.engine.runtime.jsonlog import ThrottledCountLog
from reloop.engine.streams import Record

# Bounds whose drops lose events (a sample, a click's label); max_closed only forgets a closed window
# early (a duplicate or a late click for it is no longer recognised), as a busy stream may do routinely.
LOSSY_BOUNDS = ("max_pending", "ttl", "max_early_clicks")


class JoinDrops(NamedTuple):
    """What a joiner dropped since the last delta, worth a log line: (impressions, clicks) too late, and
    events lost per bound (``LOSSY_BOUNDS``)."""

    too_late: tuple[int, int]
    at_bounds: dict[str, int]


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
        # early clicks past join.max_early_clicks (those were lost without a count before); closed
        # windows forgotten past join.max_closed (counted in the joiner only, before).
        self._bound = {b: stats.joiner_dropped_by_bound.child(b) for b in (*LOSSY_BOUNDS, "max_closed")}
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

    def joiner_delta(self, now: dict[str, int], last: dict[str, int]) -> JoinDrops:
        """Add what a joiner's ``stats.as_dict()`` counted since ``last``; returns what it dropped in
        that span worth a log line (``TooLateLog``, ``BoundDropLog``)."""

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
        at_bounds = {
            "max_pending": delta("evicted_pending"),
            "ttl": delta("expired_ttl"),
            "max_early_clicks": delta("evicted_early_clicks"),
        }
        for bound, n in at_bounds.items():
            self._bound[bound].add(n)
        self._bound["max_closed"].add(delta("evicted_closed"))
        if "stamped_ahead" in now:  # the merge's count (not in snapshots: it restarts at 0 with its merger)
            self._stamped_ahead.add(n=max(0, delta("stamped_ahead")))
        if "replays_abandoned" in now:  # a join task's count (not in its checkpoints either)
            self._replays_abandoned.add(n=max(0, delta("replays_abandoned")))
        return JoinDrops(too_late, at_bounds)

    def dead_letters(self, counts: dict[str, int]) -> None:
        """The dead-letter sink's counts per reason (cumulative), exported as deltas."""
        if counts == self._last_dead:
            return
        for reason, n in counts.items():
            d = n - self._last_dead.get(reason, 0)
            if d:
                self._dead.add(reason, n=d)
        self._last_dead = dict(counts)


class BoundDropLog(ThrottledCountLog):
    """WARNING lines for the events a join lost at its memory bounds: counted, but with no word in the
    log, 472 of 2,000 impressions went untrained under a small ``join.max_pending``."""

    def __init__(self, logger: logging.Logger, **kwargs: Any) -> None:
        super().__init__(
            logger,
            "events dropped at the join's memory bounds (max_pending, ttl: impressions waiting for their "
            "window; max_early_clicks: clicks waiting for their impression): raise join.<bound>, or find "
            "what holds the windows open (an input partition behind the others?)",
            **kwargs,
        )

    def __call__(self, at_bounds: dict[str, int], **fields: object) -> None:
        self.add(at_bounds, **fields)


class TooLateLog(ThrottledCountLog):
    """WARNING lines for the events a join dropped as too late (their window closed and was forgotten:
    event times in seconds, a producer's clock hours behind, a replay of old events; or a click stamped
    long before its impression): the counters alone went unseen, and a producer sending seconds logged
    a line per poll."""

    def __init__(self, logger: logging.Logger, **kwargs: Any) -> None:
        super().__init__(
            logger,
            "events dropped as too late (their window closed and was forgotten, or a click was stamped "
            "more than join.click_grace_ms before its impression: event_time_ms in milliseconds? a "
            "producer's clock behind?)",
            **kwargs,
        )

    def __call__(self, too_late: tuple[int, int], watermark_ms: int, **fields: object) -> None:
        self.add({"impressions": too_late[0], "clicks": too_late[1]}, watermark_ms=watermark_ms, **fields)
