from __future__ import annotations

import random

import orjson
import pytest
from reloop.connectors.memory.memory import MemoryLog, MemorySource
from reloop.engine.events.schema import Click, Impression
from reloop.engine.replay.sources import EventListSource, ReplaySource, ReplayStalled, event_time_of
from reloop.engine.streams import Record, TopicPartition

IMP0, IMP1, CLK0 = TopicPartition("imp", 0), TopicPartition("imp", 1), TopicPartition("clk", 0)


def _log(seed: int = 0, n: int = 60) -> MemoryLog:
    """Three partitions, each in its own non-decreasing timestamp order, interleaved in time."""
    rng = random.Random(seed)
    log = MemoryLog()
    log.create("imp", 2)
    log.create("clk", 1)
    t = {IMP0: 0, IMP1: 0, CLK0: 0}
    for i in range(n):
        tp = rng.choice([IMP0, IMP1, CLK0])
        t[tp] += rng.randint(0, 5)  # ties across partitions happen
        body = orjson.dumps({"event_time_ms": 5_000 + 3 * t[tp], "i": i})
        log._data[tp].append(Record(tp.topic, tp.partition, len(log._data[tp]), None, body, t[tp]))
    return log


class Choppy:
    """A source that hands out random small slices of random partitions, like uneven Kafka fetches."""

    def __init__(self, inner: MemorySource, seed: int) -> None:
        self.inner, self.rng = inner, random.Random(seed)

    def partitions(self):
        return self.inner.partitions()

    def open(self, positions=None):
        self.inner.open(positions)

    def poll(self, max_records, timeout_s):
        if self.rng.random() < 0.3:
            return []
        tp = self.rng.choice(self.inner.partitions())
        pos = self.inner.position()
        recs = self.inner.log.read(tp, pos[tp], self.rng.randint(1, 4))
        if recs:
            self.inner._next[tp] = recs[-1].offset + 1
        return recs

    def position(self):
        return self.inner.position()

    def close(self):
        self.inner.close()


def _ends(log: MemoryLog) -> dict:
    return {tp: len(log._data[tp]) for tp in (IMP0, IMP1, CLK0)}


def _drain(src: ReplaySource, max_records: int = 7) -> list[list[Record]]:
    src.open()
    polls = []
    for _ in range(10_000):
        if src.done():
            return polls
        polls.append(src.poll(max_records, 0.0))
    raise AssertionError("replay did not finish")


def test_poll_results_do_not_depend_on_how_the_inner_source_fetches() -> None:
    log = _log()
    results = []
    for seed in range(4):
        src = ReplaySource(Choppy(MemorySource(log, ["imp", "clk"]), seed), end=_ends(log), batch_size=5)
        results.append([[(r.topic, r.partition, r.offset) for r in p] for p in _drain(src) if p])
    plain = ReplaySource(MemorySource(log, ["imp", "clk"]), end=_ends(log), batch_size=5)
    results.append([[(r.topic, r.partition, r.offset) for r in p] for p in _drain(plain) if p])
    assert all(r == results[0] for r in results[1:])
    flat = [x for p in results[0] for x in p]
    assert len(flat) == sum(_ends(log).values()) and all(len(p) == 5 for p in results[0][:-1])
    keys = [(log._data[TopicPartition(t, p)][o].timestamp_ms, t, p, o) for t, p, o in flat]
    assert keys == sorted(keys)


def test_bounds_clock_and_event_timestamps() -> None:
    log = _log(1)
    ends = _ends(log)
    end = {tp: max(0, n - 3) for tp, n in ends.items()}
    start = {IMP0: 2, IMP1: 0, CLK0: 1}
    clock: list[int] = []
    src = ReplaySource(
        MemorySource(log, ["imp", "clk"]),
        end=end,
        start=start,
        batch_size=4,
        timestamps="event",
        set_clock=clock.append,
    )
    polls = _drain(src)
    got = [r for p in polls for r in p]
    assert sorted((r.topic, r.partition, r.offset) for r in got) == sorted(
        (tp.topic, tp.partition, o) for tp in end for o in range(start[tp], end[tp])
    )
    # ordered by the event time in the payload, stamped onto the records
    assert all(r.timestamp_ms == event_time_of(r.value) for r in got)
    assert [r.timestamp_ms for r in got] == sorted(r.timestamp_ms for r in got)
    assert clock == [max(r.timestamp_ms for r in p) for p in polls if p]
    assert src.position() == end


def test_an_exhausted_range_blocks_for_the_poll_timeout_like_a_consumer() -> None:
    """A fetch thread looping on a finished replay must not spin (it held the GIL from the training
    thread: a samples-topic replay ran at a third of its speed)."""
    import time

    log = _log(3, n=20)
    src = ReplaySource(MemorySource(log, ["imp", "clk"]), end=_ends(log))
    _drain(src)
    assert src.done()
    t0 = time.monotonic()
    assert src.poll(100, 0.05) == [] and time.monotonic() - t0 >= 0.05
    t0 = time.monotonic()
    assert src.poll(100, 0.0) == [] and time.monotonic() - t0 < 0.05  # a zero timeout never waits


def test_a_range_that_cannot_be_reached_stalls_with_a_clear_error() -> None:
    log = _log(2, n=10)
    end = {tp: n + 5 for tp, n in _ends(log).items()}
    src = ReplaySource(MemorySource(log, ["imp", "clk"]), end=end, stall_timeout_s=0.2)
    src.open()
    with pytest.raises(ReplayStalled, match="deleted by retention"):
        for _ in range(1000):
            src.poll(100, 0.05)


def test_event_list_source() -> None:
    events = [
        Impression("a", "r", "u", "i", {"f": "x"}, 100, 0.5, 0),
        Click("a", 150),
        Impression("b", "r", "u", "j", {"f": "y"}, 120, 0.5, 0),
    ]
    src = EventListSource(events, "imps", "clks")
    assert src.end_positions() == {TopicPartition("imps", 0): 2, TopicPartition("clks", 0): 1}
    src.open()
    got = src.poll(10, 0)
    assert [(r.topic, r.offset, r.timestamp_ms, r.key) for r in got] == [
        ("imps", 0, 100, b"a"), ("imps", 1, 120, b"b"), ("clks", 0, 150, b"a"),
    ]  # fmt: skip
    src.open({TopicPartition("imps", 0): 1})
    assert [(r.topic, r.offset) for r in src.poll(10, 0)] == [("imps", 1), ("clks", 0)]
    assert event_time_of(b"not json") is None and event_time_of(b'{"event_time_ms": true}') is None


def test_first_topics_go_first_among_records_of_one_timestamp() -> None:
    log = MemoryLog()
    log.create("imp", 2)
    log.create("clk", 1)
    for tp, t in ((CLK0, 10), (IMP0, 10), (IMP1, 10), (CLK0, 11), (IMP0, 12)):
        log._data[tp].append(Record(tp.topic, tp.partition, len(log._data[tp]), None, b"{}", t))

    def order(**kw) -> list[tuple[str, int]]:
        polls = _drain(ReplaySource(MemorySource(log, ["imp", "clk"]), end=_ends(log), **kw))
        return [(r.topic, r.timestamp_ms) for p in polls for r in p]

    # by topic name a click of time 10 goes before the impressions of time 10
    assert order()[:3] == [("clk", 10), ("imp", 10), ("imp", 10)]
    assert order(first_topics=("imp",)) == [("imp", 10), ("imp", 10), ("clk", 10), ("clk", 11), ("imp", 12)]


def test_event_list_source_puts_an_impression_before_a_click_of_its_time() -> None:
    events = [Impression("a", "r", "u", "i", {"f": "x"}, 100, 0.5, 0), Click("a", 100)]
    src = EventListSource(events, "x-impressions", "a-clicks")
    src.open()
    assert [r.topic for r in src.poll(10, 0)] == ["x-impressions", "a-clicks"]


def test_a_first_record_without_a_time_is_not_the_replays_first_time() -> None:
    # A JSONL file whose first line has no event time (not JSON: it is dead-lettered) stamps it 0 and it
    # goes out first: the summary's first_time_ms said 1970.
    log = _log(2)
    log._data[CLK0].insert(0, Record("clk", 0, 0, None, b"not json", 0))
    log._data[CLK0] = [r._replace(offset=i) for i, r in enumerate(log._data[CLK0])]
    src = ReplaySource(MemorySource(log, ["imp", "clk"]), end=_ends(log), batch_size=4, timestamps="event")
    got = [r for p in _drain(src) for r in p]
    assert got[0].value == b"not json"
    assert src.first_timestamp_ms == min(r.timestamp_ms for r in got if r.value != b"not json") > 0
