"""Records not keyed by their impression id: with more than one partition a click meets its impression only
by chance (an integrator's clicks keyed by user id were orphans, their impressions trained as negatives,
with no line in the log). The join stage's intake checks the key of a sample of its records."""

from __future__ import annotations

import logging

from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Click, Impression
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.intake import KEY_CHECK_FIRST, EventIntake, IntakeLimits
from reloop.engine.streams import Record

T0 = 1_700_000_000_000


def _records(n: int, click_key=lambda iid: iid.encode()) -> list[Record]:
    out = []
    for k in range(n):
        iid = f"i{k}"
        out.append(
            Record("imp", 0, 2 * k, iid.encode(), encode(Impression(iid, "r", "u", "i", {}, T0, 0.5, 0)), T0)
        )
        out.append(Record("clk", 0, 2 * k + 1, click_key(iid), encode(Click(iid, T0 + 1)), T0 + 1))
    return out


def _intake(check_keys: bool) -> EventIntake:
    return EventIntake(
        impressions_topic="imp", clicks_topic="clk", limits=IntakeLimits(), clock=ManualClock(T0),
        dead_letters=DeadLetterSink(), check_keys=check_keys,
    )  # fmt: skip


def _warnings(caplog, intake: EventIntake, records: list[Record]) -> list[logging.LogRecord]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reloop.intake"):
        events = list(intake.events(records))
    assert all(ev is not None for _, ev in events)  # warned, never refused
    return caplog.records


def test_events_keyed_by_their_impression_id_say_nothing(caplog) -> None:
    assert _warnings(caplog, _intake(True), _records(300)) == []


def test_clicks_keyed_otherwise_are_said_once_with_the_key_and_the_id(caplog) -> None:
    [said] = _warnings(caplog, _intake(True), _records(300, click_key=lambda iid: b"user-7"))
    text = said.getMessage()
    assert "a record on clk is keyed b'user-7', not by its impression_id 'i0'" in text
    assert said.fields["topic"] == "clk"


def test_unkeyed_records_are_said_too(caplog) -> None:
    [said] = _warnings(caplog, _intake(True), _records(KEY_CHECK_FIRST, click_key=lambda iid: None))
    assert "is keyed None" in said.getMessage()


def test_without_the_check_nothing_is_said(caplog) -> None:
    # Files replayed have no keys: the single-process pipeline does not check them.
    assert _warnings(caplog, _intake(False), _records(300, click_key=lambda iid: None)) == []
