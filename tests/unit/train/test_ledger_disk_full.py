"""A full disk (ENOSPC) or a failed fsync under the ledger: the error names the file, the file keeps whole
lines only, and no later ``sync`` vouches for a ledger that missed what the model trained."""

from __future__ import annotations

import errno
import os

import pytest
from reloop.engine.events.schema import LabeledSample
from reloop.engine.train import ledger as ledger_module
from reloop.engine.train.ledger import Ledger


def _samples(prefix: str, n: int) -> list[LabeledSample]:
    return [LabeledSample(f"{prefix}-{i:05d}", {}, i % 2, 0.5, 0, 0) for i in range(n)]


def test_a_batch_cut_short_by_a_full_disk_leaves_whole_lines_and_refuses_to_vouch(
    tmp_path, monkeypatch, full_disk
):
    path = tmp_path / "ledger.jsonl"
    room = [10**9]
    full_disk(ledger_module, room)
    ledger = Ledger(path)
    ledger.append(1, _samples("a", 3))
    synced = ledger.sync()
    room[0] = 5000  # a batch of ~30 KB: the disk fills in the middle of a line
    with pytest.raises(OSError) as raised:
        ledger.append(2, _samples("b", 1000))
    assert path.read_bytes().endswith(b"\n") and len(Ledger.read(path)) == 3  # the torn batch is cut off
    assert raised.value.errno == errno.ENOSPC and str(path) in repr(raised.value)

    room[0] = 10**9  # space again: the ledger still misses batch 2, which the model trained
    for act in (lambda: ledger.append(3, _samples("c", 1)), ledger.sync):
        with pytest.raises(OSError, match="takes nothing more") as refused:
            act()
        assert refused.value.errno == errno.ENOSPC and str(path) in repr(refused.value)
    assert [e[1] for e in Ledger.read(path)] == ["a-00000", "a-00001", "a-00002"]

    ledger.truncate(synced)  # a restore: the model is back at the snapshot, so is the ledger
    ledger.append(4, _samples("d", 1))
    assert ledger.sync() == path.stat().st_size
    ledger.close()
    assert [e[1] for e in Ledger.read(path)] == ["a-00000", "a-00001", "a-00002", "d-00000"]


def test_a_failed_fsync_is_final_a_second_one_proves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append(1, _samples("a", 2))
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as raised:
        ledger.sync()
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(OSError, match="takes nothing more"):
        ledger.sync()  # the pages it could not write may be gone: no snapshot may record this length
    assert raised.value.errno == errno.EIO and str(path) in repr(raised.value)
    ledger.truncate(0)
    assert ledger.sync() == 0
    ledger.close()


def test_closing_a_ledger_on_a_full_disk_does_not_raise(tmp_path, monkeypatch, full_disk):
    """A stage torn down after a full disk closes its ledger: nothing is left in a buffer to fail."""
    room = [10**9]
    full_disk(ledger_module, room)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(1, _samples("a", 2))  # buffered by the old ledger, written at once now
    room[0] = 0
    ledger.close()
    assert len(Ledger.read(tmp_path / "ledger.jsonl")) == 2
