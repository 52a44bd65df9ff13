"""A child that called ``die_with(parent)`` is killed by the kernel when its parent is SIGKILLed (a parent
that runs no handler), and one whose parent already died exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

# The parent starts the child in a session of its own (as torchrun does with its ranks), prints its pid,
# and sleeps; the child arms die_with(parent) and sleeps.
_CHILD = (
    "import os, time; from reloop.engine.runtime.lifeline import die_with; die_with({ppid}); time.sleep(120)"
)
_PARENT = f"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {_CHILD!r}.format(ppid=os.getpid())], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_child_dies_with_its_sigkilled_parent():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(3.0)  # the child imported reloop and armed the signal
        assert psutil.pid_exists(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _gone(child, within_s=10), "the child outlived its SIGKILLed parent"
    finally:
        if psutil.pid_exists(child):
            os.kill(child, signal.SIGKILL)
        parent.kill()


def test_a_child_whose_parent_already_died_exits():
    code = "from reloop.engine.runtime.lifeline import die_with; die_with(1); print('ran on')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "ran on" not in done.stdout


def test_a_stop_that_did_not_save_the_final_checkpoint_is_not_exit_0(capsys):
    from reloop.engine.runtime.train_cmd import _stopped

    assert _stopped(asked=True, final_saved=True) == 0
    assert capsys.readouterr().err == ""
    assert _stopped(asked=True, final_saved=False) == 1
    assert "before their final checkpoint" in capsys.readouterr().err
    assert _stopped(asked=False, final_saved=True) == 1  # SIGHUP/SIGQUIT: not a stop anyone asked for
