"""``reloop serve --workers N``: N serving processes on one port (SO_REUSEPORT), kept alive by the parent.

Each worker is a whole ``reloop serve`` process (its own registry watcher and hot reload, its own model
copy, its own impression producer, its own event loop and GIL); the kernel spreads incoming connections
over the workers' listening sockets. What that means:

* arm routing: blake2b of (salt, user id), the same in every process: a user lands in the same arm
  whichever worker answers (engine/serve/arms.py);
* impression logging: each worker has its own producer to the arm's topic; impression ids are 128
  random bits per impression, so workers never collide; per-worker buffers and drop counters;
* hot reload: each worker polls the registry and swaps on its own; for up to one poll interval
  (``serve.reload_interval_s``) two workers may serve adjacent versions. Every response and every
  impression names the version that scored it, so the trainer's y_last stays exact;
* ``/stats`` and ``/metrics`` on the shared port answer for the worker the connection landed on, so
  worker i also serves its /metrics alone on ``serve.worker_metrics_port`` + i (default: the serving
  port + 1 + i): Prometheus scrapes each of those for totals (or run one worker per pod);
* memory: N copies of the model (memory-mapped bundles share the page cache: their weights are in
  memory once);
* the parent restarts a worker that exits (after 1 s), except one that exits 2 (it cannot start with
  this config: every restart would fail alike), which stops them all and the parent with status 2;
  it stops all of them on SIGTERM/SIGINT; the connections a crashing worker held (in flight or queued
  on its socket) are reset, new ones go to the others at once;
* a parent that dies without stopping them (SIGKILL, the OOM killer) takes them along: on Linux each
  worker gets SIGTERM from the kernel when the parent dies (``PR_SET_PDEATHSIG``) and stops as on any
  SIGTERM (within ``serve.shutdown_timeout_s`` + 3 s). They kept serving on the port before, as orphans
  that a restarted parent's new workers shared it with.

On a 2-core machine one worker is the default: a second one pays off only when a core is idle.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import time

from reloop.engine.netaddr import http_url
from reloop.engine.runtime import early_stop
from reloop.engine.runtime.signal_event import SignalSafeEvent

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def stop_with_parent(parent_pid: int) -> None:
    """``preexec_fn`` of a worker: the kernel sends it SIGTERM when the parent dies (the thread that
    started it: run_workers' loop runs on the main thread); exits at once if the parent is already gone.
    SIGTERM, not the SIGKILL of reloop run's stages (engine/runtime/lifeline.py): a worker has nothing
    that another process could write twice, and a graceful stop delivers or counts its impression log."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)


def run_workers(
    argv: list[str],
    workers: int,
    host: str,
    port: int,
    metrics_port: int | None = None,
    *,
    shutdown_timeout_s: float = 20.0,
) -> int:
    """Run ``workers`` copies of ``reloop serve`` with ``argv`` (+ the worker flags) on host:port.
    The port is reserved here first (port 0 picks a free one), with SO_REUSEPORT like the workers'.
    Worker i serves its own /metrics on ``metrics_port`` + i (default: the port + 1 + i). At a stop each
    worker gets its ``serve.shutdown_timeout_s`` (+ its close's slack and its exit) before a SIGKILL."""
    from reloop.engine.serve.stack import CLOSE_SLACK_S, listen_socket

    reserve = listen_socket(host, port, reuse_port=True)  # bound, never listening: takes no connections
    port = int(reserve.getsockname()[1])
    cmd = [
        sys.executable, "-m", "reloop.engine.runtime.cli", "serve", *argv,
        "--host", host, "--port", str(port), "--worker",
    ]  # fmt: skip
    first_metrics = port + 1 if metrics_port is None else metrics_port
    if first_metrics + workers - 1 > 65535:
        reserve.close()
        print(f"reloop serve: worker metrics ports {first_metrics}..{first_metrics + workers - 1} go past "
              "65535 (serve.worker_metrics_port)", file=sys.stderr)  # fmt: skip
        return 2
    stop = SignalSafeEvent()  # set by the handler below (signal_event.py)
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if early_stop.take() is not None:  # a SIGTERM recorded during the imports (early_stop.py)
        on_signal(signal.SIGTERM, None)
    procs: list[subprocess.Popen | None] = [None] * workers
    started: list[float] = [float("-inf")] * workers  # when each was last started
    print(
        f"reloop serve: {workers} workers on {http_url(host, port)}; each one's /metrics on ports "
        f"{first_metrics}..{first_metrics + workers - 1}",
        flush=True,
    )
    status = 0
    lifeline = functools.partial(stop_with_parent, os.getpid())
    try:
        while not stop.is_set():
            for i, p in enumerate(procs):
                if p is None or p.poll() is not None:
                    if p is not None and p.returncode == 2:
                        # `reloop serve` exits 2 only when it cannot start with this config (a token
                        # file it cannot read, a port in use): every restart would fail alike, for ever.
                        log.error("serving worker %d could not start (status 2, said above); stopping", i)
                        status = 2
                        stop.set()
                        break
                    if time.monotonic() - started[i] < 1.0:
                        continue  # at most one start per second per worker
                    if p is not None:
                        log.error("serving worker %d exited with status %s; restarting it", i, p.returncode)
                    started[i] = time.monotonic()
                    try:
                        procs[i] = subprocess.Popen(
                            [*cmd, "--worker-metrics-port", str(first_metrics + i)], preexec_fn=lifeline
                        )
                    except OSError as exc:
                        # fork/exec failing for a moment (EAGAIN, ENOMEM) ended the parent with a
                        # traceback, its workers left serving as orphans: tried again in a second.
                        log.error("serving worker %d could not be started (%s); trying again", i, exc)
                        procs[i] = None
            stop.wait(0.5)
    finally:
        # Whatever ends this loop (an error included), no worker outlives the parent. The stop is in
        # the log as a worker's is: a worker killed for not stopping in time was not said at all.
        began = time.monotonic()
        if received:
            plural = "s" if workers > 1 else ""
            log.info("stopping on %s (pid %d): %d worker%s", received[0], os.getpid(), workers, plural)
        grace_s = shutdown_timeout_s + CLOSE_SLACK_S + _EXIT_SLACK_S
        killed = _stop_all(procs, grace_s)
        for i in killed:
            log.error("serving worker %d had not stopped %.0f s after its SIGTERM: killed (its impressions "
                      "not yet delivered are lost)", i, grace_s)  # fmt: skip
        reserve.close()
        if received:
            log.info("stopped in %.1f s (pid %d)", time.monotonic() - began, os.getpid())
    # A killed worker's stop was not clean (exit 1, as a stream processor's that ran out of time).
    return status or (1 if killed else 0)


# A worker's exit after its stack closed (threads joined, the interpreter torn down); with the default
# shutdown_timeout_s (20 s) a stop waits 30 s in all, as before it followed the setting.
_EXIT_SLACK_S = 7.0


def _stop_all(procs: list[subprocess.Popen | None], grace_s: float) -> list[int]:
    """SIGTERM every running worker, wait up to ``grace_s`` in all, then SIGKILL what is left (a fixed
    30 s cut a worker given a longer ``serve.shutdown_timeout_s`` short, its impressions undelivered);
    returns the indices of the workers killed."""
    killed: list[int] = []
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for i, p in enumerate(procs):
        if p is not None:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                killed.append(i)
    return killed
