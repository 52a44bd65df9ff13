"""A full disk (ENOSPC) or a failed fsync under a JSONL sink (samples, dead letters): the error names the
file, a line cut short is never glued to the next record, the sink takes nothing more, and a dead letter
the sink could not take is not counted."""

from __future__ import annotations

import errno
import os

import pytest
from reloop.connectors.files import jsonl
from reloop.connectors.files.jsonl import JsonlSink, JsonlSource, partition_path
from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.streams import Record


def test_a_record_cut_short_by_a_full_disk_is_never_glued_to_the_next(tmp_path, monkeypatch, full_disk):
    room = [10**9]
    full_disk(jsonl, room)
    sink = JsonlSink(root=tmp_path, topic="dead")
    path = partition_path(tmp_path, "dead", 0)
    sink.send(b'{"a":1}')
    sink.flush()
    room[0] = 5000
    with pytest.raises(OSError) as first:
        sink.send(b'{"big":"' + b"x" * 20000 + b'"}')  # larger than any buffer: written at once
    room[0] = 10**9  # space again
    refused = None
    try:
        sink.send(b'{"next":1}')
        sink.flush()
    except OSError as exc:
        refused = exc
    assert path.read_bytes() == b'{"a":1}\n'  # the torn line's bytes are cut off, nothing glued to them
    assert refused is not None and "takes nothing more" in str(refused)
    for exc in (first.value, refused):
        assert exc.errno == errno.ENOSPC and str(path) in repr(exc)
    with pytest.raises(OSError, match="takes nothing more"):
        sink.close()  # releases the files, and says the sink failed
    src = JsonlSource(root=tmp_path, topics=["dead"])
    src.open()
    assert [r.value for r in src.poll(10, 0)] == [b'{"a":1}']
    src.close()


def test_a_failed_flush_names_the_file_and_close_still_releases_it(tmp_path, monkeypatch, full_disk):
    room = [10**9]
    full_disk(jsonl, room)
    sink = JsonlSink(root=tmp_path, topic="samples")
    sink.send(b'{"s":1}')  # pending in memory
    room[0] = 3
    with pytest.raises(OSError) as raised:
        sink.flush()
    path = partition_path(tmp_path, "samples", 0)
    assert path.read_bytes() == b""  # the 3 bytes that landed are taken back
    assert raised.value.errno == errno.ENOSPC and str(path) in repr(raised.value)
    with pytest.raises(OSError):
        sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.send(b'{"s":2}')


def test_a_failed_fsync_is_final(tmp_path, monkeypatch):
    sink = JsonlSink(root=tmp_path, topic="samples")
    sink.send(b'{"s":1}')
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as raised:
        sink.flush()
    monkeypatch.setattr(os, "fsync", real_fsync)
    with pytest.raises(OSError, match="takes nothing more"):
        sink.flush()  # Linux reports an fsync error once: a second fsync that succeeds proves nothing
    assert raised.value.errno == errno.EIO
    assert str(partition_path(tmp_path, "samples", 0)) in repr(raised.value)
    sink.abort()  # what a failed stage does: no write, no error


def test_a_dead_letter_the_file_cannot_take_is_not_counted(tmp_path, monkeypatch, full_disk):
    room = [10**9]
    full_disk(jsonl, room)
    path = partition_path(tmp_path, "deadletter", 0)
    letters = DeadLetterSink(JsonlSink(root=tmp_path, topic="deadletter"))
    bad = Record("impressions", 0, 7, None, b"y" * 20000, 1)  # an envelope larger than any buffer
    room[0] = 100
    with pytest.raises(OSError) as raised:
        letters.send(bad, ValueError("bad value"))
    assert letters.counts == {} and letters.total == 0
    assert raised.value.errno == errno.ENOSPC and str(path) in repr(raised.value)
    assert path.read_bytes() == b""
