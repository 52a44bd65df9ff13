"""The order of every save, in one place: make durable what was sent, publish the state, commit offsets.

1. **Flush.** Every sink is flushed (samples topic, dead-letter topic) and the ledger synced, with a
   timeout. A flush that fails raises before anything is published: the last save stays the restart
   point, and what was sent since is sent again after it (downstream drops copies by their identity).
2. **Publish.** The caller's state goes out (a period snapshot, a checkpoint, a join task's state); it
   names input positions that everything flushed in step 1 covers. This is the restart point.
3. **Commit.** The input positions are committed to the consumer group. They are informational (a
   restart reads its positions from the state), so a failed commit is logged and returned, never raised:
   it must not undo a published save. With a snapshot writer (engine/checkpoint/writer.py: the state
   written on a background thread) the commit waits until the state is durable, and is skipped if its
   write fails.

Used by the single-process pipeline, the train stage and the join stage (engine/runtime/).

>>> sent = []
>>> class Sink:
...     def flush(self, timeout_s=None): sent.append("flush")
>>> cp = Checkpointer([Sink()], commit=lambda positions: sent.append(("commit", dict(positions))))
>>> cp.save(lambda ledger_bytes: sent.append("publish") or 7, {"p0": 12})
7
>>> sent
['flush', 'publish', ('commit', {'p0': 12})]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from reloop.engine.checkpoint.writer import SnapshotWriter

log = logging.getLogger("reloop.checkpoint")
T = TypeVar("T")


class Flushable(Protocol):
    def flush(self, timeout_s: float | None = None) -> None: ...


class Syncable(Protocol):
    def sync(self) -> int: ...


class Checkpointer:
    """Flush ``sinks`` (in order) and sync ``ledger``, then publish, then ``commit`` the positions."""

    def __init__(
        self,
        sinks: Sequence[Flushable | None],
        *,
        commit: Callable[[Mapping[Any, int]], None] | None = None,
        ledger: Syncable | None = None,
        flush_timeout_s: float | None = None,
        writer: SnapshotWriter | None = None,
    ) -> None:
        self.sinks = [s for s in sinks if s is not None]
        self.commit = commit
        self.ledger = ledger
        self.writer = writer
        self.flush_timeout_s = flush_timeout_s
        self.last_commit_error: str | None = None

    def flush(self, timeout_s: float | None = None) -> int:
        """Step 1: every sink flushed (``timeout_s``, default the checkpointer's), then the ledger synced;
        returns the ledger's length in bytes (0 without one), which the state records."""
        timeout = self.flush_timeout_s if timeout_s is None else timeout_s
        for sink in self.sinks:
            sink.flush(timeout)
        return self.ledger.sync() if self.ledger is not None else 0

    def commit_offsets(self, positions: Mapping[Any, int], **fields: Any) -> str | None:
        """Step 3: commit ``positions``; a failure is logged with ``fields`` and returned, not raised."""
        if self.commit is None:
            return None
        try:
            self.commit(dict(positions))
            self.last_commit_error = None
        except Exception as exc:  # noqa: BLE001 - offsets are informational; the published save is the truth
            self.last_commit_error = repr(exc)
            log.warning("offset commit failed", extra={"fields": {**fields, "error": repr(exc)}})
        return self.last_commit_error

    def save(
        self,
        publish: Callable[[int], T],
        positions: Mapping[Any, int],
        *,
        timeout_s: float | None = None,
        **fields: Any,
    ) -> T:
        """The three steps: ``publish(ledger_bytes)`` runs only after a successful flush, the commit only
        after a successful publish. Returns what ``publish`` returned."""
        ledger_bytes = self.flush(timeout_s)
        result = publish(ledger_bytes)
        if self.writer is not None:
            self.writer.then(lambda: self.commit_offsets(positions, **fields))
        else:
            self.commit_offsets(positions, **fields)
        return result
