"""The marks a rank of `reloop train --world-size M` leaves in its launcher's scratch folder (stopped owing
nothing, refused) survive the folder being taken by a /tmp cleaner while the launcher ran: the rank's
final checkpoint ended in FileNotFoundError and was reported as not saved, and the launcher crashed."""

from __future__ import annotations

from pathlib import Path

import pytest
from reloop.engine.runtime import train_cmd


@pytest.fixture
def rank_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")


def test_a_rank_marks_its_stop_in_a_folder_that_was_removed(tmp_path: Path, monkeypatch, rank_1) -> None:
    marks = tmp_path / "scratch" / "stopped"  # the whole scratch folder gone
    monkeypatch.setenv(train_cmd.STOPPED_MARKS, str(marks))
    train_cmd.stopped_before_start()
    assert train_cmd._marked(marks) == {"rank-1"}


def test_a_refusing_rank_marks_it_in_a_folder_that_was_removed(tmp_path: Path, monkeypatch, rank_1) -> None:
    marks = tmp_path / "refused"
    monkeypatch.setenv(train_cmd.REFUSED_MARKS, str(marks))
    assert train_cmd._rank_exit(2) == 0  # marked, not restarted by torchrun
    assert train_cmd._refused(marks) == 2


def test_the_launcher_reads_a_removed_folder_as_no_marks(tmp_path: Path) -> None:
    assert train_cmd._marked(tmp_path / "gone") == set()
    assert train_cmd._refused(tmp_path / "gone") == 0
