"""Rows -> the events a live system would have logged: Impressions and (delayed) Clicks, in time order.

Datasets carry no served prediction. Unless a row brings its own, ``served_prediction`` is the running
click-through rate seen so far in event time (clicks that have *arrived* before the impression, over
impressions before it, smoothed towards 0.5), with ``model_version`` 0. This is a neutral, causal
placeholder: a backtest decides y_last itself and must not treat version 0 as a real model.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from reloop.connectors.files.datasets.base import DatasetError, DatasetRow
from reloop.connectors.files.datasets.delay import ClickDelay, ImmediateDelay
from reloop.engine.events.schema import Click, Impression, LabeledSample

#: The model version stamped on placeholder predictions: "no model served this".
PLACEHOLDER_VERSION = 0
# user_id / item_id of an impression whose dataset row has none (Criteo; a log without those columns)
UNKNOWN_ID = "unknown"


@dataclass(slots=True)
class RunningBaseRate:
    """(clicks + prior * weight) / (impressions + weight), updated as events go by."""

    prior: float = 0.5
    weight: float = 2.0
    impressions: int = field(default=0, init=False)
    clicks: int = field(default=0, init=False)

    def value(self) -> float:
        return (self.clicks + self.prior * self.weight) / (self.impressions + self.weight)

    def saw_impression(self) -> None:
        self.impressions += 1

    def saw_click(self) -> None:
        self.clicks += 1


@dataclass(slots=True)
class UnloggedPredictions:
    """Counts the rows without a logged ``served_prediction``: under ``y_last`` "logged" theirs is a
    placeholder (the running click rate), which reads as a production model's prediction in a report."""

    rows: int = 0
    missing: int = 0

    def counted(self, rows: Iterable[DatasetRow]) -> Iterator[DatasetRow]:
        for row in rows:
            self.rows += 1
            self.missing += row.served_prediction is None
            yield row

    def warning(self, command: str, recompute: str) -> str | None:
        """The line to print once the rows were read; None when every row had its prediction."""
        if not self.missing:
            return None
        return (
            f"reloop {command}: warning: y_last is the logged prediction, but {self.missing:,} of "
            f"{self.rows:,} rows have no served_prediction: their y_last is a placeholder (the click rate "
            f"so far), not what a production model predicted ({recompute} recomputes it)"
        )


def _check_order(rows: Iterable[DatasetRow]) -> Iterator[DatasetRow]:
    last = None
    for row in rows:
        if last is not None and row.event_time_ms < last:
            raise DatasetError(f"rows out of time order at {row.row_id}: {row.event_time_ms} < {last}")
        last = row.event_time_ms
        yield row


def to_events(
    rows: Iterable[DatasetRow],
    delay: ClickDelay | None = None,
    base_rate: RunningBaseRate | None = None,
) -> Iterator[Impression | Click]:
    """Merge impressions and their clicks into one stream ordered by event time.

    A click due at the same time as a later impression comes first (it had arrived by then).
    A row's own ``click_time_ms`` wins over the delay model.

    >>> from reloop.connectors.files.datasets.delay import FixedDelay
    >>> rows = [DatasetRow("a", "a", "u", "i", 0, {}, 1), DatasetRow("b", "b", "u", "j", 10, {}, 0)]
    >>> [(type(e).__name__, e.event_time_ms) for e in to_events(rows, FixedDelay(5))]
    [('Impression', 0), ('Click', 5), ('Impression', 10)]
    """
    delay = delay or ImmediateDelay()
    rate = base_rate or RunningBaseRate()
    pending: list[tuple[int, int, Click]] = []
    seq = 0
    for row in _check_order(rows):
        while pending and pending[0][0] <= row.event_time_ms:
            rate.saw_click()
            yield heapq.heappop(pending)[2]
        served = row.served_prediction if row.served_prediction is not None else rate.value()
        version = row.model_version if row.model_version is not None else PLACEHOLDER_VERSION
        rate.saw_impression()
        yield Impression(
            impression_id=row.row_id,
            request_id=row.request_id,
            # The event contract wants non-empty ids; Criteo and logs without the columns have none.
            user_id=row.user_id or UNKNOWN_ID,
            item_id=row.item_id or UNKNOWN_ID,
            features=row.features,
            event_time_ms=row.event_time_ms,
            served_prediction=served,
            model_version=version,
        )
        if row.label:
            t = click_time_ms(row, delay)
            heapq.heappush(pending, (t, seq, Click(impression_id=row.row_id, event_time_ms=t)))
            seq += 1
    while pending:
        yield heapq.heappop(pending)[2]


def click_time_ms(row: DatasetRow, delay: ClickDelay) -> int:
    """When a clicked row's click arrives: its own ``click_time_ms``, else its time plus the delay's."""
    if row.click_time_ms is None:
        return row.event_time_ms + delay.delay_ms(row.row_id)
    if row.click_time_ms < row.event_time_ms:
        raise DatasetError(f"row {row.row_id}: click at {row.click_time_ms} before its impression")
    return row.click_time_ms


def to_samples(
    rows: Iterable[DatasetRow], base_rate: RunningBaseRate | None = None
) -> Iterator[LabeledSample]:
    """Rows straight to labeled samples (what a joiner with an unbounded window would emit), in time order.

    The served prediction follows the same placeholder rule as ``to_events`` with immediate clicks.
    """
    rate = base_rate or RunningBaseRate()
    for row in _check_order(rows):
        served = row.served_prediction if row.served_prediction is not None else rate.value()
        version = row.model_version if row.model_version is not None else PLACEHOLDER_VERSION
        rate.saw_impression()
        if row.label:
            rate.saw_click()
        yield LabeledSample(
            sample_id=row.row_id,
            features=row.features,
            label=int(row.label),
            served_prediction=served,
            served_version=version,
            event_time_ms=row.event_time_ms,
        )
