"""A checkpoint folder a one-process pipeline wrote (reloop before 2026-11-30) is refused by ``reloop run``,
``join`` and ``train`` before anything starts: the train stage refused every version, but only after the
join stage, with no join checkpoints beside that state, had sent the whole retained history to the samples
topic again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.runtime import cli, run_cmd, stage_runner, train_cmd
from reloop.engine.runtime.state_layout import one_process_version

MODEL = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}}
# What the one-process pipeline's manifests held (meta keys of a version written on 2026-11-27).
ONE_PROCESS_META = {"fingerprint": "2d10c6d561e2563a", "pending": 12, "watermark_ms": 1, "samples_trained": 9}
TRAIN_STAGE_META = {"fingerprint": "2d10c6d561e2563a", "stage": "train", "kind": "snapshot"}


def _publish(root: Path, meta: dict) -> int:
    return SnapshotRegistry(root).publish({"model": {"w": torch.zeros(2)}, "state": {}}, meta=meta)


def test_the_newest_readable_version_decides(tmp_path) -> None:
    root = tmp_path / "ckpt"
    assert one_process_version(root) is None  # no folder yet
    _publish(root, ONE_PROCESS_META)
    assert one_process_version(root) == root / "v000000000001"
    _publish(root, TRAIN_STAGE_META)  # written by this reloop after the old one: resumes from it
    assert one_process_version(root) is None
    _publish(root, ONE_PROCESS_META)
    (root / "v000000000004").mkdir()  # no manifest: left to the train stage's restore to judge
    assert one_process_version(root) == root / "v000000000003"


@pytest.mark.parametrize("command", ["run", "join", "train"])
def test_a_one_process_state_stops_each_command_before_it_starts_anything(
    tmp_path, capsys, monkeypatch, command
) -> None:
    started: list[str] = []
    # Stand-ins for what each command starts next: the stage processes, the join stage, the train stage.
    monkeypatch.setattr(run_cmd, "_two_processes", lambda *a: started.append("stages") or 0)
    monkeypatch.setattr(stage_runner, "run_supervised", lambda *a, **k: started.append("join") or 0)
    monkeypatch.setattr(train_cmd, "_train", lambda *a: started.append("train") or 0)
    root = tmp_path / "ckpt"
    _publish(root, ONE_PROCESS_META)
    path = tmp_path / "run.yaml"
    cfg = {"model": MODEL, "kafka": {"bootstrap": "127.0.0.1:1"}, "checkpoint": {"dir": str(root)}}
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main([command, "--config", str(path)]) == 2
    assert started == []
    err = capsys.readouterr().err
    folder = root / "v000000000001"
    assert err.startswith(f"reloop {command}: checkpoint.dir: {folder} was written by a reloop "), err
    assert "from before 2026-11-30" in err
    assert "Give checkpoint.dir a new folder" in err
