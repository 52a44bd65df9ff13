"""The impression-click joiner: pure logic, event time, clock injected.

Rules (each has a unit test in tests/unit/join/):

* An impression waits in ``pending`` until a click inside its attribution window arrives (positive,
  emitted at once) or the watermark passes ``event_time + window_ms`` (negative, emitted then).
* A click counts for the window when ``click_time - impression_time <= window_ms`` (a click stamped
  slightly before its impression, clock skew, counts too). A click beyond the window is a *late click*.
* Watermark = max event time seen - ``allowed_lateness_ms``. It also advances with the wall clock when no
  input arrived for ``idle_timeout_ms``, so negatives still come out when traffic stops (ksqlDB issue 9084).
  The watermark never goes back.
* A duplicate impression (same id, still known) is dropped. Several clicks on one impression make one
  positive.
* A click whose impression is unknown is held for ``click_grace_ms`` of event time (partition skew); if
  the impression does not arrive by then the click is an orphan: counted and dropped.
* A late click (after the negative went out, or beyond the window) follows ``late_click_policy``:
  ``drop`` (counted) or ``correct``: a positive with ``is_correction=True`` (fake-negative re-ingestion,
  Ktena et al. 2019), emitted once per impression.
* Emitted impressions are remembered for ``retention_ms`` of event time after their window closes, to
  drop duplicates and handle late clicks; older input is counted as too late and dropped.
* ``emit_policy``: ``window`` (the rules above) or ``fnw`` (fake negative weighting, Ktena et al. 2019):
  every impression goes out AT ONCE as a negative and every click on it (while it is remembered) as one
  positive copy flagged ``is_correction``; no sample waits for the window. The stream then holds each
  impression once as a negative plus once more as a positive if clicked, which the trainer undoes with
  the FNW importance weights (engine/loss/delayed.py, ``train.delayed_feedback: fnw``). Needs
  ``late_click_policy: correct``.
* Bounds: ``max_pending`` / ``max_closed`` / ``max_early_clicks`` entries and a wall-clock ``ttl_ms`` on
  pending impressions. Whatever a bound drops is counted in ``stats``.

The joiner never looks inside an impression's payload: the caller passes the raw encoded event (about the
smallest form that still holds everything a sample needs) and gets it back with the label.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

from reloop.engine.join.deadlines import DeadlineIndex

LateClickPolicy = Literal["drop", "correct"]
EmitPolicy = Literal["window", "fnw"]

_NEG, _POS, _CORRECTED = 0, 1, 2
_NO_WATERMARK = -(2**62)
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True, slots=True)
class JoinerConfig:
    window_ms: int = 15 * 60_000
    allowed_lateness_ms: int = 5_000
    idle_timeout_ms: int = 10_000
    click_grace_ms: int = 60_000
    retention_ms: int = 60 * 60_000
    late_click_policy: LateClickPolicy = "correct"
    max_pending: int = 2_000_000
    max_closed: int = 2_000_000
    max_early_clicks: int = 200_000
    ttl_ms: int = 6 * 60 * 60_000
    bucket_ms: int = 1_000
    emit_policy: EmitPolicy = "window"

    def __post_init__(self) -> None:
        for name in ("window_ms", "bucket_ms", "max_pending", "max_closed", "max_early_clicks", "ttl_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"joiner.{name} must be positive")
        for name in ("allowed_lateness_ms", "idle_timeout_ms", "click_grace_ms", "retention_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"joiner.{name} must be >= 0")
        if self.late_click_policy not in ("drop", "correct"):
            raise ValueError("joiner.late_click_policy must be 'drop' or 'correct'")
        if self.emit_policy not in ("window", "fnw"):
            raise ValueError("joiner.emit_policy must be 'window' or 'fnw'")
        if self.emit_policy == "fnw" and self.late_click_policy != "correct":
            raise ValueError("joiner.emit_policy 'fnw' needs late_click_policy 'correct' (clicks re-emit)")


class Joined(NamedTuple):
    """One labeled impression: ``payload`` is what the caller gave ``on_impression``."""

    impression_id: str
    event_time_ms: int
    payload: Any
    label: int
    is_correction: bool


@dataclass(slots=True)
class JoinStats:
    impressions: int = 0
    clicks: int = 0
    positives: int = 0
    negatives: int = 0
    corrections: int = 0
    duplicate_impressions: int = 0
    duplicate_clicks: int = 0
    early_clicks_held: int = 0
    early_clicks_matched: int = 0
    orphan_clicks: int = 0
    late_clicks_dropped: int = 0
    late_clicks_corrected: int = 0
    late_impressions: int = 0
    too_late_impressions: int = 0
    too_late_clicks: int = 0
    evicted_pending: int = 0
    evicted_closed: int = 0
    evicted_early_clicks: int = 0
    expired_ttl: int = 0
    idle_advances: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Joiner:
    """Joins impressions with clicks. Not thread-safe; one instance per partition group.

    >>> j = Joiner(JoinerConfig(window_ms=100, allowed_lateness_ms=0), clock=lambda: 0)
    >>> j.on_impression("a", 1000, b"imp-a")
    []
    >>> [(x.impression_id, x.label) for x in j.on_click("a", 1050)]
    [('a', 1)]
    >>> j.on_impression("b", 1060, b"imp-b")
    []
    >>> [(x.impression_id, x.label) for x in j.on_impression("c", 1200, b"imp-c")]
    [('b', 0)]
    """

    def __init__(self, config: JoinerConfig, clock: Callable[[], int]) -> None:
        self.config = config
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        config, clock = self.config, self.clock
        self.stats = JoinStats()
        self._pending: dict[str, tuple[int, Any]] = {}
        self._late_marked: dict[str, int] = {}
        self._closed: dict[str, tuple[int, int, Any]] = {}
        self._early: dict[str, int] = {}
        self._pending_idx = DeadlineIndex(config.bucket_ms)
        self._closed_idx = DeadlineIndex(config.bucket_ms)
        self._early_idx = DeadlineIndex(config.bucket_ms)
        self._arrivals: deque[list[Any]] = deque()  # [wall_second, [ids]] in arrival order, for the TTL
        self._max_event_ms = _NO_WATERMARK
        self._watermark = _NO_WATERMARK
        self._last_input_wall_ms = clock()

    # ------------------------------------------------------------------ queries
    @property
    def watermark_ms(self) -> int:
        return self._watermark

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def closed_count(self) -> int:
        return len(self._closed)

    @property
    def early_click_count(self) -> int:
        return len(self._early)

    # ------------------------------------------------------------------ input
    def on_impression(self, impression_id: str, event_time_ms: int, payload: Any) -> list[Joined]:
        cfg = self.config
        self.stats.impressions += 1
        now = self._last_input_wall_ms = self.clock()
        out: list[Joined] = []
        if impression_id in self._pending or impression_id in self._closed:
            self.stats.duplicate_impressions += 1
            return out
        deadline = event_time_ms + cfg.window_ms
        if deadline + cfg.retention_ms <= self._watermark:
            self.stats.too_late_impressions += 1
            return out
        early_click = self._early.pop(impression_id, None)
        if cfg.emit_policy == "fnw":
            # Out at once as a (fake) negative; a click held before it arrived re-emits it as a positive.
            if early_click is not None:
                self.stats.early_clicks_matched += 1
                self._late_marked[impression_id] = early_click
            self._emit_negative(impression_id, event_time_ms, payload, out)
            self._observe(event_time_ms, out)
            return out
        if early_click is not None:
            self.stats.early_clicks_matched += 1
            if early_click - event_time_ms <= cfg.window_ms:
                self._close(impression_id, event_time_ms, _POS, None)
                out.append(Joined(impression_id, event_time_ms, payload, 1, False))
                self.stats.positives += 1
                self._observe(event_time_ms, out)
                return out
            self._late_marked[impression_id] = early_click
        if deadline <= self._watermark:
            # Its window already closed: decide now with what is known.
            self.stats.late_impressions += 1
            self._emit_negative(impression_id, event_time_ms, payload, out)
            self._observe(event_time_ms, out)
            return out
        pending = self._pending
        pending[impression_id] = (event_time_ms, payload)
        self._pending_idx.add(impression_id, deadline)
        # The TTL's arrival list, inlined: this is the hot path of the joiner.
        second = now // 1000
        arrivals = self._arrivals
        if arrivals and arrivals[-1][0] == second:
            arrivals[-1][1].append(impression_id)
        else:
            arrivals.append([second, [impression_id]])
        if len(pending) > cfg.max_pending:
            self._evict_pending()
        if event_time_ms > self._max_event_ms:
            self._observe(event_time_ms, out)
        return out

    def on_click(self, impression_id: str, event_time_ms: int) -> list[Joined]:
        cfg = self.config
        self.stats.clicks += 1
        self._last_input_wall_ms = self.clock()
        out: list[Joined] = []
        entry = self._pending.get(impression_id)
        if entry is not None:
            imp_time, payload = entry
            if event_time_ms - imp_time <= cfg.window_ms:
                del self._pending[impression_id]
                self._late_marked.pop(impression_id, None)
                self._close(impression_id, imp_time, _POS, None)
                out.append(Joined(impression_id, imp_time, payload, 1, False))
                self.stats.positives += 1
            elif impression_id in self._late_marked:
                self.stats.duplicate_clicks += 1
            else:
                # Beyond the window: the label stays negative; the policy applies when the window closes,
                # so the outcome does not depend on how early the click happened to arrive.
                self._late_marked[impression_id] = event_time_ms
        else:
            closed = self._closed.get(impression_id)
            if closed is not None:
                imp_time, state, payload = closed
                if state == _NEG:
                    self._late_click(impression_id, imp_time, payload, out)
                else:
                    self.stats.duplicate_clicks += 1
            elif impression_id in self._early:
                self.stats.duplicate_clicks += 1
            elif event_time_ms + cfg.click_grace_ms <= self._watermark:
                self.stats.too_late_clicks += 1
            elif len(self._early) >= cfg.max_early_clicks:
                self.stats.evicted_early_clicks += 1
            else:
                self._early[impression_id] = event_time_ms
                self._early_idx.add(impression_id, event_time_ms + cfg.click_grace_ms)
                self.stats.early_clicks_held += 1
        self._observe(event_time_ms, out)
        return out

    def advance(self) -> list[Joined]:
        """Let wall-clock time act: the idle watermark and the TTL. Call it regularly, also when idle."""
        out: list[Joined] = []
        now = self.clock()
        idle_for = now - self._last_input_wall_ms - self.config.idle_timeout_ms
        if idle_for > 0 and self._max_event_ms != _NO_WATERMARK:
            target = self._max_event_ms - self.config.allowed_lateness_ms + idle_for
            if target > self._watermark:
                self.stats.idle_advances += 1
                self._set_watermark(target, out)
        self._expire_ttl(now)
        return out

    def flush(self) -> list[Joined]:
        """Close every pending window now (end of a bounded replay)."""
        out: list[Joined] = []
        ends = [t + self.config.window_ms for t, _ in self._pending.values()]
        if ends:
            self._set_watermark(max(ends), out)
        return out

    # ------------------------------------------------------------------ internals
    def _observe(self, event_time_ms: int, out: list[Joined]) -> None:
        if event_time_ms > self._max_event_ms:
            self._max_event_ms = event_time_ms
            target = event_time_ms - self.config.allowed_lateness_ms
            if target > self._watermark:
                self._set_watermark(target, out)

    def _set_watermark(self, watermark_ms: int, out: list[Joined]) -> None:
        self._watermark = watermark_ms
        if watermark_ms >= self._pending_idx.horizon:
            pending = self._pending
            for key in self._pending_idx.pop_due(watermark_ms, self._pending_deadline):
                imp_time, payload = pending.pop(key)
                self._emit_negative(key, imp_time, payload, out)
        if watermark_ms >= self._early_idx.horizon:
            early = self._early
            for key in self._early_idx.pop_due(watermark_ms, self._early_deadline):
                del early[key]
                self.stats.orphan_clicks += 1
        if watermark_ms >= self._closed_idx.horizon:
            closed = self._closed
            for key in self._closed_idx.pop_due(watermark_ms, self._closed_deadline):
                del closed[key]

    def _pending_deadline(self, key: str) -> int | None:
        entry = self._pending.get(key)
        return None if entry is None else entry[0] + self.config.window_ms

    def _early_deadline(self, key: str) -> int | None:
        t = self._early.get(key)
        return None if t is None else t + self.config.click_grace_ms

    def _closed_deadline(self, key: str) -> int | None:
        entry = self._closed.get(key)
        return None if entry is None else entry[0] + self.config.window_ms + self.config.retention_ms

    def _emit_negative(self, key: str, imp_time: int, payload: Any, out: list[Joined]) -> None:
        out.append(Joined(key, imp_time, payload, 0, False))
        self.stats.negatives += 1
        keep = payload if self.config.late_click_policy == "correct" else None
        self._close(key, imp_time, _NEG, keep)
        if self._late_marked.pop(key, None) is not None:
            self._late_click(key, imp_time, payload, out)

    def _late_click(self, key: str, imp_time: int, payload: Any, out: list[Joined]) -> None:
        if self.config.late_click_policy == "drop":
            self.stats.late_clicks_dropped += 1
            return
        out.append(Joined(key, imp_time, payload, 1, True))
        self.stats.late_clicks_corrected += 1
        self.stats.corrections += 1
        # Same deadline as before, so the index entry stays valid.
        self._closed[key] = (imp_time, _CORRECTED, None)

    def _close(self, key: str, imp_time: int, state: int, payload: Any) -> None:
        self._closed[key] = (imp_time, state, payload)
        self._closed_idx.add(key, imp_time + self.config.window_ms + self.config.retention_ms)
        if len(self._closed) > self.config.max_closed:
            victim = self._closed_idx.pop_earliest(self._closed_deadline)
            if victim is not None:
                del self._closed[victim]
                self.stats.evicted_closed += 1

    def _evict_pending(self) -> None:
        victim = self._pending_idx.pop_earliest(self._pending_deadline)
        if victim is not None:
            del self._pending[victim]
            self._late_marked.pop(victim, None)
            self.stats.evicted_pending += 1

    def _expire_ttl(self, now_ms: int) -> None:
        ttl_s = self.config.ttl_ms / 1000.0
        pending = self._pending
        while self._arrivals and (now_ms / 1000.0) - self._arrivals[0][0] > ttl_s:
            _, keys = self._arrivals.popleft()
            for key in keys:
                if pending.pop(key, None) is not None:
                    self._late_marked.pop(key, None)
                    self.stats.expired_ttl += 1

    # ------------------------------------------------------------------ snapshot
    def state_dict(self) -> dict[str, Any]:
        """All state as plain data (str/int/bytes/lists/dicts); ``load_state_dict`` makes an equal joiner."""
        live_arrivals = [[s, [k for k in keys if k in self._pending]] for s, keys in self._arrivals]
        return {
            "format": SNAPSHOT_FORMAT,
            "config": asdict(self.config),
            "max_event_ms": self._max_event_ms,
            "watermark_ms": self._watermark,
            "pending": [[k, t, p] for k, (t, p) in self._pending.items()],
            "pending_order": [k for k in self._pending_idx if k in self._pending],
            "late_marked": [[k, t] for k, t in self._late_marked.items()],
            "closed": [[k, t, s, p] for k, (t, s, p) in self._closed.items()],
            "closed_order": [k for k in self._closed_idx if k in self._closed],
            "early": [[k, t] for k, t in self._early.items()],
            "early_order": [k for k in self._early_idx if k in self._early],
            "arrivals": [a for a in live_arrivals if a[1]],
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Take the state of ``state_dict()`` (this joiner's config applies). The idle timer restarts now:
        downtime is not idleness."""
        if data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unknown joiner snapshot format {data.get('format')!r}")
        self._reset()
        joiner, cfg = self, self.config
        joiner._max_event_ms = int(data["max_event_ms"])
        joiner._watermark = int(data["watermark_ms"])
        joiner._pending = {k: (int(t), p) for k, t, p in data["pending"]}
        joiner._late_marked = {k: int(t) for k, t in data["late_marked"]}
        joiner._closed = {k: (int(t), int(s), p) for k, t, s, p in data["closed"]}
        joiner._early = {k: int(t) for k, t in data["early"]}
        for key in data["pending_order"]:
            joiner._pending_idx.add(key, joiner._pending[key][0] + cfg.window_ms)
        for key in data["closed_order"]:
            joiner._closed_idx.add(key, joiner._closed[key][0] + cfg.window_ms + cfg.retention_ms)
        for key in data["early_order"]:
            joiner._early_idx.add(key, joiner._early[key] + cfg.click_grace_ms)
        joiner._arrivals = deque([int(s), list(keys)] for s, keys in data["arrivals"])
        joiner.stats = JoinStats(**data["stats"])

