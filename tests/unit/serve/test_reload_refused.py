"""Refused versions and registries that went back: tried once each, never for ever, never never."""

from __future__ import annotations

from reloop.engine.serve.bundle import ModelHolder
from reloop.engine.serve.reload import ArmSource, ReloadWatcher

from .test_reload import FakeRegistry


def _watcher(reg: FakeRegistry, holder: ModelHolder) -> ReloadWatcher:
    return ReloadWatcher(sources=[ArmSource("A", holder, reg.latest, reg.load, lambda: list(reg.versions))])


def test_a_refused_older_version_is_not_loaded_again_every_poll():
    # The registry went back to v1 only, and v1 does not load: the service keeps v2 and must not
    # read, refuse and log v1 again on every poll (it did: the refused set kept only versions > live).
    reg = FakeRegistry()
    holder = ModelHolder()
    watcher = _watcher(reg, holder)
    reg.versions = [1, 2]
    watcher.poll_once()
    assert holder.version == 2
    reg.versions, reg.corrupt = [1], {1}
    for _ in range(5):
        assert watcher.poll_once() == 0
    assert holder.version == 2
    assert reg.loads.count(1) == 1 and watcher.refused == 1


def test_a_version_number_refused_before_the_registry_started_again_is_loaded_after():
    # v4 was refused; the registry was then started again (v1 only) and its new run publishes a good
    # v4: it was skipped for good (the refused set still held 4), the service stayed on v3.
    reg = FakeRegistry()
    holder = ModelHolder()
    watcher = _watcher(reg, holder)
    reg.versions, reg.corrupt = [1, 2, 3, 4], {4}
    watcher.poll_once()
    assert holder.version == 3 and watcher.refused == 1
    reg.versions, reg.corrupt = [1], set()  # started again: v4 is gone, its number free
    watcher.poll_once()
    assert holder.version == 1
    reg.versions = [1, 2, 3, 4]  # the new run's v4, a snapshot that loads
    watcher.poll_once()
    assert holder.version == 4


def test_readyz_says_which_version_was_refused_while_none_is_loaded():
    # It said "no model loaded yet" while every version was refused (a plugin not installed here).
    from reloop.engine.serve.arms import ArmRouter
    from reloop.engine.serve.service import ArmRuntime, ScoringService

    reg = FakeRegistry()
    holder = ModelHolder()
    service = ScoringService(
        router=ArmRouter([("A", 1.0)], salt="s"), arms={"A": ArmRuntime("A", holder, None)}
    )
    assert service.not_ready() == {"A": "no model loaded yet"}
    reg.versions, reg.corrupt = [1], {1}
    _watcher(reg, holder).poll_once()
    (reason,) = service.not_ready().values()
    assert reason.startswith("no model loaded yet (refused v1: ")
