"""Daemon threads that call into torch or pyarrow, and the interpreter's exit.

A daemon thread still inside a torch (or pyarrow) C++ call when the interpreter finalises aborts the
whole process: the call ends by taking the GIL back, CPython (before 3.14) ends a daemon thread that
does so during finalisation with ``pthread_exit``, and that unwinding through the C++ frame calls
``std::terminate`` (SIGABRT, exit 134, "terminate called without an active exception"). ``reloop serve``
stopped while its reload thread loaded a snapshot exited 134 instead of 0 (its close waits 2 s for the
thread, then leaves it).

The daemon threads' torch and pyarrow work (a snapshot load, the error memory's writes, the train
stage's featurising) runs inside ``native_work()``. At exit (an ``atexit`` hook: before finalisation,
while daemon threads still run) the guard closes: the work in progress is waited for, at most
``EXIT_WAIT_S``, and a thread that reaches ``native_work()`` afterwards waits there, in a plain lock wait
that the process's end interrupts harmlessly, instead of calling into torch.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)

EXIT_WAIT_S = 10.0  # the longest the exit waits for a daemon thread's torch call to return

_cond = threading.Condition()
_inside = 0  # threads within native_work()
_closed = False  # the interpreter is exiting
_local = threading.local()


@contextlib.contextmanager
def native_work() -> Iterator[None]:
    """Run the block's torch/pyarrow calls where the interpreter's exit waits for them (module doc)."""
    global _inside
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        with _cond:
            # The main thread runs the exit itself: it must never wait here.
            while _closed and threading.current_thread() is not threading.main_thread():
                _cond.wait()
            _inside += 1
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        if depth == 0:
            with _cond:
                _inside -= 1
                _cond.notify_all()


def _close(timeout_s: float | None = None) -> bool:
    """Let no new native work start and wait for what runs; False when some still ran after the wait."""
    global _closed
    with _cond:
        _closed = True
        done = _cond.wait_for(lambda: _inside <= 0, EXIT_WAIT_S if timeout_s is None else timeout_s)
    if not done:
        log.warning(
            "exiting while a background thread is still inside torch/pyarrow (after %g s): the process may "
            "abort (SIGABRT)",
            EXIT_WAIT_S if timeout_s is None else timeout_s,
        )
    return done


def _after_fork() -> None:
    """A forked child has none of the parent's threads: none inside, and a lock nobody holds."""
    global _cond, _inside, _closed
    _cond, _inside, _closed = threading.Condition(), 0, False


atexit.register(_close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
