"""Which joined samples a serving arm's feed has written already: the highest seq per join task numbering.

A join task resumed from its checkpoint emits again, with the same ``(task, incarnation, seq)`` identity,
the samples it had emitted after that checkpoint (engine/events/sample_batch.py). The train stage drops
them by that identity; a serving arm's feed (engine/memory/feed.py) does the same, so a click re-emitted
after a join crash is not counted twice, nor written twice into an error memory. Saved with the target's
state (two arrays), so a restarted service keeps dropping them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from reloop.engine.events.sample_batch import SampleBatch

KEPT = 4096  # numberings remembered: far more than join tasks x restarts; the oldest is forgotten first


class SeenSeqs:
    def __init__(self) -> None:
        self.highest: dict[str, int] = {}  # "task/incarnation" -> highest seq written, oldest first

    @staticmethod
    def _key(batch: SampleBatch) -> str:
        return f"{batch.task}/{batch.incarnation}"

    def new_rows(self, batch: SampleBatch) -> np.ndarray:
        """Which rows of ``batch`` were not written before (bool per row)."""
        return batch.seqs() > self.highest.get(self._key(batch), -1)

    def mark(self, batch: SampleBatch) -> None:
        """Remember ``batch``'s rows as written."""
        if not len(batch):
            return
        key = self._key(batch)
        top = max(int(batch.seqs().max()), self.highest.pop(key, -1))
        self.highest[key] = top  # (re-inserted: the numbering written last goes last)
        while len(self.highest) > KEPT:
            del self.highest[next(iter(self.highest))]

    def arrays(self) -> dict[str, np.ndarray]:
        keys = list(self.highest)
        return {
            "seen_keys": np.array(keys, dtype=np.str_),
            "seen_values": np.array([self.highest[k] for k in keys], dtype=np.int64),
        }

    def load_arrays(self, a: Mapping[str, np.ndarray]) -> None:
        """From ``arrays()`` (a state without them, written before dedup: nothing seen)."""
        if "seen_keys" in a:
            self.highest = dict(zip(a["seen_keys"].tolist(), a["seen_values"].tolist(), strict=True))
        else:
            self.highest = {}
