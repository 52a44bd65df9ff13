"""The live model: an immutable (version, learner, featurizer) bundle behind one reference.

A request reads ``holder.current`` once and scores with that bundle to the end, so a hot reload
(one attribute assignment, atomic in CPython) never mixes two versions inside a request and never
makes one fail: in-flight requests finish on the old bundle, new ones get the new bundle.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from engine.events.schema import Features


class Scorer(Protocol):
    def __call__(self, rows: Sequence[Features]) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class ModelBundle:
    """What scores a request: a snapshot version, its learner and the featurizer it was trained with."""

    version: int
    learner: Any
    featurizer: Any

    def score(self, rows: Sequence[Features]) -> np.ndarray:
        batch = self.featurizer.transform(list(rows))
        probs = self.learner.predict_proba(batch)
        if hasattr(probs, "detach"):  # a torch tensor
            probs = probs.detach().cpu().numpy()
        out = np.asarray(probs, dtype=np.float64).reshape(-1)
        if out.shape[0] != len(rows):
            raise RuntimeError(f"model v{self.version} returned {out.shape[0]} scores for {len(rows)} rows")
        return out


class ModelHolder:
    """Holds the live bundle of one arm; ``swap`` is the only writer."""

    def __init__(self, bundle: ModelBundle | None = None) -> None:
        self._bundle = bundle
        self._lock = threading.Lock()  # serialises writers only; readers never take it
        self.reloads = 0

    @property
    def current(self) -> ModelBundle | None:
        return self._bundle

    @property
    def version(self) -> int | None:
        bundle = self._bundle
        return None if bundle is None else bundle.version

    def swap(self, bundle: ModelBundle) -> bool:
        """Install ``bundle`` if it is newer than the live one; returns whether it was installed."""
        with self._lock:
            live = self._bundle
            if live is not None and bundle.version <= live.version:
                return False
            self._bundle = bundle
            self.reloads += 1
            return True
