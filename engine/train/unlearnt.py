"""Samples a step did not learn go to the dead-letter sink, one envelope each, and stay out of the ledger.

A row is left out of its step when the model cannot take it (a dense input or its logit not finite,
engine/models/finite.py), and a whole batch when the learner's last guard skips the step (a gradient
not finite). Counting them (``skipped_samples``) says how many; the dead letter says which, with the
sample itself (``encode``: the JSON of a ``LabeledSample``, features as they arrived), so it can be
inspected, fixed and trained later. The ledger then lists exactly the samples that were learnt: a
sample is either in the ledger or among the dead letters, never both and never neither.

>>> import numpy as np
>>> from reloop.engine.deadletter import DeadLetterSink
>>> from reloop.engine.events.schema import LabeledSample
>>> samples = [LabeledSample(f"s{i}", {"x": i}, 0, 0.5, 0, 1000) for i in range(3)]
>>> letters = DeadLetterSink()
>>> unlearnt = np.array([False, True, False])
>>> dead_letter_unlearnt(letters, "samples", unlearnt_only(samples, unlearnt), "why")
>>> letters.counts
{'unlearnable': 1}
>>> [s.sample_id for s in learnt(samples, unlearnt)]
['s0', 's2']
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress
from typing import TypeVar

import numpy as np
from reloop.engine.deadletter import DeadLetterSink, SampleRecord
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import LabeledSample
from reloop.engine.events.validation import EventError

REASON = "unlearnable"
T = TypeVar("T")


def dead_letter_unlearnt(
    dead_letters: DeadLetterSink,
    topic: str,
    samples: Sequence[LabeledSample],
    why: str,
    *,
    origins: Sequence[str] | None = None,
) -> None:
    """Dead-letter each of ``samples`` (reason ``unlearnable``; ``origins``: where each came from, for
    the detail, e.g. its join task and seq)."""
    for i, s in enumerate(samples):
        where = f" ({origins[i]})" if origins is not None else ""
        record = SampleRecord(topic, None, None, s.sample_id.encode(), encode(s), s.event_time_ms)
        dead_letters.send(record, EventError(REASON, f"sample {s.sample_id!r}{where} was not learnt: {why}"))


def unlearnt_only(items: Sequence[T], unlearnt: np.ndarray) -> list[T]:
    """The ``items`` marked in ``unlearnt``."""
    return list(compress(items, unlearnt))


def learnt(items: Sequence[T], unlearnt: np.ndarray | None) -> list[T]:
    """``items`` less those marked in ``unlearnt`` (all of them when it is None)."""
    return list(items) if unlearnt is None else list(compress(items, ~unlearnt))
