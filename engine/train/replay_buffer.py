"""A bounded buffer of recent featurised samples that the stream trainer replays for extra passes.

Periodic retraining passes over a period's data several times; a stream passes once. The buffer keeps
the last ``capacity`` samples (a ring: the oldest is overwritten) and, after each trained batch, hands out
``ratio`` replayed samples per new one, in steps of ``batch_size`` drawn uniformly from the buffer. Each
replayed sample keeps the y_last and weight it was first trained with, so CE, KD and ReLoop mean the same
on a replay as on the first pass.

The buffer is trainer state: ``state()`` is tensors and plain numbers (it loads with
``torch.load(weights_only=True)``), and the draws depend only on (seed, draw number), so a run restored
from a snapshot replays exactly what an uninterrupted run replays. Memory is fixed once the first batch
fixes the row shape: ``nbytes`` says how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from reloop.engine.features.featurizer import FeatureBatch

_COLUMNS = ("cat", "num", "multi", "multi_mask", "labels", "y_last", "weights")


@dataclass(frozen=True, slots=True)
class ReplayDraw:
    batch: FeatureBatch
    labels: np.ndarray
    y_last: np.ndarray | None  # None when no sample of the draw has a y_last
    weights: np.ndarray | None  # None when every weight is 1


class ReplayBuffer:
    def __init__(self, capacity: int, ratio: float, batch_size: int, seed: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be > 0, got {capacity}")
        if ratio < 0:
            raise ValueError(f"replay ratio must be >= 0, got {ratio}")
        if batch_size <= 0:
            raise ValueError(f"replay batch size must be > 0, got {batch_size}")
        self.capacity = capacity
        self.ratio = float(ratio)
        self.batch_size = batch_size
        self.seed = seed
        self.size = 0  # samples held
        self.head = 0  # next slot to write
        self.debt = 0.0  # replayed samples owed
        self.draws = 0  # replay steps handed out (the RNG stream of the next draw)
        self.added = 0  # samples ever added
        self.replayed = 0  # samples ever replayed
        self._cols: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ filling
    def _allocate(self, batch: FeatureBatch) -> dict[str, np.ndarray]:
        c = self.capacity
        return {
            "cat": np.zeros((c, *batch.cat.shape[1:]), dtype=batch.cat.dtype),
            "num": np.zeros((c, *batch.num.shape[1:]), dtype=batch.num.dtype),
            "multi": np.zeros((c, *batch.multi.shape[1:]), dtype=batch.multi.dtype),
            "multi_mask": np.zeros((c, *batch.multi_mask.shape[1:]), dtype=batch.multi_mask.dtype),
            "labels": np.zeros(c, dtype=np.float32),
            "y_last": np.full(c, np.nan, dtype=np.float32),
            "weights": np.ones(c, dtype=np.float32),
        }

    def add(
        self,
        batch: FeatureBatch,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> None:
        n = len(batch)
        if n == 0:
            return
        cols = self._allocate(batch) if self._cols is None else self._cols
        values = {
            "cat": batch.cat,
            "num": batch.num,
            "multi": batch.multi,
            "multi_mask": batch.multi_mask,
            "labels": np.asarray(labels, dtype=np.float32).reshape(-1),
            "y_last": (
                np.full(n, np.nan, dtype=np.float32)
                if y_last is None
                else np.asarray(y_last, dtype=np.float32).reshape(-1)
            ),
            "weights": (
                np.ones(n, dtype=np.float32)
                if weights is None
                else np.asarray(weights, dtype=np.float32).reshape(-1)
            ),
        }
        # All checked before any slot is written: a refused batch leaves the held rows as they were.
        for k, v in values.items():
            if len(v) != n or v.shape[1:] != cols[k].shape[1:]:
                raise ValueError(
                    f"replay buffer: {k} of shape {v.shape} for {n} samples, rows of {cols[k].shape[1:]}"
                )
        self._cols = cols
        added = n  # every sample added owes its ``ratio``, also those the ring cannot keep
        if n > self.capacity:  # only the newest capacity samples can stay
            values = {k: v[n - self.capacity :] for k, v in values.items()}
            n = self.capacity
        slots = (self.head + np.arange(n)) % self.capacity
        for k, v in values.items():
            cols[k][slots] = v
        self.head = int((self.head + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)
        self.added += added
        self.debt += self.ratio * added

    def take(self) -> list[ReplayDraw]:
        """The replay steps now owed (``ratio`` per sample added so far, in whole batches)."""
        out: list[ReplayDraw] = []
        if self._cols is None or self.size == 0:
            return out
        while self.debt >= self.batch_size:
            self.debt -= self.batch_size
            # model.seed may be negative (torch's range), which numpy refuses: mod 2**64 leaves every
            # non-negative seed (and so every existing run's draws) as it was.
            rng = np.random.default_rng([self.seed % 2**64, self.draws])
            self.draws += 1
            # Positions by age (0 = oldest held), so a restored buffer, laid out oldest first, draws the
            # same samples as the ring it was saved from.
            age = np.sort(rng.integers(0, self.size, size=self.batch_size))
            slots = (self.head - self.size + age) % self.capacity
            cols = {k: v[slots] for k, v in self._cols.items()}
            y_last = cols["y_last"]
            weights = cols["weights"]
            out.append(
                ReplayDraw(
                    batch=FeatureBatch(
                        cat=cols["cat"], num=cols["num"], multi=cols["multi"], multi_mask=cols["multi_mask"]
                    ),
                    labels=cols["labels"],
                    y_last=None if np.all(np.isnan(y_last)) else y_last,
                    weights=None if np.all(weights == 1.0) else weights,
                )
            )
            self.replayed += self.batch_size
        return out

    # ------------------------------------------------------------------ bookkeeping
    @property
    def nbytes(self) -> int:
        return 0 if self._cols is None else sum(v.nbytes for v in self._cols.values())

    def counters(self) -> dict[str, int]:
        return {
            "replay_size": self.size,
            "replay_capacity": self.capacity,
            "replay_bytes": self.nbytes,
            "replay_added": self.added,
            "replayed": self.replayed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and tensors; the held rows only (oldest first), not the empty slots."""
        out: dict[str, Any] = {
            "capacity": self.capacity,
            "size": self.size,
            "debt": self.debt,
            "draws": self.draws,
            "added": self.added,
            "replayed": self.replayed,
        }
        if self._cols is not None:
            order = (self.head - self.size + np.arange(self.size)) % self.capacity
            # Row shapes travel with the rows (a buffer of 0 rows still knows them).
            out["rows"] = {k: torch.from_numpy(np.ascontiguousarray(v[order])) for k, v in self._cols.items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"replay buffer state has capacity {state['capacity']}, this trainer {self.capacity}"
            )
        self.debt = float(state["debt"])
        self.draws = int(state["draws"])
        self.added = int(state["added"])
        self.replayed = int(state["replayed"])
        self._cols = None
        self.size = 0
        self.head = 0
        rows = state.get("rows")
        if rows is not None:
            held = {k: rows[k].numpy() for k in _COLUMNS}
            n = int(state["size"])
            self._cols = {k: np.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in held.items()}
            self._cols["y_last"][:] = np.nan
            self._cols["weights"][:] = 1.0
            for k, v in held.items():
                self._cols[k][:n] = v
            self.size = n
            self.head = n % self.capacity
