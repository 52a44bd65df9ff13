"""Snapshot writes off the training thread: serialise now, make durable on a writer thread.

A period snapshot of a DCN on MovieLens (11 MB of weights and optimizer moments) cost the train stage
~40 ms of training time, about a fifth of a samples-topic replay: ~12 ms to serialise, the rest writing,
fsyncing, renaming and deleting old versions (docs/performance.md). ``SnapshotWriter.publish``
serialises on the caller's thread (so the caller may go on changing the weights at once) and leaves the
rest to one background thread, which writes one snapshot at a time:

* the version is taken when the snapshot is prepared: the newest committed + 1. ``publish`` first waits
  for the write in flight, so the registry on disk is up to date when the next version is taken;
* ``then(fn)`` runs ``fn`` after the write in flight is durable (offsets are committed only then: the
  checkpointer's order, engine/runtime/checkpointer.py); never when that write failed;
* a failed write is raised by the next ``check``, ``wait`` or ``publish`` as ``SnapshotWriteError``,
  once; the version it would have taken was never visible, so the newest durable snapshot stays the
  restart point, as after a crash;
* at most one prepared snapshot is held in memory (its serialised bytes) besides the live state.

``background=False`` writes on the caller's thread (``publish`` returns with the snapshot durable).

>>> import tempfile
>>> from reloop.engine.checkpoint.registry import SnapshotRegistry
>>> reg, done = SnapshotRegistry(tempfile.mkdtemp()), []
>>> writer = SnapshotWriter()
>>> writer.publish(reg, {"model": {"w": [1.0]}}, on_durable=done.append)
1
>>> writer.then(lambda: done.append("committed"))
>>> writer.wait(); done, reg.versions()
([1, 'committed'], [1])
>>> writer.close()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from reloop.engine.checkpoint.registry import SnapshotError, SnapshotRegistry

log = logging.getLogger("reloop.checkpoint")


class SnapshotWriteError(SnapshotError):
    """A snapshot that was prepared but could not be written (the newest durable one stays)."""


class SnapshotWriter:
    def __init__(self, *, background: bool = True, name: str = "snapshot-writer") -> None:
        self.background = background
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None  # the newest job: the write, or a ``then`` after it
        self._write: Future[None] | None = None  # the newest write
        self._error: BaseException | None = None  # a failed write, not raised yet
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ writing
    def publish(
        self,
        registry: SnapshotRegistry,
        state: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        *,
        on_durable: Callable[[int], None] | None = None,
    ) -> int:
        """Serialise ``state`` as the next version of ``registry`` and write it (in the background);
        returns the version. ``on_durable(version)`` runs once it is durable (on the writer thread)."""
        self.wait()
        prepared = registry.prepare(state, meta)
        if not self.background:
            version = registry.write(prepared)
            if on_durable is not None:
                on_durable(version)
            return version

        def write() -> None:
            try:
                registry.write(prepared)
            except BaseException as exc:
                with self._lock:
                    self._error = SnapshotWriteError(
                        f"snapshot {prepared.version} was not written: {type(exc).__name__}: {exc}"
                    )
                    self._error.__cause__ = exc
                raise
            if on_durable is not None:
                on_durable(prepared.version)

        self._write = self._submit(write)
        return prepared.version

    def then(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the write in flight is durable (now when none is), skipped if it failed."""
        write = self._write
        if write is None or write.done():
            if write is None or write.exception() is None:
                fn()
            return

        def after() -> None:  # on the writer thread, after ``write``: done by now
            if write.exception() is None:
                fn()

        self._submit(after)

    # ------------------------------------------------------------------ waiting
    @property
    def in_flight(self) -> bool:
        return self._last is not None and not self._last.done()

    def check(self) -> None:
        """Raise a failed write (once), without waiting for the one in flight."""
        error = self._take_error()
        if error is not None:
            raise error

    def wait(self) -> None:
        """Wait until every write (and every ``then``) submitted so far has run; raise a failed write."""
        if self._last is not None:
            futures.wait([self._last])  # a failed write's error is kept in _error, raised by check()
        self.check()

    def finish(self) -> bool:
        """``close``, logging a failed write instead of raising it (False): for a stop or an abort, where
        the newest durable snapshot is the restart point either way."""
        try:
            self.close()
        except SnapshotError as exc:
            log.error("snapshot write failed", extra={"fields": {"error": repr(exc)}})
            return False
        return True

    def close(self) -> None:
        """Wait for the writes in flight (raising a failed one) and stop the thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # ------------------------------------------------------------------ internals
    def _submit(self, job: Callable[[], None]) -> Future[None]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._last = self._pool.submit(job)
        return self._last

    def _take_error(self) -> BaseException | None:
        with self._lock:
            error, self._error = self._error, None
        return error
