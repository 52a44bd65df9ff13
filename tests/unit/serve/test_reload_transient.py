"""The reload watcher and the registry's loaders when the file system, not the snapshot, fails: a
version that could not be read is tried again (with backoff) rather than refused for good, and an arm
with a cold start never falls back to its untrained v0 once a trained version served."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
from reloop.engine.checkpoint.registry import ChecksumError, SnapshotError, SnapshotRegistry
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import build_learner
from reloop.engine.serve import reload as reload_mod
from reloop.engine.serve.bundle import ModelHolder
from reloop.engine.serve.config import ArmConfig, ColdStart
from reloop.engine.serve.reload import ArmSource, ReloadWatcher, unreadable
from reloop.engine.serve.stack import registry_loader_factory

from .fakes import bundle

SPEC = {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(reload_mod, "time", c)
    return c


class _FlakyRegistry:
    """Versions 1..3; ``errors[v]`` is raised by the next loads of v (one per load) while it lasts."""

    def __init__(self, versions: list[int], errors: dict[int, list[BaseException]]) -> None:
        self.versions, self.errors, self.loads = versions, errors, []

    def latest(self):
        return max(self.versions) if self.versions else None

    def load(self, version: int):
        self.loads.append(version)
        if self.errors.get(version):
            raise self.errors[version].pop(0)
        return bundle(version)


def _from_oserror(exc: OSError) -> SnapshotError:
    try:
        raise SnapshotError(f"part 'model' cannot be read ({exc})") from exc
    except SnapshotError as wrapped:
        return wrapped


def _watcher(reg, holder: ModelHolder) -> ReloadWatcher:
    return ReloadWatcher(sources=[ArmSource("A", holder, reg.latest, reg.load, lambda: list(reg.versions))])


def test_a_version_that_could_not_be_read_is_tried_again_with_backoff(clock):
    # A transient I/O error (a file being replaced, an NFS hiccup) refused the version for good: the
    # service stayed on v2 until v4 came out.
    errors = {3: [_from_oserror(OSError(errno.ESTALE, "Stale file handle")), OSError(errno.EIO, "I/O")]}
    reg = _FlakyRegistry([1, 2, 3], errors)
    holder = ModelHolder()
    watcher = _watcher(reg, holder)
    watcher.poll_once()
    assert holder.version == 2 and watcher.refused == 0  # the older one meanwhile
    watcher.poll_once()
    assert reg.loads == [3, 2]  # not tried again before its backoff ends
    clock.now += reload_mod.RETRY_FIRST_S
    watcher.poll_once()
    assert holder.version == 2 and reg.loads == [3, 2, 3]  # failed again: waits twice as long
    clock.now += reload_mod.RETRY_FIRST_S
    watcher.poll_once()
    assert reg.loads == [3, 2, 3]
    clock.now += reload_mod.RETRY_FIRST_S
    watcher.poll_once()
    assert holder.version == 3 and reg.loads == [3, 2, 3, 3]
    assert not watcher.sources[0].retry


def test_a_version_that_fails_its_checksum_or_weights_only_load_stays_refused(clock):
    try:
        raise SnapshotError("part 'model' does not load: a weights-only load refuses it") from RuntimeError()
    except SnapshotError as exc:
        not_weights = exc
    errors = {3: [ChecksumError("part 'model' fails its crc32c checksum")], 2: [not_weights]}
    reg = _FlakyRegistry([1, 2, 3], errors)
    holder = ModelHolder()
    watcher = _watcher(reg, holder)
    watcher.poll_once()
    assert holder.version == 1 and watcher.refused == 2
    for _ in range(3):
        clock.now += reload_mod.RETRY_MAX_S
        watcher.poll_once()
    assert reg.loads == [3, 2, 1] and holder.version == 1


def test_what_counts_as_unreadable():
    assert unreadable(OSError(5, "Input/output error"))
    assert unreadable(_from_oserror(PermissionError(13, "Permission denied")))
    assert not unreadable(ChecksumError("fails its checksum"))
    assert not unreadable(SnapshotError("unexpected format"))
    assert not unreadable(ValueError("no"))
    assert not unreadable(_from_oserror(FileNotFoundError(2, "No such file")))  # incomplete, not unreadable
    try:
        raise ChecksumError("manifest is not valid JSON") from OSError()
    except ChecksumError as exc:
        assert not unreadable(exc)


def test_a_part_that_cannot_be_read_for_a_moment_is_loaded_after(tmp_path, clock, monkeypatch):
    # The registry's own reader: the I/O error is wrapped in a SnapshotError ("cannot be read").
    learner = build_learner("lr", FeatureSpec.from_dict(SPEC), "ce", 0.0)
    reg = SnapshotRegistry(tmp_path)
    reg.publish({"model": learner.state_dict()})
    reg.publish({"model": learner.state_dict()})
    part = reg.path(2) / "model.pt"
    real_read = Path.read_bytes
    stale = [True]

    def read_bytes(path: Path) -> bytes:
        if path == part and stale[0]:
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    latest, load, versions = registry_loader_factory(ArmConfig(name="io", registry=tmp_path))
    holder = ModelHolder()
    watcher = ReloadWatcher(sources=[ArmSource("io", holder, latest, load, versions)])
    watcher.poll_once()
    assert holder.version == 1 and watcher.refused == 0
    stale[0] = False
    clock.now += reload_mod.RETRY_FIRST_S
    watcher.poll_once()
    assert holder.version == 2


def _cold_arm(root) -> ArmConfig:
    return ArmConfig(name="cold", registry=root, cold_start=ColdStart(backbone="lr", spec=SPEC))


def test_a_cold_start_arm_keeps_its_trained_model_while_the_registry_lists_nothing(tmp_path, caplog):
    # A registry that listed nothing for a poll (a remount: is_dir() False) made the cold-start v0 "the
    # registry's newest": the arm served an untrained model, without a word, until the next poll.
    root = tmp_path / "reg"
    learner = build_learner("lr", FeatureSpec.from_dict(SPEC), "ce", 0.0)
    SnapshotRegistry(root).publish({"model": learner.state_dict()})
    latest, load, versions = registry_loader_factory(_cold_arm(root))
    holder = ModelHolder()
    watcher = ReloadWatcher(sources=[ArmSource("cold", holder, latest, load, versions)])
    watcher.poll_once()
    assert holder.version == 1
    root.rename(tmp_path / "unmounted")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            watcher.poll_once()
    assert holder.version == 1
    assert caplog.text.count("lists no snapshot") == 1  # said once, not every poll
    (tmp_path / "unmounted").rename(root)
    watcher.poll_once()
    assert holder.version == 1 and holder.reloads == 1


def test_a_cold_start_arm_says_it_serves_v0_and_takes_the_first_snapshot(tmp_path, caplog):
    root = tmp_path / "reg"
    latest, load, versions = registry_loader_factory(_cold_arm(root))
    holder = ModelHolder()
    watcher = ReloadWatcher(sources=[ArmSource("cold", holder, latest, load, versions)])
    with caplog.at_level(logging.WARNING):
        watcher.poll_once()
    assert holder.version == 0 and "untrained cold-start model v0" in caplog.text
    learner = build_learner("lr", FeatureSpec.from_dict(SPEC), "ce", 0.0)
    SnapshotRegistry(root).publish({"model": learner.state_dict()})
    watcher.poll_once()
    assert holder.version == 1


def test_a_registry_that_cannot_be_listed_is_logged_once_a_minute_not_at_every_poll(clock, caplog):
    # Out of file descriptors, the watcher logged a whole traceback at every poll (5 a second): 770 lines
    # in 10 s, burying what the operator needed to see.
    class Unlistable(_FlakyRegistry):
        failing = True

        def latest(self):
            if self.failing:
                raise OSError(errno.EMFILE, "Too many open files")
            return super().latest()

    reg = Unlistable([1], {})
    watcher = _watcher(reg, ModelHolder())
    with caplog.at_level(logging.INFO, logger="reloop.engine.serve.reload"):
        for _ in range(300):  # a minute of polls
            watcher.poll_once()
            clock.now += 0.2
        watcher.poll_once()  # a minute after the first line: one line saying how many failed since
        reg.failing = False
        watcher.poll_once()
    lines = [r for r in caplog.records if r.name == "reloop.engine.serve.reload"]
    assert [r.levelname for r in lines] == ["ERROR", "ERROR", "INFO", "INFO"], [r.getMessage() for r in lines]
    assert lines[0].exc_info is not None and "cannot list the registry" in lines[0].getMessage()
    assert "300 polls failed since" in lines[1].getMessage() and lines[1].exc_info is None
    assert "listed again" in lines[2].getMessage()
