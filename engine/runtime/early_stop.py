"""A SIGTERM to a stream processor (``reloop run|join|train``) before it installed its own stop handling
(an orchestrator's stop, ``reloop demo`` ending, while torch was still importing on a loaded machine):
nothing was read yet, so the command exits 0 instead of dying by the signal (exit -15, a failure).

The handler raises ``StoppedBeforeStart``, except inside an import: an exception raised there while torch's
C extension initialises is swallowed (the process went on to build its stage as though never asked to
stop, until ``reloop run`` killed it ``recovery.stop_timeout_s`` later) or aborts the process (exit -6).
So the signal is recorded, and acted on once the import is done: the command line raises it when the
command's module is imported, and the stop handling the command installs later (``StopRequest.install``,
``reloop run``'s forwarding) takes it as a signal arriving then.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any


class StoppedBeforeStart(BaseException):
    """A SIGTERM before the command installed its own handler (BaseException: no ``except Exception``
    on the way takes it)."""


_pending: list[int] = []


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _pending[:] = [signum]  # one stop, however often it is sent again
    if not _importing(frame):
        raise StoppedBeforeStart
    _send_again_later()


_again: threading.Thread | None = None


def _send_again_later() -> None:
    """The import's end is not always where the command line looks (an import inside the command's own
    code, a lazy one in the standard library): a thread sends the signal to the main thread again every
    ``AGAIN_S`` until it lands outside an import, or the command's own handler is in place. A CI run saw
    a deferred signal sit unseen through a 60-s sleep."""
    global _again
    if _again is not None and _again.is_alive():
        return
    main = threading.main_thread().ident

    def again() -> None:
        while _pending and signal.getsignal(signal.SIGTERM) is _on_signal:
            time.sleep(AGAIN_S)
            if _pending and signal.getsignal(signal.SIGTERM) is _on_signal and main is not None:
                signal.pthread_kill(main, signal.SIGTERM)

    _again = threading.Thread(target=again, name="early-stop", daemon=True)
    _again.start()


AGAIN_S = 0.2


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def arm() -> Any:
    """Install the handler (main thread only); returns the handler it replaced."""
    _pending.clear()
    return signal.signal(signal.SIGTERM, _on_signal)


def disarm(previous: Any) -> None:
    """Put ``previous`` back unless the command installed its own handler; forget a pending signal."""
    _pending.clear()
    if signal.getsignal(signal.SIGTERM) is _on_signal:
        signal.signal(signal.SIGTERM, previous)


def raise_if_pending() -> None:
    """``StoppedBeforeStart`` where a signal came during an import (or its exception was swallowed)."""
    if _pending:
        raise StoppedBeforeStart


def take() -> int | None:
    """The signal that came before the command's own handler and was not acted on, once; None if none."""
    return _pending.pop() if _pending else None
