"""The serving bundle: weights only, checksummed, no random init, the optimizer never read; a version
without one (or with a broken one) still loads from the training snapshot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reloop.engine.checkpoint.registry import ChecksumError, SnapshotError, SnapshotRegistry
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import available_backbones, build_learner
from reloop.engine.serve.bundle_format import (
    bundle_versions,
    learner_from_bundle,
    publish_serving_bundle,
    read_bundle,
    serving_dir,
)
from reloop.engine.serve.config import ArmConfig
from reloop.engine.serve.loader import bundle_or_snapshot_loader
from reloop.engine.serve.stack import registry_loader_factory

SPEC = FeatureSpec.from_dict(
    {
        "fields": [
            {"kind": "categorical", "name": "user", "buckets": 50},
            {"kind": "categorical", "name": "item", "buckets": 80},
            {"kind": "numeric", "name": "price", "transform": "minmax", "min": 0, "max": 10},
            {"kind": "numeric", "name": "count", "transform": "log_bucket", "buckets": 20},
            {"kind": "multi", "name": "tags", "buckets": 31, "max_len": 3},
        ]
    }
)


def _rows(n: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "user": f"u{rng.integers(20)}",
            "item": f"i{rng.integers(40)}",
            "price": float(rng.random() * 10),
            "count": int(rng.integers(0, 500)),
            "tags": [f"t{rng.integers(9)}" for _ in range(int(rng.integers(0, 4)))],
        }
        for _ in range(n)
    ]


def _trained(backbone: str, **params):
    learner = build_learner(backbone, SPEC, "reloop", 0.5, seed=1, **params)
    batch = Featurizer(SPEC).transform(_rows())
    rng = np.random.default_rng(1)
    for _ in range(3):
        learner.learn(batch, (rng.random(64) < 0.3).astype(np.float32))
    return learner


@pytest.mark.parametrize(
    ("backbone", "params"),
    [
        ("dcn", {"embedding_dim": 4, "hidden_units": [16, 16]}),
        ("deepfm", {"embedding_dim": 4, "hidden_units": [8]}),
        ("fm", {"embedding_dim": 4, "optimizer": {"wide": "off", "embedding_optimizer": "adam"}}),
    ],
)
def test_bundle_predicts_exactly_what_the_learner_predicts(tmp_path, backbone, params):
    learner = _trained(backbone, **params)
    reg = SnapshotRegistry(tmp_path)
    version = publish_serving_bundle(reg, learner)
    assert version == 1 and bundle_versions(serving_dir(tmp_path)) == [1]
    served = learner_from_bundle(*read_bundle(serving_dir(tmp_path), 1))
    batch = Featurizer(SPEC).transform(_rows(50, seed=7))
    np.testing.assert_array_equal(served.predict_proba(batch), learner.predict_proba(batch))
    # Published before the training snapshot, it takes the version that snapshot then takes.
    assert reg.publish({"model": learner.state_dict()}) == version


_TORCH_BACKBONES = [b for b in available_backbones() if not b.startswith(("river_", "ftrl"))]


@pytest.mark.parametrize(
    ("backbone", "params"),
    [(b, {} if b == "lr" else {"embedding_dim": 4}) for b in _TORCH_BACKBONES]
    + [(b, {"embedding_dim": 4, "batch_norm": True}) for b in ("dcn", "deepfm")],
)
def test_every_torch_backbone_publishes_a_bundle_that_predicts_what_it_predicts(tmp_path, backbone, params):
    # Batch norm keeps a 0-dim int64 buffer (num_batches_tracked): AFN+, and any backbone with
    # batch_norm on, once failed every publish on it.
    learner = _trained(backbone, **params)
    version = publish_serving_bundle(SnapshotRegistry(tmp_path), learner)
    assert version == 1
    served = learner_from_bundle(*read_bundle(serving_dir(tmp_path), 1))
    batch = Featurizer(SPEC).transform(_rows(50, seed=7))
    np.testing.assert_array_equal(served.predict_proba(batch), learner.predict_proba(batch))


def test_the_bundle_holds_no_optimizer_state_and_the_load_never_reads_the_snapshot(tmp_path, monkeypatch):
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    publish_serving_bundle(reg, learner)
    reg.publish({"model": learner.state_dict(), "state": {"x": 1}})
    tensors, meta = read_bundle(serving_dir(tmp_path), 1)
    weights = sum(t.numel() * t.element_size() for t in learner.model.parameters())
    bundle_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(k.startswith(("model.", "buffer.", "wide.")) for k in tensors)
    assert bundle_bytes <= weights + 2 * 8 * (SPEC.total_rows + 1) + 1024  # + the wide part's mean/var

    def no_snapshot(*a, **kw):
        raise AssertionError("the training snapshot was read")

    monkeypatch.setattr(SnapshotRegistry, "load", no_snapshot)
    bundle = bundle_or_snapshot_loader(reg)(1)
    rows = _rows(10, seed=3)
    np.testing.assert_array_equal(bundle.score(rows), learner.predict_proba(Featurizer(SPEC).transform(rows)))


def test_a_corrupt_bundle_is_refused_and_the_snapshot_serves(tmp_path):
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    publish_serving_bundle(reg, learner)
    reg.publish({"model": learner.state_dict()})
    path = serving_dir(tmp_path) / "v000000000001.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        read_bundle(serving_dir(tmp_path), 1)
    bundle = bundle_or_snapshot_loader(reg)(1)  # falls back to the snapshot of the same version
    rows = _rows(10)
    np.testing.assert_allclose(bundle.score(rows), learner.predict_proba(Featurizer(SPEC).transform(rows)))


def test_the_checksum_is_crc32c_of_the_file_and_older_sha256_manifests_still_verify(tmp_path):
    import hashlib
    import json

    import crc32c

    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    publish_serving_bundle(SnapshotRegistry(tmp_path), learner)
    root = serving_dir(tmp_path)
    manifest_path, data = root / "v000000000001.json", (root / "v000000000001.safetensors").read_bytes()
    manifest = json.loads(manifest_path.read_text())
    assert manifest["crc32c"] == f"{crc32c.crc32c(data):08x}" and "sha256" not in manifest
    # A manifest from before (sha256) is verified with sha256: right, it loads; wrong, it is refused.
    old = {k: v for k, v in manifest.items() if k != "crc32c"}
    manifest_path.write_text(json.dumps({**old, "sha256": hashlib.sha256(data).hexdigest()}))
    tensors, _ = read_bundle(root, 1)
    assert tensors
    manifest_path.write_text(json.dumps({**old, "sha256": hashlib.sha256(data + b"x").hexdigest()}))
    with pytest.raises(ChecksumError, match="sha256"):
        read_bundle(root, 1)
    # A bundle cut short fails on its length before any checksum.
    manifest_path.write_text(json.dumps(manifest))
    (root / "v000000000001.safetensors").write_bytes(data[:-8])
    with pytest.raises(ChecksumError, match="crc32c"):
        read_bundle(root, 1)


def test_a_bundle_manifest_naming_another_file_or_a_link_is_refused(tmp_path):
    # read_bundle opened whatever the manifest named: "../x" or "/x" had the service map and serve any
    # file it could read (a checksum in the manifest written to match it).
    import json
    import os

    import crc32c

    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    publish_serving_bundle(SnapshotRegistry(tmp_path / "reg"), learner)
    root = serving_dir(tmp_path / "reg")
    manifest_path, own = root / "v000000000001.json", root / "v000000000001.safetensors"
    manifest = json.loads(manifest_path.read_text())
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(own.read_bytes())
    for named in (str(outside), os.path.relpath(outside, root)):
        manifest_path.write_text(json.dumps({**manifest, "file": named}))
        with pytest.raises(SnapshotError, match="not this version's"):
            read_bundle(root, 1)
    manifest_path.write_text(json.dumps(manifest))
    own.unlink()
    own.symlink_to(outside)
    with pytest.raises(SnapshotError, match="cannot be read"):
        read_bundle(root, 1)
    # A header that is not an object: refused as unusable (it escaped as an AttributeError).
    own.unlink()
    header = b"[]"
    data = len(header).to_bytes(8, "little") + header
    own.write_bytes(data)
    manifest_path.write_text(
        json.dumps({**manifest, "bytes": len(data), "crc32c": f"{crc32c.crc32c(data):08x}"})
    )
    with pytest.raises(SnapshotError, match="not an object"):
        read_bundle(root, 1)


def test_a_bundle_that_does_not_fit_its_model_is_refused(tmp_path):
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    publish_serving_bundle(SnapshotRegistry(tmp_path), learner)
    tensors, meta = read_bundle(serving_dir(tmp_path), 1)
    tensors.pop(next(k for k in tensors if k.startswith("model.")))
    with pytest.raises(SnapshotError, match="missing"):
        learner_from_bundle(tensors, meta)


def test_the_service_sees_a_bundle_before_its_snapshot_and_old_snapshots_without_one(tmp_path):
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    reg.publish({"model": learner.state_dict()})  # v1: an older trainer, no bundle
    latest, load, versions = registry_loader_factory(ArmConfig(name="A", registry=tmp_path))
    assert latest() == 1 and load(1).version == 1
    publish_serving_bundle(reg, learner)  # v2's bundle; its training snapshot is still being written
    assert latest() == 2 and versions() == [1, 2]
    assert load(2).version == 2


def test_the_file_is_standard_safetensors(tmp_path):
    from safetensors.torch import load_file

    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    publish_serving_bundle(SnapshotRegistry(tmp_path), learner)
    path = serving_dir(tmp_path) / "v000000000001.safetensors"
    ours, meta = read_bundle(serving_dir(tmp_path), 1)
    theirs = load_file(path)
    fillers = {k for k in theirs if k.startswith("__pad")}  # uint8 entries that align the next tensor
    assert fillers and all(theirs[k].dtype == torch.uint8 and not theirs[k].any() for k in fillers)
    assert set(ours) == set(theirs) - fillers and meta["config_json"] == learner.config.to_json()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
        assert v.data_ptr() % 64 == 0, k  # aligned as torch aligns its own tensors


def _serving_v1(root, learner):
    """A registry at ``root`` whose v1 (bundle, then snapshot) a reload watcher serves: (the registry,
    the model holder, the watcher)."""
    from reloop.engine.serve.bundle import ModelHolder
    from reloop.engine.serve.reload import ArmSource, ReloadWatcher

    reg = SnapshotRegistry(root)
    publish_serving_bundle(reg, learner)
    reg.publish({"model": learner.state_dict()})
    latest, load, versions = registry_loader_factory(ArmConfig(name="A", registry=root))
    holder = ModelHolder()
    watcher = ReloadWatcher(sources=[ArmSource("A", holder, latest, load, versions)])
    assert watcher.poll_once() == 1 and holder.version == 1
    return reg, holder, watcher


def test_a_version_whose_bundle_was_refused_before_its_snapshot_was_written_loads_once_it_is(tmp_path):
    # The trainer writes the bundle first. One refused (torn, or read while the trainer rewrote it)
    # before the training snapshot of its version was there was refused for good: the service stayed
    # on the version before for a whole period although that snapshot loaded.
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg, holder, watcher = _serving_v1(tmp_path, learner)
    assert publish_serving_bundle(reg, learner) == 2
    path = serving_dir(tmp_path) / "v000000000002.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert watcher.poll_once() == 0 and holder.version == 1 and watcher.refused == 1
    assert watcher.poll_once() == 0 and watcher.refused == 1  # not tried again until the snapshot is there
    reg.publish({"model": learner.state_dict()})  # v2's training snapshot
    assert watcher.poll_once() == 1 and holder.version == 2
    rows = _rows(10)
    np.testing.assert_allclose(
        holder.current.score(rows), learner.predict_proba(Featurizer(SPEC).transform(rows))
    )


def test_what_a_writer_killed_mid_write_left_is_removed_by_the_next_write(tmp_path):
    # A trainer killed while writing a bundle left its temporary file (the size of the weights); the
    # files piled up, one per kill, and nothing removed them.
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    root = serving_dir(tmp_path)
    root.mkdir()
    stale = [root / ".tmp-v000000000001-0badf00d.safetensors", root / ".tmp-v000000000001-0badf00d.json"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    assert publish_serving_bundle(SnapshotRegistry(tmp_path), learner) == 1
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in root.iterdir()) == ["v000000000001.json", "v000000000001.safetensors"]


def test_the_bundle_takes_the_version_its_snapshot_takes_past_a_stray_entry(tmp_path):
    # The registry numbers a snapshot past a stray file holding a version's name; the bundle took the
    # newest + 1 regardless: a bundle of a version that never existed, served (and logged) as such, and
    # the real version without one.
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    reg.publish({"model": learner.state_dict()})
    (tmp_path / "v000000000002").write_text("not a snapshot")
    bundle_version = publish_serving_bundle(reg, learner)
    version = reg.publish({"model": learner.state_dict()})
    assert bundle_version == version == 3
    assert bundle_versions(serving_dir(tmp_path)) == [3]
    rows = _rows(10)
    served = bundle_or_snapshot_loader(reg)(version).score(rows)
    np.testing.assert_array_equal(served, learner.predict_proba(Featurizer(SPEC).transform(rows)))


def test_the_service_leaves_a_missing_registry_folder_to_its_trainer(tmp_path):
    # Serving mounts the snapshots read-only; on a fresh volume the registry folder does not exist until
    # the processor's first publish. The service created it (EROFS there: a crash loop until then).
    root = tmp_path / "snapshots" / "arm-a"
    latest, load, versions = registry_loader_factory(ArmConfig(name="A", registry=root))
    assert latest() is None and versions() == []
    assert not root.exists()
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(root)  # the trainer's
    publish_serving_bundle(reg, learner)
    reg.publish({"model": learner.state_dict()})
    assert latest() == 1 and load(1).version == 1


def test_a_bundle_carries_the_counters_its_model_learnt(tmp_path) -> None:
    """Serve checks an arm's counter prior against the model's record: the bundle must keep it."""
    from reloop.engine.features.counters import CounterSettings, with_counter_fields
    from reloop.engine.serve.bundle_format import write_bundle

    settings = CounterSettings(fields=("user", "user*tags"), prior_strength=7.0, windows_s=(60.0,))
    spec = with_counter_fields(SPEC, settings)
    learner = build_learner("dcn", spec, "ce", 0.0, seed=0, embedding_dim=4, counters=settings)
    write_bundle(tmp_path, 3, learner)
    assert learner_from_bundle(*read_bundle(tmp_path, 3)).config.counters == settings
