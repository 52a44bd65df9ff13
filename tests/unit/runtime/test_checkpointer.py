"""The save order every stage follows (engine/runtime/checkpointer.py): flush, publish, commit."""

from __future__ import annotations

import doctest
import logging

import pytest
from reloop.engine.runtime import checkpointer as module
from reloop.engine.runtime.checkpointer import Checkpointer


class _Sink:
    def __init__(self, calls: list, name: str, fail: bool = False) -> None:
        self.calls, self.name, self.fail = calls, name, fail

    def flush(self, timeout_s: float | None = None) -> None:
        self.calls.append((self.name, timeout_s))
        if self.fail:
            raise TimeoutError(f"{self.name} did not flush")


class _Ledger:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def sync(self) -> int:
        self.calls.append("ledger")
        return 123


def test_the_docstring_example_runs() -> None:
    assert doctest.testmod(module).failed == 0


def test_flush_every_sink_then_the_ledger_then_publish_then_commit() -> None:
    calls: list = []
    cp = Checkpointer(
        [_Sink(calls, "samples"), None, _Sink(calls, "dead")],
        commit=lambda positions: calls.append(("commit", positions)),
        ledger=_Ledger(calls),
        flush_timeout_s=2.0,
    )
    result = cp.save(lambda ledger_bytes: calls.append(("publish", ledger_bytes)) or "v7", {"p": 5})
    assert result == "v7"
    assert calls == [("samples", 2.0), ("dead", 2.0), "ledger", ("publish", 123), ("commit", {"p": 5})]
    calls.clear()
    cp.save(lambda _: None, {"p": 6}, timeout_s=0.5)  # a caller's timeout wins over the default
    assert calls[:2] == [("samples", 0.5), ("dead", 0.5)]


def test_a_failed_flush_publishes_and_commits_nothing() -> None:
    calls: list = []
    cp = Checkpointer([_Sink(calls, "samples", fail=True)], commit=lambda p: calls.append("commit"))
    with pytest.raises(TimeoutError):
        cp.save(lambda _: calls.append("publish"), {"p": 1})
    assert calls == [("samples", None)]


def test_a_failed_publish_commits_nothing() -> None:
    calls: list = []

    def publish(_: int) -> None:
        raise OSError("disk full")

    cp = Checkpointer([_Sink(calls, "samples")], commit=lambda p: calls.append("commit"))
    with pytest.raises(OSError, match="disk full"):
        cp.save(publish, {"p": 1})
    assert "commit" not in calls


def test_a_failed_commit_is_logged_and_returned_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def commit(positions: dict) -> None:
        raise ConnectionError("coordinator not available")

    cp = Checkpointer([], commit=commit)
    with caplog.at_level(logging.WARNING, logger="reloop.checkpoint"):
        assert cp.save(lambda _: 3, {"p": 1}, task=0) == 3  # the published save stands
    assert "coordinator not available" in (cp.last_commit_error or "")
    assert any("offset commit failed" in r.getMessage() for r in caplog.records)
    cp.commit = lambda positions: None
    assert cp.commit_offsets({"p": 2}) is None and cp.last_commit_error is None
