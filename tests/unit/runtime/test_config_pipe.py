"""A config given as a pipe (``--config <(envsubst < run.yaml)``) reaches the child processes that open it
again: `reloop run`'s two stage processes found nothing at /dev/fd/63 and refused it as "not found"."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml
from reloop.engine.runtime.config import load_config
from reloop.engine.runtime.config_pipe import COPY_PREFIX, config_base_dir, reopenable

ROOT = Path(__file__).resolve().parents[3]


def _fifo(tmp_path: Path, text: str, name: str = "config") -> Path:
    """A named pipe that yields ``text`` to its first reader, as a shell's process substitution does."""
    path = tmp_path / name
    os.mkfifo(path)

    def write() -> None:
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)

    threading.Thread(target=write, daemon=True).start()
    return path


def test_a_pipe_is_copied_once_into_a_private_file_removed_afterwards(tmp_path: Path) -> None:
    pipe = _fifo(tmp_path, "model: {backbone: lr}\n", "config.toml")
    with reopenable(str(pipe)) as copy:
        assert copy != str(pipe)
        for _ in range(2):  # every child reads it whole
            assert Path(copy).read_text() == "model: {backbone: lr}\n"
        assert Path(copy).suffix == ".toml"  # read as TOML, as the name given says
        assert stat.S_IMODE(Path(copy).stat().st_mode) == 0o600  # it may hold Kafka credentials
        assert stat.S_IMODE(Path(copy).parent.stat().st_mode) == 0o700
    assert not Path(copy).parent.exists()


def test_a_regular_file_or_a_missing_one_is_given_as_it_is(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("{}")
    for path in (str(file), str(tmp_path / "missing.yaml")):
        with reopenable(path) as given:
            assert given == path


def test_a_relative_spec_file_in_a_pipe_is_taken_from_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    # From /dev/fd it was /dev/fd/spec.yaml; from the copy it would be the copy's private folder.
    monkeypatch.chdir(tmp_path)
    pipe = _fifo(tmp_path, yaml.safe_dump({"model": {"backbone": "lr", "spec_file": "spec.yaml"}}))
    assert config_base_dir(pipe) == tmp_path
    with reopenable(str(pipe)) as copy:
        for _ in range(2):  # the command, then each of its children
            assert load_config(copy, env={}).model.spec_file == str(tmp_path / "spec.yaml")
    beside = tmp_path / "sub" / "run.yaml"
    beside.parent.mkdir()
    beside.write_text(yaml.safe_dump({"model": {"backbone": "lr", "spec_file": "spec.yaml"}}))
    assert load_config(beside, env={}).model.spec_file == str(beside.parent / "spec.yaml")


def test_reloop_run_s_stage_processes_read_a_config_given_as_a_pipe(tmp_path: Path) -> None:
    config = {
        "model": {
            "backbone": "lr",
            "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]},
        },
        "kafka": {"bootstrap": "127.0.0.1:1"},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "metrics": {"prometheus_port": None},
    }
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "run", "--config", f"/dev/fd/{read}"],
        pass_fds=(read,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    os.close(read)
    with os.fdopen(write, "w") as out:
        out.write(yaml.safe_dump(config))
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for line in proc.stdout:  # a stage connecting to the broker read its config; EOF if none could
            seen.append(line)
            if "ECONNREFUSED" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out_text = "".join(seen) + rest
    assert proc.returncode == 0, out_text[-3000:]
    assert "not found" not in out_text and "ended on its own" not in out_text, out_text[-3000:]
    assert list(Path(tempfile.gettempdir()).glob(f"{COPY_PREFIX}-{proc.pid}-*")) == []
