"""Upgrades and rollbacks of the train stage's saved state: a state of an older shape resumes, a state a
newer reloop wrote (a format this one does not read) stops the stage naming the point and the formats,
instead of resuming silently from an older point (from before the upgrade)."""

from __future__ import annotations

import pytest
from reloop.engine.runtime.restore import SnapshotMismatch
from reloop.engine.runtime.train_state import ledger_lengths, numberings_of, rank_parts, share_of
from reloop.engine.streams import PartitionShare

from .test_stages import _joined, _train
from .test_train_restore import _until_version


def _republished(registry, version: int, **changes) -> int:
    """The snapshot ``version`` published again as the next version, its train-stage state changed."""
    snap = registry.load(version)
    state = {**snap.state["state"], **changes}
    return registry.publish({**snap.state, "state": state}, snap.meta)


def test_a_state_a_newer_reloop_wrote_stops_the_stage_instead_of_resuming_from_before_it(tmp_path):
    # A rollback: the newest snapshot is of a newer train-stage format. It was refused like a corrupt
    # one and the stage resumed from the older snapshot, i.e. from before the upgrade: it trained what
    # came since again (or lost it past the topic's retention) and published over the newer versions.
    log, clock, cfg = _joined(tmp_path, 400, seed=12)
    train = _train(cfg, log, clock, tmp_path)
    _until_version(train, clock, None)
    old = train.version
    train.close(final=None)
    newer = _republished(train.registry, old, format=3)
    with pytest.raises(SnapshotMismatch, match="newer reloop") as caught:
        _train(cfg, log, clock, tmp_path)
    message = str(caught.value)
    assert f"snapshot {newer}" in message and f"v{newer:012d}" in message
    assert "format 3" in message and "formats 1 to 2" in message
    assert train.registry.versions()[-1] == newer  # nothing published over it


def test_a_snapshot_of_a_newer_registry_format_stops_the_stage_too(tmp_path):
    # The registry refuses a manifest of another format like a corrupt one: the stage fell back.
    import json

    from reloop.engine.checkpoint import registry as registry_module

    log, clock, cfg = _joined(tmp_path, 400, seed=12)
    train = _train(cfg, log, clock, tmp_path)
    _until_version(train, clock, None)
    train.close(final=None)
    newer = _republished(train.registry, train.version)
    path = train.registry.path(newer) / "manifest.json"
    manifest = json.loads(path.read_text())
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"} | {
        "format": registry_module.FORMAT + 1
    }
    body["manifest_sha256"] = registry_module._sha256(registry_module._canonical(body))
    path.write_text(json.dumps(body))
    with pytest.raises(
        SnapshotMismatch, match=f"snapshot format {registry_module.FORMAT + 1}, written by a newer"
    ):
        _train(cfg, log, clock, tmp_path)


def test_the_supervisor_takes_a_newer_format_as_a_refusal_not_a_failure_to_retry():
    from reloop.engine.runtime.restore import NewerFormat
    from reloop.engine.runtime.supervisor import REFUSED

    assert issubclass(NewerFormat, REFUSED)


def test_rank_parts_of_a_newer_format_name_it_and_of_an_unknown_one_stay_a_value_error():
    from reloop.engine.runtime.restore import NewerFormat

    with pytest.raises(NewerFormat, match="format 7, written by a newer reloop"):
        rank_parts({"format": 7, "ranks": []}, {})
    for odd in (None, 0, "2"):
        with pytest.raises(ValueError, match="unknown train-stage state format"):
            rank_parts({"format": odd, "ranks": []}, {})


def _part(**extra):
    return {
        "trainer": {"counters": {"samples": 3}},
        "served_metrics": None,
        "buffer": [],
        "taken": {"0": 9, "1": 4},
        "event_time_ms": 5,
        "positions": {"samples:0": 10, "samples:1": 7},
        "ledger_bytes": 12,
        **extra,
    }


def test_a_format_2_state_from_before_incarnations_and_ledger_lengths_resumes():
    # Keys added within format 2 (numberings, ledger_lengths) are read with their defaults.
    state = {"format": 2, "stage": "train", "period": {}, "ranks": [_part()]}
    parts = rank_parts(state, {})
    assert numberings_of(parts[0]) == {0: {"": 9}, 1: {"": 4}}
    assert ledger_lengths(state) == {}
    half = share_of(parts, PartitionShare(1, 2))
    assert half["taken"] == {"1": 4} and numberings_of(half) == {1: {"": 4}}


def test_a_format_1_state_reads_as_one_rank():
    part = _part()
    positions = part.pop("positions")
    state = {"format": 1, "stage": "train", "period": {}, **part}
    (only,) = rank_parts(state, {"positions": positions})
    assert only["positions"] == positions and only["taken"] == {"0": 9, "1": 4}
    assert ledger_lengths(state) == {0: 12}


# ---------------------------------------------------------------------------------------- join tasks
def _join_task_checkpointed(tmp_path, steps=(4, 9)):
    """A join stage over a synthetic log, its task 0 checkpointed after ``steps`` and aborted:
    (log, clock, config, the task's checkpoint registry); the log's ground truth in ``.expected``."""
    from reloop.engine.checkpoint.registry import SnapshotRegistry
    from reloop.engine.runtime.clock import ManualClock
    from reloop.engine.runtime.synthetic import generate

    from .test_stages import BATCH, START, _config, _join, _log

    synth = generate(400, seed=7, pad_to_multiple=BATCH)
    log = _log(synth)
    log.expected = synth.expected
    clock = ManualClock(START)
    cfg = _config(tmp_path)
    first = _join(cfg, log, clock, tmp_path)
    for i in range(max(steps) + 1):
        first.step()
        clock.advance(10)
        if i in steps:
            first.checkpoint_all()
    first.abort()
    return log, clock, cfg, SnapshotRegistry(tmp_path / "join-ckpt" / "join" / "task-00000", keep=2)


def _rewrite_state(reg, version: int, change) -> None:
    """Checkpoint ``version`` of a join task written again (a valid checkpoint) with its state changed."""
    import shutil

    snap = reg.load(version)
    state = change(dict(snap.state["state"]))
    shutil.rmtree(reg.path(version))
    import dataclasses

    reg.write(dataclasses.replace(reg.prepare({**snap.state, "state": state}, snap.meta), version=version))


def test_a_join_task_checkpoint_a_newer_reloop_wrote_stops_the_stage_naming_it(tmp_path):
    # It raised ValueError("join task 0: unusable checkpoint state"), which the supervisor retried for
    # recovery.give_up_after_s (15 minutes) before giving up with exit 1.
    from reloop.engine.runtime.join_task import STATE_FORMAT
    from reloop.engine.runtime.restore import NewerFormat
    from reloop.engine.runtime.supervisor import REFUSED

    from .test_stages import _join

    log, clock, cfg, reg = _join_task_checkpointed(tmp_path)
    newest = reg.versions()[-1]
    _rewrite_state(reg, newest, lambda s: {**s, "format": STATE_FORMAT + 1})
    second = _join(cfg, log, clock, tmp_path)
    with pytest.raises(NewerFormat) as caught:
        second.step()
    assert isinstance(caught.value, REFUSED)
    message = str(caught.value)
    assert "join task 0" in message and f"checkpoint {newest}" in message
    assert str(reg.path(newest)) in message
    assert f"format {STATE_FORMAT + 1}, written by a newer reloop" in message
    assert f"reads format {STATE_FORMAT}" in message
    # not "a fresh checkpoint dir": the task would join its retained input again under a new numbering
    assert "run the reloop that wrote it" in message and "fresh" not in message
    assert reg.versions()[-1] == newest  # nothing written over it


def test_a_join_task_checkpoint_of_a_newer_registry_format_stops_the_stage_too(tmp_path):
    # The registry refused its manifest like a corrupt one and the task resumed from the checkpoint
    # before it, in silence.
    import json

    from reloop.engine.checkpoint import registry as registry_module
    from reloop.engine.runtime.restore import NewerFormat

    from .test_stages import _join

    log, clock, cfg, reg = _join_task_checkpointed(tmp_path)
    newest = reg.versions()[-1]
    path = reg.path(newest) / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": registry_module.FORMAT + 1}))
    second = _join(cfg, log, clock, tmp_path)
    with pytest.raises(
        NewerFormat, match=f"snapshot format {registry_module.FORMAT + 1}, written by a newer"
    ):
        second.step()


def test_a_join_task_checkpoint_whose_state_does_not_apply_falls_back_to_the_one_before(tmp_path):
    # A state that passes its checksums but that the task does not take (a key missing): the task was
    # not restored from the checkpoint before it (a KeyError out of the stage, for ever).
    from reloop.engine.metrics.stats import EngineStats

    from .test_stages import _assert_trained_once, _join, _run_join

    log, clock, cfg, reg = _join_task_checkpointed(tmp_path)
    before, newest = reg.versions()
    expected = reg.load(before).state["state"]["sent"]
    _rewrite_state(reg, newest, lambda s: {k: v for k, v in s.items() if k != "sent"})
    stats = EngineStats()
    second = _join(cfg, log, clock, tmp_path, stats=stats)
    second.step()
    assert stats.snapshot_restore_fallbacks.get() == 1
    task = second.tasks[0]
    assert task.sent >= expected  # resumed from ``before`` (and went on)
    second.checkpoint_all()
    # the fence follows the newest in the folder (+1 at the restore: a merge journal of its own)
    assert reg.versions()[-1] == newest + 2
    _run_join(second, log, clock)
    # what the task sent again was trained once, and nothing is missing
    _assert_trained_once(cfg, log, clock, tmp_path, log.expected)


def test_a_join_task_none_of_whose_checkpoint_states_applies_refuses_to_start(tmp_path):
    from reloop.engine.runtime.restore import NoUsableSnapshot
    from reloop.engine.runtime.supervisor import REFUSED

    from .test_stages import _join

    log, clock, cfg, reg = _join_task_checkpointed(tmp_path)
    for v in reg.versions():
        _rewrite_state(reg, v, lambda s: {**s, "unsent": 7})
    second = _join(cfg, log, clock, tmp_path)
    with pytest.raises(NoUsableSnapshot, match="join task 0: no checkpoint .* loads; refusing to start") as e:
        second.step()
    assert isinstance(e.value, REFUSED) and "history again" in str(e.value)
    assert not second.tasks


def test_join_task_state_errors_name_the_formats():
    from reloop.engine.runtime.join_task import STATE_FORMAT, JoinTask
    from reloop.engine.runtime.restore import NewerFormat

    task = JoinTask.__new__(JoinTask)
    task.partition = 3
    with pytest.raises(
        NewerFormat, match=f"join task 3: checkpoint state format {STATE_FORMAT + 1}, written"
    ):
        task.load_state_dict({"format": STATE_FORMAT + 1, "partition": 3})
    with pytest.raises(ValueError, match=f"unknown checkpoint state format 'x', expected {STATE_FORMAT}"):
        task.load_state_dict({"format": "x", "partition": 3})
    with pytest.raises(ValueError, match="the checkpoint state is task 4's"):
        task.load_state_dict({"format": STATE_FORMAT, "partition": 4})


# ------------------------------------------------------------------ the pipeline (reloop replay), learner
def test_a_pipeline_state_a_newer_reloop_wrote_stops_the_replay_instead_of_resuming_from_before_it(tmp_path):
    # Refused as a SnapshotError like a corrupt state: `reloop replay --resume` resumed from the
    # snapshot before it (from before the upgrade).
    from reloop.engine.runtime.pipeline import STATE_FORMAT
    from reloop.engine.runtime.restore import NewerFormat

    from .test_pipeline import _config, _pipeline, _ran_to_end

    log, clock, _ = _ran_to_end(tmp_path, 200, seed=1)
    from reloop.engine.checkpoint.registry import SnapshotRegistry

    registry = SnapshotRegistry(tmp_path / "snaps", keep=3)
    newer = _republished(registry, registry.versions()[-1], format=STATE_FORMAT + 1)
    with pytest.raises(NewerFormat) as caught:
        _pipeline(_config(tmp_path), log, clock)
    message = str(caught.value)
    assert f"snapshot {newer}" in message and f"v{newer:012d}" in message
    assert f"pipeline state format {STATE_FORMAT + 1}, written by a newer reloop" in message
    assert f"reads format {STATE_FORMAT}" in message
    assert registry.versions()[-1] == newer


def test_a_learner_state_a_newer_reloop_wrote_stops_the_stage_instead_of_resuming_from_before_it(tmp_path):
    # The learner raised ValueError: the snapshot was refused and the stage resumed from the one before.
    from reloop.engine.models.learner import STATE_FORMAT
    from reloop.engine.runtime.restore import NewerFormat

    log, clock, cfg = _joined(tmp_path, 400, seed=12)
    train = _train(cfg, log, clock, tmp_path)
    _until_version(train, clock, None)
    train.close(final=None)
    snap = train.registry.load(train.version)
    model = {**snap.state["model"], "format": STATE_FORMAT + 1}
    newer = train.registry.publish({**snap.state, "model": model}, snap.meta)
    with pytest.raises(NewerFormat) as caught:
        _train(cfg, log, clock, tmp_path)
    message = str(caught.value)
    assert f"snapshot {newer}" in message and f"v{newer:012d}" in message
    assert f"learner state format {STATE_FORMAT + 1}, written by a newer reloop" in message


def test_a_learner_state_of_an_unknown_format_stays_a_value_error():
    from reloop.engine.features.spec import FeatureSpec
    from reloop.engine.models.learner import STATE_FORMAT
    from reloop.engine.models.registry import build_learner, learner_from_state
    from reloop.engine.runtime.synthetic import SPEC

    state = build_learner("lr", FeatureSpec.from_dict(SPEC), "ce", 0.0).state_dict()
    for odd in (None, 0, "1"):
        with pytest.raises(ValueError, match=f"learner state format .*, expected {STATE_FORMAT}"):
            learner_from_state({**state, "format": odd})
    assert learner_from_state(state) is not None


def test_engine_models_and_engine_checkpoint_import_nothing_of_engine_runtime():
    # NewerFormat lives in engine/checkpoint/registry.py so that the learners can raise it.
    import ast
    from pathlib import Path

    engine = Path(__file__).resolve().parents[3] / "engine"
    offenders = []
    for folder in ("models", "checkpoint"):
        for path in (engine / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                )  # fmt: skip
                offenders += [f"{path.name}: {n}" for n in names if n.startswith("reloop.engine.runtime")]
    assert offenders == []
