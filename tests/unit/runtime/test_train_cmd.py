"""``reloop train``'s launcher housekeeping (the ranks themselves: test_train_ranks.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reloop.engine.runtime.config_pipe import remove_dead_owners_folders


def test_the_scratch_folders_of_launchers_that_are_gone_are_removed(tmp_path: Path) -> None:
    # A SIGKILLed launcher left its /tmp/reloop-train-* folder behind, one more at each such end.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    dead = tmp_path / f"reloop-train-{dead_pid}-abc"
    (dead / "sub").mkdir(parents=True)
    (dead / "final-saved").touch()
    alive = tmp_path / f"reloop-train-{os.getppid()}-def"  # the pytest runner's parent: alive
    mine = tmp_path / f"reloop-train-{os.getpid()}-ghi"
    other = tmp_path / "reloop-train-xyz-1"  # not named by a launcher of this version: left alone
    for folder in (alive, mine, other):
        folder.mkdir()
    remove_dead_owners_folders(tmp_path, "reloop-train")
    assert not dead.exists()
    assert alive.exists() and mine.exists() and other.exists()


def test_ranks_on_metrics_port_0_each_take_a_free_port() -> None:
    # Rank r served /metrics on port + r: with port 0 (a free port) rank 1 bound port 1 (refused: exit 2,
    # and torchrun restarted the group).
    from reloop.engine.runtime.train_cmd import rank_metrics_port

    assert [rank_metrics_port(0, r) for r in range(3)] == [0, 0, 0]
    assert [rank_metrics_port(9464, r) for r in range(3)] == [9464, 9465, 9466]
    assert rank_metrics_port(None, 1) is None


def test_ranks_that_refuse_to_go_on_end_the_group_at_once_with_exit_2(tmp_path: Path) -> None:
    # Every rank refused (exit 2: here a setting data parallelism cannot take, found as each rank built its
    # stage; a model that diverged ends the same way) and torchrun restarted the group into the same
    # refusal, distributed.max_restarts times, before giving up. Each rank now marks its refusal and exits
    # 0, so the group ends without a restart, and the launcher exits 2.
    import yaml
    from reloop.engine.runtime.synthetic import SPEC

    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap": "127.0.0.1:1", "client": "confluent"},  # a client built offline
                "model": {"backbone": "dcn", "spec": SPEC},
                "train": {"replay_size": 64, "threads": 1},
                "checkpoint": {"dir": str(tmp_path / "snaps")},
                "distributed": {"max_restarts": 1},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__")}
    train = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "train", "--config", str(config),
         "--world-size", "2", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    said = train.stderr.count("reloop train: train.replay_size: the replay buffer is per process")
    assert train.returncode == 2, train.stderr[-3000:]
    assert said == 2, train.stderr[-3000:]  # once per rank: no restart (one restart said it 4 times)
    assert "reloop train: ranks [0, 1] refused to go on" in train.stderr
