"""``reloop serve --config FILE``: the scoring service (FastAPI on uvicorn, 127.0.0.1 by default)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from reloop.engine.config_common import path_problem, port_arg
from reloop.engine.netaddr import bootstrap_arg, http_url, is_loopback
from reloop.engine.runtime import early_stop
from reloop.engine.runtime.signal_event import SignalSafeEvent
from reloop.engine.serve.config import (
    ArmConfig,
    ConfigError,
    ServeConfig,
    counters_conflict,
    load_serve_config,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML with sections serve, arms, kafka")
    parser.add_argument("--host", help="override serve.host (default 127.0.0.1)")
    parser.add_argument("--port", type=port_arg(0), help="override serve.port")
    parser.add_argument("--bootstrap", type=bootstrap_arg, help="override kafka.bootstrap")
    parser.add_argument("--no-log", action="store_true", help="do not log impressions (benchmarks)")
    parser.add_argument(
        "--workers",
        type=int,
        help="serving processes sharing the port (SO_REUSEPORT); default serve.workers (1). "
        "Each worker serves its own /metrics on serve.worker_metrics_port + i: scrape those "
        "(docs/bench-serve.md, 'Several workers')",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --workers N
    # that worker's own /metrics port
    parser.add_argument("--worker-metrics-port", type=port_arg(0), help=argparse.SUPPRESS)


def _arm_problem(arm: ArmConfig) -> str | None:
    """What an arm's settings cannot do, as ``KEY: why``, checked before the service listens: each of
    these failed later, at every poll or save, while the arm served nothing (or nothing it saved)."""
    from reloop.engine.serve.loader import cold_start_problem

    problem = path_problem(arm.registry, folder=True)
    if problem:
        return f"registry: {problem}"
    for key, feed in (("memory", arm.memory), ("counters", arm.counters)):
        state_file = None if feed is None else feed.state_file
        problem = None if state_file is None else path_problem(state_file, folder=False)
        if problem:
            return f"{key}.state_file: {problem}"
    problem = None if arm.cold_start is None else cold_start_problem(arm.cold_start, arm.counters)
    return f"cold_start: {problem}" if problem else None


def config_problem(config: ServeConfig, workers: int) -> str | None:
    """What the service refuses at its start beyond the file's own validation, or None."""
    problem = counters_conflict(config, workers)
    if problem:
        return problem
    for i, arm in enumerate(config.arms):
        problem = _arm_problem(arm)
        if problem:
            return f"bad serve config: arms.{i}.{problem}"
    return None


def main(args: argparse.Namespace) -> int:
    from reloop.engine.runtime.config_pipe import reopenable

    # A config given as a pipe (--config <(envsubst < serve.yaml)) is read once into a private copy that
    # the workers (--workers N) open again: they found the pipe drained.
    with reopenable(args.config) as path:
        return _main(args, path)


def _main(args: argparse.Namespace, config_path: str) -> int:
    from reloop.engine.runtime.jsonlog import quiet_kafka_python, setup_text_logging

    setup_text_logging(logging.INFO)

    for handler in logging.getLogger().handlers:  # as the stream processors quiet it
        quiet_kafka_python(handler)
    try:
        config = load_serve_config(config_path)
    except ConfigError as exc:
        print(f"reloop serve: {exc}", file=sys.stderr)
        return 2
    update: dict = {}
    if args.bootstrap:
        update["kafka"] = config.kafka.model_copy(update={"bootstrap": args.bootstrap})
    if args.no_log:
        update["log"] = config.log.model_copy(update={"enabled": False})
    config = config.model_copy(update=update)
    workers = args.workers if args.workers is not None else config.workers
    if workers < 1:
        print("reloop serve: --workers must be >= 1", file=sys.stderr)
        return 2
    # The file was checked without --workers / --no-log; a worker's parent checked the arms.
    problem = counters_conflict(config, workers) if args.worker else config_problem(config, workers)
    if problem:
        print(f"reloop serve: {problem}", file=sys.stderr)
        return 2
    if workers > 1 and not args.worker:
        from reloop.engine.serve.workers import run_workers

        argv = ["--config", config_path, "--workers", str(workers)]  # with --worker: one of them
        if args.bootstrap:
            argv += ["--bootstrap", args.bootstrap]
        if args.no_log:
            argv.append("--no-log")
        port = config.port if args.port is None else args.port
        return run_workers(
            argv,
            workers,
            args.host or config.host,
            port,
            config.worker_metrics_port,
            shutdown_timeout_s=config.shutdown_timeout_s,
        )

    from reloop.engine.serve.stack import ServingStack

    # From here a SIGTERM or SIGINT is a stop, whenever it comes: one during the start (a stack loading
    # its models) ends the service once it started, with its stop logged, not by the signal (-15).
    stop = SignalSafeEvent()  # set by the handler: a threading.Event could hang it in stop.wait()
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if early_stop.take() is not None:  # a SIGTERM recorded during the import above (early_stop.py)
        on_signal(signal.SIGTERM, None)
    # One worker of several: the shared port's /metrics answered for whichever worker a connection
    # reached (each scrape another's counters: resets, wild rates), so it refuses and names the ports.
    elsewhere = None
    if args.worker:
        port = config.port if args.port is None else args.port
        first = port + 1 if config.worker_metrics_port is None else config.worker_metrics_port
        ports = ", ".join(str(first + i) for i in range(workers)) if workers > 1 else "their own ports"
        several = str(workers) if workers > 1 else "several"
        elsewhere = (
            f"this service runs {several} workers: scrape each on its own /metrics port "
            f"(serve.worker_metrics_port + i): {ports}; this one's is {args.worker_metrics_port}. This "
            "port's /metrics would answer for whichever worker a connection reached\n"
        )
    try:
        stack = ServingStack(config, metrics_elsewhere=elsewhere).start()
    except (ValueError, OSError) as exc:  # OSError: an auth_token_file that cannot be read
        print(f"reloop serve: {exc}", file=sys.stderr)
        return 2
    try:
        url = stack.serve_in_thread(host=args.host, port=args.port, reuse_port=args.worker)
    except (OSError, OverflowError) as exc:  # the port in use, not ours to bind, out of range
        stack.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        host = args.host or config.host
        port = config.port if args.port is None else args.port
        print(f"reloop serve: cannot listen on {host}:{port}: {why} (serve.port or --port)", file=sys.stderr)
        return 2
    print(f"reloop serve: listening on {url} (arms: {', '.join(stack.arms)})", flush=True)
    host = args.host or config.host
    if not is_loopback(host) and config.auth_token is None and config.auth_token_file is None:
        # Open to the network and answering anyone (its /metrics and /stats too): said, not refused (a
        # mesh or a gateway in front may authenticate).
        logging.getLogger("reloop.engine.serve").warning(
            "serving on %s without a token: anyone who reaches it may score and read /metrics "
            "(serve.auth_token or serve.auth_token_file; fine behind a gateway that authenticates)",
            host,
        )
    metrics: Any = None
    if args.worker_metrics_port is not None:
        from reloop.connectors.metrics.prometheus import serve_metrics

        host = args.host or config.host
        try:
            if stack.token:
                metrics = _GuardedMetrics(host, args.worker_metrics_port, stack.token)
            else:
                metrics = serve_metrics(host=host, port=args.worker_metrics_port)
        except OSError as exc:
            stack.close()
            why = exc.strerror or str(exc)
            print(f"reloop serve: cannot serve this worker's /metrics on {host}:{args.worker_metrics_port}: "
                  f"{why} (serve.worker_metrics_port)", file=sys.stderr)  # fmt: skip
            return 2
        print(f"reloop serve: this worker's metrics at {metrics.url}", flush=True)
    stop.wait()
    # The stop in the log, as `reloop run` has it (with --workers N, each worker's pid tells them apart).
    said = logging.getLogger("reloop.engine.serve")
    began = time.monotonic()
    said.info("stopping on %s (pid %d)", received[0] if received else "request", os.getpid())
    if metrics is not None:
        metrics.close()
    stack.close()
    said.info("stopped in %.1f s (pid %d)", time.monotonic() - began, os.getpid())
    return 0


class _GuardedMetrics:
    """This worker's /metrics behind the service's bearer token, as the shared port's is (docs/operations.md:
    every path but the probes needs it): prometheus_client's own server has no authentication."""

    def __init__(self, host: str, port: int, token: str) -> None:
        import uvicorn
        from reloop.connectors.metrics.prometheus import metrics_asgi_app
        from reloop.engine.serve.auth import BearerAuth
        from reloop.engine.serve.stack import listen_socket

        sock = listen_socket(host, port)
        app = BearerAuth(metrics_asgi_app(), token, open_paths=frozenset())  # it answers every path
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="worker-metrics"
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise OSError(f"this worker's /metrics did not start on {host}:{port}")
            time.sleep(0.02)
        self.url = http_url(host, sock.getsockname()[1], "/metrics")

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
