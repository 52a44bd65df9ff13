"""``reloop run --config FILE``: the long-running stream processor.

Kafka in (impressions + clicks), optionally a ``samples`` topic and a dead-letter topic out, snapshots
into the checkpoint registry, Kafka group offsets committed after each durable snapshot. A failure that
is not about one record rebuilds the pipeline from its last snapshot (engine/runtime/supervisor.py).
SIGTERM/SIGINT stop it gracefully with a final checkpoint; the process exits at the latest
``recovery.stop_timeout_s`` after the signal whatever the broker does (a second signal exits at once).
Logs are JSON lines on stderr. Exit codes: 0 stopped cleanly, 1 gave up or forced out, 2 bad config or
unusable snapshots.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from engine.runtime.config import ConfigError, RunConfig, load_config
from engine.runtime.jsonlog import setup_json_logging

log = logging.getLogger("reloop.run")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML or TOML run config (RELOOP__* env overrides)")
    parser.add_argument("--log-level", default=None, help="override log.level")


def kafka_pipeline_factory(cfg: RunConfig) -> Any:
    """A function building a fresh Pipeline over new Kafka clients (the supervisor calls it again
    after every failure, so no client that went through an outage is reused)."""
    # Imported here: the engine itself never imports a Kafka client; only this entry point wires one in.
    from connectors.kafka.sink import KafkaSink
    from connectors.kafka.source import KafkaSource
    from engine.runtime.build import build_pipeline

    src = cfg.source
    sink_cfg = {**src.client_config, **cfg.sink.client_config}

    def build() -> Any:
        opened: list[Any] = []
        try:
            # It reports end offsets: the merge waits for a lagging partition instead of guessing.
            source = KafkaSource(
                bootstrap=src.bootstrap,
                topics=[src.impressions_topic, src.clicks_topic],
                group_id=src.group_id,
                client_config=src.client_config,
            )
            opened.append(source)
            samples = dead = None
            if cfg.sink.samples_topic:
                samples = KafkaSink(
                    bootstrap=src.bootstrap, topic=cfg.sink.samples_topic, client_config=sink_cfg
                )
                opened.append(samples)
            if cfg.sink.dead_letter_topic:
                dead = KafkaSink(
                    bootstrap=src.bootstrap, topic=cfg.sink.dead_letter_topic, client_config=sink_cfg
                )
                opened.append(dead)
            commit = source.commit if src.group_id else None
            return build_pipeline(
                cfg, source=source, samples_sink=samples, dead_letter_sink=dead, commit=commit
            )
        except BaseException:
            for thing in opened:
                release = getattr(thing, "abort", None) or thing.close
                try:
                    release()
                except Exception:  # noqa: BLE001 - releasing what a failed build opened
                    log.debug("release after a failed build failed", exc_info=True)
            raise

    return build


class StopRequest:
    """SIGTERM/SIGINT: set ``event`` and arm a watchdog that ends the process ``timeout_s`` later if
    the graceful stop has not finished by then (a stop must never wait on the broker)."""

    def __init__(self, timeout_s: float) -> None:
        self.event = threading.Event()
        self.timeout_s = timeout_s
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set():
            self._force(f"second {name}")
        log.info("stopping", extra={"fields": {"signal": name, "exit_within_s": self.timeout_s}})
        self.event.set()
        self._timer = threading.Timer(
            self.timeout_s, self._force, args=(f"{self.timeout_s:g} s after {name}",)
        )
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    @staticmethod
    def _force(why: str) -> None:
        log.critical(
            "stop did not finish in time: exiting without a final checkpoint "
            "(the last snapshot stays the restart point)",
            extra={"fields": {"why": why}},
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"reloop run: {exc}", file=sys.stderr, flush=True)
        return 2
    setup_json_logging(args.log_level or cfg.log.level)
    from engine.metrics.registry import REGISTRY
    from engine.runtime.restore import NoUsableSnapshot, SnapshotMismatch
    from engine.runtime.supervisor import GaveUp, RetryPolicy, Supervisor

    metrics_server = None
    if cfg.metrics.prometheus_port is not None:
        from connectors.metrics.prometheus import serve_metrics

        metrics_server = serve_metrics(host=cfg.metrics.prometheus_host, port=cfg.metrics.prometheus_port)
        log.info(
            "metrics",
            extra={"fields": {"url": f"http://{metrics_server.host}:{metrics_server.port}/metrics"}},
        )

    stop = StopRequest(cfg.recovery.stop_timeout_s)
    stop.install()
    hook: list[Any] = []

    def on_pipeline(p) -> None:  # noqa: ANN001
        if metrics_server is not None:
            for old in hook:
                REGISTRY.remove_collect_hook(old)
            hook[:] = [p.served_metrics.bind()]
        log.info(
            "started",
            extra={
                "fields": {
                    "config": args.config,
                    "fingerprint": cfg.fingerprint(),
                    "restored": p.restored_from,
                    "version": p.version,
                    "bootstrap": cfg.source.bootstrap,
                    "topics": [cfg.source.impressions_topic, cfg.source.clicks_topic],
                }
            },
        )

    last_log = [time.monotonic()]

    def report(p) -> None:  # noqa: ANN001
        now = time.monotonic()
        if now - last_log[0] < cfg.log.stats_every_s:
            return
        last_log[0] = now
        log.info(
            "progress",
            extra={
                "fields": {
                    "version": p.version,
                    "records": p.records_processed,
                    "samples_trained": p.trainer.counters.samples,
                    "buffered": p.buffered_samples,
                    "pending": p.joiner.pending_count,
                    "watermark_ms": p.joiner.watermark_ms,
                    "dead_letters": p.dead_letters.total,
                    "join": p.joiner.stats.as_dict(),
                }
            },
        )

    r = cfg.recovery
    supervisor = Supervisor(
        kafka_pipeline_factory(cfg),
        stop=stop.event,
        policy=RetryPolicy(
            backoff_initial_s=r.backoff_initial_s,
            backoff_max_s=r.backoff_max_s,
            give_up_after_s=r.give_up_after_s,
        ),
        on_pipeline=on_pipeline,
        on_step=report,
    )
    code = 0
    try:
        supervisor.run()
    except (SnapshotMismatch, NoUsableSnapshot) as exc:
        log.critical("cannot resume", extra={"fields": {"error": str(exc)}})
        print(f"reloop run: {exc}", file=sys.stderr, flush=True)
        code = 2
    except GaveUp as exc:
        print(f"reloop run: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        stop.disarm()
        if metrics_server is not None:
            metrics_server.close()
    p = supervisor.pipeline
    log.info(
        "stopped",
        extra={
            "fields": {
                "exit_code": code,
                "final_checkpoint": supervisor.final_number,
                "restarts": supervisor.restarts,
                "version": p.version if p is not None else None,
                "samples_trained": p.trainer.counters.samples if p is not None else 0,
                "dead_letters": p.dead_letters.counts if p is not None else {},
            }
        },
    )
    return code
