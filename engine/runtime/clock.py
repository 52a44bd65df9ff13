"""Clocks: wall milliseconds as a callable, so a replay can drive the pipeline with simulated time."""

from __future__ import annotations

import time


def system_clock() -> int:
    """Wall time in integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def monotonic_ms() -> int:
    """Milliseconds of a clock that no step of the wall clock moves (an NTP correction, a VM resumed)."""
    return time.monotonic_ns() // 1_000_000


# A wall clock may carry ``steady``: a clock in its unit for the durations measured beside it, which
# must not jump when the wall clock is stepped (the joiner's idle timer and TTL, engine/join/joiner.py).
# A clock without one (ManualClock: tests and replay) measures its durations itself.
system_clock.steady = monotonic_ms  # type: ignore[attr-defined]


class ManualClock:
    """A clock that moves only when told to (tests and replay).

    >>> c = ManualClock(1_000)
    >>> c.advance(500); c()
    1500
    """

    def __init__(self, now_ms: int = 0) -> None:
        self.now_ms = int(now_ms)

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("a clock does not go back")
        self.now_ms += int(ms)

    def set(self, now_ms: int) -> None:
        if now_ms < self.now_ms:
            raise ValueError("a clock does not go back")
        self.now_ms = int(now_ms)
