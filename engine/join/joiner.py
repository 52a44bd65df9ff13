"""The impression-click joiner: pure logic, event time, clock injected.

Rules (each has a unit test in tests/unit/join/):

* An impression waits in ``pending`` until a click inside its attribution window arrives (positive,
  emitted at once) or the watermark passes ``event_time + window_ms`` (negative, emitted then; at the
  watermark a click stamped at the window's end may still come, allowed lateness, so not before).
* A click counts for the window when ``click_time - impression_time <= window_ms`` (a click stamped
  slightly before its impression, clock skew, counts too). A click beyond the window is a *late click*.
  A click stamped more than ``click_grace_ms`` before its impression does not count (a clock hours
  behind, event times in seconds): dropped and counted as too late, whichever of the two came first.
* Watermark = max event time seen - ``allowed_lateness_ms``. It also advances with the wall clock when no
  input arrived for ``idle_timeout_ms``, so negatives still come out when traffic stops (ksqlDB issue 9084);
  idleness and the TTL's ages are measured on a steady clock, which a step of the wall clock does not move
  (``step_free``).
  The watermark never goes back.
* A duplicate impression (same id, still known) is dropped. Several clicks on one impression make one
  positive.
* A click whose impression is unknown is held for ``click_grace_ms`` of event time (partition skew); if
  the impression does not arrive by then the click is an orphan: counted and dropped.
* A late click (after the negative went out, or beyond the window) follows ``late_click_policy``:
  ``drop`` (counted) or ``correct``: a positive with ``is_correction=True`` (fake-negative re-ingestion,
  Ktena et al. 2019), emitted once per impression.
* Emitted impressions are remembered for ``retention_ms`` of event time after their window closes (and up
  to ``bucket_ms`` longer: retention is swept a bucket at a time), to drop duplicates and handle late
  clicks; older input is counted as too late and dropped.
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

from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from itertools import groupby, islice, repeat
from operator import attrgetter, itemgetter
from typing import Any, Literal, NamedTuple

import numpy as np
from reloop.engine.join.deadlines import DeadlineIndex

_FIRST, _SECOND, _THIRD = itemgetter(0), itemgetter(1), itemgetter(2)
_BLOB_TYPES = frozenset({bytes, type(None)})  # payloads the columns layout keeps

LateClickPolicy = Literal["drop", "correct"]
EmitPolicy = Literal["window", "fnw"]

_NEG, _POS, _CORRECTED = 0, 1, 2
_NO_WATERMARK = -(2**62)
SNAPSHOT_FORMAT = 2  # 1: lists of [id, time, payload] (still read, and written for non-bytes payloads)
_Pending = tuple[int, Any, int]  # a pending impression: (event time, payload, arrival second)
_new = tuple.__new__  # builds a Joined without NamedTuple.__new__'s Python frame


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
        # Not dataclasses.asdict, which deep-copies field by field: this runs on every stage step.
        return dict(zip(_STAT_NAMES, _stat_values(self), strict=True))


_STAT_NAMES = tuple(f.name for f in fields(JoinStats))
_stat_values = attrgetter(*_STAT_NAMES)


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
        # Config values the hot paths read, as plain attributes.
        self._window_ms = config.window_ms
        self._lateness_ms = config.allowed_lateness_ms
        self._retention_ms = config.retention_ms
        self._closed_ttl_ms = config.window_ms + config.retention_ms  # a closed entry lives until then
        self._grace_ms = config.click_grace_ms
        self._max_pending = config.max_pending
        self._max_closed = config.max_closed
        self._keep_payload = config.late_click_policy == "correct"
        self._fnw = config.emit_policy == "fnw"
        self._reset()

    def _reset(self) -> None:
        config, clock = self.config, self.clock
        self.stats = JoinStats()
        # id -> (event time, payload, arrival second of wall clock: the TTL's). In arrival order: a dict
        # keeps insertion order and a key added again goes to the end, so the TTL's expired impressions
        # are its first entries (a list of arrivals beside it held every impression and its payload for
        # ttl_ms, 6 h, however soon its window closed: 193 MB for 200,000 impressions of 800 B).
        self._pending: dict[str, _Pending] = {}
        self._late_marked: dict[str, int] = {}
        self._closed: dict[str, tuple[int, int, Any]] = {}
        self._early: dict[str, int] = {}
        self._pending_idx = DeadlineIndex(config.bucket_ms, self._window_ms, self._pending_deadline)
        self._closed_idx = DeadlineIndex(config.bucket_ms, self._closed_ttl_ms, self._closed_deadline)
        self._early_idx = DeadlineIndex(config.bucket_ms, self._grace_ms, self._early_deadline)
        self._arrival_second = -1  # one int object per second, shared by that second's pending entries
        self._max_event_ms = _NO_WATERMARK
        self._watermark = _NO_WATERMARK
        self._closed_sweep_at = _NO_WATERMARK
        # The wall clock as it reads now, moved on by its steady clock (``step_free``); anchored again
        # at each restore, where the saved arrival seconds meet the wall clock of that moment.
        self._now = step_free(clock)
        self._last_input_ms = self._now()

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
    # The hot paths (on_impression, on_click, _set_watermark) inline what they call per event: at ~3 us an
    # event, each Python call saved is a few percent of the joiner.
    def on_impression(self, impression_id: str, event_time_ms: int, payload: Any) -> list[Joined]:
        stats = self.stats
        stats.impressions += 1
        now = self._last_input_ms = self._now()
        out: list[Joined] = []
        pending = self._pending
        if impression_id in pending or impression_id in self._closed:
            stats.duplicate_impressions += 1
            return out
        deadline = event_time_ms + self._window_ms
        if deadline + self._retention_ms < self._watermark:
            stats.too_late_impressions += 1
            return out
        early_click = self._early.pop(impression_id, None) if self._early else None
        if early_click is not None and early_click + self._grace_ms < event_time_ms:
            stats.too_late_clicks += 1  # held, but stamped before its impression beyond the skew allowed
            early_click = None
        if self._fnw:
            # Out at once as a (fake) negative; a click held before it arrived re-emits it as a positive.
            if early_click is not None:
                stats.early_clicks_matched += 1
                self._late_marked[impression_id] = early_click
            self._emit_negative(impression_id, event_time_ms, payload, out)
            self._observe(event_time_ms, out)
            return out
        if early_click is not None:
            stats.early_clicks_matched += 1
            if early_click - event_time_ms <= self._window_ms:
                self._close(impression_id, event_time_ms, _POS, None)
                out.append(_new(Joined, (impression_id, event_time_ms, payload, 1, False)))
                stats.positives += 1
                self._observe(event_time_ms, out)
                return out
            self._late_marked[impression_id] = early_click
        if deadline < self._watermark:
            # Its window already closed: decide now with what is known.
            stats.late_impressions += 1
            self._emit_negative(impression_id, event_time_ms, payload, out)
            self._observe(event_time_ms, out)
            return out
        # The TTL counts from this arrival (a redelivery of an impression a bound dropped: from it).
        second = now // 1000
        if second != self._arrival_second:
            self._arrival_second = second
        pending[impression_id] = (event_time_ms, payload, self._arrival_second)
        self._pending_idx.add(impression_id, event_time_ms)
        if len(pending) > self._max_pending:
            self._evict_pending()
        if event_time_ms > self._max_event_ms:
            self._max_event_ms = event_time_ms
            target = event_time_ms - self._lateness_ms
            if target > self._watermark:
                self._set_watermark(target, out)
        return out

    def on_click(self, impression_id: str, event_time_ms: int) -> list[Joined]:
        stats = self.stats
        stats.clicks += 1
        self._last_input_ms = self._now()
        out: list[Joined] = []
        entry = self._pending.get(impression_id)
        if entry is not None:
            imp_time, payload, _ = entry
            if event_time_ms + self._grace_ms < imp_time:
                stats.too_late_clicks += 1  # stamped before its impression by more than the skew allowed
            elif event_time_ms - imp_time <= self._window_ms:
                del self._pending[impression_id]
                if self._late_marked:
                    self._late_marked.pop(impression_id, None)
                self._close(impression_id, imp_time, _POS, None)
                out.append(_new(Joined, (impression_id, imp_time, payload, 1, False)))
                stats.positives += 1
            elif impression_id in self._late_marked:
                stats.duplicate_clicks += 1
            else:
                # Beyond the window: the label stays negative; the policy applies when the window closes,
                # so the outcome does not depend on how early the click happened to arrive.
                self._late_marked[impression_id] = event_time_ms
        else:
            closed = self._closed.get(impression_id)
            if closed is not None:
                imp_time, state, payload = closed
                if event_time_ms + self._grace_ms < imp_time:
                    stats.too_late_clicks += 1
                elif state == _NEG:
                    self._late_click(impression_id, imp_time, payload, out)
                else:
                    stats.duplicate_clicks += 1
            elif impression_id in self._early:
                stats.duplicate_clicks += 1
            elif event_time_ms + self._grace_ms <= self._watermark:
                stats.too_late_clicks += 1
            elif len(self._early) >= self.config.max_early_clicks:
                stats.evicted_early_clicks += 1
            else:
                self._early[impression_id] = event_time_ms
                self._early_idx.add(impression_id, event_time_ms)
                stats.early_clicks_held += 1
        if event_time_ms > self._max_event_ms:
            self._observe(event_time_ms, out)
        return out

    def advance(self) -> list[Joined]:
        """Let wall-clock time act: the idle watermark and the TTL. Call it regularly, also when idle."""
        out: list[Joined] = []
        now = self._now()
        idle_for = now - self._last_input_ms - self.config.idle_timeout_ms
        if idle_for > 0 and self._max_event_ms != _NO_WATERMARK:
            target = self._max_event_ms - self._lateness_ms + idle_for
            if target > self._watermark:
                self.stats.idle_advances += 1
                self._set_watermark(target, out)
        self._expire_ttl(now)
        return out

    def flush(self) -> list[Joined]:
        """Close every pending window now, and count every click still waiting for its impression as an
        orphan (end of a bounded replay: a range's first clicks, of impressions before it, were held
        and counted nowhere)."""
        out: list[Joined] = []
        ends = [t + self._window_ms for t in map(_FIRST, self._pending.values())]
        ends += [t + self._grace_ms for t in self._early.values()]
        if ends:
            self._set_watermark(max(ends) + 1, out)
        return out

    # ------------------------------------------------------------------ internals
    def _observe(self, event_time_ms: int, out: list[Joined]) -> None:
        if event_time_ms > self._max_event_ms:
            self._max_event_ms = event_time_ms
            target = event_time_ms - self._lateness_ms
            if target > self._watermark:
                self._set_watermark(target, out)

    def _set_watermark(self, watermark_ms: int, out: list[Joined]) -> None:
        """Move the watermark and act on what fell due. An index entry counts only while its key is still
        there with that deadline (see deadlines.py)."""
        self._watermark = watermark_ms
        # A window closes once the watermark is past its end: a click stamped at the very end (its
        # impression's time + window_ms) may still come at the watermark (allowed_lateness_ms late, or in
        # the millisecond of the latest event, after an impression of that millisecond) and counts.
        if watermark_ms > self._pending_idx.horizon:
            pending, window = self._pending, self._window_ms
            closed, closed_add = self._closed, self._closed_idx.add
            keep, max_closed, late_marked = self._keep_payload, self._max_closed, self._late_marked
            negatives = 0
            # _emit_negative, inlined.
            for deadline, _, key in self._pending_idx.pop_due(watermark_ms - 1):
                entry = pending.get(key)
                if entry is None or entry[0] + window != deadline:
                    continue
                del pending[key]
                imp_time, payload, _ = entry
                out.append(_new(Joined, (key, imp_time, payload, 0, False)))
                negatives += 1
                closed[key] = (imp_time, _NEG, payload if keep else None)
                closed_add(key, imp_time)
                if len(closed) > max_closed:
                    self._evict_closed()
                if late_marked and late_marked.pop(key, None) is not None:
                    self._late_click(key, imp_time, payload, out)
            self.stats.negatives += negatives
        if watermark_ms >= self._early_idx.horizon:
            early, grace = self._early, self._grace_ms
            for deadline, _, key in self._early_idx.pop_due(watermark_ms):
                t = early.get(key)
                if t is not None and t + grace == deadline:
                    del early[key]
                    self.stats.orphan_clicks += 1
        if watermark_ms >= self._closed_sweep_at:
            # Retention is swept a bucket at a time: a closed entry is forgotten once the watermark enters
            # the bucket after the one its expiry falls in (up to bucket_ms late: it is a memory bound).
            closed = self._closed
            flat = self._closed_idx.pop_buckets_before(watermark_ms)
            for key, t in zip(flat[0::2], flat[1::2], strict=True):
                entry = closed.get(key)  # type: ignore[call-overload]
                if entry is not None and entry[0] == t:
                    del closed[key]  # type: ignore[arg-type]
            bucket_ms = self.config.bucket_ms
            self._closed_sweep_at = (watermark_ms // bucket_ms + 1) * bucket_ms

    # Each index's view of its owner's dict: the current deadline of a key, None when gone.
    def _pending_deadline(self, key: str) -> int | None:
        entry = self._pending.get(key)
        return None if entry is None else entry[0] + self._window_ms

    def _early_deadline(self, key: str) -> int | None:
        t = self._early.get(key)
        return None if t is None else t + self._grace_ms

    def _closed_deadline(self, key: str) -> int | None:
        entry = self._closed.get(key)
        return None if entry is None else entry[0] + self._closed_ttl_ms

    def _emit_negative(self, key: str, imp_time: int, payload: Any, out: list[Joined]) -> None:
        out.append(_new(Joined, (key, imp_time, payload, 0, False)))
        self.stats.negatives += 1
        self._close(key, imp_time, _NEG, payload if self._keep_payload else None)
        if self._late_marked.pop(key, None) is not None:
            self._late_click(key, imp_time, payload, out)

    def _late_click(self, key: str, imp_time: int, payload: Any, out: list[Joined]) -> None:
        if not self._keep_payload:  # late_click_policy "drop"
            self.stats.late_clicks_dropped += 1
            return
        out.append(_new(Joined, (key, imp_time, payload, 1, True)))
        self.stats.late_clicks_corrected += 1
        self.stats.corrections += 1
        # Same deadline as before, so the index entry stays valid.
        self._closed[key] = (imp_time, _CORRECTED, None)

    def _close(self, key: str, imp_time: int, state: int, payload: Any) -> None:
        self._closed[key] = (imp_time, state, payload)
        self._closed_idx.add(key, imp_time)
        if len(self._closed) > self._max_closed:
            self._evict_closed()

    def _evict_closed(self) -> None:
        victim = self._closed_idx.pop_earliest()
        if victim is not None:
            del self._closed[victim]
            self.stats.evicted_closed += 1

    def _evict_pending(self) -> None:
        victim = self._pending_idx.pop_earliest()
        if victim is not None:
            del self._pending[victim]
            self._late_marked.pop(victim, None)
            self.stats.evicted_pending += 1

    def _expire_ttl(self, now_ms: int) -> None:
        """Drop the pending impressions that arrived more than ``ttl_ms`` of wall clock ago: the first
        entries of ``_pending``, which is in arrival order."""
        horizon = now_ms / 1000.0 - self.config.ttl_ms / 1000.0
        pending = self._pending
        expired: list[str] = []
        for key, entry in pending.items():
            if entry[2] >= horizon:
                break
            expired.append(key)
        late_marked = self._late_marked
        for key in expired:
            del pending[key]
            late_marked.pop(key, None)
        self.stats.expired_ttl += len(expired)

    # ------------------------------------------------------------------ snapshot
    def state_dict(self, *, columns: bool = True) -> dict[str, Any]:
        """All state as plain data (str/int/bytes/lists/dicts); ``load_state_dict`` makes an equal joiner.

        The pending and closed impressions (the bulk: one payload each) are columns of ``blobs``: ids,
        times and payloads each as one ``bytes`` with their lengths, orders as positions, so saving and
        loading them costs per byte, not per Python object (a checkpoint of 200,000 pending impressions
        pickled as lists took ~4 s to save and ~10 s to load). ``columns=False``, or payloads that are not
        all ``bytes`` (or None), give the lists of format 1 (what was written before)."""
        pending, closed = self._pending, self._closed
        state: dict[str, Any] = {
            "config": asdict(self.config),
            "max_event_ms": self._max_event_ms,
            "watermark_ms": self._watermark,
            "late_marked": [[k, t] for k, t in self._late_marked.items()],
            "early": [[k, t] for k, t in self._early.items()],
            "early_order": list(self._early_idx.live_keys()),
            "stats": self.stats.as_dict(),
        }
        # Column by column, with C-level map passes where one does: a quarter to a third less time than a
        # Python step per impression and index entry (docs/bench-join-checkpoint.md).
        pending_payloads = list(map(_SECOND, pending.values()))
        closed_payloads = list(map(_THIRD, closed.values()))
        kinds = set(map(type, pending_payloads)) | set(map(type, closed_payloads))
        if not columns or not kinds <= _BLOB_TYPES:
            return {**state, "format": 1, **self._lists_state()}
        pending_ids = list(pending)
        at = dict(zip(pending_ids, range(len(pending_ids)), strict=True))
        # The TTL's arrivals: pending is in arrival order, so its arrival seconds run by run.
        seconds = np.fromiter(map(_THIRD, pending.values()), np.int64, len(pending))
        starts = np.flatnonzero(np.r_[True, seconds[1:] != seconds[:-1]]) if len(seconds) else seconds
        arrival_counts = np.diff(np.r_[starts, len(seconds)]).astype(np.int64)
        arrival_seconds = seconds[starts]
        arrival_positions = np.arange(len(seconds), dtype=np.int64)
        closed_ids = list(closed)
        closed_at = dict(zip(closed_ids, range(len(closed_ids)), strict=True))
        pending_times = np.fromiter(map(_FIRST, pending.values()), np.int64, len(pending))
        closed_times = np.fromiter(map(_FIRST, closed.values()), np.int64, len(closed))
        blobs = {
            **_pack("pending_ids", list(map(str.encode, pending_ids))),
            "pending_times": pending_times.tobytes(),
            **_pack("pending_payloads", pending_payloads),
            "pending_order": _live_positions(self._pending_idx, at, pending_times).tobytes(),
            "arrival_seconds": arrival_seconds.tobytes(),
            "arrival_counts": arrival_counts.tobytes(),
            "arrival_positions": arrival_positions.tobytes(),
            **_pack("closed_ids", list(map(str.encode, closed_ids))),
            "closed_times": closed_times.tobytes(),
            "closed_states": array("q", map(_SECOND, closed.values())).tobytes(),
            **_pack("closed_payloads", closed_payloads),
            "closed_order": _live_positions(self._closed_idx, closed_at, closed_times).tobytes(),
        }
        return {**state, "format": SNAPSHOT_FORMAT, "blobs": blobs}

    def _lists_state(self) -> dict[str, Any]:
        arrivals = groupby(self._pending.items(), key=lambda item: item[1][2])
        return {
            "pending": [[k, t, p] for k, (t, p, _) in self._pending.items()],
            "pending_order": list(self._pending_idx.live_keys()),
            "closed": [[k, t, s, p] for k, (t, s, p) in self._closed.items()],
            "closed_order": list(self._closed_idx.live_keys()),
            "arrivals": [[second, [k for k, _ in run]] for second, run in arrivals],
        }

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Take the state of ``state_dict()`` (this joiner's config applies). The idle timer restarts now:
        downtime is not idleness."""
        if data.get("format") not in (1, SNAPSHOT_FORMAT):
            raise ValueError(f"unknown joiner snapshot format {data.get('format')!r}")
        self._reset()
        self._max_event_ms = int(data["max_event_ms"])
        self._watermark = int(data["watermark_ms"])
        self._late_marked = {k: int(t) for k, t in data["late_marked"]}
        self._early = {k: int(t) for k, t in data["early"]}
        for key in data["early_order"]:
            self._early_idx.add(key, self._early[key])
        if data["format"] == 1:
            self._load_lists(data)
        else:
            self._load_blobs(data["blobs"])
        self.stats = JoinStats(**data["stats"])

    def _load_blobs(self, b: dict[str, bytes]) -> None:
        ids = [k.decode() for k in _unpack(b, "pending_ids")]
        times = _ints(b["pending_times"])
        payloads = _unpack(b, "pending_payloads")
        positions = iter(_ints(b["arrival_positions"]))
        arrived = [
            (i, second)
            for second, count in zip(_ints(b["arrival_seconds"]), _ints(b["arrival_counts"]), strict=True)
            for i in islice(positions, count)
        ]
        self._pending = self._in_arrival_order(
            ids, arrived, lambda i, second: (times[i], payloads[i], second)
        )
        for i in _ints(b["pending_order"]):
            self._pending_idx.add(ids[i], times[i])
        closed_ids = [k.decode() for k in _unpack(b, "closed_ids")]
        closed_times = _ints(b["closed_times"])
        rows = zip(closed_times, _ints(b["closed_states"]), _unpack(b, "closed_payloads"), strict=True)
        self._closed = dict(zip(closed_ids, rows, strict=True))
        for i in _ints(b["closed_order"]):
            self._closed_idx.add(closed_ids[i], closed_times[i])

    def _load_lists(self, data: dict[str, Any]) -> None:
        rows = data["pending"]
        ids = [k for k, _, _ in rows]
        at = {k: i for i, k in enumerate(ids)}
        arrived = [(at[k], int(second)) for second, keys in data["arrivals"] for k in keys if k in at]
        self._pending = self._in_arrival_order(
            ids, arrived, lambda i, second: (int(rows[i][1]), rows[i][2], second)
        )
        self._closed = {k: (int(t), int(s), p) for k, t, s, p in data["closed"]}
        for key in data["pending_order"]:
            self._pending_idx.add(key, self._pending[key][0])
        for key in data["closed_order"]:
            self._closed_idx.add(key, self._closed[key][0])

    def _in_arrival_order(
        self, ids: list[str], arrived: list[tuple[int, int]], entry: Callable[[int, int], _Pending]
    ) -> dict[str, _Pending]:
        """The pending dict from saved rows: ``arrived`` (row, arrival second) in arrival order, then any
        row without an arrival (none is written so) as arriving now."""
        pending: dict[str, _Pending] = {}
        shared: dict[int, int] = {}  # one int object per second, as on_impression shares them
        for i, second in arrived:
            if ids[i] not in pending:
                pending[ids[i]] = entry(i, shared.setdefault(second, second))
        now = self._now() // 1000
        for i, key in enumerate(ids):
            if key not in pending:
                pending[key] = entry(i, now)
        return pending


def step_free(clock: Callable[[], int]) -> Callable[[], int]:
    """``clock`` as it reads now, moved on from here by its ``steady`` clock when it has one (the system
    clock: monotonic time, engine/runtime/clock.py); else ``clock`` itself (a ManualClock). Read straight
    from the wall clock, a step forward (NTP, a VM resumed) larger than ``idle_timeout_ms`` moved the
    watermark by the whole step at the next ``advance`` (an hour: every open window closed as a negative,
    and the next 45 minutes' impressions labeled negative on arrival; beyond ``window_ms`` plus
    ``retention_ms``, dropped as too late), and one larger than ``ttl_ms`` dropped every pending
    impression; a step back held the idle watermark and the TTL back by the step."""
    steady = getattr(clock, "steady", None)
    if steady is None:
        return clock
    offset = clock() - steady()
    return lambda: steady() + offset


def _pack(name: str, items: list[bytes | None]) -> dict[str, bytes]:
    """``items`` as one ``bytes`` and their lengths (-1: None)."""
    try:  # no None (the usual case): two C-level passes
        data, lengths = b"".join(items), array("q", map(len, items))  # type: ignore[arg-type]
    except TypeError:
        data = b"".join(x for x in items if x is not None)
        lengths = array("q", [-1 if x is None else len(x) for x in items])
    return {name: data, f"{name}_lengths": lengths.tobytes()}


def _live_positions(index: DeadlineIndex, at: dict[str, int], times: np.ndarray) -> np.ndarray:
    """The positions (in ``at``) of ``index.live_keys()``, in that order, computed in bulk: an entry is
    live when its key is still there with the entry's time, and each key counts at its first live entry
    (what ``live_keys`` yields, without a Python call per key: a snapshot of 200,000 pending impressions
    spent about a third of its state building there)."""
    keys, entry_times = index.candidates()
    positions = np.fromiter(map(at.get, keys, repeat(-1)), np.int64, len(keys))
    live = positions >= 0
    live[live] = times[positions[live]] == np.asarray(entry_times, dtype=np.int64)[live]
    positions = positions[live]
    _, first = np.unique(positions, return_index=True)
    return positions[np.sort(first)]


def _unpack(blobs: dict[str, bytes], name: str) -> list[bytes | None]:
    data, out, pos = blobs[name], [], 0
    for n in _ints(blobs[f"{name}_lengths"]):
        if n < 0:
            out.append(None)
        else:
            out.append(data[pos : pos + n])
            pos += n
    return out


def _ints(data: bytes) -> array:
    out = array("q")
    out.frombytes(data)
    return out
