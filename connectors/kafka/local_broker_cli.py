"""``reloop kafka up | status | down | fetch | topics``: the local development broker, and the topics a run
config reads.

The state folder is ``--state-dir``, or ``$RELOOP_STATE_DIR/kafka``, or ``.state/kafka`` in a checkout,
or ``~/.local/state/reloop/kafka`` (``$XDG_STATE_HOME/reloop/kafka``) for an installed reloop. The jars
are in ``deploy/kafka/lib`` in a checkout, else in ``~/.cache/reloop/kafka/lib`` (see local_broker.py).
``up`` leaves the broker running in the background; ``status`` and ``down`` find it through
``<state>/broker.json``. ``topics --config FILE`` creates the topics that config's ``reloop run`` reads and
does not create itself (impressions, clicks, dead letters; the join stage creates the samples topic) on its
``kafka.bootstrap``, with its connection settings: any broker, not only the local one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from reloop.connectors.kafka.local_broker import REPO_ROOT, BrokerError, LocalBroker
from reloop.engine.config_common import folder_arg, int_at_least, port_arg, positive_float
from reloop.engine.resources import in_checkout, user_state_dir


def default_state_dir() -> Path:
    root = os.environ.get("RELOOP_STATE_DIR")
    if root:
        return Path(root) / "kafka"
    return (REPO_ROOT / ".state" if in_checkout() else user_state_dir()) / "kafka"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "status", "down", "fetch", "topics"], help="what to do")
    parser.add_argument(
        "--state-dir",
        type=folder_arg,
        default=None,
        help="broker state folder (default: $RELOOP_STATE_DIR/kafka, else .state/kafka in a checkout, "
        "else ~/.local/state/reloop/kafka)",
    )
    parser.add_argument(
        "--port", type=port_arg(1), default=None, help="client port for `up` (default: a free port)"
    )
    parser.add_argument(
        "--controller-port",
        type=port_arg(1),
        default=None,
        help="the KRaft controller's port for `up`, also on 127.0.0.1 (default: the previous run's when "
        "free, else a free port)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        help="seconds to wait: for `up`/`down` (default 90), for `topics` to reach the broker and create "
        "them (default 30)",
    )
    parser.add_argument("--config", help="`topics`: the run config whose input topics to create")
    parser.add_argument(
        "--partitions",
        type=int_at_least(1),
        default=1,
        help="`topics`: partitions of the impressions and clicks topics (default 1; at least the most join "
        "processes you will run, and a multiple of every number of train ranks: docs/scale-out.md)",
    )


def main(args: argparse.Namespace) -> int:
    if args.action == "topics":
        return _topics(args)
    controller_port = getattr(args, "controller_port", None)  # (a Namespace made by a caller may lack it)
    if controller_port is not None and controller_port == args.port:
        print("reloop kafka: --port and --controller-port must differ", file=sys.stderr)
        return 2
    try:
        broker = LocalBroker(
            args.state_dir or default_state_dir(),
            port=args.port,
            controller_port=controller_port,
            detached=True,
        )
        return _ACTIONS[args.action](broker, args)
    except BrokerError as exc:
        print(f"reloop kafka {args.action}: {exc}", file=sys.stderr)
        return 1


def _fetch(broker: LocalBroker, args: argparse.Namespace) -> int:
    began = time.monotonic()
    lib = broker.ensure_jars()
    jars = sum(1 for p in lib.glob("*.jar"))
    print(f"Kafka {broker.version}: {jars} jars in {lib} ({time.monotonic() - began:.1f} s)")
    return 0


class _Stopped(BaseException):
    """SIGTERM or SIGHUP while `up` waits for the broker (a closed terminal, `timeout reloop kafka up`)."""


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception, so ``start`` stops the detached JVM it launched: by default
    Python dies at once and leaves a broker that no broker.json records (`down` cannot find it, and it
    holds the data dir's lock against every later `up`)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield
        return
    previous = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _up(broker: LocalBroker, args: argparse.Namespace) -> int:
    # The state folder's lock around check + start: a second `up` from another shell waits for this one
    # and then reports "already running" instead of launching a second JVM on the same data dir.
    try:
        with _stop_on_signals(), broker.exclusive():
            current = broker.status()
            if current.running and current.info is not None:
                info = current.info
                if args.port is not None and args.port != info.port:
                    # Exit 0 here would leave the user pointing clients at a port nobody listens on.
                    print(
                        f"reloop kafka up: a broker already runs from {broker.state_dir} at {info.bootstrap} "
                        f"(pid {info.pid}), not on port {args.port}; stop it first: "
                        f"reloop kafka down --state-dir {broker.state_dir}",
                        file=sys.stderr,
                    )
                    return 1
                print(f"already running: Kafka {info.version} at {info.bootstrap} (pid {info.pid})")
                return 0
            info = broker.start(timeout_s=args.timeout or UP_DOWN_TIMEOUT_S)
    except _Stopped as exc:
        print(f"reloop kafka up: stopped by {exc}; the broker it was starting is stopped", file=sys.stderr)
        return 128 + signal.Signals[str(exc)].value
    print(
        f"Kafka {info.version} started at {info.bootstrap} in {info.start_seconds:.1f} s "
        f"(pid {info.pid}, RSS {broker.rss_mb()} MB, state {broker.state_dir})"
    )
    print(f"  point reloop at it: RELOOP__KAFKA__BOOTSTRAP={info.bootstrap} (or kafka.bootstrap)")
    print(f"  log: {info.log_path}")
    print(f"  stop it with: reloop kafka down --state-dir {broker.state_dir}")
    return 0


def _status(broker: LocalBroker, args: argparse.Namespace) -> int:
    status = broker.status()
    if not status.running or status.info is None:
        print(f"not running: {status.detail}")
        return 1
    info = status.info
    uptime = time.time() - info.started_at
    print(
        f"running: Kafka {info.version} at {info.bootstrap} (pid {info.pid}, up {uptime:.0f} s, "
        f"RSS {status.rss_mb} MB)\n  metadata: {'ok' if status.reachable else 'FAILED'}: {status.detail}\n"
        f"  log: {info.log_path}"
    )
    return 0 if status.reachable else 1


def _down(broker: LocalBroker, args: argparse.Namespace) -> int:
    if broker.stop(timeout_s=args.timeout or UP_DOWN_TIMEOUT_S):
        print(f"stopped the broker in {broker.state_dir}")
    else:
        print(f"no running broker in {broker.state_dir}")
    return 0


def _topics(args: argparse.Namespace) -> int:
    from reloop.connectors.kafka.admin import admin_settings, create_topics_counted
    from reloop.engine.runtime.config import ConfigError, load_config
    from reloop.engine.streams import AuthenticationFailed

    if args.config is None:
        print("reloop kafka topics: give the run config: --config FILE", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"reloop kafka topics: {exc}", file=sys.stderr)
        return 2
    topics = {cfg.source.impressions_topic: args.partitions, cfg.source.clicks_topic: args.partitions}
    if cfg.sink.dead_letter_topic is not None:  # null: no dead-letter topic
        topics[cfg.sink.dead_letter_topic] = 1
    bootstrap = cfg.kafka.bootstrap
    timeout_s = args.timeout or TOPICS_TIMEOUT_S
    # The client's own wait for a first broker too (it took 30 s whatever --timeout said), unless set.
    settings = {"bootstrap_timeout_ms": int(timeout_s * 1000)}
    settings.update(admin_settings(cfg.kafka.connection("kafka-python")))
    try:
        created, have = create_topics_counted(
            bootstrap,
            topics,
            timeout_s=timeout_s,
            client_config=settings,
            replication_factor=cfg.kafka.replication_factor,
        )
    except AuthenticationFailed as exc:  # a setting to fix, not an outage: exit 2, as the stages do
        print(f"reloop kafka topics: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - unreachable, fewer partitions: one line, exit 1
        print(f"reloop kafka topics: at {bootstrap}: {exc}", file=sys.stderr)
        return 1
    for name, asked in topics.items():
        state = "created" if name in created else "already there"
        # An existing topic keeps its count (create_topics refused fewer than asked): more is said, since
        # it fixes how many join processes divide the work evenly.
        more = f" (asked {asked}: a topic's partitions are not changed)" if have[name] != asked else ""
        print(f"{name}: {state} at {bootstrap} with {have[name]} partition(s){more}")
    return 0


UP_DOWN_TIMEOUT_S = 90.0
TOPICS_TIMEOUT_S = 30.0

_ACTIONS = {"up": _up, "status": _status, "down": _down, "fetch": _fetch}
