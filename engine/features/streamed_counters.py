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
The same sums as the live counter's, added in another order: equal to float rounding.

Rows go in chunks of ``CHUNK_ROWS`` (never splitting a timestamp), so memory does not grow with the
log: each cell's first item in a chunk carries its counts from the chunks before (aged to the chunk's
start), and the clicks a chunk counts include those of earlier chunks' rows. On MovieLens with the
cross the pass peaks at 19 MB (its output 5 MB of it; 95 MB in one chunk), beside the counts
themselves (13 MB, as the live counter's).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from reloop.engine.features.counters import ClickCounters, Ids, rate_inputs

# The order of a cell's items of one time: its counts carried from the chunk before, the clicks counted
# then, the reads, the showings; clicks after the last row are counted after its reads.
_CARRY, _CLICK, _READ, _SHOWN, _LAST = 0, 1, 2, 3, 4
#: Rows per chunk (whole timestamps): bounds the items held at once (module doc). The fastest of 2,048
#: to 131,072 on MovieLens (smaller chunks sort and scan in cache; each carries its cells' counts).
CHUNK_ROWS = 8192


def streamed_counter_values(
    counters: ClickCounters,
    ids: Ids,
    labels: np.ndarray,
    times_ms: np.ndarray,
    label_times_ms: np.ndarray | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
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
    clicks = np.flatnonzero(labels > 0)
    arrived = (times if label_times_ms is None else np.asarray(label_times_ms, dtype=np.int64))[clicks]
    # A click is counted at the first row time after its arrival; after the last row: at its arrival.
    stamps = np.unique(times)
    at = np.searchsorted(stamps, arrived, side="right")
    after_last = at == stamps.size
    counted_ms = np.where(after_last, arrived.max(initial=0), stamps[np.minimum(at, stamps.size - 1)])
    in_count_order = np.argsort(counted_ms, kind="stable")
    counted_sorted = counted_ms[in_count_order]
    # The overall rate each row reads: the rows of earlier times, the clicks counted before its time
    # (those counted after the last row never are).
    earlier_rows = np.searchsorted(times, times, side="left").astype(np.float64)
    read_clicks = np.where(after_last, 0.0, labels[clicks])[in_count_order]
    earlier_clicks = np.r_[0.0, np.cumsum(read_clicks)][np.searchsorted(counted_sorted, times, side="right")]
    prior = (np.minimum(earlier_clicks, earlier_rows) + 1.0) / (earlier_rows + 2.0)
    for lo, hi in _chunks(times, chunk_rows):
        # the clicks counted from this chunk's first time to the next chunk's (the last: all the rest)
        first = np.searchsorted(counted_sorted, times[lo], side="left")
        end = np.searchsorted(counted_sorted, times[hi], side="left") if hi < n else counted_sorted.size
        counted_here = in_count_order[first:end]
        chunk_clicks = _Clicks(
            ids=_take(ids, clicks[counted_here]),
            counted_ms=counted_ms[counted_here],
            shown_ms=times[clicks[counted_here]],
            weights=labels[clicks[counted_here]],
            after_last=after_last[counted_here],
        )
        part = _take(ids, slice(lo, hi))
        column = 0
        for key, count_sets in counters.count_sets:
            cells, mask = key.cells(part)
            log = _KeyLog(cells, mask, times[lo:hi], key.cells(chunk_clicks.ids), chunk_clicks)
            for counts in count_sets:
                shown, clicked = log.counted(counts)
                inputs = rate_inputs(shown, clicked, prior[lo:hi], counters.prior_strength, mask)
                out[lo:hi, column], out[lo:hi, column + 1] = inputs
                column += 2
    counters.total_shown = float(n)
    counters.total_clicked = float(labels[clicks].sum())
    return out


def _chunks(times: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Row ranges of about ``rows`` rows each that never split a timestamp."""
    n = times.shape[0]
    starts = np.flatnonzero(np.r_[True, times[1:] != times[:-1]])
    out, lo = [], 0
    while lo < n:
        i = int(np.searchsorted(starts, lo + max(rows, 1), side="left"))
        hi = int(starts[i]) if i < starts.size else n
        out.append((lo, hi))
        lo = hi
    return out


def _take(ids: Ids, index: np.ndarray | slice) -> Ids:
    return ids[index] if isinstance(ids, np.ndarray) else ids.take(index)


class _Clicks(NamedTuple):
    """The clicks counted in one chunk: their rows' ids, when each is counted and was shown, its label,
    and which are counted after the last row."""

    ids: Ids
    counted_ms: np.ndarray
    shown_ms: np.ndarray
    weights: np.ndarray
    after_last: np.ndarray


def live_counter_values(
    counters: ClickCounters,
    ids: Ids,
    labels: np.ndarray,
    times_ms: np.ndarray,
    label_times_ms: np.ndarray | None = None,
) -> np.ndarray:
    """``streamed_counter_values`` by its definition: a live counter fed the log one timestamp at a time.
    At each timestamp the clicks that arrived before it are counted (weighing what their impressions
    weigh then), that time's rows read, then counted as shown; the clicks still on their way are counted
    at the last one's arrival. What the fast path is tested and benchmarked against (~150 numpy calls a
    timestamp). ``ids`` as there."""
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
            counters.count_clicks(_take(ids, rows), labels[rows], now, times[rows])
            done = until
        part = _take(ids, slice(a, b))
        out[a:b] = counters.values(part, now)
        counters.count_shown(part, now)
    if done < clicks.size:
        rows = clicks[done:]
        counters.count_clicks(_take(ids, rows), labels[rows], float(when[-1]), times[rows])
    return out


class _KeyLog:
    """One counted key's items of a chunk (module doc), sorted by cell, time and kind; each cell's first
    item carries its counts from the chunks before."""

    def __init__(
        self,
        cells: np.ndarray,
        mask: np.ndarray | None,
        times: np.ndarray,
        click_cells: tuple[np.ndarray, np.ndarray | None],
        clicks: _Clicks,
    ) -> None:
        self.shape = cells.shape
        pair_row, pair_cell, self.pair_place = _pairs(cells, mask)
        click_of, click_cell, _ = _pairs(*click_cells)
        self.pairs = pair_row.shape[0]
        carried = np.unique(np.concatenate([pair_cell, click_cell]))
        sizes = [carried.size, click_of.size, self.pairs, self.pairs]
        kind = np.repeat(np.array([_CARRY, _CLICK, _READ, _SHOWN], np.int8), sizes)
        kind[carried.size : carried.size + click_of.size][clicks.after_last[click_of]] = _LAST
        start = float(times[0])
        cell = np.concatenate([carried, click_cell, pair_cell, pair_cell])
        time = np.concatenate([np.full(carried.size, start), clicks.counted_ms[click_of], times[pair_row],
                               times[pair_row]]).astype(np.float64)  # fmt: skip
        zeros = np.zeros(carried.size)
        click_w = np.concatenate([zeros, clicks.weights[click_of], np.zeros(2 * self.pairs)])
        shown_ms = np.concatenate([zeros, clicks.shown_ms[click_of], np.zeros(2 * self.pairs)])
        pair = np.concatenate([np.full(carried.size + click_of.size, -1), np.arange(self.pairs),
                               np.full(self.pairs, -1)])  # fmt: skip
        order = np.lexsort((kind, time, cell))
        self.cell, self.time, kind = cell[order], time[order], kind[order]
        self.click_w, self.shown_ms, pair = click_w[order], shown_ms[order], pair[order]
        self.first = np.ones(self.cell.shape, bool)  # a cell's first item: its carried counts
        self.first[1:] = self.cell[1:] != self.cell[:-1]
        self.last = np.ones(self.cell.shape, bool)  # never a read: a showing of its cell and time follows
        self.last[:-1] = self.first[1:]
        self.carried = np.flatnonzero(kind == _CARRY)
        self.start = start
        self.shown_w = (kind == _SHOWN).astype(np.float64)
        self.reads = np.flatnonzero(kind == _READ)
        self.read_pair = pair[self.reads]

    def counted(self, counts: Any) -> tuple[np.ndarray, np.ndarray]:
        """(shown, clicked) each row's read saw, shaped as the key's cells ([n], or a cross's [n, L] with 0
        where not real). ``counts`` (one set of the key's counts, holding the chunks before) ends holding
        this one's items too, as the live counter leaves it: each cell's counts as of its last count."""
        shown_w = self.shown_w.copy()
        carried = self.cell[self.carried]
        held_shown, held_clicked = counts.shown[carried], counts.clicked[carried]
        if counts.tau_s is None:
            decay, click_w = np.ones(self.time.shape), self.click_w.copy()
        else:
            tau_ms = 1000.0 * counts.tau_s
            decay = np.exp(-np.maximum(np.diff(self.time, prepend=self.time[:1]), 0.0) / tau_ms)
            # a click weighs what its impression weighs when it is counted: never more than the showing
            click_w = self.click_w * np.exp(-np.maximum(self.time - self.shown_ms, 0.0) / tau_ms)
            kept = np.exp(-np.maximum(self.start - counts.stamp_ms[carried], 0.0) / tau_ms)
            held_shown, held_clicked = held_shown * kept, held_clicked * kept
        shown_w[self.carried], click_w[self.carried] = held_shown, held_clicked
        decay[self.first] = 0.0
        x = _scan(decay, np.stack([shown_w, click_w], axis=1))
        last = self.cell[self.last]
        counts.shown[last], counts.clicked[last] = x[self.last, 0], x[self.last, 1]
        if counts.stamp_ms is not None:
            counts.stamp_ms[last] = self.time[self.last]
        by_pair = np.empty((self.pairs, 2))
        by_pair[self.read_pair] = x[self.reads]
        shown, clicked = np.zeros(self.shape), np.zeros(self.shape)
        shown[self.pair_place], clicked[self.pair_place] = by_pair[:, 0], by_pair[:, 1]
        return shown, clicked


def _pairs(cells: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, Any]:
    """(the row of each pair, its cell, where the pairs go in an array shaped as ``cells``): one pair per
    row, or a cross's real pairs row by row."""
    if cells.ndim == 1:
        return np.arange(cells.shape[0]), cells, slice(None)
    real = np.ones(cells.shape, bool) if mask is None else mask
    return np.nonzero(real)[0], cells[real], real


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
