"""Click counters: real-time count features of a field's values, for a model that learns in batches.

A per-event learner adapts to a user within a burst of their events; a deep model that learns in
batches of 512 scores the whole burst before it has learned any of it (docs/backtest/ablation.md).
Production rankers close that gap with features rather than with per-event updates: counters of how
often a user (an item, ...) was shown and clicked, read at serve time. The model learns in batches what a
click rate means; the counter makes each score as fresh as the last label. Unlike a per-event learner
they do not learn from the order labels arrive in: an impression is counted when it is shown and a click
when it arrives, and a negative is never counted at all, so the join window's late negatives do not
bias them (a click still on its way reads as not yet clicked, as it does at serve time).

Each counted field gets two dense inputs per set of counts, appended to the feature spec as numeric
fields:

* ``FIELD#ctr``: the logit of the value's smoothed click rate, ``(clicks + m * p) / (shown + m)``, where
  ``p`` is the click rate of every counted event so far and ``m`` the prior strength (a value seen
  rarely reads close to the overall rate);
* ``FIELD#seen``: ``log1p(shown) * SEEN_SCALE``, how much that rate is worth.

The lifetime counts keep everything; each time constant in ``windows_s`` adds counts that forget
(``FIELD#ctr@600s``, ``FIELD#seen@600s``: a count 600 s old weighs 1/e), which follow a user's last
few minutes. Counts are kept per hash bucket of the field (the same rows as its embedding), so memory
is bounded by the spec's buckets and values that collide share their counts, as they share an
embedding row.

A cross ``A*B`` counts pairs: a categorical field ``A`` (a user) with a categorical or multi-valued field
``B`` (an item's genres), so that a user's rate on each genre follows what they clicked of it. Pairs are
hashed into ``CROSS_BUCKETS`` cells; a row with several values of ``B`` counts one showing (and click) in
each of its pairs and reads the mean of its pairs' inputs (a row without any: the prior, nothing seen).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from reloop.engine.features.spec import CategoricalField, FeatureSpec, NumericField

SEEN_SCALE = 0.2  # keeps a few thousand sightings near 1, the scale of the other dense inputs
_CROSS_BITS = 18
CROSS_BUCKETS = 1 << _CROSS_BITS  # cells of a cross's pairs: 2 MB per set of counts


class CounterError(ValueError):
    """A counted field the spec does not have as a categorical field, or a setting out of range."""


class CounterSettings(BaseModel):
    """What is counted and how (``model.counters`` of a trainer, ``arms[].counters`` of a serving arm):
    the two must agree, since the model learns the values the arm serves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fields: tuple[str, ...] = Field(
        min_length=1, description="categorical fields of the spec to count, or crosses A*B (user_id*genres)"
    )
    prior_strength: float = Field(default=5.0, gt=0, allow_inf_nan=False, description="m of the rate")
    windows_s: tuple[float, ...] = Field(
        default=(), description="time constants (s) of counts that forget, one set of inputs each"
    )

    @field_validator("fields")
    @classmethod
    def _distinct_fields(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v) or not all(v):
            raise ValueError(f"expected distinct non-empty field names, got {list(v)}")
        return v

    @field_validator("windows_s")
    @classmethod
    def _windows(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < w < float("inf") for w in v) or len(set(v)) != len(v):
            raise ValueError(f"windows must be distinct, finite and > 0 seconds, got {list(v)}")
        return v

    def settings(self) -> CounterSettings:
        """The counting settings alone (of an arm's counters: without its topic and state file)."""
        return CounterSettings(
            fields=self.fields, prior_strength=self.prior_strength, windows_s=self.windows_s
        )


def counter_field_names(fields: Sequence[str], windows_s: Sequence[float] = ()) -> list[str]:
    """The names of the dense inputs counters of ``fields`` add, in the order of their values' columns."""
    names = []
    for field in fields:
        for window in ("", *(f"@{w:g}s" for w in windows_s)):
            names += [f"{field}#ctr{window}", f"{field}#seen{window}"]
    return names


_INPUT_NAME = re.compile(r".+#(ctr|seen)(@[^#@]+s)?")  # as counter_field_names names them


def counter_inputs(spec: FeatureSpec) -> list[str]:
    """The dense fields of ``spec`` named as click-counter inputs (``FIELD#ctr``, ``FIELD#seen@600s``):
    those a serving arm must fill, or the model scores zeros in their place."""
    return [f.name for f in spec.dense_fields if _INPUT_NAME.fullmatch(f.name)]


def with_counter_fields(spec: FeatureSpec, settings: CounterSettings) -> FeatureSpec:
    """``spec`` with the dense inputs of ``settings``' counters appended: those it lacks, so a spec that
    has them already (a snapshot's) comes back unchanged. Refuses counted fields the spec has not as
    categorical fields, and a field of a counter input's name that is not a plain numeric one."""
    ClickCounters(spec, settings.fields, settings.prior_strength, settings.windows_s)  # checks the fields
    have = {f.name: f for f in spec.fields}
    added = []
    for name in counter_field_names(settings.fields, settings.windows_s):
        field = have.get(name)
        if field is None:
            added.append(NumericField(name=name))
        elif not isinstance(field, NumericField) or field.transform != "identity":
            raise CounterError(f"counters: the spec's field {name!r} is not a numeric field with transform "
                               "identity, so it cannot carry the counter input of that name")  # fmt: skip
    return spec if not added else FeatureSpec(fields=(*spec.fields, *added), version=spec.version)


Ids = Any  # FeatureBatch (anything with cat, multi, multi_mask), or its cat array alone


class _Key:
    """Where a counted key's cells are in a featurised batch: a categorical field's bucket, or for a cross
    ``A*B`` the hashed pair of A's bucket with each of B's (``cells`` then gives [B, L] and a mask)."""

    def __init__(self, spec: FeatureSpec, name: str) -> None:
        self.name = name
        parts = name.split("*")
        if len(parts) > 2 or not all(parts):
            raise CounterError(f"counters: {name!r}: a field, or a cross of two fields A*B")
        self.a = self._cat(spec, parts[0])
        self.b: tuple[str, int, int, int] | None = None
        if len(parts) == 2:
            names = [f.name for f in spec.multi_fields]
            if parts[1] in names:
                j = names.index(parts[1])
                self.b = ("multi", j, spec.multi_offsets[j], spec.multi_fields[j].buckets)
            else:
                self.b = ("cat", *self._cat(spec, parts[1]))
        self.buckets = self.a[2] if self.b is None else CROSS_BUCKETS
        self.layout = (self.a, self.b)  # counts laid out by one spec fit another of the same layout

    @staticmethod
    def _cat(spec: FeatureSpec, name: str) -> tuple[int, int, int]:
        j = next((i for i, f in enumerate(spec.cat_fields) if f.name == name), None)
        if j is None or not isinstance(spec.cat_fields[j], CategoricalField):
            known = ", ".join(f.name for f in spec.cat_fields if isinstance(f, CategoricalField))
            raise CounterError(f"counters: {name!r} is not a categorical field of the spec ({known})")
        return j, spec.cat_offsets[j], spec.cat_fields[j].buckets

    def cells(self, ids: Ids) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows' cells ([B]; a cross: [B, L]) and which are real ([B, L] bool; None: all)."""
        cat = ids if isinstance(ids, np.ndarray) else ids.cat
        col, off, _ = self.a
        a = cat[:, col] - off
        if self.b is None:
            return a, None
        kind, j, off_b, _ = self.b
        if kind == "cat":
            b, mask = (cat[:, j] - off_b)[:, None], None
        else:
            if isinstance(ids, np.ndarray):
                raise CounterError(f"counters: {self.name!r} counts a multi-valued field: pass the batch")
            b, mask = ids.multi[:, j, :] - off_b, ids.multi_mask[:, j, :] > 0
        # multiplicative hashing of the pair: the top bits of 64-bit products (they wrap by design)
        pair = (a.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)) ^ (
            b.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        cells = (pair * np.uint64(0xFF51AFD7ED558CCD)) >> np.uint64(64 - _CROSS_BITS)
        return cells.astype(np.int64), mask


class _Counts:
    """Shown and clicked counts per bucket of one key; with ``tau_s`` they forget with that time
    constant (each count weighs ``exp(-age / tau_s)``), else they keep everything."""

    def __init__(self, key: _Key, tau_s: float | None) -> None:
        self.key, self.tau_s = key, tau_s
        self.shown = np.zeros(key.buckets)
        self.clicked = np.zeros(key.buckets)
        self.stamp_ms = np.zeros(key.buckets) if tau_s else None  # when each bucket's counts were last aged

    def read(self, rows: np.ndarray, now_ms: float) -> tuple[np.ndarray, np.ndarray]:
        shown, clicked = self.shown[rows], self.clicked[rows]
        if self.stamp_ms is not None:
            kept = self._kept(self.stamp_ms[rows], now_ms)
            shown, clicked = shown * kept, clicked * kept
        return shown, clicked

    def add(
        self,
        rows: np.ndarray,
        now_ms: float,
        shown: float,
        clicked: np.ndarray | None,
        shown_ms: np.ndarray | None = None,
    ) -> None:
        if self.stamp_ms is not None:  # age the touched buckets to now, so the new counts weigh 1
            touched = np.unique(rows)
            kept = self._kept(self.stamp_ms[touched], now_ms)
            self.shown[touched] *= kept
            self.clicked[touched] *= kept
            self.stamp_ms[touched] = np.maximum(self.stamp_ms[touched], now_ms)
            if clicked is not None and shown_ms is not None:
                # a click weighs what its impression weighs now: never more clicks than showings
                clicked = clicked * self._kept(shown_ms, now_ms)
        if shown:
            np.add.at(self.shown, rows, shown)
        if clicked is not None:
            np.add.at(self.clicked, rows, clicked)

    def _kept(self, stamp_ms: np.ndarray, now_ms: float) -> np.ndarray:
        assert self.tau_s is not None
        return np.exp(-np.maximum(now_ms - stamp_ms, 0.0) / (1000.0 * self.tau_s))


class ClickCounters:
    """Shown and clicked counts per hash bucket of each counted field, and the features they make: for
    each field, lifetime counts and one more pair of counts per time constant in ``windows_s``."""

    def __init__(
        self,
        spec: FeatureSpec,
        fields: Sequence[str],
        prior_strength: float = 5.0,
        windows_s: Sequence[float] = (),
    ) -> None:
        if not prior_strength > 0:
            raise CounterError(f"counters: prior strength must be > 0, got {prior_strength:g}")
        if len(set(fields)) != len(fields) or not fields:
            raise CounterError(f"counters: expected distinct field names, got {list(fields)}")
        if any(not w > 0 for w in windows_s) or len(set(windows_s)) != len(windows_s):
            raise CounterError(f"counters: windows must be distinct and > 0 seconds, got {list(windows_s)}")
        self.fields = tuple(fields)
        self.prior_strength = float(prior_strength)
        self.windows_s = tuple(float(w) for w in windows_s)
        self._keys = [_Key(spec, name) for name in self.fields]
        self._groups = [(key, [_Counts(key, tau) for tau in (None, *self.windows_s)]) for key in self._keys]
        self._counts = [c for _, counts in self._groups for c in counts]  # in the order of values' columns
        self.total_shown = 0.0
        self.total_clicked = 0.0

    @property
    def n_columns(self) -> int:
        return 2 * len(self._counts)

    def spec_fields(self) -> tuple[NumericField, ...]:
        """The dense fields the counters add to a spec, in the order of ``values``' columns."""
        return tuple(NumericField(name=n) for n in counter_field_names(self.fields, self.windows_s))

    @property
    def layout(self) -> tuple[Any, ...]:
        """Where the counted keys live in the spec: counts fit any spec of the same layout."""
        return tuple(key.layout for key in self._keys)

    def values(self, ids: Ids, now_ms: float = 0.0) -> np.ndarray:
        """float32 [B, n_columns]: the features of a batch's rows (a FeatureBatch, or its ``cat`` where
        no cross counts a multi-valued field) as counted at ``now_ms`` (only the counts that forget
        depend on it)."""
        out = np.empty((_rows(ids), self.n_columns), dtype=np.float32)
        prior = (min(self.total_clicked, self.total_shown) + 1.0) / (self.total_shown + 2.0)
        cells = {id(key): key.cells(ids) for key in self._keys}
        for k, counts in enumerate(self._counts):
            rows, mask = cells[id(counts.key)]
            shown, clicked = counts.read(rows, now_ms)
            out[:, 2 * k], out[:, 2 * k + 1] = rate_inputs(shown, clicked, prior, self.prior_strength, mask)
        return out

    @property
    def count_sets(self) -> list[tuple[_Key, list[_Counts]]]:
        """Each counted key with its sets of counts (lifetime first, then one per window), in the order
        of ``values``' columns."""
        return self._groups

    def count_shown(self, ids: Ids, now_ms: float = 0.0) -> None:
        """Count a batch of impressions when they are shown."""
        for key, counts in self._groups:
            rows, _, _ = self._flat(key, ids, None, None)
            for c in counts:
                c.add(rows, now_ms, 1.0, None)
        self.total_shown += _rows(ids)

    def count_clicks(
        self, ids: Ids, clicks: np.ndarray, now_ms: float = 0.0, shown_ms: np.ndarray | None = None
    ) -> None:
        """Count the clicks of a batch of impressions when they arrive (0 rows count nothing). With
        ``shown_ms``, when each impression was shown, a click weighs in counts that forget what its
        impression weighs now, so they never hold more clicks than showings; without, it weighs 1."""
        clicks = np.asarray(clicks, dtype=np.float64)
        for key, counts in self._groups:
            rows, weights, times = self._flat(key, ids, clicks, shown_ms)
            for c in counts:
                c.add(rows, now_ms, 0.0, weights, times)
        self.total_clicked += float(np.sum(clicks))

    @staticmethod
    def _flat(
        key: _Key, ids: Ids, clicks: np.ndarray | None, shown_ms: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The key's cells of ``ids`` as one flat array (a cross: its real pairs), each row's click and
        time repeated alike."""
        rows, mask = key.cells(ids)
        if rows.ndim == 1:
            return rows, clicks, shown_ms
        real = np.ones(rows.shape, bool) if mask is None else mask

        def spread(x: np.ndarray | None) -> np.ndarray | None:
            return None if x is None else np.broadcast_to(np.asarray(x)[:, None], rows.shape)[real]

        return rows[real], spread(clicks), spread(shown_ms)

    def state_dict(self) -> dict[str, Any]:
        return {
            "fields": list(self.fields),
            "prior_strength": self.prior_strength,
            "windows_s": list(self.windows_s),
            "shown": np.concatenate([c.shown for c in self._counts]),
            "clicked": np.concatenate([c.clicked for c in self._counts]),
            "stamp_ms": np.concatenate([c.stamp_ms for c in self._counts if c.stamp_ms is not None] or [[]]),
            "total_shown": self.total_shown,
            "total_clicked": self.total_clicked,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        setting = (
            list(state["fields"]),
            float(state["prior_strength"]),
            [float(w) for w in state["windows_s"]],
        )
        if setting != (list(self.fields), self.prior_strength, list(self.windows_s)):
            raise CounterError(
                f"counters: state of fields {setting[0]} (prior {setting[1]:g}, windows {setting[2]}) does "
                f"not fit counters of {list(self.fields)} (prior {self.prior_strength:g}, windows "
                f"{list(self.windows_s)})"
            )
        shown, clicked = np.asarray(state["shown"], float), np.asarray(state["clicked"], float)
        stamps = np.asarray(state["stamp_ms"], float)
        sizes = [c.shown.shape[0] for c in self._counts]
        timed = sum(n for n, c in zip(sizes, self._counts, strict=True) if c.stamp_ms is not None)
        if shown.shape != (sum(sizes),) or clicked.shape != shown.shape or stamps.shape != (timed,):
            raise CounterError(f"counters: state of {shown.shape[0]} buckets, expected {sum(sizes)}")
        at = stamp_at = 0
        for c, n in zip(self._counts, sizes, strict=True):
            c.shown, c.clicked = shown[at : at + n].copy(), clicked[at : at + n].copy()
            at += n
            if c.stamp_ms is not None:
                c.stamp_ms = stamps[stamp_at : stamp_at + n].copy()
                stamp_at += n
        self.total_shown = float(state["total_shown"])
        self.total_clicked = float(state["total_clicked"])


def rate_inputs(
    shown: np.ndarray, clicked: np.ndarray, prior: float | np.ndarray, m: float, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The two inputs (``#ctr``, ``#seen``) of counts read for a batch's rows, [B] each, from counts of
    [B], or of a cross's [B, L] pairs (averaged over the real ones, ``mask``; None: all; a row without
    any: the prior, not seen). ``prior``: the overall rate, one or one per row."""
    p = prior if np.ndim(prior) == 0 else np.asarray(prior).reshape(-1, *([1] * (shown.ndim - 1)))
    # never more clicks than showings (here and in the prior): a click whose impression was counted
    # elsewhere (before a restart, say) must not make a rate of 1, whose logit is not finite
    rate = (np.minimum(clicked, shown) + m * p) / (shown + m)
    logit, seen = np.log(rate / (1.0 - rate)), np.log1p(shown) * SEEN_SCALE
    if shown.ndim == 2:  # a cross: the mean over the row's real pairs
        real = np.ones(shown.shape, bool) if mask is None else mask
        count = real.sum(axis=1)
        empty = np.log(np.asarray(prior) / (1.0 - np.asarray(prior)))
        with np.errstate(invalid="ignore", divide="ignore"):
            logit = np.where(count > 0, (logit * real).sum(axis=1) / count, empty)
            seen = np.where(count > 0, (seen * real).sum(axis=1) / count, 0.0)
    return logit, seen


def counter_layout(spec: FeatureSpec, fields: Sequence[str]) -> tuple[Any, ...]:
    """Where counters of ``fields`` live in ``spec`` (``ClickCounters.layout`` of such counters)."""
    return tuple(_Key(spec, name).layout for name in fields)


def _rows(ids: Ids) -> int:
    return int((ids if isinstance(ids, np.ndarray) else ids.cat).shape[0])
