"""SnapshotWriter: serialised at once, written on a thread, one at a time; commits only after durable."""

import threading

import pytest
import torch
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.checkpoint.writer import SnapshotWriteError, SnapshotWriter
from reloop.engine.runtime.checkpointer import Checkpointer


class GatedRegistry(SnapshotRegistry):
    """A registry whose writes wait for ``gate`` (a slow disk) and can be made to fail."""

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        self.gate = threading.Event()
        self.fail: Exception | None = None

    def write(self, prepared):
        assert self.gate.wait(10), "test gate never opened"
        if self.fail is not None:
            raise self.fail
        return super().write(prepared)


def test_the_snapshot_holds_the_state_as_it_was_when_published(tmp_path):
    reg = GatedRegistry(tmp_path)
    w = torch.zeros(4)
    writer = SnapshotWriter()
    version = writer.publish(reg, {"model": {"w": w}})
    w += 7  # training goes on while the write is in flight
    assert writer.in_flight and reg.versions() == []
    reg.gate.set()
    writer.wait()
    assert reg.versions() == [version] == [1]
    assert torch.equal(reg.load(1).state["model"]["w"], torch.zeros(4))
    writer.close()


def test_then_runs_only_after_the_write_is_durable(tmp_path):
    reg = GatedRegistry(tmp_path)
    seen: list = []
    writer = SnapshotWriter()
    writer.publish(reg, {"model": {"w": [1.0]}}, on_durable=lambda v: seen.append(("durable", v)))
    writer.then(lambda: seen.append(("commit", reg.versions())))
    assert seen == []  # neither the durable hook nor the commit before the write
    reg.gate.set()
    writer.wait()
    assert seen == [("durable", 1), ("commit", [1])]
    writer.close()


def test_a_failed_write_skips_its_commit_is_raised_once_and_its_version_is_taken_again(tmp_path):
    reg = GatedRegistry(tmp_path)
    reg.fail = OSError(28, "No space left on device")
    committed: list = []
    writer = SnapshotWriter()
    writer.publish(reg, {"model": {"w": [1.0]}})
    writer.then(lambda: committed.append(1))
    reg.gate.set()
    with pytest.raises(SnapshotWriteError, match="snapshot 1 was not written.*No space left"):
        writer.wait()
    writer.check()  # raised once
    assert committed == [] and reg.versions() == []
    assert not list(tmp_path.glob(".tmp-*"))  # the torn write left nothing behind
    reg.fail = None
    assert writer.publish(reg, {"model": {"w": [2.0]}}) == 1
    writer.wait()
    assert reg.load(1).state["model"]["w"] == [2.0]
    writer.close()


def test_publish_waits_for_the_write_in_flight_and_raises_its_failure(tmp_path):
    reg = GatedRegistry(tmp_path)
    reg.fail = OSError(5, "I/O error")
    writer = SnapshotWriter()
    writer.publish(reg, {"model": {"w": [1.0]}})
    reg.gate.set()
    with pytest.raises(SnapshotWriteError):
        writer.publish(reg, {"model": {"w": [2.0]}})
    writer.close()


def test_foreground_writes_are_durable_when_publish_returns(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    seen: list = []
    writer = SnapshotWriter(background=False)
    assert writer.publish(reg, {"model": {"w": [1.0]}}, on_durable=seen.append) == 1
    assert reg.versions() == [1] and seen == [1] and not writer.in_flight
    writer.close()


def test_the_checkpointer_commits_offsets_only_after_the_background_write(tmp_path):
    reg = GatedRegistry(tmp_path)
    commits: list = []
    writer = SnapshotWriter()
    cp = Checkpointer([], commit=lambda positions: commits.append((positions, reg.versions())), writer=writer)
    assert cp.save(lambda _ledger_bytes: writer.publish(reg, {"model": {"w": [1.0]}}), {"p0": 12}) == 1
    assert commits == []
    reg.gate.set()
    writer.wait()
    assert commits == [({"p0": 12}, [1])]
    writer.close()
