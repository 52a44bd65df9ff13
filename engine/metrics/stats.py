"""The engine's own counters: plain Python numbers, read by the one metrics adapter at scrape time.

No metric names, help texts, label names or exposition formats here: those live in
``connectors/metrics/prometheus.py``, the only place that knows Prometheus. The engine keeps one
``EngineStats`` (a field per thing it counts) and adds to it; an event costs a dict lookup and an
add, and a hot path resolves its child once and pays only the add.

* ``Tally``: counts per label-values tuple (``add(*labels, n=1)``); only goes up.
* ``Level``: a value per label-values tuple (``set(value, *labels)``), or a function read at scrape
  time (``set_function(fn, *labels)``).
* ``Buckets``: a fixed-bound histogram per label-values tuple (``observe(value, *labels)``): raw,
  non-cumulative counts (one per bound, ``v <= bound``, plus one above the last) and their sum.

Label values are the tuple's strings, in the order the adapter documents for that field; a
series exists once it has been touched (nothing is exported for a tally never added to)::

    >>> stats = EngineStats()
    >>> stats.events_consumed.add("clicks", n=2)
    >>> hot = stats.events_consumed.child("clicks")   # resolve once on a hot path
    >>> hot.add(); hot.add(3)
    >>> stats.events_consumed.items()
    [(('clicks',), 6)]
    >>> stats.train_loss.set(0.25)
    >>> stats.train_loss.items()
    [((), 0.25)]
    >>> stats.serve_latency_s.observe(0.003, "a")
    >>> stats.serve_latency_s.items()[0][1].total(), stats.serve_latency_s.items()[0][1].sum
    (1, 0.003)

Threading: one writer thread per child plus any number of scraping readers. Creating a child and
``items()`` take the metric's lock, so a reader never sees a dict change size while iterating;
``add``/``set``/``observe`` are a plain read-add-store without a lock, so two threads writing the
SAME child may lose an update (give each thread its own child, or add under your own lock).
``STATS`` is the process-wide instance; tests build their own ``EngineStats()`` or call
``STATS.reset()``.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

# Serving latency of one scoring request (seconds): 0.25 ms .. 2.5 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

Labels = tuple[str, ...]


class Count:
    """One tally child: ``value`` only goes up."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def add(self, n: float = 1) -> None:
        self.value += n


class Cell:
    """One level child: ``value``, or ``function()`` when one is set."""

    __slots__ = ("value", "function")

    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self.function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self.value = value

    def get(self) -> float:
        return float(self.function()) if self.function is not None else float(self.value)


class Bins:
    """One buckets child: ``counts[i]`` = observations in (bounds[i-1], bounds[i]]; the last slot is
    above every bound. Non-cumulative; ``sum`` is the sum of the observed values."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def total(self) -> int:
        return sum(self.counts)


class _Children:
    """Children by label-values tuple; created under a lock, read as a copy under it."""

    def __init__(self) -> None:
        self._children: dict[Labels, object] = {}
        self._lock = threading.Lock()

    def _new(self) -> object:
        raise NotImplementedError

    def _child(self, labels: Labels):
        child = self._children.get(labels)
        if child is None:
            with self._lock:
                child = self._children.get(labels)
                if child is None:
                    child = self._children[labels] = self._new()
        return child

    def _copy(self) -> list[tuple[Labels, object]]:
        with self._lock:
            return list(self._children.items())

    def remove(self, *labels: str) -> None:
        with self._lock:
            self._children.pop(labels, None)

    def clear(self) -> None:
        with self._lock:
            self._children = {}


class Tally(_Children):
    """Counts per label-values tuple."""

    def _new(self) -> Count:
        return Count()

    def child(self, *labels: str) -> Count:
        return self._child(labels)

    def add(self, *labels: str, n: float = 1) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._child(labels)
        child.value += n

    def get(self, *labels: str) -> float:
        child = self._children.get(labels)
        return child.value if child is not None else 0

    def items(self) -> list[tuple[Labels, float]]:
        return [(k, c.value) for k, c in self._copy()]


class Level(_Children):
    """A value per label-values tuple (a gauge), or a function read at scrape time."""

    def __init__(self) -> None:
        super().__init__()
        self._owners: dict[str, set[Labels]] = {}  # replace(owner=...): the children each owner set

    def _new(self) -> Cell:
        return Cell()

    def child(self, *labels: str) -> Cell:
        return self._child(labels)

    def set(self, value: float, *labels: str) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._child(labels)
        child.value = value

    def set_function(self, fn: Callable[[], float] | None, *labels: str) -> None:
        """Read ``fn()`` at scrape time instead of a stored value (state the engine already keeps)."""
        self._child(labels).function = fn

    def replace(self, values: Mapping[Labels, float], *, owner: str | None = None) -> None:
        """Exactly these children and values from now on, in one swap: all others dropped, or with an
        ``owner`` only those it set before (the join and train stages of one process share the lag
        gauge: each replacing it whole erased the other's series at every refresh)."""
        cells = {tuple(k): Cell(v) for k, v in values.items()}
        with self._lock:
            if owner is None:
                self._children = cells
                self._owners.clear()
                return
            before = self._owners.get(owner, set())
            self._children = {k: c for k, c in self._children.items() if k not in before} | cells
            self._owners[owner] = set(cells)

    def get(self, *labels: str) -> float | None:
        child = self._children.get(labels)
        return child.get() if child is not None else None

    def items(self) -> list[tuple[Labels, float]]:
        return [(k, c.get()) for k, c in self._copy()]


class Buckets(_Children):
    """A fixed-bound histogram per label-values tuple."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"buckets need strictly increasing bounds, got {bounds}")
        super().__init__()
        self.bounds = bounds

    def _new(self) -> Bins:
        return Bins(self.bounds)

    def child(self, *labels: str) -> Bins:
        return self._child(labels)

    def observe(self, value: float, *labels: str) -> None:
        child = self._children.get(labels)
        if child is None:
            child = self._child(labels)
        child.observe(value)

    def items(self) -> list[tuple[Labels, Bins]]:
        """A copy of each child (counts and sum read together), so a scrape sees one moment of each."""
        out = []
        for k, b in self._copy():
            snap = Bins(self.bounds)
            snap.counts, snap.sum = list(b.counts), b.sum
            out.append((k, snap))
        return out


@dataclass(eq=False)
class EngineStats:
    """Everything the engine counts, one field each (label-values order in the comment).

    Who writes what: the pipeline and the join stage (events, joiner, dead letters, lag), the train
    stage and the pipeline (train, snapshots), the supervisor (restarts), ``OnlineMetricsBook.bind``
    (rolling, from a scrape hook), the scoring service (serve, impressions).
    """

    events_consumed: Tally = field(default_factory=Tally)  # (topic,)
    dead_letters: Tally = field(default_factory=Tally)  # (reason,)
    joined_samples: Tally = field(default_factory=Tally)  # (label "0"/"1",)
    join_tasks: Level = field(default_factory=Level)
    join_checkpoint_seconds: Level = field(default_factory=Level)
    join_checkpoint_interval_seconds: Level = field(default_factory=Level)
    joiner_pending: Level = field(default_factory=Level)
    joiner_expired: Tally = field(default_factory=Tally)
    joiner_late_clicks: Tally = field(default_factory=Tally)  # (policy,)
    joiner_orphan_clicks: Tally = field(default_factory=Tally)
    joiner_too_late: Tally = field(default_factory=Tally)  # (kind,)
    joiner_duplicates: Tally = field(default_factory=Tally)  # (kind,)
    joiner_dropped_by_bound: Tally = field(default_factory=Tally)
    joiner_watermark_s: Level = field(default_factory=Level)
    merge_stamped_ahead: Tally = field(default_factory=Tally)
    join_replays_abandoned: Tally = field(default_factory=Tally)
    join_input_deleted_unread: Tally = field(default_factory=Tally)  # (topic,)
    join_input_restarted_below: Tally = field(default_factory=Tally)  # (topic,)
    join_record_age_s: Level = field(default_factory=Level)  # (topic,)
    topic_retention_s: Level = field(default_factory=Level)  # (topic,)

    train_steps: Tally = field(default_factory=Tally)
    train_samples: Tally = field(default_factory=Tally)
    train_skipped_steps: Tally = field(default_factory=Tally)
    train_skipped_samples: Tally = field(default_factory=Tally)
    train_replayed_samples: Tally = field(default_factory=Tally)
    train_version_mismatches: Tally = field(default_factory=Tally)
    train_duplicates_dropped: Tally = field(default_factory=Tally)
    train_samples_refused: Tally = field(default_factory=Tally)
    train_samples_missing: Tally = field(default_factory=Tally)
    train_join_task_restarts: Tally = field(default_factory=Tally)
    train_loss: Level = field(default_factory=Level)  # the mini-batch's total loss
    train_loss_parts: Level = field(default_factory=Level)  # (part "ce"/"sc"/"kd",)
    train_sc_active: Level = field(default_factory=Level)
    train_learning_rate: Level = field(default_factory=Level)  # (optimizer "dense"/"embedding",)

    rolling_auc: Level = field(default_factory=Level)  # (arm, model_version, slot)
    rolling_logloss: Level = field(default_factory=Level)  # (arm, model_version, slot)
    rolling_mean_prediction: Level = field(default_factory=Level)  # (arm, model_version, slot)
    rolling_observed_ctr: Level = field(default_factory=Level)  # (arm, model_version, slot)
    rolling_samples: Level = field(default_factory=Level)  # (arm, model_version, slot)
    rolling_untracked_samples: Tally = field(default_factory=Tally)  # arms beyond metrics.max_arms

    snapshot_version: Level = field(default_factory=Level)
    snapshot_time_s: Level = field(default_factory=Level)
    snapshot_period_s: Level = field(default_factory=Level)
    period_boundary_time_s: Level = field(default_factory=Level)
    snapshots: Tally = field(default_factory=Tally)
    snapshot_restore_fallbacks: Tally = field(default_factory=Tally)
    pipeline_restarts: Tally = field(default_factory=Tally)

    consumer_lag: Level = field(default_factory=Level)  # (topic, partition)

    serve_requests: Tally = field(default_factory=Tally)  # (arm,)
    serve_failed_requests: Tally = field(default_factory=Tally)  # (status,): /score answered other than 200
    serve_unread_requests: Tally = field(default_factory=Tally)  # (arm,): features the model reads none of
    serve_latency_s: Buckets = field(default_factory=Buckets)  # (arm,)
    serve_reloads: Tally = field(default_factory=Tally)  # (outcome "ok"/"refused",)
    serve_fallback: Level = field(default_factory=Level)  # (arm,)
    serve_model_version: Level = field(default_factory=Level)  # (arm,)
    impressions_logged: Tally = field(default_factory=Tally)  # (arm,)
    impressions_dropped: Tally = field(default_factory=Tally)  # (reason,)
    impressions_pending: Level = field(default_factory=Level)  # (arm,): accepted, not acknowledged yet
    serve_feed_samples: Tally = field(default_factory=Tally)  # (arm, target, outcome)
    serve_feed_lag: Level = field(default_factory=Level)  # (arm, target, topic)

    hooks: list[Callable[[], None]] = field(default_factory=list)

    def add_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before every scrape reads the values: state that is costly to publish per
        event (rolling AUC) is copied into its levels only when someone reads them."""
        self.hooks = [*self.hooks, hook]

    def remove_hook(self, hook: Callable[[], None]) -> None:
        self.hooks = [h for h in self.hooks if h is not hook]

    def run_hooks(self) -> None:
        for hook in list(self.hooks):
            hook()

    def metrics(self) -> dict[str, Tally | Level | Buckets]:
        """Field name -> its tally, level or buckets (everything but the hooks)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hooks"}

    def reset(self) -> None:
        """Drop every child (values restart at zero, functions are forgotten) and every hook."""
        for metric in self.metrics().values():
            metric.clear()
        self.hooks = []


STATS = EngineStats()
