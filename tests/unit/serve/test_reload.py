from __future__ import annotations

from reloop.engine.serve.bundle import ModelHolder
from reloop.engine.serve.reload import ArmSource, ReloadWatcher

from .fakes import bundle


class FakeRegistry:
    def __init__(self) -> None:
        self.versions: list[int] = []
        self.corrupt: set[int] = set()
        self.loads: list[int] = []

    def latest(self):
        return max(self.versions) if self.versions else None

    def load(self, version: int):
        self.loads.append(version)
        if version in self.corrupt:
            raise ValueError(f"snapshot v{version}: checksum mismatch")
        return bundle(version)


def test_watcher_loads_newer_versions_only():
    reg = FakeRegistry()
    holder = ModelHolder()
    watcher = ReloadWatcher(sources=[ArmSource("A", holder, reg.latest, reg.load)])
    assert watcher.poll_once() == 0 and holder.current is None
    reg.versions = [1]
    assert watcher.poll_once() == 1 and holder.version == 1
    assert watcher.poll_once() == 0 and reg.loads == [1]  # nothing new: nothing loaded
    reg.versions = [1, 2, 3]
    watcher.poll_once()
    assert holder.version == 3 and reg.loads == [1, 3]  # jumps straight to the newest


def test_a_registry_whose_newer_versions_were_removed_is_followed_back(caplog):
    # A rollback (v3 deleted) or a registry started again (v1 only): the service went on serving v3,
    # a version no longer on disk, without a word, until the new run passed v3.
    reg = FakeRegistry()
    holder = ModelHolder()
    watcher = ReloadWatcher(
        sources=[ArmSource("A", holder, reg.latest, reg.load, lambda: list(reg.versions))]
    )
    reg.versions = [1, 2, 3]
    watcher.poll_once()
    assert holder.version == 3
    reg.versions = [1, 2]
    with caplog.at_level("WARNING"):
        assert watcher.poll_once() == 1
    assert holder.version == 2 and "older than the live v3" in caplog.text
    reg.versions, reg.corrupt = [1], {1}
    assert watcher.poll_once() == 0 and holder.version == 2  # nothing loadable: keeps what it has
    reg.versions, reg.corrupt = [1, 2, 3, 4], set()
    watcher.poll_once()
    assert holder.version == 4


def test_a_version_the_arm_cannot_score_with_is_loaded_with_a_warning_not_now_serving(caplog):
    # A counters arm given a model without its counter inputs: "now serving v2" at INFO while /readyz
    # answered 503 and every request was refused.
    reg = FakeRegistry()
    holder = ModelHolder()
    source = ArmSource("A", holder, reg.latest, reg.load,
                       unusable=lambda b: "lacks the counter inputs" if b.version == 2 else None)  # fmt: skip
    watcher = ReloadWatcher(sources=[source])
    reg.versions = [1]
    with caplog.at_level("INFO", logger="reloop.engine.serve.reload"):
        watcher.poll_once()
        reg.versions = [1, 2]
        watcher.poll_once()
        reg.versions = [1, 2, 3]
        watcher.poll_once()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("INFO", "reload A: now serving v1 (newest v1)")
    assert lines[1][0] == "WARNING" and lines[1][1].startswith("reload A: loaded v2 (newest v2), which")
    assert "(lacks the counter inputs): /readyz answers 503" in lines[1][1]
    assert lines[2] == ("INFO", "reload A: now serving v3 (newest v3)")
    assert holder.version == 3


def test_corrupt_snapshot_is_refused_and_the_old_model_keeps_serving():
    reg = FakeRegistry()
    holder = ModelHolder(bundle(1))
    watcher = ReloadWatcher(sources=[ArmSource("A", holder, reg.latest, reg.load)])
    reg.versions = [1, 2]
    reg.corrupt = {2}
    assert watcher.poll_once() == 0
    assert holder.version == 1 and watcher.refused == 1
    watcher.poll_once()
    assert reg.loads == [2]  # a refused version is not retried every poll
    reg.versions.append(3)
    watcher.poll_once()
    assert holder.version == 3


def test_registry_error_does_not_stop_other_arms():
    def broken():
        raise OSError("registry unreadable")

    reg = FakeRegistry()
    reg.versions = [7]
    a, b = ModelHolder(), ModelHolder()
    watcher = ReloadWatcher(
        sources=[ArmSource("A", a, broken, reg.load), ArmSource("B", b, reg.latest, reg.load)]
    )
    assert watcher.poll_once() == 1
    assert a.current is None and b.version == 7


def test_background_thread_picks_up_new_versions():
    import time

    reg = FakeRegistry()
    holder = ModelHolder()
    watcher = ReloadWatcher(sources=[ArmSource("A", holder, reg.latest, reg.load)], interval_s=0.01).start()
    try:
        reg.versions = [1]
        deadline = time.monotonic() + 5
        while holder.version != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.version == 1
    finally:
        watcher.close()
