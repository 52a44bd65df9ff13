"""``reloop versions list|rollback``: a checkpoint folder's versions, and the documented rollback done by
a command (by hand it took removing folders and bundles, and a number could name two models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reloop.engine.checkpoint.folder_lock import FolderLock
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.runtime.cli import main
from reloop.engine.serve.bundle_format import bundle_versions, serving_dir


def _folder(root: Path, n: int = 4, *, bundles: bool = True) -> SnapshotRegistry:
    """``n`` versions (samples_trained 1000 each), a serving bundle beside each (two files, as the trainer
    writes them), and a stop checkpoint saved after the newest."""
    registry = SnapshotRegistry(root)
    for i in range(1, n + 1):
        registry.publish({"model": {"w": torch.full((2,), float(i))}}, meta={"samples_trained": 1000 * i})
        if bundles:
            serving_dir(root).mkdir(exist_ok=True)
            for suffix in (".json", ".safetensors"):
                (serving_dir(root) / f"v{i:012d}{suffix}").write_bytes(b"{}")
    registry.checkpoints.publish({"model": {"w": torch.zeros(2)}}, meta={"base_version": n})
    return registry


def test_list_names_every_version_its_bundle_the_checkpoints_and_the_next_number(tmp_path, capsys):
    _folder(tmp_path / "ckpt", 3)
    assert main(["versions", "list", "--dir", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "3 version(s); the next takes v4" in out
    lines = [line.split() for line in out.splitlines()[2:5]]
    assert [line[0] for line in lines] == ["v3", "v2", "v1"]
    assert [line[3] for line in lines] == ["3,000", "2,000", "1,000"] and {line[4] for line in lines} == {
        "yes"
    }
    assert "stop checkpoint 1: saved after v3" in out
    assert main(["versions", "list", "--dir", str(tmp_path / "ckpt"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["samples_trained"], r["bundle"]) for r in rows] == [
        (3, 3000, True), (2, 2000, True), (1, 1000, True)
    ]  # fmt: skip


def test_rollback_removes_newer_versions_bundles_and_checkpoints_and_keeps_their_numbers(tmp_path, capsys):
    root = tmp_path / "ckpt"
    registry = _folder(root, 4)
    (root / "highest_version").unlink()  # a folder an older reloop wrote: the numbers are recorded first
    assert main(["versions", "rollback", "--dir", str(root), "--to", "2", "--dry-run"]) == 0
    assert "would remove v4, v3" in capsys.readouterr().out and registry.versions() == [1, 2, 3, 4]
    assert main(["versions", "rollback", "--dir", str(root), "--to", "2"]) == 0
    out = capsys.readouterr().out
    assert "rolled back to v2: removed v4, v3" in out and "publishes v5 next" in out
    assert registry.versions() == [1, 2] and bundle_versions(serving_dir(root)) == [1, 2]
    assert registry.checkpoints.versions() == []  # saved after v4: not a place to resume from any more
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert SnapshotRegistry(root).publish({"model": {"w": torch.zeros(2)}}) == 5
    assert main(["versions", "rollback", "--dir", str(root), "--to", "5"]) == 0
    assert "already the newest" in capsys.readouterr().out


def test_rollback_is_refused_while_a_trainer_holds_the_folder(tmp_path, capsys):
    root = tmp_path / "ckpt"
    registry = _folder(root, 3)
    lock = FolderLock(root).acquire()
    try:
        for dry_run in ([], ["--dry-run"]):  # the dry run said "would remove" and the rollback then refused
            assert main(["versions", "rollback", "--dir", str(root), "--to", "1", *dry_run]) == 2
            out, err = capsys.readouterr()
            assert f"a train stage holds {root} (pid " in err and "stop it first" in err and not out
    finally:
        lock.release()
    assert registry.versions() == [1, 2, 3] and bundle_versions(serving_dir(root)) == [1, 2, 3]


def test_rollback_onto_a_version_that_does_not_load_is_refused_and_removes_nothing(tmp_path, capsys):
    root = tmp_path / "ckpt"
    registry = _folder(root, 3)
    part = registry.path(2) / "model.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert main(["versions", "rollback", "--dir", str(root), "--to", "2"]) == 2
    assert "v2 does not load" in capsys.readouterr().err
    assert registry.versions() == [1, 2, 3] and registry.checkpoints.versions() == [1]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--to", "9"], "v9 is not in"),
        ([], "rollback needs --to N"),
    ],
)
def test_a_rollback_asked_wrongly_is_one_line_and_exit_2(tmp_path, capsys, argv, says):
    root = tmp_path / "ckpt"
    _folder(root, 2)
    assert main(["versions", "rollback", "--dir", str(root), *argv]) == 2
    assert says in capsys.readouterr().err


def test_the_folder_is_the_run_configs_checkpoint_dir(tmp_path, capsys):
    _folder(tmp_path / "ckpt", 2, bundles=False)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"checkpoint: {{dir: {tmp_path / 'ckpt'}}}\n"
        "model: {backbone: lr, spec: {fields: [{kind: categorical, name: user, buckets: 10}]}}\n"
    )
    assert main(["versions", "list", "--config", str(config)]) == 0
    assert "2 version(s)" in capsys.readouterr().out
    assert main(["versions", "list", "--dir", str(tmp_path / "none")]) == 2


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_rollback_to_vn_removes_the_stop_checkpoint_saved_after_vn(tmp_path, capsys):
    # The restart resumed from it ("restored from checkpoint 9"), with what was trained after vN, while
    # the command said it would resume from vN.
    root = tmp_path / "ckpt"
    registry = _folder(root, 3)  # its stop checkpoint: saved after v3
    assert main(["versions", "rollback", "--dir", str(root), "--to", "3", "--dry-run"]) == 0
    assert "would remove no version (with their serving bundles) and 1 stop checkpoint(s) saved after v3" in (
        capsys.readouterr().out
    )
    assert main(["versions", "rollback", "--dir", str(root), "--to", "3"]) == 0
    assert "resumes from v3" in capsys.readouterr().out
    assert registry.versions() == [1, 2, 3] and registry.checkpoints.versions() == []
    assert main(["versions", "rollback", "--dir", str(root), "--to", "3"]) == 0
    assert "already the newest" in capsys.readouterr().out


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_target_that_does_not_load_is_refused_by_a_dry_run_and_when_newest(tmp_path, capsys, dry_run):
    root = tmp_path / "ckpt"
    registry = _folder(root, 3)
    _corrupt(registry.path(2) / "model.pt")
    assert main(["versions", "rollback", "--dir", str(root), "--to", "2", *dry_run]) == 2
    assert "v2 does not load" in capsys.readouterr().err
    registry.checkpoints.remove(1)
    _corrupt(registry.path(3) / "model.pt")  # the newest ("already the newest; nothing to remove")
    assert main(["versions", "rollback", "--dir", str(root), "--to", "3", *dry_run]) == 2
    assert "v3 does not load" in capsys.readouterr().err
    assert registry.versions() == [1, 2, 3]


def test_list_says_which_versions_and_checkpoints_do_not_load(tmp_path, capsys):
    root = tmp_path / "ckpt"
    registry = _folder(root, 3)
    _corrupt(registry.path(2) / "model.pt")
    _corrupt(registry.checkpoints.path(1) / "model.pt")
    (registry.path(1) / "manifest.json").unlink()
    assert main(["versions", "list", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    [v2] = [line for line in out.splitlines() if line.split()[:1] == ["v2"]]
    assert "fails its crc32c checksum" in v2
    [v1] = [line for line in out.splitlines() if line.split()[:1] == ["v1"]]
    assert "has no manifest.json" in v1  # it said "snapshot 1 does not exist" beside its folder
    assert "stop checkpoint 1: saved after v3 (" in out and "fails its crc32c checksum" in out
    assert main(["versions", "list", "--dir", str(root), "--json"]) == 0
    rows = {r["version"]: r["problem"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[3] is None and "checksum" in rows[2] and "manifest" in rows[1]
