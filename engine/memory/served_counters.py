"""Click counters of one serving arm: each scored candidate gets its counter inputs, as the model was
trained on them (``model.counters``; engine/features/counters.py).

* Scoring (request threads): ``fill`` writes each row's counter values into the featurised request's
  dense columns of the counter inputs (the model's spec names them), and, with ``shown_from:
  requests``, ``count_shown`` counts the impressions the arm shows. The service logs the values with
  each impression, so the join stage and the trainer see exactly what was served: nothing is
  recomputed downstream, and replaying the logged topics replays them too.
* Clicks (the samples feed's thread, engine/memory/feed.py): every positive of the arm's samples topic
  is counted when it is read, weighing in counts that forget what its impression weighs then. Negatives
  are never counted (their impressions were counted when shown).
* Shown items, with ``shown_from: impressions`` (the default): not counted by the request path but by
  the same feed, from the arm's impression log read back from Kafka (``count_logged``), so that every
  worker and replica of the arm counts every impression any of them showed. The price is the log's round trip
  (the producer's linger, the feed's poll: tens of milliseconds) before an impression counts; the
  backtests never count an event's own second anyway (engine/features/counters.py).
* Time is the service's clock (wall time): the feed has no other clock for a click's arrival, and the
  same clock ages shown and clicked counts alike.
* Counts are kept per hash bucket of the counted fields of the live model's spec. A snapshot whose spec
  lays those fields out alike keeps them; another layout starts them afresh (logged, counted in
  ``resets``): its ids are other rows.
* ``save``/``load``: one ``.npz`` (numpy arrays only, read with ``allow_pickle=False``) with the counts,
  the feed's positions and the samples it counted (their identities: a re-emitted click counts once).
  The counts of one arm must see every impression that arm shows: an arm counting its requests is
  served by one process (serve's ``workers: 1``); one counting its impression log by any number, which
  may share one state file (each save is one process's whole state, counts with the positions they
  reached, and every process counts the same records).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from reloop.engine.appending import replace_whole
from reloop.engine.features.counters import (
    ClickCounters,
    CounterError,
    CounterSettings,
    counter_field_names,
    counter_layout,
)
from reloop.engine.features.featurizer import FeatureBatch
from reloop.engine.memory.seen import SeenSeqs

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class CounterInputsMissing(CounterError):
    """The live model's spec lacks some counter inputs: it was trained without the arm's counters."""


# Counter inputs a message names one by one; more are named by field, with how many each has.
NAMED_INPUTS = 12


def describe_inputs(names: Sequence[str]) -> str:
    """Counter inputs (``FIELD#ctr``, ``FIELD#seen@600s`` ...) for a message, every one of them: their
    list, or past ``NAMED_INPUTS`` their fields with how many inputs of each."""
    if len(names) <= NAMED_INPUTS:
        return str(list(names))
    per_field: dict[str, int] = {}
    for name in names:
        field = name.rsplit("#", 1)[0]  # (the suffix holds no '#': counter_field_names)
        per_field[field] = per_field.get(field, 0) + 1
    fields = ", ".join(f"{field} ({n})" for field, n in per_field.items())
    return f"of the fields {fields}, {len(names)} in all"


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ServedCounters:
    """Thread-safe: requests read and count shown items while the feed thread counts clicks."""

    def __init__(self, settings: CounterSettings, clock_ms: Callable[[], int] = _wall_ms) -> None:
        self.settings = settings
        # Count shown items on the request path (else the feed counts them from the impression log).
        self.counts_requests = getattr(settings, "shown_from", "requests") == "requests"
        self.clock_ms = clock_ms
        self.names = counter_field_names(settings.fields, settings.windows_s)
        self.counters: ClickCounters | None = None
        self.version: int | None = None  # the model version the feed last checked (engine/memory/feed.py)
        self.positions: dict[str, int] = {}
        self.seen = SeenSeqs()  # the feed's: samples counted already (engine/memory/seen.py)
        self.written = 0  # clicks counted
        self.shown = 0  # impressions counted
        self.rekeys = 0
        self.resets = 0
        self._spec: Any = None  # the spec the counts were last checked against
        self._pending: dict[str, Any] | None = None  # loaded counts, kept until a spec lays them out
        # (spec, which of names it reads, their dense columns in it)
        self._columns: tuple[Any, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ request path
    def columns(self, spec: Any) -> tuple[np.ndarray, np.ndarray]:
        """Which of the arm's counter inputs ``spec`` reads (indices into ``names``) and their dense
        columns in it. A model may read fewer than the arm counts (a field or window given to the arm
        first, then to the trainer: docs/models.md); one that reads none was trained without the arm's
        counters (``CounterInputsMissing``), and would score without them."""
        cached = self._columns
        if cached is not None and cached[0] is spec:
            return cached[1], cached[2]
        dense = {f.name: i for i, f in enumerate(spec.dense_fields)}
        read = [k for k, n in enumerate(self.names) if n in dense]
        if not read:
            raise CounterInputsMissing(
                f"the model's spec lacks the counter inputs {describe_inputs(self.names)}: train it with "
                "model.counters set as this arm's counters"
            )
        which = np.array(read, dtype=np.int64)
        cols = np.array([dense[self.names[k]] for k in read], dtype=np.int64)
        self._columns = (spec, which, cols)
        return which, cols

    def refusal(self, spec: Any) -> str | None:
        """Why no request is scored with a model of ``spec`` (``columns``' refusal: it lacks counter
        inputs), or None: the service's readiness (``/readyz``) asks, so no replica refusing every
        request is routed any."""
        try:
            self.columns(spec)
        except CounterInputsMissing as exc:
            return str(exc)
        return None

    def fill(self, spec: Any, batch: FeatureBatch, now_ms: float) -> np.ndarray:
        """Write each row's counter values into ``batch``'s dense columns; returns them [B, inputs]."""
        which, cols = self.columns(spec)
        with self._lock:
            values = self._ready(spec).values(batch, now_ms)
        batch.num[:, cols] = values[:, which]
        return values

    def count_shown(self, spec: Any, batch: FeatureBatch, now_ms: float) -> None:
        """Count impressions when they are shown (``batch``: their featurised rows)."""
        with self._lock:
            self._ready(spec).count_shown(batch, now_ms)
            self.shown += len(batch)

    def count_logged(self, bundle: Any, batch: FeatureBatch) -> None:
        """Count impressions read back from the arm's impression log (the feed's thread), now."""
        self.count_shown(bundle.featurizer.spec, batch, float(self.clock_ms()))

    def _ready(self, spec: Any) -> ClickCounters:
        """The counts for ``spec``'s layout (under the lock): built on first use, anew for another one."""
        counters = self.counters
        if counters is not None and spec is self._spec:
            return counters
        s = self.settings
        if counters is not None and counter_layout(spec, s.fields) == counters.layout:
            self._spec = spec
            return counters
        fresh = ClickCounters(spec, s.fields, s.prior_strength, s.windows_s)  # CounterError: not in the spec
        if counters is not None:
            self.resets += 1
            log.warning("counters: the model's spec lays out %s otherwise; counts start anew", list(s.fields))
        elif self._pending is not None:
            try:
                fresh.load_state_dict(self._pending)
            except CounterError as exc:
                log.error("counters: saved counts refused (%s); starting empty", exc)
        self._pending = None
        self.counters, self._spec = fresh, spec
        return fresh

    # ------------------------------------------------------------------ feed path
    def rekey(self, bundle: Any) -> None:
        """A new model version: check its spec reads the counters (counts kept if it lays them out alike)."""
        spec = bundle.featurizer.spec
        with self._lock:
            self._ready(spec)
            self.version = bundle.version
        self.rekeys += 1

    def write(
        self, bundle: Any, batch: FeatureBatch, labels: np.ndarray, times_ms: np.ndarray | None = None
    ) -> None:
        """Count the clicks among joined samples now (``times_ms``: when each impression was shown)."""
        clicked = np.flatnonzero(np.asarray(labels) > 0)
        if not len(clicked):
            return
        shown_ms = None if times_ms is None else np.asarray(times_ms, dtype=np.float64)[clicked]
        now = float(self.clock_ms())
        spec = bundle.featurizer.spec
        with self._lock:
            self._ready(spec).count_clicks(batch.take(clicked), np.ones(len(clicked)), now, shown_ms)
            self.written += len(clicked)

    # ------------------------------------------------------------------ state
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the counts and positions atomically (temporary file, then rename)."""
        with self._lock:
            state = self.counters.state_dict() if self.counters is not None else self._pending
            arrays: dict[str, np.ndarray] = {
                "format": np.array(STATE_FORMAT),
                "position_keys": np.array(sorted(self.positions), dtype=np.str_),
                "position_values": np.array([self.positions[k] for k in sorted(self.positions)], np.int64),
                **self.seen.arrays(),
            }
            if state is not None:
                arrays.update(
                    {
                        "fields": np.array(state["fields"], dtype=np.str_),
                        "prior_strength": np.array(float(state["prior_strength"])),
                        "windows_s": np.array(state["windows_s"], dtype=np.float64),
                        "shown": np.asarray(state["shown"], np.float64).copy(),
                        "clicked": np.asarray(state["clicked"], np.float64).copy(),
                        "stamp_ms": np.asarray(state["stamp_ms"], np.float64).copy(),
                        "totals": np.array([state["total_shown"], state["total_clicked"]], np.float64),
                    }
                )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        replace_whole(Path(path), lambda f: np.savez(f, **arrays))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a ``save``d state (no pickle). An unreadable file or one of other settings is a
        ValueError, so the caller can start empty; the counts are laid out by the first model's spec."""
        try:
            with np.load(path, allow_pickle=False) as f:
                a: Mapping[str, np.ndarray] = {k: f[k] for k in f.files}
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - EOFError, BadZipFile...: all "unreadable"
            raise ValueError(f"counters state {path} is unreadable ({type(exc).__name__}: {exc})") from exc
        try:
            if int(a["format"]) != STATE_FORMAT:
                raise ValueError(f"counters state {path}: format {int(a['format'])}, expected {STATE_FORMAT}")
            positions = dict(zip(a["position_keys"].tolist(), a["position_values"].tolist(), strict=True))
            state = None
            if "fields" in a:
                state = {
                    "fields": a["fields"].tolist(),
                    "prior_strength": float(a["prior_strength"]),
                    "windows_s": a["windows_s"].tolist(),
                    "shown": a["shown"],
                    "clicked": a["clicked"],
                    "stamp_ms": a["stamp_ms"],
                    "total_shown": float(a["totals"][0]),
                    "total_clicked": float(a["totals"][1]),
                }
                s = self.settings
                theirs = (state["fields"], state["prior_strength"], [float(w) for w in state["windows_s"]])
                ours = (list(s.fields), s.prior_strength, list(s.windows_s))
                if theirs != ours:
                    raise ValueError(f"counters state {path} holds counts of {theirs}, not of {ours}")
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"counters state {path} is malformed ({type(exc).__name__}: {exc})") from exc
        with self._lock:
            self.positions = positions
            self.seen.load_arrays(a)
            self.counters, self._spec, self._pending = None, None, state
