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
