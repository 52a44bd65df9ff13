"""bench/merge_journal.py: syncs are timed on the given disk, the no-op arm really skips the journal's
fsync (and only for the bench's duration), and the report names what it measured."""

from __future__ import annotations

import os
import re

from reloop.bench import merge_journal as bench
from reloop.engine.runtime import merge_journal


def test_the_no_op_arm_skips_the_journals_fsync_and_restores_it(tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    original_sync = merge_journal.MergeJournal.sync
    journal = merge_journal.MergeJournal.create(tmp_path, "a0")
    calls.clear()
    with bench.counted_syncs(fsync=False) as count:
        journal.add([merge_journal.MergeDecision((1, 2), (True, False))])
        journal.sync()
        journal.sync()  # nothing added: not counted
    assert count == [1] and calls == []
    with bench.counted_syncs(fsync=True) as count:
        journal.add([merge_journal.MergeDecision((3, 4), (True, True))])
        journal.sync()
    assert count == [1] and len(calls) == 1
    assert merge_journal.os is os and merge_journal.MergeJournal.sync is original_sync  # restored
    journal.close()
    assert len(merge_journal.MergeJournal.open(tmp_path, "a0")[1]) == 2


def test_the_report_gives_the_sync_latency_and_both_arms(tmp_path, capsys) -> None:
    out = tmp_path / "r.md"
    argv = ["--dir", str(tmp_path), "--syncs", "20", "--rounds", "2", "--samples", "2048", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert re.search(r"20 times: p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms", text)
    rows = re.findall(r"\| (as it is|a no-op) \| ([\d,]+), ([\d,]+) \|", text)
    assert [r[0] for r in rows] == ["as it is", "a no-op"], text
    assert re.search(r"Ratio .*: \d\.\d{3}\.", text) and "mounted at" in text
