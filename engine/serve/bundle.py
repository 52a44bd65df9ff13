"""The live model: an immutable (version, learner, featurizer) bundle behind one reference.

A request reads ``holder.current`` once and scores with that bundle to the end, so a hot reload
(one attribute assignment, atomic in CPython) never mixes two versions inside a request and never
makes one fail: in-flight requests finish on the old bundle, new ones get the new bundle.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from reloop.engine.events.schema import Features
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.serve.columns import ColumnFeaturizer

# One column featurizer (and so one hash memo) per feature spec, shared by the bundles of every
# version: a reload every second must not start the memo over. Bounded: the newest few specs.
_COLUMNS: dict[str, ColumnFeaturizer] = {}
_COLUMNS_KEEP = 4
_COLUMNS_LOCK = threading.Lock()


def column_featurizer(featurizer: Any) -> ColumnFeaturizer | None:
    """The shared ColumnFeaturizer of a real Featurizer's spec; None for anything else (test doubles)."""
    if type(featurizer) is not Featurizer:
        return None
    key = featurizer.spec.to_json()
    with _COLUMNS_LOCK:
        found = _COLUMNS.get(key)
        if found is None:
            found = _COLUMNS[key] = ColumnFeaturizer(featurizer.spec)
            while len(_COLUMNS) > _COLUMNS_KEEP:
                del _COLUMNS[next(iter(_COLUMNS))]
        return found


class Scorer(Protocol):
    def __call__(self, rows: Sequence[Features]) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class ModelBundle:
    """What scores a request: a snapshot version, its learner and the featurizer it was trained with."""

    version: int
    learner: Any
    featurizer: Any
    columns: ColumnFeaturizer | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.columns is None:
            object.__setattr__(self, "columns", column_featurizer(self.featurizer))

    def score(self, rows: Sequence[Features]) -> np.ndarray:
        batch = self.featurizer.transform(list(rows))
        return self._predict(batch, len(rows))

    def score_request(self, context: Mapping[str, Any], features: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Scores of ``{**context, **f}`` for each ``f``, featurised as columns (engine/serve/columns.py)."""
        if self.columns is None:
            return self.score([{**context, **f} for f in features])
        return self._predict(self.columns.transform(context, features), len(features))

    def request_batch(self, context: Mapping[str, Any], features: Sequence[Mapping[str, Any]]) -> Any:
        """The featurised rows ``{**context, **f}`` (what ``score_request`` scores), for an error memory."""
        if self.columns is None:
            return self.featurizer.transform([{**context, **f} for f in features])
        return self.columns.transform(context, features)

    def score_batch(self, batch: Any) -> np.ndarray:
        """Scores of rows featurised already (``request_batch``'s, with counter inputs filled in)."""
        return self._predict(batch, len(batch))

    def _predict(self, batch: Any, n: int) -> np.ndarray:
        probs = self.learner.predict_proba(batch)
        if hasattr(probs, "detach"):  # a torch tensor
            probs = probs.detach().cpu().numpy()
        out = np.asarray(probs, dtype=np.float64).reshape(-1)
        if out.shape[0] != n:
            raise RuntimeError(f"model v{self.version} returned {out.shape[0]} scores for {n} rows")
        return out


class ModelHolder:
    """Holds the live bundle of one arm; ``swap`` is the only writer."""

    def __init__(self, bundle: ModelBundle | None = None) -> None:
        self._bundle = bundle
        self._lock = threading.Lock()  # serialises writers only; readers never take it
        self.reloads = 0
        # The last version the reload watcher refused and why: /readyz says it while nothing is loaded.
        self.last_refusal: str | None = None

    @property
    def current(self) -> ModelBundle | None:
        return self._bundle

    @property
    def version(self) -> int | None:
        bundle = self._bundle
        return None if bundle is None else bundle.version

    def swap(self, bundle: ModelBundle, *, rollback: bool = False) -> bool:
        """Install ``bundle`` if it is newer than the live one (``rollback``: if it is another one, the
        registry's newest after newer versions were removed); returns whether it was installed."""
        with self._lock:
            live = self._bundle
            if live is not None and (
                bundle.version == live.version or (bundle.version < live.version and not rollback)
            ):
                return False
            self._bundle = bundle
            self.reloads += 1
            return True
