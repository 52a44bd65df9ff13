"""Period boundaries: when the trainer publishes a snapshot.

Exactly one trigger: every ``every_samples`` trained samples, each time event time crosses a multiple
of ``every_event_ms`` (e.g. each hour of event time, aligned to the epoch), or every ``every_wall_s``
seconds of wall clock. The pipeline asks after each optimisation step, so the count and event-time
triggers fire at the same step however the input was chunked (a restart reproduces them exactly).

A boundary with nothing trained since the last one (a quiet stream under a wall-clock or event-time
period) is passed, not published: the model is the one already published, and the same weights under a
new version number would push a real version out of the registry's ``checkpoint.keep`` and reset the
per-version metrics. The trigger moves on as if it had published (``idle_boundaries`` counts them,
``on_idle`` hears of each), so the next version comes one period after it, not at the next sample.

>>> p = PeriodTrigger(every_event_ms=3_600_000)
>>> p.due(samples=10, event_time_ms=3_599_999, now_ms=0), p.due(samples=20, event_time_ms=3_600_000, now_ms=0)
(False, True)
>>> p.mark(samples=20, event_time_ms=3_600_000, now_ms=0)
>>> p.due(samples=30, event_time_ms=7_199_999, now_ms=0)
False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PeriodTrigger:
    def __init__(
        self,
        *,
        every_samples: int | None = None,
        every_event_ms: int | None = None,
        every_wall_s: float | None = None,
    ) -> None:
        given = [x for x in (every_samples, every_event_ms, every_wall_s) if x is not None]
        if len(given) != 1 or given[0] <= 0:
            raise ValueError(
                "give exactly one positive period: every_samples, every_event_ms or every_wall_s"
            )
        self.every_samples = every_samples
        self.every_event_ms = every_event_ms
        self.every_wall_s = every_wall_s
        self.last_samples = 0
        self.last_period: int | None = None  # event-time period index of the last boundary
        self.last_wall_ms: int | None = None
        self.idle_boundaries = 0  # boundaries passed with nothing trained (this process; not state)
        self.on_idle: Callable[[], None] | None = None

    @property
    def length_s(self) -> float | None:
        """An event-time period's length in seconds (the wall time it lasts on a live stream), else None."""
        return None if self.every_event_ms is None else self.every_event_ms / 1000

    def due(self, *, samples: int, event_time_ms: int | None, now_ms: int) -> bool:
        if self.every_samples is not None:
            return samples - self.last_samples >= self.every_samples
        if not self._reached(event_time_ms=event_time_ms, now_ms=now_ms):
            return False
        if samples != self.last_samples:
            return True
        self.mark(samples=samples, event_time_ms=event_time_ms, now_ms=now_ms)
        self.idle_boundaries += 1
        if self.on_idle is not None:
            self.on_idle()
        return False

    def _reached(self, *, event_time_ms: int | None, now_ms: int) -> bool:
        """Whether the event-time or wall-clock period has run out."""
        if self.every_event_ms is not None:
            if event_time_ms is None:
                return False
            period = event_time_ms // self.every_event_ms
            if self.last_period is None:
                self.last_period = period  # the first period starts with the first sample
                return False
            return period > self.last_period
        assert self.every_wall_s is not None
        if self.last_wall_ms is None or now_ms < self.last_wall_ms:
            # A clock stepped back (NTP) would otherwise hold the next boundary back by the whole step:
            # the period restarts now, as after a restart.
            self.last_wall_ms = now_ms
            return False
        return now_ms - self.last_wall_ms >= self.every_wall_s * 1000

    def mark(self, *, samples: int, event_time_ms: int | None, now_ms: int) -> None:
        """A snapshot was taken now."""
        self.last_samples = samples
        if event_time_ms is not None and self.every_event_ms is not None:
            period = event_time_ms // self.every_event_ms
            # Never back: a mark with an older event time (out of order) would fire the period again.
            self.last_period = period if self.last_period is None else max(self.last_period, period)
        self.last_wall_ms = now_ms

    def state_dict(self) -> dict[str, Any]:
        return {"last_samples": self.last_samples, "last_period": self.last_period}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The wall-clock timer restarts at the next check: downtime does not count toward a period."""
        self.last_samples = int(state["last_samples"])
        self.last_period = state["last_period"]
        self.last_wall_ms = None
