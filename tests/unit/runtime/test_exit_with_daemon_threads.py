"""A process whose daemon thread is inside torch when the interpreter exits must still exit with its own
code: CPython ends such a thread with pthread_exit as the torch call returns, and the unwinding through
the C++ frame aborted the process (SIGABRT, exit 134, "terminate called without an active exception").

Each case runs in a child process that leaves a daemon thread in torch behind a close that gave up
waiting for it, as the product's closes do when their time is up (engine/exit_guard.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# Torch work for ``seconds`` (a large snapshot loaded, a large memory re-keyed): the thread is inside a
# torch call nearly all the time, so the old exit aborted every run.
BUSY = """
import threading, time, torch

def busy(seconds):
    w, end = torch.randn(64, 64), time.monotonic() + seconds
    while time.monotonic() < end:
        w = (w @ w).tanh()
"""


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    code = BUSY + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)},
    )


def _exited_cleanly(proc: subprocess.CompletedProcess[str]) -> None:
    assert "terminate called" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


def test_serve_stopped_while_its_reload_thread_loads_a_snapshot_exits_0(tmp_path):
    proc = _run(
        f"""
        from reloop.engine.serve.config import serve_config_from_dict
        from reloop.engine.serve.stack import ServingStack
        from tests.unit.serve.fakes import bundle

        loading, newest = threading.Event(), [1]

        def loader(arm):
            def load(version):
                if version == 2:
                    loading.set()
                    busy(2.0)
                return bundle(version)

            return (lambda: newest[0]), load, (lambda: list(range(1, newest[0] + 1)))

        config = serve_config_from_dict({{
            "serve": {{"port": 0, "log": {{"enabled": False}}, "reload_interval_s": 0.05,
                       "shutdown_timeout_s": 0.5}},
            "arms": [{{"name": "A", "registry": {str(tmp_path / "reg")!r}, "impressions_topic": "imp"}}],
        }})
        stack = ServingStack(config, loader_factory=loader).start()
        newest[0] = 2
        assert loading.wait(10)
        started = time.monotonic()
        stack.close()  # reloop serve's stop: bounded, the load is left to finish on its own
        print("closed", time.monotonic() - started, stack.watcher._thread.is_alive(), flush=True)
        """,
        tmp_path,
    )
    _exited_cleanly(proc)
    _, took, alive = proc.stdout.split()
    assert float(took) < 1.5 and alive == "True"  # the close kept its bound; the load outlived it


def test_a_memory_feed_left_re_keying_at_exit_does_not_abort_the_process(tmp_path):
    proc = _run(
        """
        from reloop.connectors.memory import MemoryLog, MemorySource
        from reloop.engine.memory.feed import SamplesFeed
        from reloop.engine.serve.bundle import ModelHolder
        from tests.unit.serve.fakes import bundle

        class Memory:  # what the feed uses of ServedMemory; re-keying a large one runs torch a while
            version = positions = None
            rekeying = threading.Event()

            def rekey(self, live):
                self.rekeying.set()
                busy(2.0)
                self.version = live.version

        log = MemoryLog()
        log.create("samples", 1)
        feed = SamplesFeed(
            name="A", source=MemorySource(log, ["samples"]), target=Memory(), holder=ModelHolder(bundle(3))
        ).start()
        assert Memory.rekeying.wait(10)
        feed.close(timeout_s=0.1)  # what was left of serve.shutdown_timeout_s
        print("closed", feed._thread.is_alive(), flush=True)
        """,
        tmp_path,
    )
    _exited_cleanly(proc)
    assert proc.stdout.split() == ["closed", "True"]


def test_a_train_stage_whose_fetch_thread_outlived_its_close_exits_0(tmp_path):
    proc = _run(
        f"""
        from reloop.engine.runtime.cli import keep_triton_out

        keep_triton_out()
        from pathlib import Path

        from reloop.connectors.memory import MemorySource
        from reloop.engine.metrics.stats import EngineStats
        from reloop.engine.runtime.build import build_train_stage
        from reloop.engine.runtime.config import load_config_dict
        from reloop.engine.runtime.train_stage import _Fetcher
        from tests.unit.runtime.test_train_ranks import TOPIC, _config, _log

        cfg = load_config_dict(_config(Path({str(tmp_path)!r}), False), env={{}})
        stage = build_train_stage(cfg, source=MemorySource(_log(1), [TOPIC]), stats=EngineStats())
        featurizing, featurize = threading.Event(), stage._featurize

        def slow(batch):
            featurizing.set()
            busy(2.0)
            return featurize(batch)

        stage._featurize = slow
        _Fetcher.CLOSE_TIMEOUT_S = 0.1  # the close gives up on its thread, as on one stuck in the client
        stage.open()
        assert featurizing.wait(20)
        stage.close(final=None)
        print("closed", flush=True)
        """,
        tmp_path,
    )
    _exited_cleanly(proc)
    assert proc.stdout.split() == ["closed"]


def test_after_the_exit_began_daemon_threads_wait_outside_torch_and_the_main_thread_never_waits(tmp_path):
    proc = _run(
        """
        import atexit

        def on_main_thread():  # registered before the guard's hook, so it runs after it: guard closed
            from reloop.engine.exit_guard import native_work

            with native_work():  # would wait for ever if the main thread waited
                print("main thread ran", flush=True)

        atexit.register(on_main_thread)
        from reloop.engine.exit_guard import native_work

        def loop():
            while True:
                with native_work():
                    busy(0.05)
                    with native_work():  # nested, maybe after the exit began: never waits on itself
                        busy(0.05)

        threading.Thread(target=loop, daemon=True).start()
        time.sleep(0.2)
        """,
        tmp_path,
    )
    _exited_cleanly(proc)
    assert proc.stdout.split() == ["main", "thread", "ran"]
    assert "still inside torch" not in proc.stderr  # the exit did not wait its EXIT_WAIT_S out


def test_the_commands_exit_waits_for_threads_and_exit_hooks_then_skips_the_teardown(tmp_path: Path) -> None:
    # A stopped stream processor or scoring service spent 0.5-4 s in the interpreter's teardown (a last
    # collection over torch's objects) after "stopped in 0.2 s". exit_now skips it, and only it: the
    # threads that are not daemons finish, the atexit hooks run, what was printed or logged is out.
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import atexit, logging, sys, threading, time
            from reloop.engine.runtime.cli import exit_now

            def late():
                time.sleep(0.3)
                open({str(tmp_path / "thread")!r}, "w").write("done")

            atexit.register(lambda: open({str(tmp_path / "hook")!r}, "w").write("ran"))
            threading.Thread(target=late).start()
            logging.basicConfig(stream=sys.stderr)
            logging.getLogger("x").warning("logged")
            print("printed", end="")  # no newline: a buffered line of a pipe
            exit_now(3)
            raise AssertionError("not reached")
        """)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout == "printed" and "logged" in done.stderr
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "hook").read_text() == "ran"
