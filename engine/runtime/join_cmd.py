"""``reloop join --config FILE``: the join stage as a process (one member of the join consumer group;
start more for more throughput: the tasks spread over them). See engine/runtime/join_stage.py."""

from __future__ import annotations

import argparse
import sys

from reloop.engine.runtime.config import LOG_LEVELS, ConfigError, load_config, load_feature_spec
from reloop.engine.runtime.jsonlog import setup_json_logging


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML or TOML run config (RELOOP__* env overrides)")
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default=None, help="override log.level"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics here (default: metrics.join_prometheus_port; 0: a free port, named in the log)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        load_feature_spec(cfg.model)  # the door checks by it: a bad spec fails here, not in a retry loop
    except ConfigError as exc:
        print(f"reloop join: {exc}", file=sys.stderr, flush=True)
        return 2
    setup_json_logging(args.log_level or cfg.log.level)
    from reloop.engine.runtime.kafka_stages import describe_join, join_stage_factory
    from reloop.engine.runtime.stage_runner import run_supervised

    port = args.metrics_port if args.metrics_port is not None else cfg.metrics.join_prometheus_port
    return run_supervised(
        "join",
        cfg,
        join_stage_factory(cfg),
        close=lambda stage: stage.close(checkpoint=True),
        describe=describe_join,
        metrics_port=port,
    )
