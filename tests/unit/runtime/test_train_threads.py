"""The train process of `reloop run` leaves a core to its join process when train.threads is unset."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import yaml
from reloop.engine.runtime import build
from reloop.engine.runtime.build import leave_a_core_to_join
from reloop.engine.runtime.config import load_config_dict
from reloop.engine.runtime.synthetic import SPEC
from reloop.engine.runtime.train_cmd import BESIDE_JOIN


def _cfg(**train: object):
    return load_config_dict({"model": {"backbone": "dcn", "spec": SPEC}, "train": train}, env={})


@pytest.fixture
def torch_threads(monkeypatch):
    """torch's thread setting, faked: (what it reports, what was set)."""
    state = {"default": 4, "set": []}
    monkeypatch.setattr(build.torch, "get_num_threads", lambda: state["default"])
    monkeypatch.setattr(build.torch, "set_num_threads", state["set"].append)
    monkeypatch.setattr(build, "usable_cpus", lambda: 64)  # no cgroup quota below torch's default
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return state


def test_unset_threads_take_torchs_default_less_one(torch_threads):
    assert leave_a_core_to_join(_cfg()) == 3
    assert torch_threads["set"] == [3]


def test_one_core_keeps_one_thread(torch_threads):
    torch_threads["default"] = 1
    assert leave_a_core_to_join(_cfg()) == 1
    assert torch_threads["set"] == [1]


@pytest.mark.parametrize("train", [{"threads": 2}, {"deterministic": True}])
def test_threads_the_config_sets_are_left_alone(torch_threads, train):
    assert leave_a_core_to_join(_cfg(**train)) is None
    assert torch_threads["set"] == []


def test_omp_num_threads_is_left_alone(torch_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert leave_a_core_to_join(_cfg()) is None
    assert torch_threads["set"] == []


def test_reloop_train_beside_a_join_process_logs_the_threads_it_took(tmp_path: Path) -> None:
    # The whole wiring in a real `reloop train` process: the variable `reloop run` sets, the threads taken
    # before the stage is built (it then waits for an unreachable broker until stopped).
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap": "127.0.0.1:1", "client": "confluent"},
                "model": {"backbone": "dcn", "spec": SPEC},
                "checkpoint": {"dir": str(tmp_path / "snaps")},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__") and k != "OMP_NUM_THREADS"}
    default = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "train", "--config", str(config)],
        env={**env, BESIDE_JOIN: "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[dict] = []
    taken = threading.Event()

    def read() -> None:  # the log, in a thread: the process may fall silent without the line
        for text in proc.stderr:
            if text.startswith("{"):
                lines.append(orjson.loads(text))
                if lines[-1]["msg"] == "train threads":
                    taken.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        taken.wait(60)
    finally:
        proc.kill()
        proc.wait()
        reader.join(10)
    [line] = [ln for ln in lines if ln["msg"] == "train threads"]
    assert line["threads"] == max(1, int(default) - 1)
