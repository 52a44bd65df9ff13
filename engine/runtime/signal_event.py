"""An event that a signal handler may set.

``threading.Event.set`` takes the event's lock. A Python signal handler runs in the main thread between
two bytecodes, so when the main thread is itself inside ``Event.wait`` (holding that lock for a few
bytecodes on the way into and out of its wait), a handler calling ``set`` waits for a lock its own thread
holds: the process hangs. ``reloop serve`` did once in CI: a SIGTERM just after it listened, no stop
logged, still running 60 s later; a stage stopped during a retry's backoff (``stop.wait(backoff)``) could
do the same until ``reloop run`` killed it.

This event takes no lock: ``set`` marks a flag and writes a byte to a pipe, and ``wait`` polls the pipe's
read end (``poll``, not ``select``: a serving process may hold more than 1024 descriptors). A wait that a
signal interrupts is resumed by Python with the time left (PEP 475), and sees the byte at once. A signal
the kernel hands another thread interrupts nothing, so the main thread polls in slices of
``MAIN_THREAD_SLICE_S``, between which Python runs any handler that is due.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import threading
import time

# How long the main thread's wait polls before it lets Python run a signal handler that is due.
MAIN_THREAD_SLICE_S = 0.1


class SignalSafeEvent(threading.Event):
    """A ``threading.Event`` whose ``set`` is safe in a signal handler. It cannot be cleared: it is a
    one-way stop flag, and a clear racing a set could eat the byte a waiter needs."""

    def __init__(self) -> None:
        super().__init__()
        self._set = False
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def is_set(self) -> bool:
        return self._set

    isSet = is_set  # noqa: N815 - threading.Event's old spelling, kept consistent

    def set(self) -> None:
        if self._set:
            return
        self._set = True  # before the byte: a waiter woken by it sees the flag
        with contextlib.suppress(BlockingIOError):  # one byte ever: cannot fill; never block a handler
            os.write(self._write_fd, b"\0")

    def clear(self) -> None:
        raise TypeError("a SignalSafeEvent cannot be cleared (make a new one)")

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        # In the main thread, never one long poll: the kernel may give a signal to another thread (two
        # signals at once: a Ctrl-C to the process group, then a parent's SIGTERM), which does not
        # interrupt this poll, and Python runs the handler only when the main thread next runs
        # bytecode. `reloop serve --workers 2` hung 30 s in 4 of 7 such stops, until killed.
        most = MAIN_THREAD_SLICE_S if threading.current_thread() is threading.main_thread() else None
        while not self._set:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            step = left if most is None else most if left is None else min(left, most)
            poller.poll(None if step is None else math.ceil(step * 1000))
        return self._set

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'set' if self._set else 'unset'}>"

    def __del__(self) -> None:
        for fd in (getattr(self, "_read_fd", None), getattr(self, "_write_fd", None)):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
