"""``reloop simulate``: drive a running scoring service with a simulated world and send its clicks to Kafka.

    reloop simulate --config deploy/config/demo.yaml --url http://127.0.0.1:8000 --bootstrap 127.0.0.1:9092

It reads the ``simulate`` section (rate, top_k, world) and the ``arms`` section (each arm's clicks
topic), runs for ``--duration`` seconds or until Ctrl-C, then prints the truth per arm: true CTR of
what was shown, AUC of the served predictions against the drawn clicks, and the A/B minus A/A lift.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable

from reloop.engine.config_common import int_at_least, positive_float
from reloop.engine.netaddr import bootstrap_arg, http_url, service_url_arg
from reloop.engine.runtime.jsonlog import quiet_kafka_python, setup_text_logging
from reloop.engine.runtime.signal_event import SignalSafeEvent
from reloop.engine.serve.config import ConfigError, check_service_sections, read_yaml
from reloop.engine.simulate.config import SimulateConfig, simulate_config_from_dict
from reloop.engine.simulate.driver import Simulator
from reloop.engine.simulate.report import ab_lines, arms_table, progress_line, versions_table
from reloop.engine.simulate.stats import SimStats
from reloop.engine.simulate.world import World
from reloop.engine.streams import Sink
from rich.console import Console


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML with sections simulate and arms")
    parser.add_argument(
        "--url",
        type=service_url_arg,
        default=None,
        help="the scoring service (default: the config's serve.host and serve.port, else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--bootstrap", type=bootstrap_arg, help="Kafka bootstrap for the clicks (default: kafka.bootstrap)"
    )
    parser.add_argument("--rate", type=positive_float, help="override simulate.rate (requests/s)")
    parser.add_argument("--duration", type=positive_float, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument("--seed", type=int_at_least(0), help="override simulate.world.seed")


#: The clicks topic of an arm that names none (serve's ArmConfig.clicks_topic default), and of an arm the
#: ``arms`` section does not list.
DEFAULT_CLICKS_TOPIC = "clicks"

log = logging.getLogger(__name__)


def service_url(doc: dict) -> str:
    """Where the config's scoring service listens (``serve.host``, ``serve.port``; a service bound to every
    interface is reached on loopback): given the serve config, simulate finds its service without --url."""
    serve = doc.get("serve") or {}
    host = str(serve.get("host") or "127.0.0.1")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return http_url(host, int(serve.get("port") or 8000))


def with_service_overrides(doc: dict) -> dict:
    """``doc`` with the ``RELOOP__SERVE__*``, ``RELOOP__KAFKA__*`` and ``RELOOP__ARMS`` variables over it,
    as the service it drives reads them: it looked for the service on the file's port and sent clicks to
    the file's broker while the service ran under RELOOP__SERVE__PORT and RELOOP__KAFKA__BOOTSTRAP."""
    import os

    from reloop.engine.config_common import deep_merge
    from reloop.engine.serve.config import service_env_overrides

    return deep_merge(doc, service_env_overrides(os.environ, others=frozenset({"simulate", "demo", "run"})))


def service_token(doc: dict) -> str | None:
    """The bearer token the service asks for (serve.auth_token_file, else serve.auth_token)."""
    from pydantic import SecretStr
    from reloop.engine.serve.auth import load_token

    serve = doc.get("serve") or {}
    token = serve.get("auth_token")
    return load_token(serve.get("auth_token_file"), SecretStr(str(token)) if token else None)


def clicks_topics(doc: dict) -> dict[str, str]:
    """arm name -> clicks topic, from the ``arms`` section (default topic ``clicks``)."""
    return {str(a["name"]): str(a.get("clicks_topic", DEFAULT_CLICKS_TOPIC)) for a in doc.get("arms") or []}


def kafka_click_sinks(
    bootstrap: str, topics: dict[str, str], settings: dict | None = None
) -> Callable[[str], Sink]:
    """The click sink of each arm the service answers with (``Simulator.click_sink``), on its topic in
    ``topics``. An arm that ``topics`` lacks (the service's arms are not the config's) falls back to
    ``clicks``, with one warning per arm: its clicks went there without a word, where no trainer of the
    arm read them."""
    from reloop.connectors.kafka.sink import KafkaSink

    warned: set[str] = set()
    lock = threading.Lock()

    def make(arm: str) -> Sink:
        topic = topics.get(arm)
        if topic is None:
            topic = DEFAULT_CLICKS_TOPIC
            with lock:
                first = arm not in warned
                warned.add(arm)
            if first:
                known = ", ".join(sorted(topics)) or "none"
                log.warning(
                    "the scoring service answered with arm %r, which the config's arms section does not "
                    "list (it lists: %s); its clicks go to the default topic %r. Pass the serve config "
                    "(the one that defines the service's arms and their clicks topics) as --config",
                    arm,
                    known,
                    topic,
                )
        return KafkaSink(bootstrap=bootstrap, topic=topic, client_config=settings or {})

    return make


def wait_ready(scorer, timeout_s: float, stop: threading.Event | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        if scorer.ready():
            return True
        time.sleep(0.2)
    return False


def build_simulator(config: SimulateConfig, *, score, click_sink, seed: int | None = None) -> Simulator:
    world_cfg = config.world_config()
    if seed is not None:
        from dataclasses import replace

        world_cfg = replace(world_cfg, seed=seed)
    return Simulator(
        world=World(world_cfg),
        score=score,
        click_sink=click_sink,
        stats=SimStats(window=config.window),
        top_k=config.top_k,
    )


PROGRESS_EVERY_S = 30.0  # a line on stderr: a long run said nothing until it stopped


def _report_progress(stats: SimStats, stop: threading.Event) -> None:
    start = time.monotonic()
    while not stop.wait(PROGRESS_EVERY_S):
        print(progress_line(stats, time.monotonic() - start), file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    setup_text_logging(logging.WARNING)
    # kafka-python's reconnect lines, once in 10 s each, as in every reloop process (a broker outage made
    # hundreds of them between the simulator's own lines).
    for handler in logging.getLogger().handlers:
        quiet_kafka_python(handler)
    try:
        doc = with_service_overrides(read_yaml(args.config))
        check_service_sections(doc)
        config = simulate_config_from_dict(doc)
        token = service_token(doc)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"reloop simulate: {exc}", file=sys.stderr)
        return 2
    bootstrap = args.bootstrap or (doc.get("kafka") or {}).get("bootstrap")
    if not bootstrap:
        print("reloop simulate: no Kafka bootstrap (give --bootstrap or kafka.bootstrap)", file=sys.stderr)
        return 2
    from pydantic import ValidationError
    from reloop.engine.config_common import KafkaSection, check_moved, describe_errors
    from reloop.engine.serve.config import MOVED

    # Checked before the wait for the service: a misspelt key was refused only after up to 60 s.
    try:  # the clicks producer: kafka-python, with the connection of the kafka section
        check_moved({"kafka": doc.get("kafka") or {}}, MOVED)
        settings = KafkaSection.model_validate(doc.get("kafka") or {}).connection("kafka-python")
    except ValidationError as exc:  # named, without the values (pydantic's text shows each input)
        why = describe_errors(exc, model=KafkaSection, prefix="kafka.")
        print(f"reloop simulate: {why}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError) as exc:
        print(f"reloop simulate: kafka: {exc}", file=sys.stderr)
        return 2
    from reloop.engine.simulate.http import HttpScorer

    url = args.url or service_url(doc)
    scorer = HttpScorer(url, token=token)
    console = Console() if Console().is_terminal else Console(width=160)
    # Handlers first: Ctrl-C while the service is awaited ends the wait, not in a traceback.
    stop = SignalSafeEvent()  # set by the handlers (signal_event.py)
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if not scorer.ready():
        print(f"reloop simulate: waiting for the scoring service at {url} (up to 60 s)", file=sys.stderr)
    if not wait_ready(scorer, 60, stop):
        if stop.is_set():  # the operator's stop, not a failure (exit 1 read as one)
            print(f"reloop simulate: stopped while waiting for the scoring service at {url}", file=sys.stderr)
            return 0
        print(f"reloop simulate: no scoring service at {url}: it is not ready after 60 s", file=sys.stderr)
        return 1
    sim = build_simulator(
        config,
        score=scorer,
        click_sink=kafka_click_sinks(bootstrap, clicks_topics(doc), settings),
        seed=args.seed,
    )
    from reloop.engine.simulate.driver import ClickSinkFailed

    failed: ClickSinkFailed | None = None
    progress = threading.Thread(target=_report_progress, args=(sim.stats, stop), daemon=True, name="progress")
    progress.start()
    try:
        sim.run(
            rate=args.rate or config.rate, duration_s=args.duration, stop=stop, concurrency=config.concurrency
        )
    except ClickSinkFailed as exc:
        failed = exc
    try:
        sim.close()
    except ClickSinkFailed as exc:
        failed = failed or exc
    scorer.close()
    console.print(arms_table(sim.stats, title="simulate: truth per arm"))
    for arm in sorted(sim.stats.arms):
        console.print(versions_table(sim.stats, arm))
    for line in ab_lines(sim.stats, config.report):
        console.print(line)
    s = sim.stats
    console.print(
        f"clicks sent {s.clicks_sent} ({s.clicks_resent} of them again after a producer gave up on them), "
        f"beyond the attribution window {s.clicks_late}, "
        f"still pending at exit {s.clicks_pending_at_end}; not-ready answers {s.not_ready}, errors {s.errors}"
    )
    if failed is not None:
        print(f"reloop simulate: {failed} ({s.clicks_pending_at_end} clicks not sent)", file=sys.stderr)
        return 1
    if not any(a.impressions for a in s.arms.values()) and (s.errors or s.not_ready):
        # Every request failed (the counts are printed above): a run that simulated nothing exited 0.
        print(f"reloop simulate: no request was answered with a ranking ({s.errors} failed, {s.not_ready} "
              f"not ready): is {url} a scoring service with a model?", file=sys.stderr)  # fmt: skip
        return 1
    return 0
