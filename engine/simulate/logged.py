"""CTR as the logs tell it: impressions and clicks read back from the arm's topics.

This is what a real site can compute (it never knows the true click probability): clicked
impressions / logged impressions, a click counted once per impression id, only clicks whose
impression is in the log. The demo reports the A/B minus A/A lift from it next to the truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from reloop.engine.events.codec import decode_click, decode_impression
from reloop.engine.streams import Source


@dataclass(frozen=True)
class LoggedCounts:
    impressions: int
    clicked: int
    orphan_clicks: int

    @property
    def ctr(self) -> float:
        return self.clicked / self.impressions if self.impressions else float("nan")


def _drain(source: Source, idle_s: float, timeout_s: float) -> list[bytes]:
    source.open()
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < idle_s:
        batch = source.poll(10_000, 0.2)
        if batch:
            out.extend(r.value for r in batch)
            last = time.monotonic()
    source.close()
    return out


def count_logged(
    impressions: Source, clicks: Source, *, idle_s: float = 1.0, timeout_s: float = 60.0
) -> LoggedCounts:
    shown = {decode_impression(v).impression_id for v in _drain(impressions, idle_s, timeout_s)}
    clicked_ids = {decode_click(v).impression_id for v in _drain(clicks, idle_s, timeout_s)}
    return LoggedCounts(
        impressions=len(shown), clicked=len(clicked_ids & shown), orphan_clicks=len(clicked_ids - shown)
    )
