from __future__ import annotations

import random
import weakref
from array import array

import pytest
from reloop.engine.join import Joiner, JoinerConfig


class FakeClock:
    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make(**overrides) -> tuple[Joiner, FakeClock]:
    base = dict(
        window_ms=1_000,
        allowed_lateness_ms=100,
        idle_timeout_ms=5_000,
        click_grace_ms=500,
        retention_ms=10_000,
        bucket_ms=50,
    )
    base.update(overrides)
    clock = FakeClock()
    return Joiner(JoinerConfig(**base), clock=clock), clock


def labels(out) -> list[tuple[str, int, bool]]:
    return [(j.impression_id, j.label, j.is_correction) for j in out]


def test_click_inside_window_emits_positive_at_once_with_payload():
    j, _ = make()
    assert j.on_impression("a", 10_000, b"A") == []
    out = j.on_click("a", 10_900)
    assert labels(out) == [("a", 1, False)]
    assert out[0].payload == b"A" and out[0].event_time_ms == 10_000
    assert j.pending_count == 0


def test_negative_only_when_watermark_passes_window_end():
    j, _ = make()
    j.on_impression("a", 10_000, b"A")
    # watermark = 11_050 - 100 = 10_950 < 11_000: still pending
    assert j.on_impression("b", 11_050, b"B") == []
    # watermark 11_000 reaches a's deadline: a click stamped 11_000 may still come (100 ms late)
    assert j.on_impression("c", 11_100, b"C") == []
    out = j.on_impression("d", 11_101, b"D")  # watermark 11_001 passes it
    assert labels(out) == [("a", 0, False)]
    assert j.stats.negatives == 1 and j.pending_count == 3


def test_negatives_come_out_in_deadline_order():
    j, _ = make()
    j.on_impression("late", 10_300, b"")
    j.on_impression("early", 10_100, b"")
    j.on_impression("mid", 10_200, b"")
    out = j.on_impression("x", 20_000, b"")
    assert [x.impression_id for x in out] == ["early", "mid", "late"]


def test_idle_watermark_advances_with_wall_clock():
    j, clock = make()
    j.on_impression("a", 10_000, b"A")
    clock.now += 4_999
    assert j.advance() == []  # not idle long enough
    clock.now += 1  # idle for exactly the timeout: the watermark is still the event one (9_900)
    assert j.advance() == []
    clock.now += 1_100  # 9_900 + 1_100 = 11_000: at the deadline, not past it
    assert j.advance() == []
    clock.now += 1
    assert labels(j.advance()) == [("a", 0, False)]
    assert j.stats.idle_advances >= 1


def test_idle_watermark_does_not_fire_while_input_flows():
    j, clock = make()
    j.on_impression("a", 10_000, b"A")
    for i in range(20):
        clock.now += 1_000
        j.on_click("zz", 10_000 + i)  # input with old event times keeps the joiner busy
        assert j.advance() == []
    assert j.pending_count == 1


def test_watermark_never_goes_back_after_idle():
    j, clock = make()
    j.on_impression("a", 10_000, b"A")
    clock.now += 10_000
    j.advance()
    wm = j.watermark_ms
    j.on_impression("b", 10_500, b"B")  # older than the idle watermark allows for its window? no: 11_500 > wm
    assert j.watermark_ms == wm


def test_duplicate_impression_dropped_while_pending_and_after_emit():
    j, _ = make()
    j.on_impression("a", 10_000, b"A")
    assert j.on_impression("a", 10_010, b"A2") == []
    j.on_click("a", 10_100)
    assert j.on_impression("a", 10_020, b"A3") == []
    assert j.stats.duplicate_impressions == 2
    assert j.stats.positives == 1


def test_several_clicks_make_one_positive():
    j, _ = make()
    j.on_impression("a", 10_000, b"A")
    out = j.on_click("a", 10_100) + j.on_click("a", 10_200) + j.on_click("a", 10_300)
    assert labels(out) == [("a", 1, False)]
    assert j.stats.duplicate_clicks == 2
    out = j.on_impression("z", 30_000, b"")
    assert labels(out) == []  # no negative for a after its positive


def test_click_before_impression_is_held_for_grace():
    j, _ = make()
    assert j.on_click("a", 10_050) == []
    assert j.early_click_count == 1
    out = j.on_impression("a", 10_000, b"A")
    assert labels(out) == [("a", 1, False)]
    assert j.stats.early_clicks_held == 1 and j.stats.early_clicks_matched == 1


@pytest.mark.parametrize("emit_policy", ["window", "fnw"])
@pytest.mark.parametrize("click_first", [False, True])
def test_a_click_stamped_before_its_impression_beyond_the_grace_is_too_late_not_a_positive(
    emit_policy, click_first
):
    # Event times in seconds, or a click producer's clock hours behind: such a click met a pending
    # impression (no lower bound on click - impression time) and trained a positive, counted nowhere;
    # arriving first it was held and matched the same way.
    j, _ = make(emit_policy=emit_policy, late_click_policy="correct")
    out = []
    if click_first:
        out += j.on_click("a", 9_499)  # 501 ms before its impression: held (the watermark allows it)
    out += j.on_impression("a", 10_000, b"A")
    if not click_first:
        out += j.on_click("a", 9_499)
    assert j.stats.too_late_clicks == 1 and j.stats.positives == 0 and j.stats.corrections == 0
    out += j.on_impression("x", 20_000, b"")  # a's window closes without a click that counts
    assert [x for x in labels(out) if x[0] == "a"] == [("a", 0, False)]
    # Within the grace a click before its impression still counts (clock skew).
    k, _ = make(emit_policy=emit_policy, late_click_policy="correct")
    k.on_impression("b", 10_000, b"B")
    assert labels(k.on_click("b", 9_500)) == [("b", 1, emit_policy == "fnw")]


def test_a_click_stamped_long_before_a_closed_negative_is_no_correction():
    j, _ = make(late_click_policy="correct")
    j.on_impression("a", 10_000, b"A")
    assert labels(j.on_impression("x", 11_101, b"")) == [("a", 0, False)]
    assert j.on_click("a", 5_000) == []  # before its impression by 5 s (grace 500 ms)
    assert j.stats.too_late_clicks == 1 and j.stats.corrections == 0
    assert labels(j.on_click("a", 11_200)) == [("a", 1, True)]  # a late click that is one


def test_orphan_click_counted_and_dropped_after_grace():
    j, _ = make()
    j.on_click("ghost", 10_000)
    j.on_impression("b", 10_599, b"")  # watermark 10_499 < 10_500
    assert j.stats.orphan_clicks == 0
    j.on_impression("c", 10_600, b"")  # watermark 10_500: grace over
    assert j.stats.orphan_clicks == 1 and j.early_click_count == 0
    # The impression arriving after the grace period becomes a plain negative later.
    j.on_impression("ghost", 10_550, b"G")
    out = j.on_impression("d", 20_000, b"")
    assert ("ghost", 0, False) in labels(out)


def test_late_click_policy_drop():
    j, _ = make(late_click_policy="drop")
    j.on_impression("a", 10_000, b"A")
    assert labels(j.on_impression("x", 11_101, b"")) == [("a", 0, False)]
    assert j.on_click("a", 11_200) == []
    assert j.stats.late_clicks_dropped == 1 and j.stats.corrections == 0


def test_late_click_policy_correct_emits_one_flagged_positive():
    j, _ = make(late_click_policy="correct")
    j.on_impression("a", 10_000, b"A")
    j.on_impression("x", 11_101, b"")
    out = j.on_click("a", 11_200)
    assert labels(out) == [("a", 1, True)]
    assert out[0].payload == b"A"
    assert j.on_click("a", 11_300) == []  # a second late click: no second correction
    assert j.stats.late_clicks_corrected == 1 and j.stats.duplicate_clicks == 1


@pytest.mark.parametrize(
    "policy,expected", [("drop", [("a", 0, False)]), ("correct", [("a", 0, False), ("a", 1, True)])]
)
def test_click_beyond_window_arriving_early_gives_same_result_as_arriving_late(policy, expected):
    j, _ = make(late_click_policy=policy, allowed_lateness_ms=5_000)
    j.on_impression("a", 10_000, b"A")
    assert j.on_click("a", 11_500) == []  # beyond W, but the negative is not out yet (lateness)
    out = j.on_impression("x", 16_001, b"")
    assert labels(out) == expected


def test_late_impression_is_decided_immediately():
    j, _ = make()
    j.on_impression("x", 20_000, b"")
    out = j.on_impression("old", 15_000, b"O")  # window ended at 16_000 < watermark 19_900
    assert labels(out) == [("old", 0, False)]
    assert j.stats.late_impressions == 1


def test_too_late_impression_dropped():
    j, _ = make()
    j.on_impression("x", 100_000, b"")
    assert j.on_impression("ancient", 1_000, b"") == []
    assert j.stats.too_late_impressions == 1


def test_max_pending_evicts_oldest_and_counts():
    j, _ = make(max_pending=3)
    for i, t in enumerate([10_000, 10_100, 10_200, 10_300]):
        j.on_impression(f"i{i}", t, b"")
    assert j.pending_count == 3
    assert j.stats.evicted_pending == 1
    out = j.on_click("unknown", 50_000)  # only moves the watermark
    assert sorted(x.impression_id for x in out) == ["i1", "i2", "i3"]


def test_max_early_clicks_bound_counted():
    j, _ = make(max_early_clicks=2)
    for i in range(4):
        j.on_click(f"c{i}", 10_000)
    assert j.early_click_count == 2 and j.stats.evicted_early_clicks == 2


def test_max_closed_bound_counted():
    j, _ = make(max_closed=2)
    for i in range(4):
        j.on_impression(f"i{i}", 10_000 + i, b"")
        j.on_click(f"i{i}", 10_000 + i)
    assert j.closed_count == 2 and j.stats.evicted_closed == 2


def test_redelivered_impression_after_ttl_is_labeled_once():
    # At-least-once input: the same impression (same id and time) comes again after the TTL dropped it.
    # The deadline index then holds two entries with one deadline; one negative comes out, no error.
    j, clock = make(ttl_ms=1_000, idle_timeout_ms=10**9)
    j.on_impression("a", 10_000, b"A")
    clock.now += 2_000
    j.advance()
    assert j.stats.expired_ttl == 1
    j.on_impression("a", 10_000, b"A")
    out = j.on_click("unknown", 20_000)  # the watermark passes the window
    assert labels(out) == [("a", 0, False)]
    assert j.pending_count == 0 and j.stats.negatives == 1


def test_ttl_of_a_redelivered_impression_counts_from_the_redelivery():
    j, clock = make(ttl_ms=3_000, idle_timeout_ms=10**9, max_pending=1)
    j.on_impression("a", 10_000, b"A")
    j.on_impression("b", 10_001, b"B")  # evicts "a" (the earliest deadline)
    clock.now += 2_000
    j.on_impression("a", 10_002, b"A")  # sent again, later: evicts "b", "a" is pending again
    clock.now += 1_500  # 3.5 s after the first delivery, 1.5 s after the second
    j.advance()
    assert j.pending_count == 1 and j.stats.expired_ttl == 0
    clock.now += 2_000
    j.advance()
    assert j.pending_count == 0 and j.stats.expired_ttl == 1


def test_ttl_of_a_redelivered_impression_counts_from_the_redelivery_after_a_restore():
    # The first delivery's arrival stays in its second's list with an entry that is no longer "a"'s:
    # the snapshot keeps only arrivals whose key still holds that very entry.
    j, clock = make(ttl_ms=3_000, idle_timeout_ms=10**9, max_pending=1)
    j.on_impression("a", 10_000, b"A")
    j.on_impression("b", 10_001, b"B")  # evicts "a"
    clock.now += 2_000
    j.on_impression("a", 10_002, b"A")  # "a" pending again, arrived 2 s later
    restored = Joiner(j.config, clock)
    restored.load_state_dict(j.state_dict())
    clock.now += 1_500
    restored.advance()
    assert restored.pending_count == 1 and restored.stats.expired_ttl == 0
    clock.now += 2_000
    restored.advance()
    assert restored.pending_count == 0 and restored.stats.expired_ttl == 1


def test_snapshot_after_a_re_added_impression_restores_one_entry():
    j, clock = make(ttl_ms=1_000, idle_timeout_ms=10**9)
    j.on_impression("a", 10_000, b"A")
    clock.now += 2_000
    j.advance()  # TTL drops "a" (never labeled)
    j.on_impression("a", 10_000, b"A")  # redelivered
    data = j.state_dict()
    assert list(array("q", data["blobs"]["pending_order"])) == [0]  # one entry: position 0
    restored = Joiner(j.config, clock)
    restored.load_state_dict(data)
    assert labels(restored.on_impression("z", 20_000, b"")) == [("a", 0, False)]


def test_ttl_drops_pending_by_wall_clock():
    j, clock = make(ttl_ms=3_000, idle_timeout_ms=10**9)
    j.on_impression("a", 10_000, b"A")
    clock.now += 2_000
    j.on_impression("b", 10_001, b"B")
    clock.now += 1_500
    j.advance()
    assert j.stats.expired_ttl == 1 and j.pending_count == 1
    clock.now += 2_000
    j.advance()
    assert j.stats.expired_ttl == 2 and j.pending_count == 0


class _Payload:
    """A payload the test can watch being freed (the joiner never looks inside one)."""

    __slots__ = ("__weakref__",)


def test_the_ttl_lets_go_of_impressions_no_longer_pending_and_still_expires_the_pending():
    # The TTL's arrival list held every impression with its payload for ttl_ms (6 h of wall clock) however
    # soon its window closed: 200,000 impressions of 800 B kept 193 MB while 1,001 were pending.
    ttl = 3_600_000
    j, clock = make(late_click_policy="drop", ttl_ms=ttl, idle_timeout_ms=10**12)
    payloads = []
    for i in range(50_000):
        clock.now += 1
        payload = _Payload()
        payloads.append(weakref.ref(payload))
        j.on_impression(f"i{i}", 10_000 + i, payload)
    del payload
    pending = j.pending_count
    assert 1_000 <= pending <= 1_200
    alive = sum(ref() is not None for ref in payloads)
    assert alive == pending  # not the 50,000 fed
    clock.now += ttl + 1_000
    j.advance()
    assert j.stats.expired_ttl == pending and j.pending_count == 0
    assert sum(ref() is not None for ref in payloads) == 0


def test_retention_forgets_closed_entries():
    j, _ = make(retention_ms=1_000)
    j.on_impression("a", 10_000, b"A")
    j.on_click("a", 10_100)
    assert j.closed_count == 1
    j.on_impression("x", 12_200, b"")  # watermark 12_100 > 10_000 + 1_000 + 1_000
    assert j.closed_count == 0


def test_flush_closes_everything():
    j, _ = make()
    j.on_impression("a", 10_000, b"")
    j.on_impression("b", 10_500, b"")
    assert [x.label for x in j.flush()] == [0, 0]
    assert j.pending_count == 0


def test_flush_counts_the_clicks_still_waiting_for_their_impression_as_orphans():
    # A replayed time range's first clicks belong to impressions before it: held as early clicks, and
    # at the end of the replay counted nowhere (early_clicks_held 13, orphan_clicks 0).
    j, _ = make()
    j.on_click("before-the-range", 10_000)
    j.on_impression("a", 10_100, b"")
    assert j.stats.early_clicks_held == 1 and j.stats.orphan_clicks == 0
    assert [x.label for x in j.flush()] == [0]
    assert j.stats.orphan_clicks == 1 and j.early_click_count == 0


def _random_stream(seed: int, n: int = 400):
    rng = random.Random(seed)
    events = []
    for i in range(n):
        t = 10_000 + i * 20 + rng.randint(-200, 200)
        events.append(("imp", f"i{i}", t))
        if rng.random() < 0.1:
            events.append(("imp", f"i{i}", t))
        r = rng.random()
        if r < 0.3:
            events.append(("click", f"i{i}", t + rng.randint(0, 900)))
        elif r < 0.4:
            events.append(("click", f"i{i}", t + rng.randint(1_100, 3_000)))
        elif r < 0.45:
            events.append(("click", f"ghost{i}", t))
    # Local shuffles: skew between partitions.
    for k in range(0, len(events) - 3, 3):
        if rng.random() < 0.3:
            events[k], events[k + 2] = events[k + 2], events[k]
    return events


def _feed(j: Joiner, events) -> list:
    out = []
    for kind, key, t in events:
        out.extend(j.on_impression(key, t, key.encode()) if kind == "imp" else j.on_click(key, t))
    return out


def test_bytes_payloads_are_saved_as_columns_and_a_list_state_still_loads():
    """Format 2 keeps pending and closed impressions as columns (ids, times, payloads: one bytes each);
    a format-1 state (lists, as written before) restores the same joiner; other payloads stay lists."""
    events = _random_stream(3)
    j, clock = make(late_click_policy="correct", window_ms=10_000)
    _feed(j, events[:300])
    data = j.state_dict()
    assert data["format"] == 2 and "pending" not in data and j.pending_count and j.closed_count
    assert data["blobs"]["pending_payloads"].startswith(next(iter(j._pending.values()))[1])
    old = j.state_dict(columns=False)
    assert old["format"] == 1 and "blobs" not in old and len(old["pending"]) == j.pending_count
    expected = _feed(j, events[300:]) + j.flush()
    for state in (data, old):
        restored = Joiner(j.config, clock)
        restored.load_state_dict(state)
        assert _feed(restored, events[300:]) + restored.flush() == expected
        assert restored.stats == j.stats
    k, _ = make()
    k.on_impression("x", 1_000, {"not": "bytes"})
    assert k.state_dict()["format"] == 1 and k.state_dict()["pending"] == [["x", 1_000, {"not": "bytes"}]]


@pytest.mark.parametrize("policy", ["drop", "correct"])
def test_snapshot_restore_continues_identically(policy):
    events = _random_stream(7)
    ref, clock = make(late_click_policy=policy)
    expected = _feed(ref, events) + ref.flush()
    for cut in (1, 57, 200, len(events) - 1):
        j, clock = make(late_click_policy=policy)
        got = _feed(j, events[:cut])
        data = j.state_dict()
        restored = Joiner(j.config, clock)
        restored.load_state_dict(data)
        got += _feed(restored, events[cut:]) + restored.flush()
        assert got == expected
        assert restored.stats == ref.stats


def _hostile_stream(seed: int, n: int = 2_000):
    """Reused ids (redeliveries, also after a bound dropped them), skewed times, wall time jumps, and
    ``snap`` marks where a resumed run restores from a snapshot."""
    rng = random.Random(seed)
    t, events = 1_000_000, []
    for _ in range(n):
        t += rng.choice([0, 1, 2, 5, 50, 400])
        key = f"i{rng.randrange(max(5, (t - 1_000_000) // 60))}"
        when = t + rng.choice([0, 0, -30, -300, -3_000, 200])
        kind = rng.choices(["imp", "click", "advance", "snap"], [60, 35, 3, 2])[0]
        events.append((kind, key, when, rng.choice([0, 0, 1, 10, 500, 4_000])))
    return events


def _run_hostile(config: JoinerConfig, events, resume: bool, payload=str) -> list:
    clock = FakeClock()
    j = Joiner(config, clock)
    out = []
    for kind, key, t, wall_step in events:
        clock.now += wall_step
        if kind == "imp":
            out.append(j.on_impression(key, t, key if payload is str else key.encode()))
        elif kind == "click":
            out.append(j.on_click(key, t))
        elif kind == "advance":
            out.append(j.advance())
        elif resume:
            data = j.state_dict()
            j = Joiner(config, clock)
            j.load_state_dict(data)
        out.append((j.watermark_ms, j.pending_count, j.closed_count, j.early_click_count))
    return [*out, j.flush(), j.stats.as_dict()]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(max_pending=20, max_closed=30, max_early_clicks=5, ttl_ms=3_000, bucket_ms=7),
        dict(emit_policy="fnw", max_closed=40, bucket_ms=1, retention_ms=1_000),
        dict(late_click_policy="drop", max_pending=50, ttl_ms=20_000, bucket_ms=1_000, retention_ms=700),
    ],
)
@pytest.mark.parametrize("payload", [str, bytes], ids=["lists", "columns"])
def test_resume_from_snapshots_equals_an_uninterrupted_run_under_bounds_and_redeliveries(overrides, payload):
    # The idle timer restarts on restore by design (downtime is not idleness), so it is off here.
    base = dict(
        window_ms=500, allowed_lateness_ms=50, click_grace_ms=300, retention_ms=2_000, idle_timeout_ms=10**12
    )
    config = JoinerConfig(**{**base, **overrides})
    for seed in range(6):
        events = _hostile_stream(seed)
        resumed = _run_hostile(config, events, resume=True, payload=payload)
        assert resumed == _run_hostile(config, events, resume=False, payload=payload)


def test_column_state_order_skips_stale_and_repeated_index_entries():
    j, clock = make(ttl_ms=1_000, idle_timeout_ms=10**9)
    j.on_impression("a", 10_000, b"A")
    j.on_impression("b", 10_010, b"B")
    clock.now += 2_000
    j.advance()  # the TTL drops both; their index entries stay, stale
    j.on_impression("b", 10_300, b"B")  # back with another time: its first entry stays stale
    j.on_impression("a", 10_000, b"A")  # back with the same time: two live-looking entries, one key
    j.on_impression("c", 10_005, b"C")
    assert list(j._pending) == ["b", "a", "c"]
    assert list(j._pending_idx.live_keys()) == ["a", "c", "b"]  # by deadline, each key once
    assert list(array("q", j.state_dict()["blobs"]["pending_order"])) == [1, 2, 0]


@pytest.mark.parametrize("bucket_ms", [1, 7, 1_000])
def test_column_state_orders_are_the_indexes_live_keys(bucket_ms):
    # The columns find each index's live keys in bulk (numpy over its entries); the list state walks
    # live_keys() one key at a time. Stale entries (keys gone, re-added with another time, or the same
    # time twice) must drop out of both alike, at every point of a hostile stream.
    config = JoinerConfig(window_ms=500, allowed_lateness_ms=50, click_grace_ms=300, retention_ms=2_000,
                          idle_timeout_ms=10**12, ttl_ms=3_000, max_pending=40, max_closed=60,
                          bucket_ms=bucket_ms)  # fmt: skip
    clock = FakeClock()
    j = Joiner(config, clock)
    checked = 0
    for kind, key, t, wall_step in _hostile_stream(3, 3_000):
        clock.now += wall_step
        if kind == "imp":
            j.on_impression(key, t, key.encode())
        elif kind == "click":
            j.on_click(key, t)
        elif kind == "advance":
            j.advance()
        else:
            columns, lists = j.state_dict(), j.state_dict(columns=False)
            blobs = columns["blobs"]
            for part in ("pending", "closed"):
                ids = [k for k, *_ in lists[part]]
                got = [ids[i] for i in array("q", blobs[f"{part}_order"])]
                assert got == lists[f"{part}_order"], part
            checked += 1
    assert checked > 20


def test_every_impression_is_labeled_exactly_once_plus_corrections():
    events = _random_stream(11)
    j, _ = make(late_click_policy="correct")
    out = _feed(j, events) + j.flush()
    plain = [x.impression_id for x in out if not x.is_correction]
    unique_imps = {key for kind, key, _ in events if kind == "imp"}
    assert sorted(plain) == sorted(unique_imps) == sorted(set(plain))
    corrections = [x.impression_id for x in out if x.is_correction]
    assert len(corrections) == len(set(corrections)) == j.stats.corrections
    negatives = {x.impression_id for x in out if x.label == 0}
    assert set(corrections) <= negatives


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="window_ms"):
        JoinerConfig(window_ms=0)
    with pytest.raises(ValueError, match="late_click_policy"):
        JoinerConfig(late_click_policy="weight")  # type: ignore[arg-type]


def _evicted_into_a_future_bucket() -> Joiner:
    """A joiner whose max_pending eviction left the index's active bucket (a2, a3: deadlines ~11_000)
    past the watermark (10_500), with one slot free for an impression whose deadline comes earlier."""
    j, _ = make(max_pending=4, idle_timeout_ms=10**12)
    for key, t in [("a", 10_000), ("a2", 10_010), ("a3", 10_020), ("b", 10_500), ("c", 10_600)]:
        j.on_impression(key, t, key.encode())  # c evicts a, the earliest
    assert j.stats.evicted_pending == 1 and "a" not in j._pending
    j.on_click("b", 10_600)  # a positive frees a slot
    return j


def test_an_impression_due_before_the_bucket_an_eviction_opened_still_closes_on_time():
    j = _evicted_into_a_future_bucket()
    assert j.on_impression("d", 9_800, b"D") == []  # deadline 10_800, before a2's and a3's
    out = j.on_click("c", 10_950)  # watermark 10_850 passes d's deadline
    assert labels(out) == [("c", 1, False), ("d", 0, False)]
    assert j.pending_count == 2 and j.stats.evicted_pending == 1


def test_eviction_after_an_earlier_deadline_was_added_takes_the_earliest_and_survives_a_restore():
    def run(restore: bool) -> tuple[list, dict]:
        j = _evicted_into_a_future_bucket()
        out = j.on_impression("d", 9_800, b"D") + j.on_impression("e", 10_700, b"E")  # e evicts one
        if restore:
            state = j.state_dict()
            j = Joiner(j.config, j.clock)
            j.load_state_dict(state)
        out += j.on_impression("f", 10_950, b"F") + j.on_impression("g", 12_500, b"G")
        return labels(out), j.stats.as_dict()

    uninterrupted = run(restore=False)
    assert uninterrupted == run(restore=True)
    # Each eviction takes the earliest deadline: d (by e), then a2 (by f), a3 (by g).
    assert uninterrupted[0] == [("c", 0, False), ("e", 0, False), ("f", 0, False)]
    assert uninterrupted[1]["evicted_pending"] == 4


@pytest.mark.parametrize("lateness", [0, 100])
@pytest.mark.parametrize("policy", ["drop", "correct"])
def test_a_click_at_the_end_of_the_window_within_the_lateness_is_a_positive(lateness, policy):
    # With allowed_lateness_ms 0, the merge hands an impression of the same millisecond to the joiner
    # before the click (impressions first): the window closed at the watermark's arrival and the click,
    # in time and in order, became a late click (dropped, or a negative plus a correction).
    j, _ = make(allowed_lateness_ms=lateness, late_click_policy=policy)
    j.on_impression("a", 10_000, b"A")
    assert j.on_impression("b", 11_000 + lateness, b"B") == []  # watermark 11_000: a's deadline
    assert labels(j.on_click("a", 11_000)) == [("a", 1, False)]
    j.on_impression("c", 11_500 + lateness, b"C")
    out = j.on_click("c", 11_500 + lateness + 1_000 + 1)  # 1 ms past c's window: late
    out += j.on_impression("z", 50_000, b"")
    late = [("c", 1, True)] if policy == "correct" else []
    assert labels(out) == [("b", 0, False), ("c", 0, False), *late]
    assert j.stats.positives == 1 and j.stats.negatives == 2


def test_window_edges_against_a_brute_force_join():
    """In-order streams with clicks at 0, 1, W - 1, W and W + 1 ms after their impression, many sharing
    a millisecond, merged as the join task does (impressions first): a click counts iff it is 0..W ms
    after its impression (the first copy of a duplicated impression), whatever the lateness."""
    window = 100
    for seed in range(60):
        rng = random.Random(seed)
        events, t = [], 0
        for i in range(80):
            t += rng.choice([0, 0, 1, 5, 20])
            events.append(("imp", f"i{i}", t, b"first"))
            if rng.random() < 0.1:
                events.append(("imp", f"i{i}", t + rng.choice([0, 3]), b"second"))
            if rng.random() < 0.6:
                after = rng.choice([0, 1, window - 1, window, window + 1])
                events.append(("click", f"i{i}", t + after, None))
        events.sort(key=lambda e: (e[2], e[0] != "imp"))
        first: dict[str, int] = {}
        for kind, key, when, _ in events:
            if kind == "imp":
                first.setdefault(key, when)
        expected = {
            key: int(any(k == "click" and c == key and 0 <= w - t0 <= window for k, c, w, _ in events))
            for key, t0 in first.items()
        }
        j, _ = make(window_ms=window, allowed_lateness_ms=rng.choice([0, 0, 1, 7]), click_grace_ms=50,
                    bucket_ms=rng.choice([1, 7, 50]), late_click_policy="drop")  # fmt: skip
        out = []
        for kind, key, when, payload in events:
            out += j.on_impression(key, when, payload) if kind == "imp" else j.on_click(key, when)
        out += j.flush()
        assert {x.impression_id: x.label for x in out} == expected, seed
        assert len(out) == len(expected) and all(x.payload == b"first" for x in out)


class SteppedClock(FakeClock):
    """A wall clock that an NTP correction can step either way, with the steady clock beside it (what
    engine/runtime/clock.py's system_clock carries) that no step moves."""

    def __init__(self, now: int = 1_000_000) -> None:
        super().__init__(now)
        self.steady_now = 0

    def steady(self) -> int:
        return self.steady_now

    def run(self, ms: int) -> None:
        self.now += ms
        self.steady_now += ms


@pytest.mark.parametrize("step_ms", [3_600_000, 7 * 3_600_000])
def test_a_wall_clock_stepped_forward_neither_closes_open_windows_nor_expires_pending(step_ms):
    # An hour: every open window closed as a negative and its click came as a correction; seven hours
    # (beyond ttl_ms) dropped every pending impression unlabeled.
    clock = SteppedClock()
    config = JoinerConfig(
        window_ms=900_000, allowed_lateness_ms=100, idle_timeout_ms=10_000, ttl_ms=6 * 3_600_000
    )
    j = Joiner(config, clock=clock)
    for i in range(10):
        j.on_impression(f"i{i}", 10_000 + i * 100, b"")
    clock.run(1_000)
    clock.now += step_ms  # stepped between the last input and the checkpoint's advance
    assert j.advance() == []
    assert j.pending_count == 10 and j.stats.idle_advances == 0 and j.stats.expired_ttl == 0
    assert labels(j.on_click("i3", 20_000)) == [("i3", 1, False)]
    assert labels(j.on_impression("new", 21_000, b"")) == []  # its window is open, not late
    clock.run(10_001)  # then really idle: the idle watermark moves as it would have without the step
    j.advance()
    assert j.stats.idle_advances == 1 and j.watermark_ms == 21_000 - 100 + 1


def test_a_wall_clock_stepped_back_does_not_hold_the_idle_watermark_back():
    clock = SteppedClock()
    j = Joiner(JoinerConfig(window_ms=1_000, allowed_lateness_ms=100, idle_timeout_ms=5_000), clock=clock)
    j.on_impression("a", 10_000, b"A")
    clock.now -= 3_600_000  # an hour back, then traffic stops
    clock.run(5_000 + 1_101)
    assert labels(j.advance()) == [("a", 0, False)]


def test_the_system_clock_carries_the_steady_clock_the_joiner_measures_with(monkeypatch):
    import time

    from reloop.engine.runtime.clock import system_clock

    j = Joiner(JoinerConfig(window_ms=900_000, idle_timeout_ms=10_000), clock=system_clock)
    j.on_impression("a", 10_000, b"A")
    wall_ns = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: wall_ns + 3_600 * 10**9)  # NTP: an hour forward
    assert j.advance() == [] and j.stats.idle_advances == 0 and j.pending_count == 1
