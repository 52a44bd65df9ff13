"""One train stage per checkpoint folder, held by a lock file (``<checkpoint dir>/train.lock``).

Two trainers on one folder (the same ``reloop run`` started twice, an old process left over) took the
same checkpoint numbers: at the stop the first one's final save failed ("snapshot 2 was not written") and
it exited 1, and until the next publish noticed ("another process publishes snapshots to the same
folder") both trained and published. The lock is ``flock``'s: the kernel drops it when the process ends,
however it ends, so a crashed trainer never leaves its folder locked.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = "train.lock"


class FolderInUse(RuntimeError):
    """Another process holds the folder's lock (``holder``: its pid as the lock file says)."""

    def __init__(self, message: str, holder: str = "unknown") -> None:
        super().__init__(message)
        self.holder = holder


class FolderLock:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 0.0, on_wait: Callable[[str], None] | None = None) -> FolderLock:
        """Hold the lock (until ``release`` or this process ends), waiting up to ``wait_s`` for a holder
        to end (a restart right after a stop: the old process still saving its final checkpoint;
        ``on_wait`` hears once of the wait, with the holder's pid); then ``FolderInUse`` naming it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise FolderInUse(
                        f"checkpoint.dir {self.path.parent} is in use by another train stage (pid {holder}): "
                        "one trainer per checkpoint folder (stop the other, or give this one its own "
                        "checkpoint.dir, stages.samples_topic and stages.join_group_id)",
                        holder,
                    ) from None
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
