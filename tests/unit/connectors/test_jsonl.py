"""JSONL files specifics the shared contract does not cover: torn last lines, layout, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from reloop.connectors.files.jsonl import JsonlSink, JsonlSource, create_topic, partition_path
from reloop.engine.streams import TopicPartition


def test_a_partially_written_last_line_is_delivered_only_when_complete(tmp_path: Path) -> None:
    create_topic(tmp_path, "events", 1)
    path = partition_path(tmp_path, "events", 0)
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": ')  # a writer crashed or is mid-write
    source = JsonlSource(root=tmp_path, topics=["events"])
    source.open()
    assert [r.value for r in source.poll(10, 0.05)] == [b'{"a": 1}', b'{"a": 2}']
    assert source.poll(10, 0.05) == []
    assert source.position() == {TopicPartition("events", 0): 2}

    with open(path, "ab") as f:
        f.write(b'3}\n{"a": 4}\n')
    got = source.poll(10, 0.05)
    assert [(r.offset, r.value) for r in got] == [(2, b'{"a": 3}'), (3, b'{"a": 4}')]
    source.close()


def test_resume_skips_complete_lines_and_refuses_a_position_past_the_end(tmp_path: Path) -> None:
    sink = JsonlSink(root=tmp_path, topic="t")
    for i in range(5):
        sink.send(b"%d" % i)
    sink.close()
    source = JsonlSource(root=tmp_path, topics=["t"])
    source.open({TopicPartition("t", 0): 3})
    assert [r.value for r in source.poll(10, 0.05)] == [b"3", b"4"]
    with pytest.raises(ValueError, match="past its last complete line"):
        source.open({TopicPartition("t", 0): 6})
    source.close()


def test_layout_is_one_file_per_partition_with_keys_routed_stably(tmp_path: Path) -> None:
    sink = JsonlSink(root=tmp_path, topic="clicks", partitions=3)
    for i in range(30):
        sink.send(b'{"i": %d}' % i, key=b"imp-%d" % (i % 4))
    sink.close()
    files = sorted((tmp_path / "clicks").iterdir())
    assert [f.name for f in files] == [
        "partition-00000.jsonl",
        "partition-00001.jsonl",
        "partition-00002.jsonl",
    ]
    assert sum(len(f.read_bytes().splitlines()) for f in files) == 30

    # A second sink (another process, say) routes the same key to the same file.
    again = JsonlSink(root=tmp_path, topic="clicks", partitions=3)
    again.send(b'{"i": 99}', key=b"imp-1")
    again.close()
    holder = [f for f in files if b'{"i": 1}' in f.read_bytes().splitlines()]
    assert len(holder) == 1 and b'{"i": 99}' in holder[0].read_bytes().splitlines()


def test_bad_input_fails_clearly(tmp_path: Path) -> None:
    sink = JsonlSink(root=tmp_path, topic="t", partitions=2)
    with pytest.raises(ValueError, match="line break"):
        sink.send(b'{"a":\n1}')
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.send(b"{}")
    with pytest.raises(ValueError, match="has 2 partitions, not 3"):
        JsonlSink(root=tmp_path, topic="t", partitions=3)
    with pytest.raises(ValueError, match="does not exist"):
        JsonlSource(root=tmp_path, topics=["nope"]).partitions()
    source = JsonlSource(root=tmp_path, topics=["t"])
    with pytest.raises(ValueError, match="does not read"):
        source.open({TopicPartition("other", 0): 1})


def test_a_sink_appending_after_a_torn_last_line_keeps_its_records_whole(tmp_path: Path) -> None:
    create_topic(tmp_path, "events", 1)
    path = partition_path(tmp_path, "events", 0)
    path.write_bytes(b'{"a": 1}\n{"a": ')  # a writer crashed mid-line
    sink = JsonlSink(root=tmp_path, topic="events")
    sink.send(b'{"b": 2}')
    sink.send(b'{"c": 3}')
    sink.close()
    source = JsonlSource(root=tmp_path, topics=["events"])
    source.open()
    got = [r.value for r in source.poll(10, 0.05)]
    source.close()
    # The torn line is a record of its own (a consumer dead-letters it); the new records are intact.
    assert got == [b'{"a": 1}', b'{"a": ', b'{"b": 2}', b'{"c": 3}']


def test_a_sink_appending_after_complete_lines_adds_no_empty_line(tmp_path: Path) -> None:
    for value in (b"1", b"2"):  # two sinks one after the other (a restart)
        sink = JsonlSink(root=tmp_path, topic="t")
        sink.send(value)
        sink.close()
    assert partition_path(tmp_path, "t", 0).read_bytes() == b"1\n2\n"
