"""Online metrics for a binary click label: ``update`` / ``revert`` / ``get``, in the style of river.

* ``ExactAUC``: exact ROC AUC (ties count one half) of every sample added and not reverted.
  Two sorted lists (positives' and negatives' scores) and the Mann-Whitney U kept up to date,
  so ``update`` and ``revert`` are O(log n) and ``get`` is O(1). river's ``RollingROCAUC`` and a
  numpy rank recompute both pay O(window) on each read (see docs/bench-metrics.md).
* ``LogLoss`` and ``Calibration``: running sums.
* ``RollingBinaryMetrics``: the three over the last ``window_size`` samples, with ``revert`` for a
  late click that turns an emitted negative into a positive::

      >>> m = RollingBinaryMetrics(window_size=3)
      >>> for y, p in [(0, 0.2), (1, 0.9), (0, 0.7)]:
      ...     m.update(y, p)
      >>> round(m.auc.get(), 3)
      1.0
      >>> m.revert(0, 0.7)  # the click for the 0.7 impression arrived late
      True
      >>> m.update(1, 0.7)
      >>> m.auc.get()
      1.0
      >>> m.update(0, 0.8)  # the window holds 3 samples: (0, 0.2) falls out
      >>> m.auc.get()
      0.5

* ``OnlineMetricsBook``: the same metrics per (arm, model version), keeping the ``max_versions``
  newest versions of each arm, and per arm over every version it kept (slot ``all``: the arm's model
  whatever version served, which a version published every few seconds never fills alone); ``bind()``
  publishes them into ``EngineStats``' rolling levels (the ``reloop_rolling_*`` gauges) at scrape
  time. It holds ``rolling_batch.BatchRollingMetrics`` (same semantics, numpy, updates buffered and
  applied a batch at a time: well under 1 us per sample instead of ~20 us), because the book sits on
  the trainer's hot path.

``state_dict()`` / ``from_state_dict()`` return and accept plain data (lists, dicts, numbers; the book's
windows as bytes, see ``rolling_batch.window_arrays``) for the engine's snapshot.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from reloop.engine.events.schema import LabeledSample
from reloop.engine.metrics.offline import EPS as _EPS  # one clipping epsilon for every LogLoss
from reloop.engine.metrics.rolling_batch import BatchRollingMetrics, window_arrays
from reloop.engine.metrics.stats import STATS, EngineStats
from sortedcontainers import SortedList

log = logging.getLogger("reloop.metrics")
DEFAULT_MAX_ARMS = 64  # also metrics.max_arms' default (engine/runtime/config.py)


def _check(y: int, p: float) -> tuple[int, float]:
    if y != 0 and y != 1:
        raise ValueError(f"label must be 0 or 1, got {y!r}")
    p = float(p)
    # NaN would corrupt the sorted lists' order; inf - inf at eviction left the mean prediction NaN for good
    if not math.isfinite(p):
        raise ValueError("score is NaN" if p != p else "score is not finite")
    return int(y), p


class ExactAUC:
    """Exact ROC AUC with revert. ``get()`` is NaN until both classes are present."""

    def __init__(self) -> None:
        self._pos: SortedList = SortedList()
        self._neg: SortedList = SortedList()
        # Twice the Mann-Whitney U statistic: an integer, so no float drift however long it runs.
        self._u2 = 0

    def update(self, y: int, p: float) -> None:
        self._add(*_check(y, p))

    def revert(self, y: int, p: float) -> None:
        """Undo one earlier ``update(y, p)``; ValueError if there is none to undo."""
        self._remove(*_check(y, p))

    # Unchecked paths for RollingBinaryMetrics, which validates once per sample.
    def _add(self, y: int, p: float) -> None:
        if y:
            neg = self._neg
            self._u2 += neg.bisect_left(p) + neg.bisect_right(p)
            self._pos.add(p)
        else:
            pos = self._pos
            self._u2 += 2 * len(pos) - pos.bisect_left(p) - pos.bisect_right(p)
            self._neg.add(p)

    def _remove(self, y: int, p: float) -> None:
        if y:
            self._pos.remove(p)
            neg = self._neg
            self._u2 -= neg.bisect_left(p) + neg.bisect_right(p)
        else:
            self._neg.remove(p)
            pos = self._pos
            self._u2 -= 2 * len(pos) - pos.bisect_left(p) - pos.bisect_right(p)

    def get(self) -> float:
        n_pos, n_neg = len(self._pos), len(self._neg)
        if n_pos == 0 or n_neg == 0:
            return math.nan
        return self._u2 / (2 * n_pos * n_neg)

    @property
    def n_pos(self) -> int:
        return len(self._pos)

    @property
    def n_neg(self) -> int:
        return len(self._neg)

    @classmethod
    def from_samples(cls, ys: np.ndarray, ps: np.ndarray) -> ExactAUC:
        """Bulk build in O(n log n) with numpy (used by restore)."""
        ys = np.asarray(ys, dtype=np.int8)
        ps = np.asarray(ps, dtype=np.float64)
        if ys.size and (not np.isfinite(ps).all() or not np.isin(ys, (0, 1)).all()):
            raise ValueError("labels must be 0/1 and scores finite (not NaN)")
        pos = np.sort(ps[ys == 1])
        neg = np.sort(ps[ys == 0])
        auc = cls()
        auc._pos = SortedList(pos.tolist())
        auc._neg = SortedList(neg.tolist())
        auc._u2 = int(
            np.searchsorted(neg, pos, side="left").sum() + np.searchsorted(neg, pos, side="right").sum()
        )
        return auc


class LogLoss:
    """Mean binary cross-entropy; predictions are clipped to [1e-15, 1 - 1e-15]."""

    def __init__(self) -> None:
        self._sum = 0.0
        self._n = 0

    @staticmethod
    def _loss(y: int, p: float) -> float:
        p = min(max(p, _EPS), 1.0 - _EPS)
        return -math.log(p) if y else -math.log1p(-p)

    def update(self, y: int, p: float) -> None:
        self._add(*_check(y, p))

    def revert(self, y: int, p: float) -> None:
        y, p = _check(y, p)
        if self._n == 0:
            raise ValueError("nothing to revert")
        self._remove(y, p)

    def _add(self, y: int, p: float) -> None:
        self._sum += self._loss(y, p)
        self._n += 1

    def _remove(self, y: int, p: float) -> None:
        self._n -= 1
        # At zero, drop the rounding residue of the subtractions.
        self._sum = self._sum - self._loss(y, p) if self._n else 0.0

    def get(self) -> float:
        return self._sum / self._n if self._n else math.nan


class Calibration:
    """Mean predicted CTR against observed CTR; ``get()`` is their ratio (1.0 = calibrated)."""

    def __init__(self) -> None:
        self._sum_p = 0.0
        self._clicks = 0
        self._n = 0

    def update(self, y: int, p: float) -> None:
        self._add(*_check(y, p))

    def revert(self, y: int, p: float) -> None:
        y, p = _check(y, p)
        if self._n == 0:
            raise ValueError("nothing to revert")
        self._remove(y, p)

    def _add(self, y: int, p: float) -> None:
        self._sum_p += p
        self._clicks += y
        self._n += 1

    def _remove(self, y: int, p: float) -> None:
        self._clicks -= y
        self._n -= 1
        self._sum_p = self._sum_p - p if self._n else 0.0

    @property
    def mean_prediction(self) -> float:
        return self._sum_p / self._n if self._n else math.nan

    @property
    def observed_ctr(self) -> float:
        return self._clicks / self._n if self._n else math.nan

    def get(self) -> float:
        if self._n == 0 or self._clicks == 0:
            return math.nan
        return self._sum_p / self._clicks


class RollingBinaryMetrics:
    """AUC, LogLoss and calibration over the last ``window_size`` samples.

    ``revert(y, p)`` removes the most recent sample in the window equal to (y, p) and returns
    True, or returns False when no such sample is in the window any more (it already fell out,
    so there is nothing to undo). Reverted samples leave a tombstone in the queue that is
    skipped when it reaches the front, so a revert is O(log n) too.
    """

    def __init__(self, window_size: int) -> None:
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.window_size = window_size
        self.auc = ExactAUC()
        self.logloss = LogLoss()
        self.calibration = Calibration()
        # Each entry is [y, p, alive]; _index maps (y, p) to its live entries, oldest first.
        self._queue: deque[list] = deque()
        self._index: dict[tuple[int, float], deque[list]] = {}
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def update(self, y: int, p: float) -> None:
        y, p = _check(y, p)
        entry = [y, p, True]
        self._queue.append(entry)
        key = (y, p)
        same = self._index.get(key)
        if same is None:
            self._index[key] = deque((entry,))
        else:
            same.append(entry)
        self._add(y, p)
        self._live += 1
        if self._live > self.window_size:
            self._evict_oldest()

    def revert(self, y: int, p: float) -> bool:
        y, p = _check(y, p)
        key = (y, p)
        same = self._index.get(key)
        if not same:
            return False
        entry = same.pop()
        if not same:
            del self._index[key]
        entry[2] = False
        self._remove(y, p)
        self._live -= 1
        return True

    def _evict_oldest(self) -> None:
        queue = self._queue
        while True:
            y, p, alive = queue.popleft()
            if alive:
                break
        key = (y, p)
        same = self._index[key]
        same.popleft()
        if not same:
            del self._index[key]
        self._remove(y, p)
        self._live -= 1

    def _add(self, y: int, p: float) -> None:
        self.auc._add(y, p)
        self.logloss._add(y, p)
        self.calibration._add(y, p)

    def _remove(self, y: int, p: float) -> None:
        self.auc._remove(y, p)
        self.logloss._remove(y, p)
        self.calibration._remove(y, p)

    def window(self) -> list[tuple[int, float]]:
        """The live samples, oldest first."""
        return [(y, p) for y, p, alive in self._queue if alive]

    def get(self) -> dict[str, float]:
        return {
            "auc": self.auc.get(),
            "logloss": self.logloss.get(),
            "mean_prediction": self.calibration.mean_prediction,
            "observed_ctr": self.calibration.observed_ctr,
            "samples": float(self._live),
        }

    def state_dict(self) -> dict[str, Any]:
        live = self.window()
        return {
            "window_size": self.window_size,
            "y": [y for y, _ in live],
            "p": [p for _, p in live],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RollingBinaryMetrics:
        try:
            window_size = int(state["window_size"])
            y_arr, p_arr = window_arrays(state["y"], state["p"])
            ys, ps = y_arr.tolist(), p_arr.tolist()
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad rolling metric state: {exc}") from exc
        if len(ys) != len(ps):
            raise ValueError("bad rolling metric state: y and p differ in length")
        # A smaller window in the new config keeps the newest samples.
        ys, ps = ys[len(ys) - min(len(ys), window_size):], ps[len(ps) - min(len(ps), window_size):]
        m = cls(window_size)
        m.auc = ExactAUC.from_samples(np.asarray(ys), np.asarray(ps))
        for y, p in zip(ys, ps, strict=True):
            y, p = _check(y, p)
            entry = [y, p, True]
            m._queue.append(entry)
            m._index.setdefault((y, p), deque()).append(entry)
            m.logloss._add(y, p)
            m.calibration._add(y, p)
        m._live = len(ys)
        return m


def slot_name(rank: int) -> str:
    """Label value for the rank of a version within its arm: 0 newest -> current, 1 -> previous."""
    return "current" if rank == 0 else "previous" if rank == 1 else f"previous_{rank}"


class _Both:
    """A sample's two windows, its version's and its arm's, fed alike."""

    __slots__ = ("version", "arm")

    def __init__(self, version: BatchRollingMetrics, arm: BatchRollingMetrics) -> None:
        self.version, self.arm = version, arm

    def update(self, y: int, p: float) -> None:
        self.version.update(y, p)
        self.arm.update(y, p)

    def update_many(self, ys: Any, ps: Any) -> None:
        self.version.update_many(ys, ps)
        self.arm.update_many(ys, ps)

    def revert(self, y: int, p: float) -> bool:
        if not self.version.revert(y, p):
            return False
        self.arm.revert(y, p)
        return True


class OnlineMetricsBook:
    """Rolling metrics per (arm, model version), keeping the ``max_versions`` newest versions per arm.

    Samples for a version older than every kept one are ignored (``update`` returns False): late
    labels for a model two reloads ago must not push the current one out. At most ``max_arms`` arms
    are tracked, the first seen: the arm is any string an impression carries, and one per request (a
    producer's bug) grew a window and five series per value without bound; the samples of the arms
    beyond are counted in ``untracked_samples`` (exported) and the first such arm is logged. Thread-safe
    for one writer and scraping readers (one lock per call; ``update_many`` takes it once per batch).
    """

    def __init__(
        self, *, window_size: int = 100_000, max_versions: int = 2, max_arms: int = DEFAULT_MAX_ARMS
    ) -> None:
        if max_versions < 1:
            raise ValueError(f"max_versions must be >= 1, got {max_versions}")
        if max_arms < 1:
            raise ValueError(f"max_arms must be >= 1, got {max_arms}")
        self.window_size = window_size
        self.max_versions = max_versions
        self.max_arms = max_arms
        self.untracked_samples = 0  # samples of arms beyond max_arms
        self._arms: dict[str, dict[int, BatchRollingMetrics]] = {}
        self._all: dict[str, BatchRollingMetrics] = {}  # per arm, every version's samples it counted
        self._lock = threading.Lock()

    def settings(self) -> dict[str, int]:
        """This book's bounds, as keyword arguments: a restored or a fresh book like this one."""
        return {"window_size": self.window_size, "max_versions": self.max_versions, "max_arms": self.max_arms}

    def _metrics_for(self, arm: str, version: int, n: int = 1) -> _Both | None:
        """The windows a sample of (arm, version) goes to: its version's and its arm's."""
        m = self._version_metrics(arm, version, n)
        if m is None:
            return None
        whole = self._all.get(arm)
        if whole is None:
            whole = self._all[arm] = BatchRollingMetrics(self.window_size)
        return _Both(m, whole)

    def _version_metrics(self, arm: str, version: int, n: int = 1) -> BatchRollingMetrics | None:
        versions = self._arms.get(arm)
        if versions is None:
            if len(self._arms) >= self.max_arms:
                if not self.untracked_samples:
                    log.warning(
                        "more arms than metrics.max_arms: their samples are not in the rolling metrics",
                        extra={"fields": {"arm": arm[:200], "max_arms": self.max_arms}},
                    )
                self.untracked_samples += n
                return None
            versions = self._arms[arm] = {}
        m = versions.get(version)
        if m is not None:
            return m
        if len(versions) >= self.max_versions and version < min(versions):
            return None
        m = versions[version] = BatchRollingMetrics(self.window_size)
        while len(versions) > self.max_versions:
            del versions[min(versions)]
        return m

    def update(self, arm: str, version: int, y: int, p: float) -> bool:
        with self._lock:
            m = self._metrics_for(arm, int(version))
            if m is None:
                return False
            m.update(y, p)
            return True

    def revert(self, arm: str, version: int, y: int, p: float) -> bool:
        with self._lock:
            m = self._arms.get(arm, {}).get(int(version))
            if m is None or not m.revert(y, p):
                return False
            self._all[arm].revert(y, p)
            return True

    def update_sample(self, s: LabeledSample) -> bool:
        """Feed one joined sample; a correction replaces the negative emitted earlier for it."""
        with self._lock:
            m = self._metrics_for(s.arm, int(s.served_version))
            if m is None:
                return False
            if s.is_correction and s.label == 1:
                m.revert(0, s.served_prediction)
            m.update(s.label, s.served_prediction)
            return True

    def update_many(self, samples: list[LabeledSample]) -> int:
        """``update_sample`` for a batch under one lock; returns how many were counted."""
        counted = 0
        with self._lock:
            for s in samples:
                m = self._metrics_for(s.arm, int(s.served_version))
                if m is None:
                    continue
                if s.is_correction and s.label == 1:
                    m.revert(0, s.served_prediction)
                m.update(s.label, s.served_prediction)
                counted += 1
        return counted

    def update_columns(
        self, arms: np.ndarray, versions: np.ndarray, ys: np.ndarray, ps: np.ndarray, corrections: np.ndarray
    ) -> int:
        """``update_many`` for columns: the same result in the same order, fed as runs of rows that share
        an (arm, version) (one batched update each); a correction row is applied on its own."""
        n = len(ys)
        if n == 0:
            return 0
        cut = np.zeros(n + 1, dtype=bool)
        cut[0] = cut[n] = True
        cut[1:n] |= (arms[1:] != arms[:-1]) | (versions[1:] != versions[:-1])
        fix = np.flatnonzero(corrections & (ys == 1))
        cut[fix] = True
        cut[fix + 1] = True
        bounds = np.flatnonzero(cut)
        counted = 0
        with self._lock:
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                m = self._metrics_for(str(arms[a]), int(versions[a]), b - a)
                if m is None:
                    continue
                if b - a == 1 and corrections[a] and ys[a] == 1:
                    m.revert(0, float(ps[a]))
                m.update_many(ys[a:b], ps[a:b])
                counted += b - a
        return counted

    def update_arrays(self, arm: str, version: int, ys: np.ndarray, ps: np.ndarray) -> bool:
        """Columnar feed for one (arm, version): no per-sample Python work at all."""
        with self._lock:
            m = self._metrics_for(arm, int(version), len(ys))
            if m is None:
                return False
            m.update_many(ys, ps)
            return True

    def versions(self, arm: str) -> list[int]:
        with self._lock:
            return sorted(self._arms.get(arm, {}), reverse=True)

    def arms(self) -> list[str]:
        with self._lock:
            return sorted(self._arms)

    def get(self, arm: str, version: int) -> dict[str, float]:
        with self._lock:
            return self._arms[arm][int(version)].get()

    def get_arm(self, arm: str) -> dict[str, float]:
        """The arm's window over every version it counted (slot ``all``)."""
        with self._lock:
            return self._all[arm].get()

    def report(self) -> list[dict[str, Any]]:
        """One row per (arm, version), newest version first: arm, model_version, slot and the values."""
        rows: list[dict[str, Any]] = []
        with self._lock:
            for arm in sorted(self._arms):
                versions = self._arms[arm]
                for rank, version in enumerate(sorted(versions, reverse=True)):
                    row = {"arm": arm, "model_version": version, "slot": slot_name(rank)}
                    rows.append({**row, **versions[version].get()})
        return rows

    def arm_report(self) -> list[dict[str, Any]]:
        """One row per arm, its window over every version (``model_version`` "": no such label)."""
        with self._lock:
            return [
                {"arm": arm, "model_version": "", "slot": "all", **self._all[arm].get()}
                for arm in sorted(self._all)
            ]

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "window_size": self.window_size,
                "max_versions": self.max_versions,
                "max_arms": self.max_arms,
                "arms": {
                    arm: {str(v): m.state_dict() for v, m in versions.items()}
                    for arm, versions in self._arms.items()
                },
                "all": {arm: m.state_dict() for arm, m in self._all.items()},
            }

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, Any],
        *,
        window_size: int | None = None,
        max_versions: int | None = None,
        max_arms: int | None = None,
    ) -> OnlineMetricsBook:
        """Rebuild from ``state_dict()``; window_size/max_versions/max_arms from the new config win when
        given (a state without max_arms, written before it existed, takes the default)."""
        try:
            book = cls(
                window_size=int(window_size if window_size is not None else state["window_size"]),
                max_versions=int(max_versions if max_versions is not None else state["max_versions"]),
                max_arms=int(max_arms if max_arms is not None else state.get("max_arms", DEFAULT_MAX_ARMS)),
            )
            for arm, versions in list(state["arms"].items())[: book.max_arms]:
                for v in sorted((int(k) for k in versions), reverse=True)[: book.max_versions]:
                    part = dict(versions[str(v)], window_size=book.window_size)
                    book._arms.setdefault(str(arm), {})[v] = BatchRollingMetrics.from_state_dict(part)
            for arm in book._arms:  # a state written before the arms' windows: they start empty
                part = state.get("all", {}).get(arm)
                book._all[arm] = (
                    BatchRollingMetrics.from_state_dict(dict(part, window_size=book.window_size))
                    if part is not None
                    else BatchRollingMetrics(book.window_size)
                )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"bad online metrics state: missing or malformed {exc}") from exc
        return book

    def bind(self, stats: EngineStats = STATS) -> Callable[[], None]:
        """Publish into ``stats``' ``rolling_*`` levels (the ``reloop_rolling_*`` gauges) before every scrape.

        Each publish replaces the levels' series with the versions kept now, so the label set stays
        bounded by arms x max_versions. Returns the hook (pass it to ``stats.remove_hook``). Scrapes
        may run at once (the exporter serves each on its own thread, and Prometheus often runs as an
        HA pair): one publish at a time, or two at once both added the same untracked samples.
        """
        untracked = stats.rolling_untracked_samples
        published = [0]
        lock = threading.Lock()
        levels = {
            "auc": stats.rolling_auc,
            "logloss": stats.rolling_logloss,
            "mean_prediction": stats.rolling_mean_prediction,
            "observed_ctr": stats.rolling_observed_ctr,
            "samples": stats.rolling_samples,
        }

        def publish() -> None:
            with lock:
                _publish()

        def _publish() -> None:
            values: dict[str, dict[tuple[str, str, str], float]] = {name: {} for name in levels}
            for row in self.report() + self.arm_report():
                key = (row["arm"], str(row["model_version"]), row["slot"])
                for name, per_key in values.items():
                    value = row[name]
                    # An undefined value (one class only, empty window) is left out rather than NaN,
                    # so alert comparisons and dashboards see no series instead of a gap-filled one.
                    if not math.isnan(value):
                        per_key[key] = value
            for name, level in levels.items():
                level.replace(values[name])
            n = self.untracked_samples
            if n > published[0]:
                untracked.add(n=n - published[0])
                published[0] = n

        stats.add_hook(publish)
        return publish
