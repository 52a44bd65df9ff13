"""The cyclic garbage collector's settings for a long-running stage process.

Why: a stage allocates a few container objects per event (the decoded JSON, its feature dict, the
joiner's entries) and holds a large live state (the join window, the rolling metrics, torch modules).
CPython's default thresholds (700, 10, 10) start a young collection every 700 net allocations and a
full one about every 70,000, and a full collection walks every tracked object the process holds. The
join stage on Criteo-shaped events, in memory, ran 21k samples/s with Python's thresholds, 29k with these
and 30k with the collector off: it spent about a third of its time collecting. Reference counting already
frees the per-event objects, which hold no cycles, so collecting less often costs little memory.

Two changes: the young-generation threshold is raised (``stages.gc_young_threshold``; None keeps
Python's), and once a stage is built (restored state included) ``gc.freeze()`` moves everything alive
then (modules, torch, the state) out of every later collection, after one collection so that no
garbage of a stage being rebuilt is frozen with it (a rebuild unfreezes the previous stage first, or it
would never be collected).
"""

from __future__ import annotations

import gc


def set_young_threshold(threshold: int | None) -> None:
    """Collect the young generation after ``threshold`` net allocations (None: leave Python's default)."""
    if threshold is None:
        return
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(int(threshold), older, oldest)


def freeze_live_objects() -> None:
    """Collect once, then exclude every object alive now from later collections (``gc.freeze``).

    What an earlier call froze is unfrozen first: a collection never looks at frozen objects, so a stage
    the supervisor threw away (its reference cycles: the stage and its checkpointer, its fetch thread)
    stayed in memory for good, a whole stage (model, optimizer, buffers, metric windows) per rebuild."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
