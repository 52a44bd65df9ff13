"""``reloop run --config FILE``: the long-running stream processor.

Kafka in (impressions + clicks), optionally a ``samples`` topic and a dead-letter topic out, snapshots
into the checkpoint registry, Kafka group offsets committed after each durable snapshot. SIGTERM/SIGINT
stop it gracefully with a final snapshot; logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

from engine.runtime.config import ConfigError, load_config
from engine.runtime.jsonlog import setup_json_logging

log = logging.getLogger("reloop.run")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML or TOML run config (RELOOP__* env overrides)")
    parser.add_argument("--log-level", default=None, help="override log.level")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"reloop run: {exc}", flush=True)
        return 2
    setup_json_logging(args.log_level or cfg.log.level)

    # Imported here: the engine itself never imports a Kafka client; only this entry point wires one in.
    from connectors.kafka.sink import KafkaSink
    from connectors.kafka.source import KafkaSource
    from engine.runtime.build import build_pipeline
    from engine.runtime.sources import EndOffsets

    src = cfg.source
    # EndOffsets: the merge waits for a lagging partition instead of guessing from idleness.
    source = EndOffsets(
        KafkaSource(
            bootstrap=src.bootstrap,
            topics=[src.impressions_topic, src.clicks_topic],
            group_id=src.group_id,
            client_config=src.client_config,
        )
    )
    sink_cfg = {**src.client_config, **cfg.sink.client_config}
    samples = (
        KafkaSink(bootstrap=src.bootstrap, topic=cfg.sink.samples_topic, client_config=sink_cfg)
        if cfg.sink.samples_topic
        else None
    )
    dead = (
        KafkaSink(bootstrap=src.bootstrap, topic=cfg.sink.dead_letter_topic, client_config=sink_cfg)
        if cfg.sink.dead_letter_topic
        else None
    )
    commit = source.commit if src.group_id else None
    pipeline = build_pipeline(cfg, source=source, samples_sink=samples, dead_letter_sink=dead, commit=commit)

    metrics_server = None
    if cfg.metrics.prometheus_port is not None:
        from connectors.metrics.prometheus import serve_metrics

        pipeline.served_metrics.bind()
        metrics_server = serve_metrics(host=cfg.metrics.prometheus_host, port=cfg.metrics.prometheus_port)
        log.info(
            "metrics",
            extra={"fields": {"url": f"http://{metrics_server.host}:{metrics_server.port}/metrics"}},
        )

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

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

    log.info(
        "starting",
        extra={
            "fields": {
                "config": args.config,
                "fingerprint": cfg.fingerprint(),
                "restored_version": pipeline.version,
                "bootstrap": src.bootstrap,
                "topics": [src.impressions_topic, src.clicks_topic],
            }
        },
    )
    try:
        pipeline.run(stop=stop, on_step=report)
    finally:
        version = pipeline.close(final_snapshot=True)
        if metrics_server is not None:
            metrics_server.close()
        log.info(
            "stopped",
            extra={
                "fields": {
                    "final_version": version,
                    "samples_trained": pipeline.trainer.counters.samples,
                    "join": pipeline.joiner.stats.as_dict(),
                    "dead_letters": pipeline.dead_letters.counts,
                }
            },
        )
    return 0
