"""`reloop run` with two stage processes: how it stops them, when it stops them, and its exit code.

The stage processes are stand-ins (the real StopRequest around a sleep for the final checkpoint) started by
the real `reloop run` code, itself in a process of its own (it installs signal handlers); the real stages on
the broker are in tests/integration/test_run_kafka.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml
from reloop.engine.runtime.synthetic import SPEC

# What a stage process does first: the train process says the model is fine (the real one checks it:
# tests below), then both wait for `reloop run` to open the gate (engine/runtime/start_gate.py).
_GATE = """
import sys
from reloop.engine.runtime import start_gate
if start_gate.gated():
    start_gate.report(None)
    if not start_gate.wait_for_go():
        sys.exit(0)
"""

# `reloop run` whose stage processes are the code in $FAKE_STAGES (one per stage).
_RUN = (
    "_GATE = "
    + repr(_GATE)
    + """
import argparse, json, os, subprocess, sys
from reloop.engine.runtime import run_cmd
fakes = json.loads(os.environ["FAKE_STAGES"])
real = subprocess.Popen
def popen(cmd, **kw):
    code = fakes[cmd[cmd.index("reloop.engine.runtime.cli") + 1]]
    return real([sys.executable, "-c", code if code.startswith("# own gate") else _GATE + code], **kw)
subprocess.Popen = popen
run_cmd.KILL_GRACE_S = 0.5
sys.exit(run_cmd.main(argparse.Namespace(config=sys.argv[1], log_level=None)))
"""
)

# A stage: the real stop handling; "ends" > 0 exits with "code" that long after it started; a stop's final
# checkpoint takes "save_s"; "ignore": SIGTERM/SIGINT ignored (a stage whose handler never runs).
_STAGE = """
import os, signal, sys, time
from reloop.engine.runtime.jsonlog import setup_json_logging
from reloop.engine.runtime.stage_runner import StopRequest
setup_json_logging()
p = {params}
if p.get("ignore"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    stop = StopRequest(timeout_s=30)
    stop.install()
os.write(1, b"ready\\n")  # one write: the two stages share the pipe (print wrote "ready", "\\n" apart)
if p.get("ends"):
    time.sleep(p["ends"])
    sys.exit(p["code"])
if p.get("interruptible"):  # the command line's KeyboardInterrupt, before a stage installed its handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        sys.exit(130)
if p.get("ignore"):
    time.sleep(60)
stop.event.wait()
time.sleep(p.get("save_s", 0))
sys.exit(0)
"""


def _stage(**params) -> str:
    return _STAGE.format(params=repr(params))


def _config(tmp: Path, stop_timeout_s: float) -> Path:
    cfg = {
        "kafka": {"bootstrap": "127.0.0.1:1"},
        "model": {"backbone": "dcn", "spec": SPEC},
        "recovery": {"flush_timeout_s": 0.5, "stop_timeout_s": stop_timeout_s},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(tmp: Path, stop_timeout_s: float = 1.0, **stages: str) -> subprocess.Popen:
    env = {**os.environ, "FAKE_STAGES": json.dumps(stages)}
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, str(_config(tmp, stop_timeout_s))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def _ready(proc: subprocess.Popen, n: int = 2) -> None:
    for _ in range(n):  # each stage prints "ready" on the inherited stdout once its handler is installed
        assert proc.stdout.readline().strip() == "ready"


def _finish(proc: subprocess.Popen, timeout_s: float = 30) -> tuple[int, list[dict]]:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # its stages die with it (lifeline)
        _, err = proc.communicate()
        pytest.fail(f"reloop run did not exit within {timeout_s} s:\n{err[-3000:]}")
    lines = [orjson.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    return proc.returncode, lines


def _stopped(lines: list[dict]) -> dict:
    [line] = [ln for ln in lines if ln["msg"] == "stopped" and "exit_codes" in ln]
    return line


def test_a_stop_request_after_run_stopped_a_stage_is_not_a_second_signal_to_it(tmp_path):
    # The join ended on its own: `reloop run` stopped the train stage, whose final checkpoint takes a
    # while. The orchestrator's SIGTERM to `reloop run` meanwhile was forwarded to the train stage, which
    # took it for a second signal and exited 1 without its final checkpoint ("stop forced").
    proc = _start(tmp_path, stop_timeout_s=10.0, train=_stage(save_s=4.0), join=_stage(ends=0.2, code=0))
    _ready(proc)
    # Until run saw the join end and stopped the train stage (a fixed 1.7 s was too short at load 5: the
    # SIGTERM reached a join still running, which exited -15).
    seen = []
    while not any(ln["msg"].startswith("a stage ended on its own") for ln in seen):
        line = proc.stderr.readline()
        assert line, "reloop run ended before the join did"
        if line.startswith("{"):
            seen.append(orjson.loads(line))
    time.sleep(0.5)  # the train stage is in its 4-s final checkpoint
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    code, lines = _finish(proc)
    lines = seen + lines
    assert not [ln for ln in lines if "stop forced" in ln["msg"]], lines
    assert _stopped(lines)["exit_codes"] == {"train": 0, "join": 0} and code == 0


def test_a_second_stop_request_still_ends_the_stages_at_once(tmp_path):
    proc = _start(tmp_path, stop_timeout_s=30.0, train=_stage(save_s=20.0), join=_stage(save_s=20.0))
    _ready(proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # past StopRequest.SAME_STOP_S: a second request
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, lines = _finish(proc)
    assert time.monotonic() - t0 < 10
    assert code == 1 and _stopped(lines)["exit_codes"] == {"train": 1, "join": 1}
    assert len([ln for ln in lines if "stop forced" in ln["msg"]]) == 2
    # said while the stages still ran (with none left, nothing is killed and it is not said)
    assert [ln for ln in lines if ln["msg"].startswith("a second signal: stages still running")]


def test_a_stage_that_does_not_exit_after_the_stop_is_killed(tmp_path):
    # A stage whose signal handler never runs (stuck in a C call) never arms its own watchdog: `reloop
    # run` waited for it forever after its sibling gave up.
    proc = _start(tmp_path, train=_stage(ignore=True), join=_stage(ends=0.2, code=2))
    _ready(proc)
    t0 = time.monotonic()
    code, lines = _finish(proc)
    # stop_timeout_s 1 + KILL_GRACE_S 0.5 after the join ended
    assert time.monotonic() - t0 < 15
    assert [ln["stage"] for ln in lines if ln["msg"].startswith("a stage did not exit in time")] == ["train"]
    assert _stopped(lines)["exit_codes"] == {"train": -signal.SIGKILL, "join": 2} and code == 2


def test_a_stage_killed_after_a_stop_request_makes_the_exit_code_1(tmp_path):
    # stop_timeout_s 5: the join stand-in's stop with room for a loaded machine (with 1 s a run at load
    # 10 killed it too: -9 instead of 0)
    proc = _start(tmp_path, stop_timeout_s=5.0, train=_stage(ignore=True), join=_stage())
    _ready(proc)
    proc.send_signal(signal.SIGTERM)
    code, lines = _finish(proc)
    assert _stopped(lines)["exit_codes"] == {"train": -signal.SIGKILL, "join": 0} and code == 1


def test_ctrl_c_before_the_stages_installed_their_handlers_exits_0(tmp_path):
    # A stage interrupted while still importing ends in the command line's KeyboardInterrupt: exit 130
    # ("reloop join: interrupted"); `reloop run` Ctrl-C'd in its first seconds exited 130.
    # stop_timeout_s 5: room for a loaded machine (at 1 s a CI run at load 6 killed both: -9, not 130)
    proc = _start(
        tmp_path, stop_timeout_s=5.0, train=_stage(interruptible=True), join=_stage(interruptible=True)
    )
    _ready(proc)
    time.sleep(0.3)  # the stand-ins put Python's SIGINT handler back after "ready"
    proc.send_signal(signal.SIGINT)
    code, lines = _finish(proc)
    assert _stopped(lines)["exit_codes"] == {"train": 130, "join": 130} and code == 0


@pytest.mark.parametrize("code", [1, 2])
def test_a_stage_that_ends_on_its_own_stops_the_other_and_gives_its_exit_code(tmp_path, code):
    # stop_timeout_s 5: the train stand-in's 0.5-s save and exit, with room for a loaded machine (with the
    # default 1 s a CI run under load killed it: exit -9 instead of 0; the kill is tested above)
    proc = _start(tmp_path, stop_timeout_s=5.0, train=_stage(save_s=0.5), join=_stage(ends=0.2, code=code))
    _ready(proc)
    got, lines = _finish(proc)
    [ended] = [ln for ln in lines if ln["msg"].startswith("a stage ended on its own")]
    assert ended["stage"] == "join" and ended["exit_code"] == code
    assert _stopped(lines)["exit_codes"] == {"train": 0, "join": code} and got == code


class _Part:
    """A stage of `stages.processes: 1` whose close records the call and may raise."""

    def __init__(self, calls: list[str], name: str, close_raises: bool = False, step=lambda: None) -> None:
        self.calls, self.name, self.close_raises, self.step = calls, name, close_raises, step
        self.snapshots_written, self.final_saved = 0, None
        self.restored_from = self.served_metrics = None

    def open(self) -> None: ...

    def abort(self) -> None:
        self.calls.append(f"{self.name} abort")

    def close(self, **_kwargs) -> int:
        self.calls.append(f"{self.name} close")
        if self.close_raises:
            raise OSError(28, "No space left on device")
        return 5


@pytest.fixture
def _process_state():
    """run_supervised in this process: its JSON handler (on capsys's stderr) and gc settings are undone."""
    import gc
    import logging

    root = logging.getLogger()
    handlers, level, threshold = root.handlers[:], root.level, gc.get_threshold()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("_process_state")
def test_a_stop_whose_close_raises_exits_1_with_one_json_line_and_the_train_stage_saved(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    # The join stage's close raised at the stop: the train stage's close (its final checkpoint) never ran,
    # and the exception left `reloop run` as a raw traceback on stderr.
    from reloop.engine.runtime.config import load_config
    from reloop.engine.runtime.jsonlog import setup_json_logging
    from reloop.engine.runtime.run_cmd import BothStages
    from reloop.engine.runtime.stage_runner import StopRequest, run_supervised

    cfg = load_config(_config(tmp_path, 1.0))
    calls: list[str] = []
    stop = StopRequest(timeout_s=30)  # not installed: the join's first step sets it
    setup_json_logging("INFO")
    code = run_supervised(
        "run",
        cfg,
        lambda: BothStages(_Part(calls, "join", True, stop.event.set), _Part(calls, "train")),
        close=lambda both: both.close(),
        describe=lambda both: {},
        metrics_port=None,
        stop=stop,
    )
    err = capsys.readouterr().err
    assert code == 1 and calls == ["join close", "train close"]
    [exiting] = [orjson.loads(ln) for ln in err.splitlines() if '"msg":"exiting"' in ln]
    assert "No space left" in exiting["error"] and "Traceback" in exiting["exc"]
    assert not [ln for ln in err.splitlines() if not ln.startswith(("{", "reloop run: "))], err


def test_a_stage_whose_parent_died_before_its_lifeline_was_armed_does_not_run(tmp_path, monkeypatch) -> None:
    # The parent-death signal is armed in the child after the fork: a `reloop run` SIGKILLed in between left
    # that stage running for good (two trainers on one checkpoint folder after the restart).
    import argparse

    from reloop.engine.runtime import run_cmd

    preexec: list = []

    class _Ended:
        pid, returncode = 0, 0

        def __init__(self, cmd, preexec_fn=None, **_kw) -> None:
            preexec.append(preexec_fn)

        def poll(self) -> int:
            return 0

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(run_cmd.subprocess, "Popen", _Ended)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        cfg = run_cmd.load_config(_config(tmp_path, 1.0))
        run_cmd._two_processes(argparse.Namespace(config="x", log_level=None), cfg)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        monkeypatch.undo()  # subprocess.Popen back
    assert len(preexec) == 2
    # A stage forked by another process than this `reloop run` (what its SIGKILL makes of the parent).
    pid = os.fork()
    if pid == 0:
        code = 4
        try:
            cmd = [sys.executable, "-c", "print('ran on')"]
            ran = subprocess.run(cmd, preexec_fn=preexec[0], capture_output=True, text=True)
            code = 3 if "ran on" in ran.stdout else 0
        except BaseException as exc:  # noqa: BLE001 - said in the parent's failure
            os.write(2, repr(exc).encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the stage ran on without its parent"


class _DownAtTheStop:
    """A sink whose broker goes down with the stop: the final save's flush fails."""

    def __init__(self, stop, down: bool) -> None:
        self.stop, self.down = stop, down

    def send(self, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None, **_kw) -> None:
        return None

    def flush(self, timeout_s: float | None = None) -> None:
        if self.down and self.stop.event.is_set():
            raise TimeoutError("flush timed out: the broker is down")

    def close(self) -> None:  # a producer's close leaves what it could not send behind, with a warning
        return None


def _real_stages(tmp_path, stop, which: str, down: bool = True):
    """``which`` ("join", "train" or "run": both) built on empty memory topics, whose sinks fail to flush
    once ``stop`` is set (``down``); the stop comes at the third step."""
    from reloop.connectors.memory.memory import MemoryGroupSource, MemoryLog, MemorySource
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.build import build_join_stage, build_train_stage
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.runtime.run_cmd import BothStages

    log = MemoryLog()
    for topic in ("impressions", "clicks", "samples"):
        log.create(topic, 1)
    cfg = load_config_dict(
        {
            "model": {"backbone": "lr", "strategy": "reloop", "alpha": 0.3, "spec": SPEC},
            "stages": {"samples_topic": "samples"},
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
            "recovery": {"stop_timeout_s": 30},
        },
        env={},
    )
    down = _DownAtTheStop(stop, down)
    stages = {
        "join": lambda: build_join_stage(
            cfg, source=MemoryGroupSource(log, ["impressions", "clicks"]), samples_sink=down,
            dead_letter_sink=down, stats=EngineStats(), checkpoint_dir=tmp_path / "join",
        ),
        "train": lambda: build_train_stage(
            cfg, source=MemorySource(log, ["samples"]), dead_letter_sink=down, stats=EngineStats(),
            checkpoint_dir=tmp_path / "train",
        ),
    }  # fmt: skip

    def build():
        stage = BothStages(stages["join"](), stages["train"]()) if which == "run" else stages[which]()
        step, steps = stage.step if which != "run" else stage.train.step, [0]

        def stepped():
            steps[0] += 1
            if steps[0] == 3:
                stop.event.set()
            return step()

        if which == "run":
            stage.train.step = stepped
        else:
            stage.step = stepped
        return stage

    return cfg, build


@pytest.mark.usefixtures("_process_state")
@pytest.mark.parametrize("which", ["join", "train", "run"])
def test_a_stop_whose_final_save_fails_exits_1(tmp_path, capsys: pytest.CaptureFixture, which: str) -> None:
    # "final save skipped" (the sinks could not flush: the records after the last save are processed again
    # after a restart) and the process exited 0, as after a clean stop with its final checkpoint.
    from reloop.engine.runtime import train_cmd
    from reloop.engine.runtime.jsonlog import setup_json_logging
    from reloop.engine.runtime.stage_runner import StopRequest, run_supervised

    stop = StopRequest(timeout_s=30)  # not installed: the third step sets it
    cfg, build = _real_stages(tmp_path, stop, which)
    close = {
        "join": lambda stage: stage.close(checkpoint=True),
        "train": train_cmd._close_and_mark,
        "run": lambda both: both.close(),
    }[which]
    setup_json_logging("INFO")
    code = run_supervised(which, cfg, build, close=close, describe=lambda s: {}, metrics_port=None, stop=stop)
    err = capsys.readouterr().err
    assert code == 1, err
    [stopped] = [orjson.loads(ln) for ln in err.splitlines() if '"msg":"stopped"' in ln]
    assert stopped["exit_code"] == 1 and stopped["final_checkpoint"] is None
    assert f"reloop {which}: the stop's final save failed" in err
    # The line it sends the reader to is in the log (it said "final save skipped" for the join stage's
    # "final checkpoint skipped").
    [said] = [ln for ln in err.splitlines() if "the stop's final save failed" in ln]
    logged = {orjson.loads(ln)["msg"] for ln in err.splitlines() if ln.startswith("{")}
    assert set(re.findall(r'"([^"]+)"', said.split("(see ")[1].split(" in the log")[0])) & logged, (
        said,
        logged,
    )


@pytest.mark.usefixtures("_process_state")
@pytest.mark.parametrize("which", ["join", "train", "run"])
def test_a_stop_whose_final_save_succeeds_exits_0(tmp_path, capsys, which: str) -> None:
    from reloop.engine.runtime import train_cmd
    from reloop.engine.runtime.stage_runner import StopRequest, run_supervised

    stop = StopRequest(timeout_s=30)
    cfg, build = _real_stages(tmp_path, stop, which, down=False)
    close = {
        "join": lambda stage: stage.close(checkpoint=True),
        "train": train_cmd._close_and_mark,
        "run": lambda both: both.close(),
    }[which]
    code = run_supervised(which, cfg, build, close=close, describe=lambda s: {}, metrics_port=None, stop=stop)
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("train", "join", "expected"),
    [(0, None, 0), (None, None, None), (9464, None, 9465), (0, 9470, 9470), (9464, 0, 0)],
)
def test_metrics_port_0_is_a_free_port_for_both_stages(train, join, expected) -> None:
    # metrics.prometheus_port 0 served the train process on a free port and the join process on none.
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.runtime.run_cmd import join_metrics_port

    metrics = {"prometheus_port": train, "join_prometheus_port": join}
    cfg = load_config_dict({"model": {"backbone": "lr", "spec": SPEC}, "metrics": metrics}, env={})
    assert join_metrics_port(cfg) == expected


@pytest.mark.usefixtures("_process_state")
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_stage_on_metrics_port_0_logs_the_port_it_bound(tmp_path, capsys, host: str) -> None:
    # Bound beyond loopback it says so, as `reloop serve` does: its /metrics has no authentication.
    import urllib.request

    from reloop.engine.runtime.jsonlog import setup_json_logging
    from reloop.engine.runtime.stage_runner import StopRequest, run_supervised

    stop = StopRequest(timeout_s=30)
    cfg, build = _real_stages(tmp_path, stop, "join", down=False)
    cfg = cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"prometheus_host": host})})
    scraped: list[bytes] = []

    def scrape(stage) -> None:  # while it runs, at the address its "metrics" line names
        err = capsys.readouterr().err
        line = next(ln for ln in err.splitlines() if '"msg":"metrics"' in ln)
        url = orjson.loads(line)["url"].replace("0.0.0.0", "127.0.0.1")
        scraped.append(urllib.request.urlopen(url, timeout=10).read())
        assert ("without authentication" in err) == (host == "0.0.0.0"), err

    setup_json_logging("INFO")

    def close(stage):
        scrape(stage)
        return stage.close(checkpoint=True)

    code = run_supervised("join", cfg, build, close=close, describe=lambda s: {}, metrics_port=0, stop=stop)
    assert code == 0
    assert b"reloop_join_tasks" in scraped[0]


# A stage that writes what `reloop run` told it about the join process beside it, then ends once the
# other stage has written too (a stage that ends on its own stops the other, which under load may not
# have run a line yet).
_ENV_STAGE = """
import os, sys, time
names = ("RELOOP_TRAIN_BESIDE_JOIN", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
open(os.environ["ENV_OUT"] + "-{stage}", "w").write(" ".join(os.environ.get(n, "unset") for n in names))
deadline = time.monotonic() + 60
while not os.path.exists(os.environ["ENV_OUT"] + "-{other}") and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("user_wait", [None, ("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "50000")])
def test_the_train_process_is_told_a_join_process_shares_its_cores(tmp_path, monkeypatch, user_wait):
    # So that, with train.threads unset, it leaves a core to the join process (build.leave_a_core_to_join),
    # and its OpenMP threads sleep soon after a parallel region instead of spinning on the join's cores
    # (cpu_limit.shared_cores_env), unless the user said how they wait.
    monkeypatch.setenv("ENV_OUT", str(tmp_path / "env"))
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    if user_wait:
        monkeypatch.setenv(*user_wait)
    train, join = (
        _ENV_STAGE.format(stage="train", other="join"),
        _ENV_STAGE.format(stage="join", other="train"),
    )
    proc = _start(tmp_path, train=train, join=join)
    code, lines = _finish(proc)
    assert code == 0
    user = dict([user_wait]) if user_wait else {}
    spin = user.get("GOMP_SPINCOUNT", "unset" if user else "1000")
    policy = user.get("OMP_WAIT_POLICY", "unset")
    assert (tmp_path / "env-train").read_text() == f"1 {spin} {policy}"
    join_spin = user.get("GOMP_SPINCOUNT", "unset")
    assert (tmp_path / "env-join").read_text() == f"unset {join_spin} {policy}"  # the join stage: as given
    started = [ln for ln in lines if ln.get("msg") == "started" and "processes" in ln]
    assert started[0]["train_openmp_wait"] == {k: v for k, v in (("OMP_WAIT_POLICY", policy),
                                               ("GOMP_SPINCOUNT", spin)) if v != "unset"}  # fmt: skip


# The parent of a two-process run, in a process of its own: its stage processes start, the train process
# checks the model config, and the parent opens their gate; supervising them is replaced here by a
# stand-in that kills them before they read anything.
PARENT = """
import argparse, sys
from reloop.engine.runtime import run_cmd
def supervise(children, stop_timeout_s):
    for p in children.values():
        p.kill()
    print("stages started", flush=True)
    return 0
run_cmd._supervise = supervise
code = run_cmd.main(argparse.Namespace(config=sys.argv[1], log_level=None))
print("exit", code, "torch imported" if "torch" in sys.modules else "no torch", flush=True)
"""


def _parent(tmp_path: Path, model: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "run.yaml"
    cfg = {"model": model, "kafka": {"bootstrap": "x:1"}, "checkpoint": {"dir": str(tmp_path / "ckpt")}}
    path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-c", PARENT, str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_a_model_section_no_learner_can_be_built_from_is_refused_before_any_stage_starts(tmp_path):
    # The two stage processes each checked it as they started: the refusal came 4-8 s in, among their log
    # lines, and a second later the other stage's stop. The train process checks it behind the gate, and
    # the refusal is the parent's last line: no stage started (none logged "started").
    huge = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10**12}]}
    done = _parent(tmp_path, {"backbone": "dcn", "spec": huge})
    assert done.stdout.splitlines() == ["exit 2 no torch"], done
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("reloop run: invalid config: model: backbone 'dcn' needs"), done.stderr
    assert '"msg":"started"' not in done.stderr and "reloop train:" not in done.stderr, done.stderr


def test_the_supervising_parent_of_two_stage_processes_never_imports_torch(tmp_path):
    # It held torch's ~480 MB PSS (of ~1.4 GB for the pipeline) while the stages ran: its model check
    # built the learner on the meta device, and the config and the folder lock imported torch too.
    done = _parent(tmp_path, {"backbone": "dcn", "spec": SPEC})
    assert done.stdout.splitlines() == ["stages started", "exit 0 no torch"], done


# A stage that speaks the gate itself (the `reloop run` harness adds none).
_OWN_GATE = """# own gate
import sys, time
from pathlib import Path
from reloop.engine.runtime import start_gate
"""


def test_the_join_process_starts_while_the_train_process_checks_the_model(tmp_path):
    # The parent ran the model check (a torch import and a model built) in a child of its own, and started
    # both stages once it ended: three imports of torch in a row, 16 s before a stage joined on 2 cores.
    train = (
        _OWN_GATE
        + f"""
time.sleep(2.0)  # the check
Path({str(tmp_path / "checked")!r}).write_text(repr(time.time()))
start_gate.report(None)
Path({str(tmp_path / "train-go")!r}).write_text(str(start_gate.wait_for_go()))
"""
    )
    join = (
        _OWN_GATE
        + f"""
Path({str(tmp_path / "join-started")!r}).write_text(repr(time.time()))
Path({str(tmp_path / "join-go")!r}).write_text(str(start_gate.wait_for_go()))
"""
    )
    code, lines = _finish(_start(tmp_path, train=train, join=join))
    assert code == 0, lines
    assert float((tmp_path / "join-started").read_text()) < float((tmp_path / "checked").read_text())
    assert (tmp_path / "train-go").read_text() == (tmp_path / "join-go").read_text() == "True"
    assert [ln for ln in lines if ln["msg"] == "started" and "processes" in ln]


@pytest.mark.parametrize("train_ends", ["refuses", "crashes", "exits_2"])
def test_no_stage_passes_the_gate_when_the_train_process_refuses_or_ends_before_its_verdict(
    tmp_path, train_ends
) -> None:
    refuses = train_ends == "refuses"
    train = _OWN_GATE + (
        "start_gate.report('invalid config: model.params: no such thing')\nsys.exit(2)\n"
        if refuses
        else f"sys.exit({2 if train_ends == 'exits_2' else 3})\n"  # 2: its own refusal (a missing extra)
    )
    join = (
        _OWN_GATE
        + f"""
go = start_gate.wait_for_go()
Path({str(tmp_path / "join-go")!r}).write_text(str(go))
sys.exit(0 if not go else 5)
"""
    )
    proc = _start(tmp_path, train=train, join=join)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("reloop run did not end")
    assert (tmp_path / "join-go").read_text() == "False"  # it read the gate's end, and ended
    last = err.strip().splitlines()[-1]
    if refuses:
        assert proc.returncode == 2 and last == "reloop run: invalid config: model.params: no such thing"
    else:
        code = 2 if train_ends == "exits_2" else 3
        assert proc.returncode == (2 if code == 2 else 1), err
        assert last == f"reloop run: the train process ended (exit code {code}) before it could start"
    assert '"msg":"started"' not in err
