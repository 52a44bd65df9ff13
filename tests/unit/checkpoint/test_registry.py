from __future__ import annotations

import fractions
import hashlib
import io
import json
import os

import crc32c
import numpy as np
import pytest
import torch
from reloop.engine.checkpoint import ChecksumError, SnapshotError, SnapshotRegistry


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


def test_a_corrupt_version_does_not_count_toward_keep(tmp_path, caplog):
    # Pruning by count alone kept v3 (rotted) and v4, leaving one loadable snapshot of keep=2.
    reg = SnapshotRegistry(tmp_path, keep=2)
    for i in range(3):
        reg.publish(_state(float(i)))
    (reg.path(3) / "model.pt").write_bytes(b"rotted")
    again = SnapshotRegistry(tmp_path, keep=2)  # a restart: it did not write v2 or v3
    assert again.publish(_state(9.0)) == 4
    assert again.versions() == [2, 3, 4]  # v3 kept for a look, v2 still the second loadable one
    assert "snapshot 3 fails its checks" in caplog.text
    with pytest.raises(ChecksumError):
        again.load(3)
    assert torch.equal(again.load(2).state["model"]["w"], torch.full((3,), 1.0))
    caplog.clear()
    again.publish(_state(10.0))
    assert again.versions() == [4, 5]  # two sound ones newer than the corrupt one: it goes
    assert "fails its checks" not in caplog.text


def test_retention_reads_an_older_version_once_and_never_the_oldest(tmp_path, monkeypatch):
    reg = SnapshotRegistry(tmp_path, keep=2)
    reg.publish(_state(1.0))
    reg.publish(_state(2.0))
    read: list[int] = []
    again = SnapshotRegistry(tmp_path, keep=2)
    verify = again.verify
    monkeypatch.setattr(again, "verify", lambda v: (read.append(v), verify(v)))
    again.publish(_state(3.0))  # v2 is read: if it failed, v1 would be the second loadable one
    assert read == [2] and again.versions() == [2, 3]
    again.publish(_state(4.0))
    assert read == [2] and again.versions() == [3, 4]  # v3 it wrote, v2 it had read: no more reads


def test_a_version_removed_by_hand_keeps_its_number_taken(tmp_path):
    # A rollback removes the newest version folders; the restarted trainer took their numbers again, so
    # v3 named two models (serving, the logged impressions and the per-version metrics tell them apart
    # by number alone).
    import shutil

    reg = SnapshotRegistry(tmp_path, keep=5)
    for i in range(3):
        reg.publish(_state(i))
    shutil.rmtree(reg.path(3))
    shutil.rmtree(reg.path(2))
    again = SnapshotRegistry(tmp_path)
    assert again.next_version() == 4
    assert again.publish(_state(9)) == 4
    assert again.versions() == [1, 4]
    (tmp_path / "highest_version").unlink()  # a folder written before the file existed
    assert SnapshotRegistry(tmp_path).publish(_state(10)) == 5
    assert (tmp_path / "highest_version").read_text() == "5\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("text", ["", "v3", "-2", "3.5"])
def test_a_highest_version_that_does_not_read_is_refused_naming_it(tmp_path, text):
    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1))
    (tmp_path / "highest_version").write_text(text)
    with pytest.raises(SnapshotError, match="highest_version should hold the highest version"):
        reg.publish(_state(2))
    assert reg.versions() == [1]


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


def test_a_refusal_names_the_folder_a_checkpoint_and_a_version_of_one_number_are_told_apart(tmp_path):
    # Every refusal said "snapshot 4: ...", for a checkpoint, a join task's checkpoint and a model
    # version alike: which folder to move aside (docs/operations.md) was a guess.
    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1.0))
    checkpoint = reg.checkpoints.publish(_state(2.0))
    for registry, version in ((reg, 1), (reg.checkpoints, checkpoint)):
        part = registry.path(version) / "model.pt"
        data = bytearray(part.read_bytes())
        data[-10] ^= 0xFF
        part.write_bytes(bytes(data))
        with pytest.raises(ChecksumError) as caught:
            registry.load(version)
        assert str(caught.value) == f"{registry.path(version)}: part 'model' fails its crc32c checksum"
    assert str(reg.checkpoints.path(checkpoint)) != str(reg.path(1))


def test_a_flipped_weight_byte_is_refused_without_the_zip_crc(tmp_path):
    """Parts are written without the zip's own CRC-32 (the manifest's CRC32C covers them): a flipped
    byte inside a tensor's data, which torch.load alone would read as a different weight, is refused."""
    from torch.utils.serialization import config

    reg = SnapshotRegistry(tmp_path)
    v = reg.publish({"model": {"w": torch.arange(4096, dtype=torch.float32)}})
    assert config.save.compute_crc32  # the process-wide setting is back as it was
    part = reg.path(v) / "model.pt"
    data = bytearray(part.read_bytes())
    at = data.find(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[4000:4016])
    assert at > 0
    data[at] ^= 0x01
    part.write_bytes(bytes(data))
    flipped = torch.load(io.BytesIO(bytes(data)), weights_only=True)["w"]
    assert not torch.equal(flipped, torch.arange(4096, dtype=torch.float32))  # torch.load alone reads it
    with pytest.raises(ChecksumError, match="model"):
        reg.load(v)


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
    v = reg.publish({"model": {"obj": 1}})
    buf = io.BytesIO()
    torch.save({"obj": fractions.Fraction(1, 3)}, buf)  # any non-allowlisted class, written by another tool
    reseal(reg, v, "model", buf.getvalue())
    with pytest.raises(SnapshotError, match="does not load: .* refuses it .the global fractions.Fraction"):
        reg.load(v)


@pytest.mark.parametrize(
    "value",
    [np.float64(0.5), np.int64(3), np.zeros(2), frozenset({1}), fractions.Fraction(1, 3), slice(0, 2)],
    ids=lambda v: type(v).__name__,
)
def test_a_part_a_weights_only_load_refuses_is_refused_at_publish_and_the_good_ones_kept(tmp_path, value):
    # Such a part was written, committed and counted against ``keep``: with keep=1 the one snapshot that
    # loaded was deleted for one that did not, and the refusal came only at the restore that needed it.
    reg = SnapshotRegistry(tmp_path, keep=1)
    good = reg.publish(_state(1.0))
    with pytest.raises(SnapshotError, match=r"part 'state' holds a value that a weights-only load refuses"):
        reg.publish({"model": {"w": torch.ones(3)}, "state": {"metric": {"auc": value}}})
    assert reg.versions() == [good] and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    assert torch.equal(reg.load().state["model"]["w"], torch.full((3,), 1.0))


def test_what_a_weights_only_load_takes_is_published(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    state = {
        "t": [torch.ones(2, dtype=d) for d in (torch.float32, torch.bfloat16, torch.int64, torch.bool)],
        "p": torch.nn.Parameter(torch.ones(2)),
        "rng": torch.Generator().manual_seed(3).get_state(),
        "plain": {"i": 2**70, "f": float("inf"), "s": "x", "b": b"", "big": bytes(5000), "set": {1}, "c": 1j},
        "torch": (torch.Size([2]), torch.float16, torch.device("cpu")),
    }
    loaded = reg.load(reg.publish({"model": state})).state["model"]
    assert loaded["plain"] == state["plain"] and loaded["torch"] == state["torch"]
    assert torch.equal(loaded["rng"], state["rng"])


def reseal(reg: SnapshotRegistry, version: int, part: str, data: bytes) -> None:
    """Replace a part and recompute every checksum, as an attacker (or a buggy tool) could."""
    folder = reg.path(version)
    (folder / f"{part}.pt").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["parts"][part].update(bytes=len(data), crc32c=f"{crc32c.crc32c(data):08x}")
    _write_manifest(folder, manifest)


def _write_manifest(folder, manifest: dict) -> None:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    manifest["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _reseal(folder, **fields) -> None:
    """The manifest in ``folder`` with ``fields`` changed and its checksum made right again."""
    manifest = json.loads((folder / "manifest.json").read_text())
    _write_manifest(folder, manifest | fields)


def test_parts_carry_their_crc32c_and_older_sha256_manifests_still_verify(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    v = reg.publish(_state(1.0))
    folder = reg.path(v)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "model.pt").read_bytes()
    assert manifest["parts"]["model"]["crc32c"] == f"{crc32c.crc32c(data):08x}"
    assert "sha256" not in manifest["parts"]["model"]
    # A manifest as written before: sha256 per part. It verifies, and a flipped byte is still caught.
    for info in manifest["parts"].values():
        info["sha256"] = hashlib.sha256((folder / info["file"]).read_bytes()).hexdigest()
        del info["crc32c"]
    _write_manifest(folder, manifest)
    assert torch.equal(reg.load(v).state["model"]["w"], torch.full((3,), 1.0))
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 1
    (folder / "model.pt").write_bytes(bytes(damaged))
    with pytest.raises(ChecksumError, match="sha256"):
        reg.load(v)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_resealed_pickle_passes_the_checksum_but_is_refused_and_load_falls_back(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1.0))
    v2 = reg.publish(_state(2.0))
    buf = io.BytesIO()
    torch.save({"w": _Boom()}, buf)
    reseal(reg, v2, "model", buf.getvalue())
    with pytest.raises(SnapshotError, match="does not load: a weights-only load refuses it") as refused:
        reg.load(v2)
    # The reason (the global it would have called), not torch's advice to load with weights_only=False.
    assert "system" in str(refused.value) and "weights_only=False" not in str(refused.value)
    snap = reg.load()
    assert snap.version == 1
    assert torch.equal(snap.state["model"]["w"], torch.full((3,), 1.0))


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "manifest.json").unlink(),
        lambda d: (d / "manifest.json").write_text("[1, 2]"),
        lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe"),
        lambda d: (d / "model.pt").unlink(),
    ],
    ids=["no-manifest", "manifest-not-object", "manifest-not-utf8", "part-missing"],
)
def test_every_kind_of_broken_snapshot_is_refused(tmp_path, damage):
    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1.0))
    damage(reg.path(reg.publish(_state(2.0))))
    assert reg.load().version == 1


def test_resealed_manifest_pointing_outside_its_folder_is_refused(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1.0))
    v2 = reg.publish(_state(2.0))
    folder = reg.path(v2)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["parts"]["model"]["file"] = "../v000000000001/model.pt"
    _write_manifest(folder, manifest)
    with pytest.raises(SnapshotError, match="manifest"):
        reg.load(v2)


def test_checkpoints_take_no_version_and_are_not_listed(tmp_path):
    reg = SnapshotRegistry(tmp_path, keep=3)
    assert reg.publish(_state(1.0)) == 1
    assert reg.checkpoints.publish(_state(1.5), meta={"base_version": 1}) == 1
    assert reg.versions() == [1] and reg.latest_version() == 1
    assert reg.publish(_state(2.0)) == 2  # the checkpoint did not take version 2
    assert reg.checkpoints.load().meta == {"base_version": 1}
    for i in range(3):
        reg.checkpoints.publish(_state(float(i)))
    assert len(reg.checkpoints.versions()) == 2


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


def test_large_bytes_travel_as_tensors_and_come_back_as_bytes(tmp_path):
    # A rolling metric window (bytes) pickled by protocol 2 goes through a latin-1 string; the registry
    # stores large ones as uint8 tensors and must give back exactly the bytes, at any depth.
    window = os.urandom(50_000)
    state = {"metrics": {"arms": {"a": [{"p": window, "n": 3}]}, "tiny": b"xy"}, "pair": (window, 1)}
    reg = SnapshotRegistry(tmp_path)
    version = reg.publish({"state": state})
    raw = torch.load(reg.path(version) / "state.pt", weights_only=True)
    assert isinstance(raw["metrics"]["arms"]["a"][0]["p"]["__reloop_bytes__"], torch.Tensor)
    assert raw["metrics"]["tiny"] == b"xy"  # small bytes stay bytes
    loaded = reg.load(version).state["state"]
    assert loaded == state
    assert type(loaded["metrics"]["arms"]["a"][0]["p"]) is bytes and type(loaded["pair"]) is tuple


def test_snapshots_written_with_plain_bytes_still_load(tmp_path):
    reg = SnapshotRegistry(tmp_path)
    window = bytes(range(256)) * 40
    version = reg.publish({"state": {"y": torch.zeros(2)}})
    buf = io.BytesIO()
    torch.save({"y": window}, buf)  # what a registry before the packing wrote
    reseal(reg, version, "state", buf.getvalue())
    assert reg.load(version).state["state"] == {"y": window}


def test_a_second_writer_on_the_folder_is_stopped_not_interleaved(tmp_path):
    # Two trainers on one folder published v2, v3, v4 in turn, serving flipping between their models.
    first, second = SnapshotRegistry(tmp_path), SnapshotRegistry(tmp_path)
    assert first.publish(_state(1.0)) == 1
    assert second.publish(_state(2.0)) == 2  # it has not written before: it continues from the newest
    with pytest.raises(SnapshotError, match="another process publishes snapshots to the same folder"):
        first.publish(_state(3.0))
    assert second.publish(_state(4.0)) == 3  # the one whose version is newest goes on
    assert torch.equal(SnapshotRegistry(tmp_path).load().state["model"]["w"], torch.full((3,), 4.0))
    # A restart (a new registry on the folder) resumes writing after the newest version.
    assert SnapshotRegistry(tmp_path).publish(_state(5.0)) == 4


def test_a_stray_file_named_like_a_version_does_not_block_publishing(tmp_path):
    # A file v000000000002 made every later publish fail ("already exists") for good.
    reg = SnapshotRegistry(tmp_path)
    assert reg.publish(_state(1.0)) == 1
    (tmp_path / "v000000000002").write_text("not a snapshot")
    os.symlink(tmp_path / "missing", tmp_path / "v000000000003")  # a dangling link too
    assert reg.publish(_state(2.0)) == 4
    assert reg.versions() == [1, 4]
    assert torch.equal(SnapshotRegistry(tmp_path).load().state["model"]["w"], torch.full((3,), 2.0))


@pytest.mark.parametrize("created", [10**400, float("nan"), -1.0])
def test_a_resealed_manifest_with_an_impossible_time_is_refused_and_load_falls_back(tmp_path, created):
    # 10**400 raised OverflowError out of load(), so the fallback to the older snapshot never happened.
    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1.0))
    v2 = reg.publish(_state(2.0))
    _reseal(reg.path(v2), created_unix=created)
    with pytest.raises(SnapshotError, match="created_unix"):
        reg.load(v2)
    assert reg.load().version == 1


def test_empty_bytes_load_back(tmp_path):
    # Protocol 2 pickles b"" as a call of the global ``bytes``, which a weights-only load refused: the
    # empty metric windows of a checkpoint taken before any sample made it unloadable, and the stage
    # then refused to start at all ("no snapshot loads; refusing to start from scratch").
    reg = SnapshotRegistry(tmp_path)
    state = {"trainer": {"progressive": {"y": b"", "p": b"", "n": 0}, "small": b"ab"}}
    v = reg.publish(state)
    assert SnapshotRegistry(tmp_path).load(v).state == state


def test_empty_bytes_written_unpacked_by_an_older_writer_still_load(tmp_path, monkeypatch):
    import reloop.engine.checkpoint.registry as registry_module

    monkeypatch.setattr(registry_module, "pack_bytes", lambda obj: obj)  # the writer before the fix
    state = {"w": {"y": b"", "p": b""}}
    v = SnapshotRegistry(tmp_path).publish(state)
    monkeypatch.undo()
    assert SnapshotRegistry(tmp_path).load(v).state == state


@pytest.mark.parametrize("resealed", [True, False], ids=["resealed", "checksum-of-another-scheme"])
def test_a_manifest_of_a_newer_format_names_the_file_and_both_formats(tmp_path, resealed):
    # It was "unexpected format or version in manifest", a SnapshotError like any broken snapshot:
    # load() fell back past it, and the restore had to read the manifest again to tell a rollback.
    from reloop.engine.checkpoint.registry import FORMAT, NewerFormat, SnapshotMismatch

    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1.0))
    v2 = reg.publish(_state(2.0))
    folder = reg.path(v2)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = FORMAT + 1
    if resealed:
        _write_manifest(folder, manifest)
    else:  # a newer writer may checksum its manifest another way
        (folder / "manifest.json").write_text(json.dumps(manifest))
    unsure = "" if resealed else " (or a corrupted manifest: it fails this reloop's checksum)"
    expected = f"{folder / 'manifest.json'}: snapshot format {FORMAT + 1}, written by a newer reloop{unsure}; this one reads format {FORMAT}"  # noqa: E501
    for read in (lambda: reg.manifest(v2), lambda: reg.load(v2), reg.load):
        with pytest.raises(NewerFormat) as caught:
            read()
        assert str(caught.value) == expected
        # a SnapshotMismatch (a resuming stage stops: exit 2), a SnapshotError (serving refuses it)
        assert isinstance(caught.value, SnapshotMismatch) and isinstance(caught.value, SnapshotError)
    assert reg.load(1).version == 1


@pytest.mark.parametrize("found", [0, "1", None, True])
def test_a_manifest_of_an_unknown_format_is_refused_as_broken(tmp_path, found):
    from reloop.engine.checkpoint.registry import NewerFormat

    reg = SnapshotRegistry(tmp_path)
    reg.publish(_state(1.0))
    v2 = reg.publish(_state(2.0))
    _reseal(reg.path(v2), format=found)
    with pytest.raises(SnapshotError, match=r"unexpected format .* \(expected 1\)") as caught:
        reg.load(v2)
    assert not isinstance(caught.value, NewerFormat)
    assert reg.load().version == 1  # falls back


def test_a_version_folder_copied_under_another_number_is_refused_saying_so(tmp_path):
    # It said "unexpected format 1 (expected 1) or version 4 in manifest": the format was fine.
    import shutil

    reg = SnapshotRegistry(tmp_path)
    v1 = reg.publish(_state(1.0))
    copy = reg.path(v1).with_name(reg.path(v1).name.replace("1", "5"))
    shutil.copytree(reg.path(v1), copy)
    with pytest.raises(SnapshotError, match=r"its manifest is version 1's, not 5's") as caught:
        reg.load(5)
    assert "format" not in str(caught.value)
