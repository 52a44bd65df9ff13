"""The error memory inside the streaming backtest (engine/replay/backtest.py, ``RunSpec.memory``).

Per mini-batch: each memory corrects the base prediction of the batch, then the batch's residuals
(label - base prediction) are written ("predict with memory, then write"). The base model is one of:

* ``live``: the learner itself (what the streaming protocol scores): keyed by its hidden layer read
  BEFORE the batch is learned, i.e. the state that scores the batch;
* ``snapshot``: the frozen snapshot of the previous period boundary, i.e. what ``reloop serve`` would
  be serving; its own predictions are reported too (``<strategy>+snapshot``), and the memory is emptied
  at every new snapshot (its residuals belong to the old one), as in serving.

The memory never touches training, so every variant of a run shares one base model and their
differences against it are exactly paired. Variants that differ only in ``lam`` share one sketch
(lam acts at read time only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from reloop.engine.features.featurizer import FeatureBatch
from reloop.engine.memory.sketch import ErrorSketch, SketchConfig


@dataclass(frozen=True, slots=True)
class MemorySpec:
    """One sketch layout evaluated at several ``lams``; ``reset``: empty it at every period boundary
    (a new snapshot, as serving does) or never."""

    n_tables: int = 4
    n_bits: int = 8
    prior_count: float = 0.0
    form: Literal["residual", "label"] = "residual"
    lams: tuple[float, ...] = (0.3,)
    reset: Literal["snapshot", "never"] = "snapshot"
    key: Literal["live", "snapshot"] = "live"
    seed: int = 0

    def __post_init__(self) -> None:
        # Fail here, naming the key: a bad layout failed only at the backtest's first batch, and a lam
        # outside [0, 1] (or none at all) was never refused.
        for key, value, allowed in (
            ("form", self.form, ("residual", "label")),
            ("reset", self.reset, ("snapshot", "never")),
            ("key", self.key, ("live", "snapshot")),
        ):
            if value not in allowed:
                raise ValueError(f"memory {key} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.lams or not all(isinstance(x, int | float) and 0.0 <= x <= 1.0 for x in self.lams):
            raise ValueError(f"memory lams must be one or more numbers in [0, 1], got {self.lams!r}")
        SketchConfig(n_tables=self.n_tables, n_bits=self.n_bits, prior_count=self.prior_count, form=self.form)
        if self.key == "snapshot" and self.reset != "snapshot":
            raise ValueError("a memory of the snapshot's errors must be reset with each new snapshot")

    def label(self, lam: float) -> str:
        tag = f"{'snapshot+' if self.key == 'snapshot' else ''}mem{self.n_tables}x{self.n_bits}"
        if self.prior_count:
            tag += f"p{self.prior_count:g}"
        if self.form != "residual":
            tag += f"-{self.form}"
        if self.reset != "snapshot":
            tag += f"-{self.reset}"
        return f"{tag}@{lam:g}"


class StreamMemory:
    """Runs every MemorySpec of a run alongside the learner; ``rows`` adds one row per (spec, lam)."""

    def __init__(self, specs: tuple[MemorySpec, ...]) -> None:
        self.specs = specs
        self._sketches: dict[int, ErrorSketch] = {}
        self._keys: dict[str, np.ndarray] = {}
        self._snapshot_base: np.ndarray | None = None
        self._probs: list[list[np.ndarray]] = []  # per spec, per lam: corrected probs of the period
        self._served: np.ndarray = np.empty(0)  # the snapshot's own predictions of the period
        self._has_snapshot = False
        self._uses = {s.key for s in specs}

    def start_period(self, n: int) -> None:
        self._probs = [[np.empty(n) for _ in s.lams] for s in self.specs]
        self._served = np.empty(n)

    def _sketch(self, i: int, dim: int) -> ErrorSketch:
        found = self._sketches.get(i)
        if found is None:
            s = self.specs[i]
            config = SketchConfig(
                n_tables=s.n_tables, n_bits=s.n_bits, prior_count=s.prior_count, form=s.form, seed=s.seed
            )
            found = self._sketches[i] = ErrorSketch(dim, config)
        return found

    def before(self, batch: FeatureBatch, learner: Any, snapshot: Any | None) -> None:
        """Read the keys (and the snapshot's base predictions) of a batch before it is learned."""
        n = len(batch)
        if "live" in self._uses:
            self._keys["live"] = np.asarray(learner.hidden(batch), dtype=np.float32).reshape(n, -1)
        self._has_snapshot = snapshot is not None
        if "snapshot" in self._uses and snapshot is not None:
            self._keys["snapshot"] = np.asarray(snapshot.hidden(batch), dtype=np.float32).reshape(n, -1)
            self._snapshot_base = np.asarray(snapshot.predict_proba(batch), dtype=np.float64)

    def after(self, where: slice, labels: np.ndarray, live_base: np.ndarray) -> None:
        """Correct each memory's base prediction of the batch, then write the batch's residuals."""
        y = np.asarray(labels, dtype=np.float64)
        for i, (spec, out) in enumerate(zip(self.specs, self._probs, strict=True)):
            if spec.key == "snapshot":
                if not self._has_snapshot:
                    continue  # period 0: nothing is serving yet (and it is not reported)
                assert self._snapshot_base is not None
                base = self._snapshot_base
                self._served[where] = base
            else:
                base = np.asarray(live_base, dtype=np.float64)
            keys = self._keys[spec.key]
            sketch = self._sketch(i, keys.shape[1])
            sums = sketch.read(keys)
            for lam, probs in zip(spec.lams, out, strict=True):
                probs[where] = sketch.apply(base, *sums, lam=lam)
            sketch.write(keys, y, base)

    def on_snapshot(self) -> None:
        for i, sketch in self._sketches.items():
            if self.specs[i].reset == "snapshot":
                sketch.reset()

    def variants(self) -> list[tuple[str, np.ndarray]]:
        """(label, probs of the period): the snapshot's own (when a spec uses it), then per spec and lam."""
        out = [("snapshot", self._served)] if "snapshot" in self._uses else []
        return out + [
            (spec.label(lam), probs)
            for spec, per_lam in zip(self.specs, self._probs, strict=True)
            for lam, probs in zip(spec.lams, per_lam, strict=True)
        ]
