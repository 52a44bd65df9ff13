"""One train stage per checkpoint folder: two `reloop run` (or `reloop train`) on one folder took the same
checkpoint numbers, and the first's final save failed at the stop ("snapshot 2 was not written")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from reloop.engine.checkpoint.folder_lock import FolderInUse, FolderLock

SPEC = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}


def test_a_held_folder_is_refused_naming_the_holder_and_free_once_released(tmp_path: Path) -> None:
    first = FolderLock(tmp_path).acquire()
    with pytest.raises(FolderInUse, match=rf"in use by another train stage \(pid {os.getpid()}\)"):
        FolderLock(tmp_path).acquire()
    first.release()
    FolderLock(tmp_path).acquire().release()


def test_a_waiter_gets_the_folder_once_the_holder_ends_its_stop(tmp_path: Path) -> None:
    # A restart right after a stop: the old process may still be saving its final checkpoint.
    first = FolderLock(tmp_path).acquire()
    threading.Timer(0.6, first.release).start()
    heard: list[str] = []
    t0 = time.monotonic()
    FolderLock(tmp_path).acquire(wait_s=10, on_wait=heard.append).release()
    assert 0.5 < time.monotonic() - t0 < 5 and heard == [str(os.getpid())]


def test_a_holder_that_died_leaves_the_folder_free(tmp_path: Path) -> None:
    code = "import sys, time; from reloop.engine.checkpoint.folder_lock import FolderLock; " \
           "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    with pytest.raises(FolderInUse, match=f"pid {proc.pid}"):
        FolderLock(tmp_path).acquire()
    proc.kill()  # SIGKILL: no handler runs, the kernel drops the lock
    proc.wait(10)
    FolderLock(tmp_path).acquire().release()


def test_a_second_reloop_train_on_a_folder_in_use_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"backbone": "lr", "spec": SPEC},
        "kafka": {"bootstrap": "127.0.0.1:1"},  # the first keeps trying to reach it, holding the folder
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "metrics": {"prometheus_port": None},
        "recovery": {"stop_timeout_s": 2, "flush_timeout_s": 1},
    }))  # fmt: skip
    cmd = [sys.executable, "-m", "reloop.engine.runtime.cli", "train", "--config", str(config)]
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while (
            not (tmp_path / "ckpt" / "train.lock").exists()
            or not (tmp_path / "ckpt" / "train.lock").read_text()
        ):
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another train stage (pid {first.pid})" in second.stderr
        assert "waiting for the train stage that holds checkpoint.dir" in second.stderr  # it waited first
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
