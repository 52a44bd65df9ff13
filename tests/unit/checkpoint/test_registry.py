from __future__ import annotations

import fractions
import json

import pytest
import torch

from engine.checkpoint import ChecksumError, SnapshotError, SnapshotRegistry


def _state(x: float) -> dict:
    return {"model": {"w": torch.full((3,), x)}, "state": {"joiner": {"pending": [["a", 1, b"raw"]]}}}


def test_publish_load_roundtrip_and_parts(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    v = reg.publish(_state(1.5), meta={"positions": {"impressions:0": 7}})
    snap = reg.load()
    assert snap.version == v == 1
    assert torch.equal(snap.state["model"]["w"], torch.full((3,), 1.5))
    assert snap.state["state"]["joiner"]["pending"] == [["a", 1, b"raw"]]
    assert snap.meta == {"positions": {"impressions:0": 7}}
    only_model = reg.load(parts=["model"])
    assert set(only_model.state) == {"model"}


def test_versions_increase_across_instances_and_retention(tmp_path):
    reg = SnapshotRegistry(tmp_path, keep=2)
    assert reg.latest_version() is None
    for i in range(3):
        reg.publish(_state(i))
    again = SnapshotRegistry(tmp_path, keep=2)  # a restart
    assert again.publish(_state(9)) == 4
    assert again.versions() == [3, 4]


def test_corrupt_part_is_refused_and_latest_falls_back(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1.0))
    v2 = reg.publish(_state(2.0))
    part = reg.path(v2) / "model.pt"
    data = bytearray(part.read_bytes())
    data[-10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="model"):
        reg.load(v2)
    assert reg.load().version == 1
    assert reg.publish(_state(3.0)) == 3  # the counter does not reuse the refused version


def test_tampered_manifest_is_refused(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    v = reg.publish(_state(1.0), meta={"step": 1})
    path = reg.path(v) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["meta"]["step"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(ChecksumError, match="manifest"):
        reg.load(v)
    with pytest.raises(SnapshotError, match="no usable snapshot"):
        reg.load()


def test_pickled_objects_are_not_loaded(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    v = reg.publish({"model": {"obj": fractions.Fraction(1, 3)}})  # any non-allowlisted class
    with pytest.raises(Exception, match="[Ww]eights only"):
        reg.load(v)


def test_leftover_temp_dirs_are_invisible_and_cleaned(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    (tmp_path / ".tmp-1-dead").mkdir()
    (tmp_path / ".tmp-1-dead" / "model.pt").write_bytes(b"partial")
    assert reg.versions() == []
    reg.publish(_state(1.0))
    assert not (tmp_path / ".tmp-1-dead").exists()


def test_bad_part_name_rejected(tmp_path):
    with pytest.raises(ValueError, match="part name"):
        SnapshotRegistry(tmp_path).publish({"../x": 1})
