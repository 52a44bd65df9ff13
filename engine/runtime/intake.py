"""The door of the join: records in, checked events (or dead letters) out, in record order.

Each record is decoded once, with the contract's checks (engine/events/validation.py) and, for
impressions, the feature values the model's spec cannot read (engine/features/check.py) refused in the
same pass (engine/features/checked_decode.py); then it is held to the limits that protect the joiner
and the trainer: an event time beyond ``max_future_ms`` of the clock or of the record's own Kafka
timestamp (whichever is earlier), optionally more than ``max_past_ms`` behind the clock. A record
refused for several reasons is dead-lettered for the first: contract, then spec, then time. A refused
record goes to the dead-letter sink with its reason, here, and nowhere else, in record order. Why the
record timestamp: a processor working through an hour-old backlog sees the wall clock an hour ahead of
the data, so an event stamped an hour later would pass a wall-clock bound and still close every window
of the data after it.

Which clock: a join task's own (``DoorClock``), read from the wall clock only at its checkpoints and
moved by its input in between, so that a task read again after a crash judges every event as it did
the first time (exactly-once downstream rests on it: engine/runtime/join_task.py). The single-process
pipeline, whose snapshot holds what it trained, reads its clock once a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.events.codec import decode_clicks
from reloop.engine.events.validation import EventError
from reloop.engine.features.check import SpecChecker
from reloop.engine.features.checked_decode import CheckedImpressionDecoder
from reloop.engine.runtime.jsonlog import ThrottledWarning
from reloop.engine.streams import Record

log = logging.getLogger("reloop.intake")

Kind = Literal["impression", "click"]


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_event_bytes: int = 512 * 1024
    max_future_ms: int | None = 300_000
    max_past_ms: int | None = None


class DoorClock:
    """A join task's clock for the door's time bounds: what its "now" is (engine/runtime/join_task.py).

    It is set from the wall clock only when the task checkpoints (and is stored in the checkpoint); in
    between it moves with the input alone: an event the door lets in whose record is stamped at or after
    the clock's time moves it to the earlier of its record time and its event time, when that is later.
    So the door's verdicts between two checkpoints are a function of the checkpoint and the input, like
    the rest of the task's output: a task read again after a crash, an hour later, refuses and lets in
    what it did the first time. Moving with the input keeps the clock up with a backlog read after a
    long stop (its records are later than the last checkpoint's wall clock) without letting one record
    stamped far ahead move it: that record is judged against the clock before it, and refused."""

    __slots__ = ("now_ms",)

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __repr__(self) -> str:
        return f"DoorClock({self.now_ms})"


KEY_CHECK_FIRST = 64  # records whose key is checked against their impression id, then one a batch
_UNBOUNDED = 1 << 62  # a time bound that is not set, as a number (one comparison an event either way)


class EventIntake:
    def __init__(
        self,
        *,
        impressions_topic: str,
        clicks_topic: str,
        limits: IntakeLimits,
        clock: Callable[[], int],
        dead_letters: DeadLetterSink,
        checker: SpecChecker | None = None,
        check_keys: bool = False,
    ) -> None:
        """``check_keys``: warn when records are not keyed by their impression id (Kafka inputs read by
        partition; a file's records have no key)."""
        self.impressions_topic = impressions_topic
        self.clicks_topic = clicks_topic
        self.limits = limits
        self.clock = clock
        self.dead_letters = dead_letters
        self.checker = checker
        self._impressions = CheckedImpressionDecoder(checker)
        self._check_keys = check_keys
        self._keys_checked = 0
        self._misrouted = ThrottledWarning(
            log,
            "a record on %s is keyed %r, not by its impression_id %r: with more than one partition a click "
            "meets its impression only if both are keyed by the impression id (docs/event-contract.md); "
            "others are orphans and their impressions train as negatives",
            every_s=600.0,
        )

    def events(self, records: list[Record], door: DoorClock | None = None) -> Iterator[tuple[Record, Any]]:
        """``(record, event)`` for every record in order: a ``Click``, an impression (an ``Impression``
        or a struct with its fields, engine/features/checked_decode.py: tell them by ``type(event) is
        Click``), or None for a record that was dead-lettered (the caller still moves its position), in
        record order too.

        ``door``: the caller's clock for the time bounds (a join task's), which the events let in move
        (see ``DoorClock``); without one, ``clock()`` once for these records (the single-process
        pipeline). Read the whole iterator: the door clock is updated at its end."""
        kinds: list[int] = []
        imp_records: list[Record] = []
        clk_records: list[Record] = []
        for r in records:
            if r.topic == self.impressions_topic:
                kinds.append(0)
                imp_records.append(r)
            elif r.topic == self.clicks_topic:
                kinds.append(1)
                clk_records.append(r)
            else:
                kinds.append(2)
        limit = self.limits.max_event_bytes
        imps, imp_errors = self._impressions.decode([r.value for r in imp_records], max_bytes=limit)
        good, bad = decode_clicks([r.value for r in clk_records], max_bytes=limit)
        clks, clk_errors = _aligned(good, bad, len(clk_records))
        lim = self.limits
        ahead, behind = lim.max_future_ms, lim.max_past_ms
        timed = ahead is not None or behind is not None
        now = (door.now_ms if door is not None else self.clock()) if timed else 0
        walk = door is not None  # the door clock moves with the events let in; the wall clock does not
        ahead_ms = _UNBOUNDED if ahead is None else ahead
        behind_ms = _UNBOUNDED if behind is None else behind
        floor = now - behind_ms
        send = self.dead_letters.send
        i_imp = i_clk = 0
        # The keys of a sample: the first records read, then the first of each batch (a producer that
        # keys otherwise does so on all its records; a check of every one cost 6% of this loop).
        keys_to_check = 0
        if self._check_keys:
            keys_to_check = max(1, KEY_CHECK_FIRST - self._keys_checked)
            self._keys_checked += keys_to_check
        for r, kind in zip(records, kinds, strict=True):
            if kind == 0:
                ev: Any = imps[i_imp]
                if ev is None:
                    send(r, imp_errors[i_imp])
                i_imp += 1
            elif kind == 1:
                ev = clks[i_clk]
                if ev is None:
                    send(r, clk_errors[i_clk])
                i_clk += 1
            else:
                send(r, EventError("bad_value", f"record from unexpected topic {r.topic!r}"))
                ev = None
            if keys_to_check and ev is not None:
                keys_to_check -= 1
                iid = ev.impression_id
                if r.key is None or r.key != iid.encode():
                    key = r.key if r.key is None else r.key[:100]  # cut short in the line: a key may be large
                    self._misrouted(r.topic, key, iid[:100], topic=r.topic, partition=r.partition)
            if timed and ev is not None:
                # Against the record's own time when it is earlier than the clock (a backlog: the data
                # behind the clock), else against the clock (a record stamped ahead proves nothing).
                t = ev.event_time_ms
                ts = r.timestamp_ms
                if ts < now:
                    if t > (ts if ts > 0 else now) + ahead_ms or t < floor:
                        ev = self._refuse(r, t, ts if ts > 0 else now, now, ahead, behind)
                elif t > now + ahead_ms or t < floor:
                    ev = self._refuse(r, t, now, now, ahead, behind)
                elif walk and t > now:
                    now = ts if ts < t else t
                    floor = now - behind_ms
            yield r, ev
        if door is not None and timed:
            door.now_ms = now

    def _refuse(self, r: Record, t: int, ref: int, now: int, ahead: int | None, behind: int | None) -> None:
        """Dead-letter ``r``, whose event time ``t`` is out of bounds (None: its event, refused)."""
        self.dead_letters.send(
            r,
            EventError(
                "bad_time",
                f"event_time_ms {t} is {t - ref:+d} ms from the clock / record time ({ref}), "
                f"{t - now:+d} ms from the clock ({now}); allowed: "
                f"{_bound(-behind if behind is not None else None)} .. {_bound(ahead)} ms",
                "event_time_ms",
            ),
        )


def _aligned(
    good: list[Any], bad: list[tuple[int, EventError]], n: int
) -> tuple[list[Any], dict[int, EventError]]:
    """``decode_clicks``'s (good, bad) as (events aligned with the records, None where refused; errors)."""
    errors = dict(bad)
    events: list[Any] = [None] * n
    it = iter(good)
    for i in range(n):
        if i not in errors:
            events[i] = next(it)
    return events, errors


def _bound(ms: int | None) -> str:
    """A time limit as the dead letter's detail states it: signed, or "unbounded" when not set."""
    return "unbounded" if ms is None else f"{ms:+d}"
