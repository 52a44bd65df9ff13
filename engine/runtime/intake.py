"""The door of the join: records in, checked events (or dead letters) out, in record order.

Each record is decoded once, with the contract's checks (engine/events/validation.py) and, for
impressions, the feature values the model's spec cannot read (engine/features/check.py) refused in the
same pass (engine/features/checked_decode.py); then it is held to the limits that protect the joiner
and the trainer: an event time beyond ``max_future_ms`` of the processor clock or of the record's own
Kafka timestamp (whichever is earlier), optionally more than ``max_past_ms`` behind the clock. A
record refused for several reasons is dead-lettered for the first: contract, then spec, then time. A
refused record goes to the dead-letter sink with its reason, here,
and nowhere else. Why the record timestamp: a processor working through an hour-old backlog sees the
wall clock an hour ahead of the data, so an event stamped an hour later would pass a wall-clock bound and
still close every window of the data after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.events.codec import decode_clicks
from reloop.engine.events.validation import EventError
from reloop.engine.features.check import SpecChecker
from reloop.engine.features.checked_decode import CheckedImpressionDecoder
from reloop.engine.streams import Record

Kind = Literal["impression", "click"]


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_event_bytes: int = 512 * 1024
    max_future_ms: int | None = 300_000
    max_past_ms: int | None = None


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
    ) -> None:
        self.impressions_topic = impressions_topic
        self.clicks_topic = clicks_topic
        self.limits = limits
        self.clock = clock
        self.dead_letters = dead_letters
        self.checker = checker
        self._impressions = CheckedImpressionDecoder(checker)

    def events(self, records: list[Record]) -> Iterator[tuple[Record, Any]]:
        """``(record, event)`` for every record in order: a ``Click``, an impression (an ``Impression``
        or a struct with its fields, engine/features/checked_decode.py: tell them by ``type(event) is
        Click``), or None for a record that was dead-lettered (the caller still moves its position)."""
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
        imps = self._checked(
            self._impressions.decode([r.value for r in imp_records], max_bytes=limit), imp_records
        )
        good, bad = decode_clicks([r.value for r in clk_records], max_bytes=limit)
        clks = self._checked(_aligned(good, bad, len(clk_records)), clk_records)
        i_imp = i_clk = 0
        for r, kind in zip(records, kinds, strict=True):
            if kind == 0:
                ev: Any = imps[i_imp]
                i_imp += 1
            elif kind == 1:
                ev = clks[i_clk]
                i_clk += 1
            else:
                self.dead_letters.send(
                    r, EventError("bad_value", f"record from unexpected topic {r.topic!r}")
                )
                ev = None
            yield r, ev

    def _checked(self, decoded: tuple[list[Any], dict[int, EventError]], records: list[Record]) -> list[Any]:
        """Decoded events aligned with their records after the time limits, None where refused (and
        dead-lettered here)."""
        events, errors = decoded
        lim = self.limits
        if lim.max_future_ms is not None or lim.max_past_ms is not None:
            now = self.clock()
            ahead, behind = lim.max_future_ms, lim.max_past_ms
            for i, ev in enumerate(events):
                if ev is None:
                    continue
                t = ev.event_time_ms
                ts = records[i].timestamp_ms
                ref = ts if 0 < ts < now else now
                if (ahead is not None and t > ref + ahead) or (behind is not None and t < now - behind):
                    events[i] = None
                    errors[i] = EventError(
                        "bad_time",
                        f"event_time_ms {t} is {t - ref:+d} ms from the processor clock / record time "
                        f"({ref}); allowed: {_bound(-behind if behind is not None else None)} .. "
                        f"{_bound(ahead)} ms",
                        "event_time_ms",
                    )
        for i in sorted(errors):
            self.dead_letters.send(records[i], errors[i])
        return events


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
