from __future__ import annotations

import random

from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.merge import RecordMerger
from reloop.engine.streams import Record, TopicPartition, merge_ends

A, B = TopicPartition("imp", 0), TopicPartition("clk", 0)


def _records(tp: TopicPartition, stamps: list[int]) -> list[Record]:
    return [
        Record(tp.topic, tp.partition, i, None, f"{tp.topic}{i}".encode(), t) for i, t in enumerate(stamps)
    ]


def _merge_in_chunks(seed: int, a: list[Record], b: list[Record], ends: dict | None) -> list[bytes]:
    rng = random.Random(seed)
    clock = ManualClock(0)
    m = RecordMerger([A, B], idle_ms=1_000, clock=clock)
    ia = ib = 0
    out: list[bytes] = []
    while ia < len(a) or ib < len(b):
        # The consumer hands over a random slice of one partition at a time.
        if rng.random() < 0.5 and ia < len(a):
            k = rng.randint(1, 5)
            m.add(a[ia : ia + k])
            ia += k
        elif ib < len(b):
            k = rng.randint(1, 5)
            m.add(b[ib : ib + k])
            ib += k
        pos = {A: min(ia, len(a)), B: min(ib, len(b))}
        out += [r.value for r in m.release(pos, ends)]
    out += [r.value for r in m.release({A: len(a), B: len(b)}, ends)]
    return out


def test_order_does_not_depend_on_how_records_arrive():
    rng = random.Random(0)
    a = _records(A, sorted(rng.randint(0, 1000) for _ in range(60)))
    b = _records(B, sorted(rng.randint(0, 1000) for _ in range(40)))
    ends = {A: len(a), B: len(b)}
    orders = {tuple(_merge_in_chunks(seed, a, b, ends)) for seed in range(20)}
    assert len(orders) == 1
    (order,) = orders
    assert len(order) == 100
    stamps = {r.value: r.timestamp_ms for r in a + b}
    assert [stamps[v] for v in order] == sorted(stamps[v] for v in order)


def test_empty_partition_blocks_until_at_its_end():
    m = RecordMerger([A, B], idle_ms=10, clock=ManualClock(0))
    m.add(_records(A, [5, 6]))
    assert m.release({A: 2, B: 0}, {A: 2, B: 3}) == []  # B has 3 records not fetched yet
    assert m.release({A: 2, B: 0}, {}) == []  # ends unknown (broker down): hold back
    assert [r.timestamp_ms for r in m.release({A: 2, B: 3}, {A: 2, B: 3})] == [5, 6]


def test_idle_rule_without_end_offsets():
    clock = ManualClock(0)
    m = RecordMerger([A, B], idle_ms=1_000, clock=clock)
    m.add(_records(A, [5, 6]))
    assert m.release() == []
    clock.advance(999)
    assert m.release() == []
    clock.advance(1)
    assert [r.timestamp_ms for r in m.release()] == [5, 6]


class _Ends:
    """A source's end-offset calls, recorded: ``fetched`` is what its last fetches reported (None:
    unknown), ``asked`` what the broker says now."""

    def __init__(self, fetched: dict | None, asked: dict) -> None:
        self.fetched, self.asked, self.calls = fetched, asked, []

    def fetched_ends(self) -> dict | None:
        self.calls.append("fetched")
        return self.fetched

    def end_positions(self) -> dict:
        self.calls.append("asked")
        return self.asked


def test_merge_ends_take_the_fetched_ends_when_known_and_ask_otherwise() -> None:
    known = _Ends({A: 5, B: 7}, {A: 9, B: 9})
    assert merge_ends(known) == {A: 5, B: 7} and known.calls == ["fetched"]  # no round trip
    unknown = _Ends(None, {A: 9, B: 9})
    assert merge_ends(unknown) == {A: 9, B: 9} and unknown.calls == ["fetched", "asked"]

    class AskOnly:
        def end_positions(self) -> dict:
            return {A: 3}

    assert merge_ends(AskOnly()) == {A: 3}
    assert merge_ends(object()) is None  # a source that cannot tell: the merge waits for idleness


def test_a_record_stamped_ahead_merges_with_its_successors_whatever_the_chunks():
    """One record of A stamped an hour ahead (a producer's clock): before, every later record of A waited
    behind it until B ran dry; now it goes where its successors go, and the order still does not depend
    on how the records arrive. A run longer than the lookahead is not covered."""
    rng = random.Random(1)
    stamps = sorted(rng.randint(0, 1000) for _ in range(60))
    stamps[20] += 3_600_000
    a = _records(A, stamps)
    b = _records(B, sorted(rng.randint(0, 1000) for _ in range(40)))
    ends = {A: len(a), B: len(b)}
    orders = {tuple(_merge_in_chunks(seed, a, b, ends)) for seed in range(20)}
    assert len(orders) == 1
    (order,) = orders
    pos = {v: i for i, v in enumerate(order)}
    b_after = [r for r in b if r.timestamp_ms > stamps[21]]
    assert b_after and all(pos[a[20].value] < pos[r.value] for r in b_after)  # not held to the end
    assert [pos[r.value] for r in a] == sorted(pos[r.value] for r in a)  # A keeps its own order
    m = RecordMerger([A, B], idle_ms=10, clock=ManualClock(0))
    m.add(a)
    m.add(b)
    assert [r.value for r in m.drain()] == list(order)  # drain: the same order
    m = RecordMerger([A, B], idle_ms=10, clock=ManualClock(0))
    m.add(a)
    m.add(b)
    assert len(m.release(ends, ends)) == 100 and m.stamped_ahead == 1  # counted (and logged)
    before = _lookahead_one(a, b)  # merged by its own timestamp, the record waited for all of B
    assert all(before.index(r.value) < before.index(a[20].value) for r in b)


def _lookahead_one(a: list[Record], b: list[Record]) -> list[bytes]:
    """Merged by each record's own timestamp (lookahead 1, the merge before)."""
    m = RecordMerger([A, B], idle_ms=10, clock=ManualClock(0), lookahead=1)
    m.add(a)
    m.add(b)
    return [r.value for r in m.release({A: len(a), B: len(b)}, {A: len(a), B: len(b)})]


def test_fewer_records_than_the_lookahead_block_until_at_the_end():
    m = RecordMerger([A, B], idle_ms=10, clock=ManualClock(0), lookahead=3)
    m.add(_records(A, [5, 6, 7, 8]))
    m.add(_records(B, [1, 2]))
    assert m.needs_ends() and m.release({A: 4, B: 2}, {A: 4, B: 9}) == []  # B's keys may still fall
    assert [r.timestamp_ms for r in m.release({A: 4, B: 2}, {A: 4, B: 2})] == [1, 2, 5, 6, 7, 8]
    m.add(_records(B, [50, 3, 60]))  # offsets 0-2 again: only the order of release matters here
    m.add(_records(A, [10, 11, 12]))
    released = m.release({A: 7, B: 5}, {A: 9, B: 9})
    assert [r.timestamp_ms for r in released] == [50]  # merged at 3 (its successor's), before A's 10
    assert m.stamped_ahead == 0  # 47 ms ahead: under the 1 s that is counted
    assert [r.timestamp_ms for r in m.release({A: 7, B: 5}, {A: 7, B: 5})] == [3, 10, 11, 12, 60]


def test_fewer_records_than_the_lookahead_wait_only_for_other_partitions_records():
    # Nothing else buffered to order them against: they go (a one-partition samples topic replayed
    # on a clock that does not move waited for ever).
    m = RecordMerger([A, B], idle_ms=10, clock=ManualClock(0), lookahead=4)
    m.add(_records(A, [5, 6]))
    assert [r.timestamp_ms for r in m.release({A: 2, B: 0}, {A: 9, B: 0})] == [5, 6]
    m = RecordMerger([A], idle_ms=10, clock=ManualClock(0), lookahead=4)
    m.add(_records(A, [5, 60, 7]))
    assert [r.timestamp_ms for r in m.release()] == [5, 60, 7]


def test_first_topics_go_first_among_records_of_one_timestamp() -> None:
    # "clk" sorts before "imp": without a rank a click of its impression's millisecond went first and
    # the joiner held it as an early click.
    a, b = _records(A, [5, 5, 9]), _records(B, [5, 7])
    ends = {A: 3, B: 2}
    for first, want in (((), [b"clk0", b"imp0", b"imp1"]), (("imp",), [b"imp0", b"imp1", b"clk0"])):
        m = RecordMerger([A, B], idle_ms=10, clock=ManualClock(0), first_topics=first)
        m.add(a)
        m.add(b)
        assert [r.value for r in m.release(ends, ends)][:3] == want
        m = RecordMerger([A, B], idle_ms=10, clock=ManualClock(0), first_topics=first)
        m.add(a)
        m.add(b)
        assert [r.value for r in m.drain()][:3] == want  # drain: the same order
