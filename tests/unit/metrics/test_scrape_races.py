"""Scrapes at once: the exporter serves each scrape on its own thread (two Prometheus servers of an HA
pair scrape the same target), and each runs the scrape hooks."""

from __future__ import annotations

import logging
import threading
import time

from reloop.connectors.metrics.prometheus import EngineCollector
from reloop.engine.metrics.online import OnlineMetricsBook
from reloop.engine.metrics.stats import EngineStats, Tally


class _SlowTally(Tally):
    """A tally whose add lets the other threads run first: the thread switch that, left to chance,
    landed there once in ~10^4 concurrent scrapes (12 samples too many in 5 s of 4 scraping threads)."""

    def add(self, *labels: str, n: float = 1) -> None:
        time.sleep(0.02)
        super().add(*labels, n=n)


def test_concurrent_scrapes_add_the_untracked_samples_once(caplog) -> None:
    caplog.set_level(logging.ERROR)  # the untracked arm's warning
    book = OnlineMetricsBook(window_size=100, max_arms=1)
    book.update("a", 1, 1, 0.9)
    stats = EngineStats(rolling_untracked_samples=_SlowTally())
    book.bind(stats)
    for _ in range(3):
        book.update("b", 1, 1, 0.5)  # an arm beyond max_arms: counted, not tracked
    start = threading.Barrier(4)

    def scrape() -> None:
        start.wait()
        list(EngineCollector(stats, build_info=False).collect())

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # Each scrape read published = 0 before any of them stored 3: the counter said 12.
    assert stats.rolling_untracked_samples.get() == book.untracked_samples == 3
    assert dict(stats.rolling_samples.items()) == {("a", "1", "current"): 1.0, ("a", "", "all"): 1.0}
