"""A stop event set by a signal handler while the main thread waits on it: ``threading.Event`` hangs
there (its handler waits for the lock its own thread holds inside ``wait``); ``SignalSafeEvent`` must not."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from reloop.engine.runtime.signal_event import SignalSafeEvent

# The main thread waits in a tight loop (the window is a wait's way in and out: a supervisor's backoff,
# serve's stop.wait()), a thread signals it, and the handler sets the event waited on. A handler stuck
# in set() never counts: the signalling thread ends the process with 3 after 5 s without progress.
_HANDLER_SETS_WHILE_MAIN_WAITS = """
import os, signal, sys, threading, time
from reloop.engine.runtime.signal_event import SignalSafeEvent

events = []
handled = [0]

def on_signal(*_):
    events[-1].set()
    handled[0] += 1

signal.signal(signal.SIGUSR1, on_signal)
main = threading.main_thread().ident

def signaller():
    for sent in range(1, SIGNALS + 1):
        before = handled[0]
        signal.pthread_kill(main, signal.SIGUSR1)
        began = time.monotonic()
        while handled[0] == before:
            time.sleep(0.0001)
            if time.monotonic() - began > 5:
                print(f"handler stuck at signal {sent}", flush=True)
                os._exit(3)
    os._exit(0)

SIGNALS = int(sys.argv[1])
events.append(SignalSafeEvent())
threading.Thread(target=signaller, daemon=True).start()
while True:
    if events[-1].wait(0):  # not blocking: the wait is its way in and out, with the lock held
        events[:] = [SignalSafeEvent()]  # a fresh unset one, so the next set is a first one
"""


def test_a_handler_setting_the_event_never_hangs_the_main_thread_waiting_on_it():
    # threading.Event in its place hung within the first few signals here.
    proc = subprocess.run(
        [sys.executable, "-c", _HANDLER_SETS_WHILE_MAIN_WAITS, "3000"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_it_behaves_as_a_threading_event():
    event = SignalSafeEvent()
    assert isinstance(event, threading.Event)
    assert not event.is_set()
    began = time.monotonic()
    assert event.wait(0.05) is False
    assert time.monotonic() - began >= 0.045
    threading.Timer(0.05, event.set).start()
    assert event.wait() is True  # woken by a set from another thread
    assert event.is_set() and event.wait(0) is True
    event.set()  # again: still set, nothing blocks
    assert event.wait(10) is True
    assert repr(event) == "<SignalSafeEvent set>"


def test_every_waiter_wakes():
    event = SignalSafeEvent()
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda: woke.append(event.wait(30))) for _ in range(4)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.05)
    event.set()
    for waiter in waiters:
        waiter.join(10)
    assert woke == [True] * 4


def test_it_cannot_be_cleared():
    event = SignalSafeEvent()
    event.set()
    with pytest.raises(TypeError, match="cannot be cleared"):
        event.clear()
    assert event.is_set()


# The kernel may hand a signal to any thread (a Ctrl-C to the process group, then a parent's SIGTERM, a
# millisecond apart: the second found the main thread with one pending). Aimed at a thread of its own
# here: it interrupts nothing in the main thread, which must still stop.
_SIGNAL_TO_ANOTHER_THREAD = """
import signal, sys, threading, time
from reloop.engine.runtime.signal_event import SignalSafeEvent

stop = SignalSafeEvent()
signal.signal(signal.SIGTERM, lambda *_: stop.set())

def signal_from_here():
    time.sleep(0.3)  # the main thread is in its wait by then
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=signal_from_here).start()
print("stopped" if stop.wait(float(sys.argv[1])) else "not stopped", flush=True)
"""


@pytest.mark.parametrize("timeout", ["1e9", "30"])
def test_a_signal_the_kernel_gives_another_thread_still_ends_the_main_threads_wait(timeout: str):
    # A single poll until set (or until 30 s) in the main thread never woke: `reloop serve --workers 2`
    # stopped by a Ctrl-C hung until its parent killed the worker 30 s later.
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_TO_ANOTHER_THREAD, timeout], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout == "stopped\n", proc.stdout + proc.stderr
    assert time.monotonic() - began < 20
