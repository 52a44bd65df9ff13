"""Child processes that die with the process that started them (Linux ``PR_SET_PDEATHSIG``).

A stage left running after its parent was SIGKILLed goes on training next to the stage a restart starts:
two writers of one checkpoint directory, samples trained twice. The kernel's parent-death signal stops
that; nothing in user space can, since a SIGKILLed parent runs no handler.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` of a child: the kernel SIGKILLs it when the thread that started it ends."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with(parent_pid: int) -> None:
    """The same, from inside a child that someone else's code started (torchrun's ranks, which it puts in
    sessions of their own); exits at once when ``parent_pid`` already died before the call took effect."""
    die_with_parent()
    if os.getppid() != parent_pid:
        os._exit(1)
