"""The "started" line says what a stage resumed from: a join stage restores each task as the group assigns
it, later, and its ``restored: null`` read as a start from scratch."""

from __future__ import annotations

from types import SimpleNamespace

from reloop.engine.runtime.stage_runner import _restored


def test_the_started_line_names_the_restore_point_or_the_per_task_restores() -> None:
    assert _restored(SimpleNamespace(restored_from="snapshot 2", tasks={})) == "snapshot 2"
    assert _restored(SimpleNamespace(restored_from=None)) is None  # a train stage that found nothing
    assert "per task" in _restored(SimpleNamespace(tasks={}))  # a join stage
    assert _restored(object()) is None
