"""Every reason a dead letter can carry: the event contract's, the trainer's, and "unknown" (an error
without a reason, engine/deadletter.py). The dead-letter commands check ``--reason`` against them, and the
stages export a zero for each at start: a reason's series that first appeared at its first letters had no
increase() over them, and the alerts on them missed the first burst."""

from __future__ import annotations

from reloop.engine.events.validation import REASONS
from reloop.engine.train.unlearnt import REASON as UNLEARNABLE

KNOWN_REASONS = frozenset({*REASONS, UNLEARNABLE, "unknown"})
