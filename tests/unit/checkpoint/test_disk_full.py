"""A full disk (ENOSPC), a read-only folder or a failed fsync while a snapshot is written: nothing half
written is ever visible, the newest loadable snapshot stays (``keep`` prunes only after a durable
write), no temporary folder is left to fill the disk further, and the error names the file."""

from __future__ import annotations

import builtins
import errno
import io
import os

import pytest
import torch
from reloop.engine.checkpoint import SnapshotError, SnapshotRegistry
from reloop.engine.checkpoint import registry as registry_module
from reloop.engine.checkpoint.writer import SnapshotWriteError, SnapshotWriter
from reloop.engine.events.schema import LabeledSample
from reloop.engine.runtime.checkpointer import Checkpointer
from reloop.engine.train import ledger as ledger_module
from reloop.engine.train.ledger import Ledger


def _state(x: float) -> dict:
    return {"model": {"w": torch.full((5000,), x)}, "state": {"step": int(x)}}


class _FullDisk(io.RawIOBase):
    """A real file that takes ``room`` more bytes, then fails with ENOSPC (a short write first)."""

    def __init__(self, raw: io.FileIO, room: int) -> None:
        self.raw, self.room = raw, room

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.raw.seek(pos, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size=None) -> int:  # noqa: ANN001
        return self.raw.truncate(size)

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, data) -> int:  # noqa: ANN001 - a buffer
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.raw.write(bytes(memoryview(data)[: self.room]))
        self.room -= n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _full_disk_at(monkeypatch: pytest.MonkeyPatch, name: str, room: int) -> None:
    """The snapshot file ``name`` fills the disk after ``room`` bytes."""

    def fake_open(path, mode="r", *args, **kw):  # noqa: ANN001
        if str(path).endswith(name) and "w" in mode:
            return io.BufferedWriter(_FullDisk(io.FileIO(path, "w"), room))
        return builtins.open(path, mode, *args, **kw)

    monkeypatch.setattr(registry_module, "open", fake_open, raising=False)


def _raise(exc: OSError):  # noqa: ANN202
    def fail(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise exc

    return fail


FAILURES = {
    "part cut short": lambda mp: _full_disk_at(mp, "model.pt", 3000),
    "manifest cut short": lambda mp: _full_disk_at(mp, "manifest.json", 10),
    "fsync fails": lambda mp: mp.setattr(os, "fsync", _raise(OSError(errno.EIO, "Input/output error"))),
    "read-only folder": lambda mp: mp.setattr(
        os, "mkdir", _raise(OSError(errno.EROFS, "Read-only file system"))
    ),
    "rename refused": lambda mp: mp.setattr(os, "rename", _raise(OSError(errno.EACCES, "Permission denied"))),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_write_publishes_nothing_prunes_nothing_and_leaves_no_temp(tmp_path, monkeypatch, failure):
    reg = SnapshotRegistry(tmp_path, keep=1)  # keep=1: a prune before durability would lose the only one
    assert reg.publish(_state(1.0)) == 1
    with monkeypatch.context() as mp:
        FAILURES[failure](mp)
        with pytest.raises(OSError):
            reg.publish(_state(2.0))
    assert reg.versions() == [1] and reg.load().state["state"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000000000001"]  # no .tmp-* left behind
    assert reg.publish(_state(3.0)) == 2  # the same writer goes on once there is room again
    assert reg.versions() == [2] and reg.load().state["state"]["step"] == 3


@pytest.mark.parametrize("failure", ["part cut short", "manifest cut short", "fsync fails"])
def test_the_error_names_the_file_that_failed(tmp_path, monkeypatch, failure):
    reg = SnapshotRegistry(tmp_path)
    FAILURES[failure](monkeypatch)
    with pytest.raises(OSError) as raised:
        reg.publish(_state(1.0))
    for text in (str(raised.value), repr(raised.value)):  # repr too: what the stages' logs write
        assert str(tmp_path) in text and ".tmp-1-" in text  # the temp folder, the file in it


def test_the_background_writer_reports_errno_and_file(tmp_path, monkeypatch):
    reg = SnapshotRegistry(tmp_path)
    writer = SnapshotWriter()
    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", _raise(OSError(errno.ENOSPC, "No space left on device")))
        writer.publish(reg, _state(1.0))
        with pytest.raises(SnapshotWriteError) as raised:
            writer.wait()
    text = str(raised.value)
    assert "snapshot 1 was not written" in text and "[Errno 28] No space left on device" in text
    assert str(tmp_path) in text and ".pt" in text
    writer.close()


def test_a_failed_fsync_of_the_root_after_the_rename_does_not_fence_out_the_writer(tmp_path, monkeypatch):
    """The rename made it visible (whole: its files and folder were fsynced); only the root's fsync
    failed. The writer must not then take its own version for another writer's and refuse to go on."""
    reg = SnapshotRegistry(tmp_path, keep=1)
    reg.publish(_state(1.0))
    real = registry_module._fsync_dir

    def root_fails(path):  # noqa: ANN001, ANN202
        if path == tmp_path:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    with monkeypatch.context() as mp:
        mp.setattr(registry_module, "_fsync_dir", root_fails)
        with pytest.raises((SnapshotError, OSError)) as raised:
            reg.publish(_state(2.0))
    assert str(tmp_path) in str(raised.value)
    assert reg.versions() == [1, 2]  # not pruned: version 2's rename may not survive a power loss
    assert reg.load().state["state"]["step"] == 2  # whole, so loadable
    assert reg.publish(_state(3.0)) == 3  # the same writer goes on (it refused: "another process")
    assert reg.versions() == [3]


def test_no_save_vouches_for_a_ledger_whose_append_the_disk_cut_short(tmp_path, monkeypatch):
    """The model trained a batch the ledger failed to record: no snapshot may record the ledger's
    length from then on (not even once there is room again), and no offsets are committed."""
    disk = _FullDisk(io.FileIO(tmp_path / "ledger.jsonl", "a"), 10**9)

    def ledger_open(path, mode="r", buffering=-1, **kw):  # noqa: ANN001
        return disk if buffering == 0 else io.BufferedWriter(disk)

    monkeypatch.setattr(ledger_module, "open", ledger_open, raising=False)
    reg, ledger, commits = SnapshotRegistry(tmp_path / "snapshots"), Ledger(tmp_path / "ledger.jsonl"), []
    checkpointer = Checkpointer([], ledger=ledger, commit=commits.append)

    def publish(ledger_bytes: int) -> int:
        return reg.publish({"state": {"ledger_bytes": ledger_bytes}})

    ledger.append(1, [LabeledSample("a", {}, 1, 0.5, 0, 0)])
    assert checkpointer.save(publish, {"p0": 1}) == 1
    disk.room = 4000
    with pytest.raises(OSError):  # a batch of ~25 KB: the disk fills in the middle of a line
        ledger.append(2, [LabeledSample(f"b{i:05d}", {}, 0, 0.5, 0, 0) for i in range(1000)])
    disk.room = 10**9  # room again
    with pytest.raises(OSError, match="takes nothing more"):
        checkpointer.save(publish, {"p0": 2})
    assert reg.versions() == [1] and commits == [{"p0": 1}]
    assert Ledger.read(tmp_path / "ledger.jsonl") == [(1, "a", 1, False)]
    ledger.close()
