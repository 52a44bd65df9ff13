"""Files replaced whole (engine/appending.py): a failure leaves the old content and no temporary file,
whether the file is a backtest's results.csv cut back or a replay's dead letters."""

from __future__ import annotations

import errno
import os

import pytest
from reloop.engine.appending import replace_whole
from reloop.engine.replay.report import cut_torn_run


def _refuse(*args, **kw):  # noqa: ANN002, ANN003, ANN202
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_replace_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "results.csv"
    path.write_bytes(b"old\n")
    monkeypatch.setattr(os, failing, _refuse)
    with pytest.raises(OSError):
        replace_whole(path, b"new\n")
    assert path.read_bytes() == b"old\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    monkeypatch.undo()
    replace_whole(path, b"new\n")
    assert path.read_bytes() == b"new\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_backtest_cut_back_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    torn = b"protocol,backbone,strategy,seed,auc\np,dcn,ce,0,0.7\np,dcn,ce,1,0."
    path.write_bytes(torn)
    monkeypatch.setattr(os, "replace", _refuse)
    with pytest.raises(OSError):
        cut_torn_run(path)
    assert path.read_bytes() == torn and [p.name for p in tmp_path.iterdir()] == ["results.csv"]
