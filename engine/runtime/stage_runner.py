"""Running one long-lived stage as a process: signals, the stop watchdog, metrics, supervision, exit codes.

Shared by ``reloop join``, ``reloop train`` and ``reloop run`` (which runs both). A failure that is not
about one record rebuilds the stage from its last checkpoint (engine/runtime/supervisor.py). SIGTERM /
SIGINT stop it gracefully (a final checkpoint); the process exits at the latest ``recovery.stop_timeout_s``
after the signal whatever the broker does; a second signal, a second or more after the first, exits at
once, and so does a signal while the stage is still being built (nothing to save yet). Exit codes: 0
stopped cleanly (the final checkpoint saved, or nothing to save), 1 gave up, forced out, stopped
without its final checkpoint (the save failed: "final save skipped"), or stopped while its stage was
failing (the last attempt failed and none has run since), 2 bad config or unusable snapshots.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from reloop.engine.netaddr import http_url, is_loopback
from reloop.engine.runtime import early_stop
from reloop.engine.runtime.config import RunConfig
from reloop.engine.runtime.gc_tuning import freeze_live_objects, set_young_threshold
from reloop.engine.runtime.signal_event import SignalSafeEvent

log = logging.getLogger("reloop.run")


class StopRequest:
    """SIGTERM/SIGINT: set ``event`` and arm a watchdog that ends the process ``timeout_s`` later if
    the graceful stop has not finished by then (a stop must never wait on the broker)."""

    # A signal this soon after the first is the same stop delivered twice, not a second request:
    # Ctrl-C in a terminal (or systemd's control-group kill) reaches `reloop run` and its stage processes
    # at once, and `reloop run` then forwards it to them again.
    SAME_STOP_S = 1.0

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.event = SignalSafeEvent()  # set by the signal handler (signal_event.py)
        self.timeout_s = timeout_s
        self._clock = clock
        self._first_at: float | None = None
        self._timer: threading.Timer | None = None
        # What the stop has saved so far (run_supervised asks the stage): the forced exit says so.
        self.final_saved: Callable[[], Any] = lambda: None
        # True while no stage is running, only being built (run_supervised asks the supervisor).
        self.starting: Callable[[], bool] = lambda: False
        # Called before a stop during the build exits (a data-parallel rank tells its launcher).
        self.nothing_owed: Callable[[], None] = lambda: None
        # The last failure of a stage that has not worked since (run_supervised asks the supervisor).
        self.failure: Callable[[], str | None] = lambda: None
        self.stage = "stage"  # its name, in that failure's line

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        early = early_stop.take()  # a SIGTERM recorded during the imports (early_stop.py)
        if early is not None:
            self._on_signal(early, None)

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        now = self._clock()
        if self._first_at is not None:
            if now - self._first_at < self.SAME_STOP_S:
                log.info("stopping already", extra={"fields": {**self._who(), "signal": name}})
                return
            self._force(f"a second {name}", in_time=False)
        self._first_at = now
        if self.starting():
            # A stage being built has read nothing and has nothing to save, and its build can block on
            # an unreachable broker for kafka-python's 30 s bootstrap: `reloop run` stopping a join
            # still connecting took that long to report its train stage's bad config. Ending here is
            # a crash before the first record, which a restart resumes like any other.
            log.info(
                "stopping before the stage started: nothing to save",
                extra={"fields": {**self._who(), "signal": name}},
            )
            self.nothing_owed()
            code = _stopped_while_failing(self.failure(), self.stage)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(code)
        log.info(
            "stopping", extra={"fields": {**self._who(), "signal": name, "exit_within_s": self.timeout_s}}
        )
        self.event.set()
        self._timer = threading.Timer(
            self.timeout_s, self._force, args=(f"{self.timeout_s:g} s after {name}",)
        )
        self._timer.daemon = True
        self._timer.start()

    def _who(self) -> dict[str, Any]:
        """Which process stops: `reloop run` merges its stages' logs, all under one logger."""
        return {"stage": self.stage, "pid": os.getpid()}

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _force(self, why: str, in_time: bool = True) -> None:
        what = "stop did not finish in time" if in_time else "stop forced"
        saved = self.final_saved()
        if saved is None:
            log.critical(
                f"{what}: exiting without a final checkpoint (the last snapshot stays the restart point)",
                extra={"fields": {**self._who(), "why": why}},
            )
        else:  # only releasing the clients was left (a broker that does not answer)
            log.error(
                f"{what}: exiting after the final checkpoint, before every client was closed",
                extra={"fields": {**self._who(), "why": why, "final_checkpoint": saved}},
            )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)


def run_supervised(
    name: str,
    cfg: RunConfig,
    build: Callable[[], Any],
    *,
    close: Callable[[Any], int | None],
    describe: Callable[[Any], dict[str, Any]],
    metrics_port: int | None,
    stop: StopRequest | None = None,
) -> int:
    """Run ``build()``'s stage under a supervisor until a stop signal; returns the exit code.
    ``describe(stage)`` gives the fields of the periodic progress log and of the last log line."""
    from reloop.engine.metrics.stats import STATS
    from reloop.engine.runtime.supervisor import REFUSED, GaveUp, ProcessFatal, RetryPolicy, Supervisor

    set_young_threshold(cfg.stages.gc_young_threshold)
    metrics_server = None
    if metrics_port is not None:
        from reloop.connectors.metrics.prometheus import serve_metrics

        try:
            metrics_server = serve_metrics(host=cfg.metrics.prometheus_host, port=metrics_port)
        except (OSError, OverflowError) as exc:  # in use, not ours to bind, out of range
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            where = f"{cfg.metrics.prometheus_host}:{metrics_port}"
            print(
                f"reloop {name}: cannot serve /metrics on {where}: {why} "
                "(metrics.prometheus_port, metrics.join_prometheus_port or --metrics-port)",
                file=sys.stderr,
                flush=True,
            )
            return 2
        # The port bound: the only place that names it when metrics_port is 0 (a free port).
        log.info(
            "metrics",
            extra={
                "fields": {
                    "stage": name,
                    "url": http_url(metrics_server.host, metrics_server.port, "/metrics"),
                    "port": metrics_server.port,
                }
            },
        )
        if not is_loopback(cfg.metrics.prometheus_host):  # as `reloop serve` says of its own port
            log.warning(
                "serving /metrics on %s without authentication: anyone who reaches the port reads it "
                "(metrics.prometheus_host; restrict it with a network policy or a firewall)",
                cfg.metrics.prometheus_host,
            )
    if stop is None:
        stop = StopRequest(cfg.recovery.stop_timeout_s)
        stop.stage = name
        stop.install()
    hooks: list[Any] = []

    def on_stage(stage: Any) -> None:
        freeze_live_objects()  # the stage just built (or rebuilt) and its restored state
        served = getattr(stage, "served_metrics", None)
        if metrics_server is not None and served is not None:
            for old in hooks:
                STATS.remove_hook(old)
            hooks[:] = [served.bind()]
        log.info("started", extra={"fields": {"stage": name, "restored": _restored(stage)}})

    last_log = [time.monotonic()]

    def report(stage: Any) -> None:
        now = time.monotonic()
        if now - last_log[0] >= cfg.log.stats_every_s:
            last_log[0] = now
            log.info("progress", extra={"fields": {"stage": name, **describe(stage)}})

    r = cfg.recovery
    supervisor = Supervisor(
        build,
        stop=stop.event,
        policy=RetryPolicy(
            backoff_initial_s=r.backoff_initial_s,
            backoff_max_s=r.backoff_max_s,
            give_up_after_s=r.give_up_after_s,
        ),
        on_pipeline=on_stage,
        on_step=report,
        close=close,
    )
    stop.final_saved = lambda: getattr(supervisor.pipeline, "final_saved", None)
    stop.starting = lambda: supervisor.building
    stop.failure = lambda: supervisor.failure
    stop.stage = name
    code = 0
    try:
        supervisor.run()
    except REFUSED as exc:
        # (a config, snapshot or login the stage refuses to run with: retrying cannot fix it)
        log.critical("refused to run", extra={"fields": {"stage": name, "error": str(exc)}})
        print(f"reloop {name}: {exc}", file=sys.stderr, flush=True)
        code = 2
    except Exception as exc:  # noqa: BLE001 - gave up, a broken rank group, or a stage's close raised
        # (the supervisor retries anything else): one JSON line, the traceback under "exc" when unexpected.
        expected = isinstance(exc, GaveUp | ProcessFatal)
        error = str(exc) if expected else repr(exc)
        log.critical(
            "exiting", extra={"fields": {"stage": name, "error": error}}, exc_info=None if expected else exc
        )
        print(f"reloop {name}: {error}", file=sys.stderr, flush=True)
        code = 1
    else:
        if not supervisor.closed:  # stopped between attempts: was the last one a failure?
            code = _stopped_while_failing(supervisor.failure, name)
            if code == 0:  # waiting for a topic: nothing read since the last save (a rank tells its launcher)
                stop.nothing_owed()
        elif not _final_saved(supervisor):
            # The stop's final save failed (the sinks could not flush, the write failed): the records
            # after the last save are processed again by the restart, as after a crash. Exit 0 said the
            # stop was clean.
            log.critical(
                "stopped without a final checkpoint (the last save is the restart point)",
                extra={"fields": {"stage": name}},
            )
            print(
                f"reloop {name}: the stop's final save failed (see {_SAVE_SKIPPED.get(name, _EITHER)} in the "
                "log); the last snapshot or checkpoint is the restart point",
                file=sys.stderr,
                flush=True,
            )
            code = 1
    finally:
        stop.disarm()
        if metrics_server is not None:
            metrics_server.close()
    stage = supervisor.pipeline
    log.info(
        "stopped",
        extra={
            "fields": {
                "stage": name,
                "exit_code": code,
                "final_checkpoint": supervisor.final_number,
                "restarts": supervisor.restarts,
                **(describe(stage) if stage is not None else {}),
            }
        },
    )
    return code


# The log line a stage's failed final save leaves ("run" in one process: either stage's).
_SAVE_SKIPPED = {"join": '"final checkpoint skipped"', "train": '"final save skipped"'}
_EITHER = '"final save skipped" or "final checkpoint skipped"'


def _stopped_while_failing(failure: str | None, name: str) -> int:
    """The exit code of a stop that found no stage running: 0 before the first attempt or while waiting
    for a topic, 1 when the last attempt failed (a stage that was not working, which exit 0 hid from an
    orchestrator), said on stderr with the last error."""
    if failure is None:
        return 0
    log.critical(
        "stopped while the stage was failing",
        extra={"fields": {"stage": name, "pid": os.getpid(), "last_error": failure}},
    )
    print(
        f"reloop {name}: stopped while the stage was failing; last error: {failure}",
        file=sys.stderr,
        flush=True,
    )
    return 1


def _final_saved(supervisor: Any) -> bool:
    """Whether the stage the stop closed saved its final checkpoint: its ``final_saved`` (set once that save
    is durable), else what its close returned."""
    saved = getattr(supervisor.pipeline, "final_saved", supervisor.final_number)
    return saved is not None


def _restored(stage: object) -> str | None:
    """What the stage resumed from, for its "started" line: a train stage's snapshot or checkpoint; a join
    stage restores each task as the group assigns it, later ("task restored" lines), which ``null`` read
    as a start from scratch."""
    if hasattr(stage, "restored_from"):
        return stage.restored_from  # type: ignore[no-any-return]
    if hasattr(stage, "tasks"):
        return "per task, as the group assigns them (the 'task restored' lines)"
    return None
