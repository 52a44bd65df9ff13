"""What a train stage (and the single-process pipeline) owes the registry it takes over at restore: no
serving bundle left of a version whose snapshot never came (its number is taken again for other
weights), and a fence against a second writer that publishes after the restore."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from reloop.engine.checkpoint.registry import SnapshotError
from reloop.engine.checkpoint.writer import SnapshotWriteError
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.synthetic import generate
from reloop.engine.serve.bundle_format import bundle_versions, read_bundle, serving_dir

from .test_pipeline import START as PIPELINE_START
from .test_pipeline import _config as _pipeline_config
from .test_pipeline import _log as _pipeline_log
from .test_pipeline import _pipeline
from .test_stages import _joined, _run_train, _train


def _until_version(stage, clock, above: int | None) -> None:
    """Step until ``stage`` published a version above ``above`` (any, for None) and it is durable."""
    for _ in range(2000):
        if stage.version is not None and (above is None or stage.version > above):
            stage.writer.wait()
            return
        stage.step()
        clock.advance(10)
    raise AssertionError("no new version")


def test_a_bundle_whose_snapshot_was_never_written_is_removed_at_restore(tmp_path):
    # The bundle is written just before its snapshot; the write failed, the stage was rebuilt, and the
    # bundle stayed: serving listed (and served) that version with weights no snapshot holds, and the
    # rebuilt stage then published the same number for the weights it trained.
    log, clock, cfg = _joined(tmp_path, 400, seed=12)
    train = _train(cfg, log, clock, tmp_path)
    _until_version(train, clock, None)
    good = train.version

    def full_disk(prepared):
        raise OSError(28, "No space left on device")

    train.registry.write = full_disk
    with pytest.raises(SnapshotWriteError):
        for _ in range(5000):
            train.step()
            clock.advance(10)
    train.abort()
    root = serving_dir(train.registry.root)
    assert max(bundle_versions(root)) == good + 1  # the orphan this is about

    again = _train(cfg, log, clock, tmp_path)
    assert again.version == good
    assert max(bundle_versions(root)) == good  # serving follows back down to the newest snapshot
    _run_train(again, log, clock)
    newest = again.registry.versions()[-1]
    assert newest > good and max(bundle_versions(root)) == newest
    for v in bundle_versions(root):  # every listed bundle is its snapshot's weights
        tensors, _ = read_bundle(root, v)
        for name, value in again.registry.load(v, parts=["model"]).state["model"]["model"].items():
            assert torch.equal(tensors[f"model.{name}"], value), (v, name)
    again.close(final=None)


def test_a_restored_train_stage_stops_at_a_version_another_writer_published_after_its_restore(tmp_path):
    # A second trainer on the folder (a zombie after a failover) publishes after this one restored:
    # this one's first write went on unchecked, a version whose previous one it never saw.
    log, clock, cfg = _joined(tmp_path, 400, seed=12)
    other = _train(cfg, log, clock, tmp_path)
    _until_version(other, clock, None)
    n = other.version
    train = _train(cfg, log, clock, tmp_path)
    assert train.version == n
    _until_version(other, clock, n)  # the other writer publishes n + 1
    with pytest.raises(SnapshotError, match="another process publishes"):
        _until_version(train, clock, n)  # its next boundary
    assert train.registry.versions()[-1] == n + 1  # nothing forked from n
    train.abort()
    other.abort()
    rebuilt = _train(cfg, log, clock, tmp_path)  # what the supervisor does: it follows the newest
    assert rebuilt.version == n + 1
    rebuilt.abort()


def test_a_restored_pipeline_stops_at_a_version_another_writer_published_after_its_restore(tmp_path):
    log = _pipeline_log(generate(400, seed=6, pad_to_multiple=16))
    clock = ManualClock(PIPELINE_START)
    cfg = _pipeline_config(tmp_path)
    other = _pipeline(cfg, log, clock)
    _until_version(other, clock, None)
    n = other.version
    p = _pipeline(cfg, log, clock)
    assert p.version == n
    _until_version(other, clock, n)
    with pytest.raises(SnapshotError, match="another process publishes"):
        _until_version(p, clock, n)
    assert p.registry.versions()[-1] == n + 1
    p.abort()
    other.abort()


def test_a_rollback_resumes_from_the_newest_version_left_and_never_reuses_a_number(tmp_path, caplog):
    # The documented rollback: stop the trainer, remove the newest version folders and their bundles.
    # The restart took the removed numbers again (v3 then named two models) and skipped its stop
    # checkpoint, saved after a removed version, without a word.
    log, clock, cfg = _joined(tmp_path, 400, seed=12)
    train = _train(cfg, log, clock, tmp_path)
    _until_version(train, clock, None)
    _until_version(train, clock, train.version)
    removed = train.version
    assert train.close() is not None  # the stop's checkpoint, saved after the newest version
    registry = train.registry
    shutil.rmtree(registry.path(removed))  # a bundle left behind too: the restart removes it
    kept = registry.versions()[-1]
    assert kept < removed

    with caplog.at_level(logging.WARNING, logger="reloop"):
        again = _train(cfg, log, clock, tmp_path)
    assert again.version == kept
    skipped = [r for r in caplog.records if r.getMessage().startswith("not resuming from checkpoints")]
    assert len(skipped) == 1 and skipped[0].fields["newest_version"] == kept
    root = serving_dir(registry.root)
    assert max(bundle_versions(root)) == kept
    _until_version(again, clock, kept)
    assert again.version == removed + 1  # past every number ever published here
    again.close(final=None)


def test_reloop_versions_rollback_then_a_restart_resumes_from_the_chosen_version(tmp_path, caplog, capsys):
    from reloop.engine.runtime.cli import main

    log, clock, cfg = _joined(tmp_path, 400, seed=12)
    train = _train(cfg, log, clock, tmp_path)
    _until_version(train, clock, None)
    first = train.version
    _until_version(train, clock, first)
    newest = train.version
    assert train.close() is not None
    root = train.registry.root
    assert main(["versions", "rollback", "--dir", str(root), "--to", str(first)]) == 0
    assert f"publishes v{newest + 1} next" in capsys.readouterr().out

    with caplog.at_level(logging.WARNING, logger="reloop"):
        again = _train(cfg, log, clock, tmp_path)
    assert again.version == first
    cleaned_up = ("not resuming", "removing the serving")  # the rollback left nothing for the restart to pass
    assert not [r for r in caplog.records if r.getMessage().startswith(cleaned_up)]
    _until_version(again, clock, first)
    assert again.version == newest + 1
    tensors, _ = read_bundle(serving_dir(root), newest + 1)  # its bundle is the new weights
    for name, value in again.registry.load(newest + 1, parts=["model"]).state["model"]["model"].items():
        assert torch.equal(tensors[f"model.{name}"], value), name
    again.close(final=None)
