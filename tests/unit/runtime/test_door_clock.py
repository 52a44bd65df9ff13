"""The door's time bounds judge a join task's events against the task's own clock (engine/runtime/intake.py,
``DoorClock``): taken from the wall clock only at checkpoints, moved by the input in between. Its verdicts
are a function of the checkpoint and the input, so a task read again after a crash refuses and lets in
what it did the first time (the stage-level test: tests/unit/runtime/test_stages.py, "resumed hours
later")."""

from __future__ import annotations

import pytest
from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Click, Impression
from reloop.engine.join.joiner import JoinerConfig
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.intake import DoorClock, EventIntake, IntakeLimits
from reloop.engine.runtime.join_task import JoinTask
from reloop.engine.streams import Record, TopicPartition

T0 = 1_700_000_000_000
MIN = 60_000


def _imp(offset: int, iid: str, t: int, ts: int) -> Record:
    value = encode(Impression(iid, "r", "u", "i", {"user": "u"}, t, 0.5, 0))
    return Record("imp", 0, offset, iid.encode(), value, ts)


def _clk(offset: int, iid: str, t: int, ts: int) -> Record:
    return Record("clk", 0, offset, iid.encode(), encode(Click(iid, t)), ts)


def _intake(clock, **limits) -> EventIntake:
    return EventIntake(
        impressions_topic="imp",
        clicks_topic="clk",
        limits=IntakeLimits(**limits),
        clock=clock,
        dead_letters=DeadLetterSink(),
    )


def _backlog() -> list[Record]:
    """Two hours of traffic, a record a second alternating impressions and clicks, and in its middle one
    impression stamped (record and event) 20 minutes ahead by its producer, and one event two hours old in
    a record of now (a re-sent record)."""
    out: list[Record] = []
    for k in range(2 * 3600):
        t = T0 + k * 1000
        out.append(_imp(k, f"i{k}", t, t) if k % 2 == 0 else _clk(k, f"i{k - 1}", t, t))
    mid = len(out) // 2
    t = out[mid].timestamp_ms
    out.insert(mid, _imp(-1, "ahead", t + 20 * MIN, t + 20 * MIN))
    out.insert(mid + 1, _imp(-2, "old", t - 2 * 3600_000, t))
    return out


def _verdicts(intake, records, door, cuts):
    refused = []
    for a, b in zip([0, *cuts], [*cuts, len(records)], strict=True):
        refused += [r.key for r, ev in intake.events(records[a:b], door) if ev is None]
    return refused


@pytest.mark.parametrize("cuts", [[], [1], [3, 4000, 4001, 7000], list(range(7, 7200, 97))])
def test_a_backlog_read_long_after_the_last_checkpoint_is_let_in_but_not_an_event_stamped_ahead(cuts):
    """The task's clock is that of its checkpoint, two hours before the backlog ends: the door's clock
    moves with the events it lets in (a record a second: never five minutes apart), so none of the
    backlog is refused (against the checkpoint's time it all would be); the impression stamped 20 minutes
    ahead of the events before it is refused, and one two hours older than its neighbours. However the
    records come in batches (the merge releases what the fetches allow), the verdicts and the clock are
    the same: each event is judged against the clock as the events before it left it."""
    records = _backlog()
    intake = _intake(_no_wall_clock, max_past_ms=3600_000)
    door = DoorClock(T0)
    assert _verdicts(intake, records, door, cuts) == [b"ahead", b"old"]
    assert intake.dead_letters.counts == {"bad_time": 2}
    assert door.now_ms == records[-1].timestamp_ms


def _no_wall_clock() -> int:
    raise AssertionError("the door read the wall clock")


def test_without_a_door_clock_the_wall_clock_is_read_once_a_batch():
    """The single-process pipeline's door (no DoorClock): as before, the clock read for each batch,
    which events do not move."""
    clock = ManualClock(T0)
    intake = _intake(clock, max_past_ms=MIN)
    records = [_imp(0, "a", T0 + 4 * MIN, T0 + 4 * MIN), _imp(1, "b", T0 + 8 * MIN, T0 + 8 * MIN)]
    assert [ev is None for _, ev in intake.events(records)] == [False, True]
    clock.set(T0 + 10 * MIN)
    assert [ev is None for _, ev in intake.events([_imp(2, "c", T0, T0)])] == [True]  # 10 min behind


def _task(clock, intake) -> JoinTask:
    return JoinTask(
        partition=0,
        impressions_topic="imp",
        clicks_topic="clk",
        joiner_config=JoinerConfig(window_ms=1000, allowed_lateness_ms=0),
        intake=intake,
        clock=clock,
    )


def test_the_door_clock_is_taken_at_checkpoints_and_restored_with_them():
    clock = ManualClock(T0)
    intake = _intake(clock, max_past_ms=MIN)
    task = _task(clock, intake)
    assert task.door.now_ms == T0
    ends = {TopicPartition("imp", 0): 1, TopicPartition("clk", 0): 0}
    task.add([_imp(0, "a", T0 + 30_000, T0 + 30_000)])
    assert task.process(ends, ends) == 1 and task.door.now_ms == T0 + 30_000  # moved by its input
    clock.set(T0 + 10_000)
    state = task.checkpoint_state(advance=True)
    assert state["door_ms"] == T0 + 30_000  # never back
    clock.set(T0 + 3600_000)
    state = task.checkpoint_state(advance=True)
    assert state["door_ms"] == task.door.now_ms == T0 + 3600_000  # the wall clock, at a checkpoint
    clock.set(T0 + 7 * 3600_000)
    again = _task(clock, intake)
    again.load_state_dict(state)
    assert again.door.now_ms == T0 + 3600_000  # the checkpoint's, not the wall clock's


def test_a_checkpoint_from_before_the_door_clock_loads_with_the_wall_clock():
    clock = ManualClock(T0)
    intake = _intake(clock, max_past_ms=MIN)
    state = _task(clock, intake).checkpoint_state(advance=True)
    del state["door_ms"]
    clock.set(T0 + 3600_000)
    again = _task(clock, intake)
    again.load_state_dict(state)
    assert again.door.now_ms == T0 + 3600_000
