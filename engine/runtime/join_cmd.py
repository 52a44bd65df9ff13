"""``reloop join --config FILE``: the join stage as a process (one member of the join consumer group;
start more for more throughput: the tasks spread over them). See engine/runtime/join_stage.py."""

from __future__ import annotations

import argparse
import logging
import sys

from reloop.engine.runtime import start_gate
from reloop.engine.runtime.config import LOG_LEVELS, ConfigError, RunConfig, load_config, load_feature_spec
from reloop.engine.runtime.jsonlog import setup_json_logging
from reloop.engine.runtime.state_layout import refuse_one_process_state


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
    gated = start_gate.gated()  # started by `reloop run`, whose train process checks the model
    try:
        cfg = load_config(args.config)
        if not gated:
            load_feature_spec(cfg.model)  # the door checks by it: a bad spec fails here, not in a retry loop
            # The model section too, as run and train check it: joiners sharing a config with trainers
            # that refuse it ran on, feeding a samples topic nobody would train from.
            from reloop.engine.runtime.build import check_model

            check_model(cfg, trains_here=False)
        # Before any sample is sent: with no join checkpoints beside a one-process state, this stage
        # sent the whole retained history again while the train stage refused to start.
        refuse_one_process_state(cfg)
    except ConfigError as exc:
        print(f"reloop join: {exc}", file=sys.stderr, flush=True)
        return 2
    setup_json_logging(args.log_level or cfg.log.level)
    from reloop.engine.runtime.kafka_stages import describe_join, join_stage_factory
    from reloop.engine.runtime.stage_runner import run_supervised

    if gated and not start_gate.wait_for_go():
        return 0  # `reloop run` refused to go on (and said why)

    return run_supervised(
        "join",
        cfg,
        join_stage_factory(cfg),
        close=lambda stage: stage.close(checkpoint=True),
        describe=describe_join,
        metrics_port=metrics_port(args.metrics_port, cfg),
    )


def metrics_port(given: int | None, cfg: RunConfig) -> int | None:
    """Where this join stage serves /metrics: ``--metrics-port``, else ``metrics.join_prometheus_port``.
    With neither but ``metrics.prometheus_port`` set (the train stage's), a warning says so: an operator
    who started more joiners by hand got unmonitored processes without a word."""
    port = given if given is not None else cfg.metrics.join_prometheus_port
    if port is None and cfg.metrics.prometheus_port is not None:
        logging.getLogger("reloop.join").warning(
            "this join stage serves no /metrics: metrics.prometheus_port is the train stage's; set "
            "metrics.join_prometheus_port or --metrics-port (0: a free port)"
        )
    return port
