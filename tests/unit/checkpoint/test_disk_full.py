"""A full disk (ENOSPC), a read-only folder or a failed fsync while a snapshot is written: nothing half
written is ever visible, the newest loadable snapshot stays (``keep`` prunes only after a durable
write), no temporary folder is left to fill the disk further, and the error names the file."""

from __future__ import annotations

import errno
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


def _full_disk_at(name: str, room: int):  # noqa: ANN202
    """The snapshot file ``name`` fills the disk after ``room`` bytes: (monkeypatch, full_disk) -> None."""
    return lambda mp, disk: disk(registry_module, [room], lambda path, mode: path.endswith(name), patch=mp)


def _raise(exc: OSError):  # noqa: ANN202
    def fail(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise exc

    return fail


FAILURES = {
    "part cut short": _full_disk_at("model.pt", 3000),
    "manifest cut short": _full_disk_at("manifest.json", 10),
    "fsync fails": lambda mp, _: mp.setattr(os, "fsync", _raise(OSError(errno.EIO, "Input/output error"))),
    "read-only folder": lambda mp, _: mp.setattr(
        os, "mkdir", _raise(OSError(errno.EROFS, "Read-only file system"))
    ),
    "rename refused": lambda mp, _: mp.setattr(
        os, "rename", _raise(OSError(errno.EACCES, "Permission denied"))
    ),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_write_publishes_nothing_prunes_nothing_and_leaves_no_temp(
    tmp_path, monkeypatch, failure, full_disk
):
    reg = SnapshotRegistry(tmp_path, keep=1)  # keep=1: a prune before durability would lose the only one
    assert reg.publish(_state(1.0)) == 1
    with monkeypatch.context() as mp:
        FAILURES[failure](mp, full_disk)
        with pytest.raises(OSError):
            reg.publish(_state(2.0))
    assert reg.versions() == [1] and reg.load().state["state"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["highest_version", "v000000000001"]  # no .tmp-*
    assert (tmp_path / "highest_version").read_text() == "1\n"
    assert reg.publish(_state(3.0)) == 2  # the same writer goes on once there is room again
    assert reg.versions() == [2] and reg.load().state["state"]["step"] == 3


@pytest.mark.parametrize("failure", ["part cut short", "manifest cut short", "fsync fails"])
def test_the_error_names_the_file_that_failed(tmp_path, monkeypatch, failure, full_disk):
    reg = SnapshotRegistry(tmp_path)
    FAILURES[failure](monkeypatch, full_disk)
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


def test_no_save_vouches_for_a_ledger_whose_append_the_disk_cut_short(tmp_path, monkeypatch, full_disk):
    """The model trained a batch the ledger failed to record: no snapshot may record the ledger's
    length from then on (not even once there is room again), and no offsets are committed."""
    room = [10**9]
    full_disk(ledger_module, room)
    reg, ledger, commits = SnapshotRegistry(tmp_path / "snapshots"), Ledger(tmp_path / "ledger.jsonl"), []
    checkpointer = Checkpointer([], ledger=ledger, commit=commits.append)

    def publish(ledger_bytes: int) -> int:
        return reg.publish({"state": {"ledger_bytes": ledger_bytes}})

    ledger.append(1, [LabeledSample("a", {}, 1, 0.5, 0, 0)])
    assert checkpointer.save(publish, {"p0": 1}) == 1
    room[0] = 4000
    with pytest.raises(OSError):  # a batch of ~25 KB: the disk fills in the middle of a line
        ledger.append(2, [LabeledSample(f"b{i:05d}", {}, 0, 0.5, 0, 0) for i in range(1000)])
    room[0] = 10**9  # room again
    with pytest.raises(OSError, match="takes nothing more"):
        checkpointer.save(publish, {"p0": 2})
    assert reg.versions() == [1] and commits == [{"p0": 1}]
    assert Ledger.read(tmp_path / "ledger.jsonl") == [(1, "a", 1, False)]
    ledger.close()


def test_a_failed_highest_version_write_after_the_rename_is_an_error_and_numbers_go_on(tmp_path, monkeypatch):
    reg = SnapshotRegistry(tmp_path, keep=1)
    assert reg.publish(_state(1.0)) == 1
    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", _raise(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(SnapshotError, match="highest_version failed"):
            reg.publish(_state(2.0))
    assert reg.versions() == [1, 2]  # visible, not pruned past: it may not survive a power loss
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert reg.publish(_state(3.0)) == 3
    assert (tmp_path / "highest_version").read_text() == "3\n"
