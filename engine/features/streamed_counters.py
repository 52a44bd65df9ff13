"""Every row's click-counter inputs as a live counter would have served them, all rows at once.

A backtest or a dataset replay has no service: the inputs each impression would have been served with
are made here from the whole time-ordered log. A live ``ClickCounters`` fed the log one timestamp at a
time does the same (the tests hold it as the reference), at ~150 numpy calls per distinct timestamp: 9.5
s for MovieLens-100K's 49,282 timestamps. Here each counted key's log is one sorted array, and each set
of counts one segmented scan over it.

For one key, each row (each real pair of a cross) makes three items in the cell it counts in:

* a click, if it was clicked, when it is counted: at the first timestamp after its arrival (the clicks
  that arrive before a time are counted before that time's rows are read), weighing, in counts that
  forget, what its impression weighs then;
* a read, at its own time;
* a showing, at its own time, after the reads of that time (rows of one time are served together).

Sorted by (cell, time, kind), the count a read sees is the scan ``x_j = a_j * x_(j-1) + b_j`` up to it,
with ``b`` the item's weight and ``a`` the decay since the item before in the cell (1 for lifetime
counts, 0 at a cell's first item). The scan runs for every item at once in log2(longest cell) rounds.
The same sums as the live counter's, added in another order: equal to float rounding. The price is
memory: one key's items at a time, a peak of about 1 KB a row with MovieLens's cross (95 MB at 100,000
rows, where the live counter needs its counts alone, 13 MB), about what the rows themselves hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from reloop.engine.features.counters import ClickCounters, Ids, rate_inputs

# The order of a cell's items of one time; clicks after the last row are counted after its reads.
_CLICK, _READ, _SHOWN, _LAST = 0, 1, 2, 3


def streamed_counter_values(
    counters: ClickCounters,
    ids: Ids,
    labels: np.ndarray,
    times_ms: np.ndarray,
    label_times_ms: np.ndarray | None = None,
) -> np.ndarray:
    """float32 [n, n_columns]: each row's counter inputs as a live counter would have served them at its
    event time: every impression of an earlier time counted, and every click whose label had arrived
    before that time (``label_times_ms``; None: at its own event time, labels known as soon as it has
    passed). Never a row's own label, nor one of its own time: events that share a timestamp are served
    together, as ``--batch-by time`` scores them. ``ids``: a FeatureBatch, or its ``cat``; rows in time
    order. ``counters`` must have counted nothing yet, and ends holding every row and click, each
    counted as the live counter would have (module doc)."""
    if counters.total_shown or counters.total_clicked:
        raise ValueError("streamed_counter_values needs counters that have counted nothing yet")
    times = np.asarray(times_ms, dtype=np.int64)
    n = times.shape[0]
    out = np.empty((n, counters.n_columns), dtype=np.float32)
    if np.any(times[1:] < times[:-1]):
        raise ValueError("streamed_counter_values needs rows in time order")
    if n == 0:
        return out
    labels = np.asarray(labels, dtype=np.float64)
    clicked = labels > 0
    arrived = (times if label_times_ms is None else np.asarray(label_times_ms, dtype=np.int64))[clicked]
    # A click is counted at the first row time after its arrival; after the last row: at its arrival.
    stamps = np.unique(times)
    at = np.searchsorted(stamps, arrived, side="right")
    counted_ms = np.where(at < stamps.size, stamps[np.minimum(at, stamps.size - 1)], arrived.max(initial=0))
    counted_at = np.zeros(n, dtype=np.int64)
    counted_at[clicked] = counted_ms
    after_last = np.zeros(n, dtype=bool)
    after_last[clicked] = at == stamps.size
    # The overall rate each row reads: the rows of earlier times, the clicks counted before its time.
    earlier_rows = np.searchsorted(times, times, side="left").astype(np.float64)
    read = at < stamps.size
    by_count = np.argsort(counted_ms[read], kind="stable")
    click_sums = np.r_[0.0, np.cumsum(labels[clicked][read][by_count])]
    earlier_clicks = click_sums[np.searchsorted(counted_ms[read][by_count], times, side="right")]
    prior = (np.minimum(earlier_clicks, earlier_rows) + 1.0) / (earlier_rows + 2.0)
    column = 0
    for key, count_sets in counters.count_sets:
        cells, mask = key.cells(ids)
        log = _KeyLog(cells, mask, times, labels, counted_at, after_last)
        for counts in count_sets:
            shown, clicks = log.counted(counts)
            inputs = rate_inputs(shown, clicks, prior, counters.prior_strength, mask)
            out[:, column], out[:, column + 1] = inputs
            column += 2
    counters.total_shown = float(n)
    counters.total_clicked = float(labels[clicked].sum())
    return out


def live_counter_values(
    counters: ClickCounters,
    ids: Any,
    labels: np.ndarray,
    times_ms: np.ndarray,
    label_times_ms: np.ndarray | None = None,
) -> np.ndarray:
    """``streamed_counter_values`` by its definition: a live counter fed the log one timestamp at a time.
    At each timestamp the clicks that arrived before it are counted (weighing what their impressions
    weigh then), that time's rows read, then counted as shown; the clicks still on their way are counted
    at the last one's arrival. What the fast path is tested and benchmarked against (~150 numpy calls a
    timestamp). ``ids``: a FeatureBatch."""
    times = np.asarray(times_ms, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.float64)
    arrived = times if label_times_ms is None else np.asarray(label_times_ms, dtype=np.int64)
    out = np.empty((times.shape[0], counters.n_columns), dtype=np.float32)
    clicks = np.flatnonzero(labels > 0)
    order = np.argsort(arrived[clicks], kind="stable")
    clicks, when = clicks[order], arrived[clicks][order]
    done = 0
    starts = np.flatnonzero(np.r_[True, times[1:] != times[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], times.shape[0]], strict=True):
        now = float(times[a])
        until = int(np.searchsorted(when, times[a], side="left"))
        if until > done:
            rows = clicks[done:until]
            counters.count_clicks(ids.take(rows), labels[rows], now, times[rows])
            done = until
        part = ids.take(slice(a, b))
        out[a:b] = counters.values(part, now)
        counters.count_shown(part, now)
    if done < clicks.size:
        rows = clicks[done:]
        counters.count_clicks(ids.take(rows), labels[rows], float(when[-1]), times[rows])
    return out


class _KeyLog:
    """One counted key's items (module doc), sorted by cell, time and kind."""

    def __init__(
        self,
        cells: np.ndarray,
        mask: np.ndarray | None,
        times: np.ndarray,
        labels: np.ndarray,
        counted_at: np.ndarray,
        after_last: np.ndarray,
    ) -> None:
        self.shape = cells.shape
        if cells.ndim == 1:  # one pair per row
            pair_row, pair_cell = np.arange(cells.shape[0]), cells
            self.pair_place: Any = slice(None)
        else:  # a cross: its real pairs, row by row
            self.pair_place = np.ones(cells.shape, bool) if mask is None else mask
            pair_row, pair_cell = np.nonzero(self.pair_place)[0], cells[self.pair_place]
        self.pairs = pair_row.shape[0]
        click = np.flatnonzero(labels[pair_row] > 0)
        every = np.arange(self.pairs)
        pair = np.concatenate([click, every, every])
        kind = np.repeat(np.array([_CLICK, _READ, _SHOWN], np.int8), [click.size, self.pairs, self.pairs])
        row = pair_row[pair]
        kind[(kind == _CLICK) & after_last[row]] = _LAST
        cell = pair_cell[pair]
        time = np.where((kind == _READ) | (kind == _SHOWN), times[row], counted_at[row]).astype(np.float64)
        order = np.lexsort((kind, time, cell))
        self.cell, self.time, kind, row, pair = cell[order], time[order], kind[order], row[order], pair[order]
        self.first = np.ones(self.cell.shape, bool)  # a cell's first item (none: a cross without pairs)
        self.first[1:] = self.cell[1:] != self.cell[:-1]
        self.last = np.ones(self.cell.shape, bool)  # never a read: a showing of its cell and time follows
        self.last[:-1] = self.first[1:]
        self.shown_w = (kind == _SHOWN).astype(np.float64)
        self.click_w = np.where((kind == _CLICK) | (kind == _LAST), labels[row], 0.0)
        self.shown_ms = times[row].astype(np.float64)  # when a click's impression was shown
        self.reads = np.flatnonzero(kind == _READ)
        self.read_pair = pair[self.reads]

    def counted(self, counts: Any) -> tuple[np.ndarray, np.ndarray]:
        """(shown, clicked) each row's read saw, shaped as the key's cells ([n], or a cross's [n, L] with 0
        where not real). ``counts`` (one set of the key's counts, counting nothing yet) ends holding
        every item, as the live counter leaves it: each cell's counts as of its last count."""
        if counts.tau_s is None:
            decay, click_w = np.ones(self.time.shape), self.click_w
        else:
            tau_ms = 1000.0 * counts.tau_s
            decay = np.exp(-np.maximum(np.diff(self.time, prepend=self.time[:1]), 0.0) / tau_ms)
            # a click weighs what its impression weighs when it is counted: never more than the showing
            click_w = self.click_w * np.exp(-np.maximum(self.time - self.shown_ms, 0.0) / tau_ms)
        decay[self.first] = 0.0
        x = _scan(decay, np.stack([self.shown_w, click_w], axis=1))
        last = self.cell[self.last]
        counts.shown[last], counts.clicked[last] = x[self.last, 0], x[self.last, 1]
        if counts.stamp_ms is not None:
            counts.stamp_ms[last] = self.time[self.last]
        by_pair = np.empty((self.pairs, 2))
        by_pair[self.read_pair] = x[self.reads]
        shown, clicked = np.zeros(self.shape), np.zeros(self.shape)
        shown[self.pair_place], clicked[self.pair_place] = by_pair[:, 0], by_pair[:, 1]
        return shown, clicked


def _scan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x_j = a_j * x_(j-1) + b_j`` (``x_(-1) = 0``) for every j at once: a parallel prefix scan whose
    round k composes each item with the one 2**k before it; done once every product has met a 0."""
    a, x = a.copy(), b.copy()
    step = 1
    while step < a.shape[0] and a[step:].any():
        x[step:] += a[step:, None] * x[:-step]
        a[step:] = a[step:] * a[:-step]
        step *= 2
    return x
