"""The train stage's fetch thread owns the consumer, so it makes the offset commits: only the newest
positions are committed (a queue of them grew by one per checkpoint while the broker was down, each
waited on in turn), and a thread stuck in the client is never joined on the consumer by a second one."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from reloop.engine.runtime.train_stage import TrainStage, _Fetcher
from reloop.engine.streams import TopicPartition

A, B = TopicPartition("samples", 0), TopicPartition("samples", 1)


class _Stage:
    """What the fetcher uses of its stage: settings, the poll, and the commit (which can block)."""

    def __init__(self) -> None:
        self.settings = SimpleNamespace(prefetch=1)
        self.commits: list[dict] = []
        self.release = threading.Event()
        self.release.set()
        self.in_commit = threading.Event()

    def _poll_released(self) -> list:
        time.sleep(0.001)
        return []

    def _commit_now(self, positions: dict) -> None:
        self.in_commit.set()
        self.release.wait()
        self.commits.append(dict(positions))


def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_commits_queued_behind_a_slow_one_are_merged_into_the_newest_positions() -> None:
    stage = _Stage()
    stage.release.clear()  # the broker does not answer: the first commit hangs
    fetcher = _Fetcher(stage)  # type: ignore[arg-type]
    try:
        fetcher.commit({A: 10, B: 5})
        _until(stage.in_commit.is_set)
        for offset in range(11, 40):  # one checkpoint after another while it hangs
            fetcher.commit({A: offset})
        fetcher.commit({B: 8})
        stage.release.set()
        _until(lambda: len(stage.commits) == 2)
        time.sleep(0.05)
        assert stage.commits == [{A: 10, B: 5}, {A: 39, B: 8}]
    finally:
        assert fetcher.close()


def test_a_fetch_thread_stuck_in_the_client_is_not_joined_on_the_consumer_by_the_stage(monkeypatch) -> None:
    stage = _Stage()
    stage.release.clear()
    fetcher = _Fetcher(stage)  # type: ignore[arg-type]
    fetcher.commit({A: 1})
    _until(stage.in_commit.is_set)
    fetcher.commit({A: 2})  # the final checkpoint's positions, queued behind the stuck commit
    on_main: list[dict] = []
    owner = SimpleNamespace(_fetcher=fetcher, _commit_now=on_main.append)
    monkeypatch.setattr(_Fetcher, "CLOSE_TIMEOUT_S", 0.05)
    try:
        TrainStage._stop_fetcher(owner)  # type: ignore[arg-type]
        assert on_main == [] and owner._fetcher is None
    finally:
        stage.release.set()


def test_a_stopped_fetch_thread_leaves_its_last_commit_to_the_stage() -> None:
    stage = _Stage()
    stage.release.clear()
    fetcher = _Fetcher(stage)  # type: ignore[arg-type]
    fetcher.commit({A: 1})
    _until(stage.in_commit.is_set)
    fetcher.commit({A: 2})
    on_main: list[dict] = []
    owner = SimpleNamespace(_fetcher=fetcher, _commit_now=on_main.append)
    stage.release.set()  # the broker answers: the thread stops, the stage commits what is left
    TrainStage._stop_fetcher(owner)  # type: ignore[arg-type]
    assert stage.commits + on_main == [{A: 1}, {A: 2}]
