"""The ledger must round-trip every id the event contract accepts (issue: a tab or newline broke it)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from reloop.engine.events.schema import LabeledSample
from reloop.engine.train.ledger import Ledger


def _sample(sid: str, label: int = 0, corr: bool = False) -> LabeledSample:
    return LabeledSample(sid, {}, label, 0.5, 0, 0, is_correction=corr)


def test_ids_with_separators_round_trip(tmp_path):
    ids = ["plain", "tab\there", "new\nline", "cr\rlf\r\n", 'quote"s', "back\\slash", "ünï\u2028cödé"]
    ids.append("[1,2]")
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.append(3, [_sample(i, label=k % 2, corr=k == 1) for k, i in enumerate(ids)])
    ledger.close()
    got = Ledger.read(tmp_path / "l.jsonl")
    assert [g[1] for g in got] == ids
    assert [g[0] for g in got] == [3] * len(ids)
    assert [g[2] for g in got] == [k % 2 for k in range(len(ids))]
    assert [g[3] for g in got] == [k == 1 for k in range(len(ids))]


def test_truncate_drops_lines_after_the_snapshot(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.append(1, [_sample("a\tb")])
    length = ledger.sync()
    ledger.append(2, [_sample("c\nd")])
    ledger.truncate(length)
    ledger.append(2, [_sample("e")])
    ledger.close()
    assert [g[1] for g in Ledger.read(tmp_path / "l.jsonl")] == ["a\tb", "e"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1), min_size=1, max_size=20))
def test_any_text_id_round_trips(tmp_path_factory, ids):
    path = tmp_path_factory.mktemp("ledger") / "l.jsonl"
    ledger = Ledger(path)
    ledger.append(7, [_sample(i) for i in ids])
    ledger.close()
    assert [g[1] for g in Ledger.read(path)] == ids
