"""``reloop train --config FILE``: the train stage as a process: the samples topic in, model versions
(snapshots) out. See engine/runtime/train_stage.py.

``--world-size M`` (M > 1) runs M data-parallel ranks on this machine under torchrun (torch's elastic
launcher: rendezvous, and a restart of every rank when one fails, up to ``distributed.max_restarts``);
in a cluster, start ``reloop train`` under torchrun yourself (one process per pod, c10d rendezvous):
a process that finds torchrun's WORLD_SIZE > 1 in its environment runs as one rank
(engine/runtime/train_ranks.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from reloop.engine.runtime.config import ConfigError, RunConfig, load_config
from reloop.engine.runtime.jsonlog import setup_json_logging


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML or TOML run config (RELOOP__* env overrides)")
    parser.add_argument("--log-level", default=None, help="override log.level")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics here (default: metrics.prometheus_port; rank r of several: this + r)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="data-parallel ranks on this machine, launched with torchrun (default 1: one process)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        if args.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1 (got {args.world_size})")
        from reloop.engine.runtime.build import check_model

        check_model(cfg)
    except ConfigError as exc:
        print(f"reloop train: {exc}", file=sys.stderr, flush=True)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        setup_json_logging(args.log_level or cfg.log.level)
        return _launch(args, cfg)
    setup_json_logging(args.log_level or cfg.log.level)
    from reloop.engine.runtime.kafka_stages import describe_train, train_stage_factory
    from reloop.engine.runtime.stage_runner import run_supervised

    port = args.metrics_port if args.metrics_port is not None else cfg.metrics.prometheus_port
    group = None
    if world > 1:
        from reloop.engine.train.data_parallel import RankGroup

        group = RankGroup.start(timeout_s=cfg.distributed.timeout_s)
        if port is not None:
            port += int(os.environ.get("LOCAL_RANK", "0"))
    try:
        return run_supervised(
            "train",
            cfg,
            train_stage_factory(cfg, group),
            close=lambda stage: stage.close(final="checkpoint"),
            describe=describe_train,
            metrics_port=port,
        )
    finally:
        if group is not None:
            group.close()


def _launch(args: argparse.Namespace, cfg: RunConfig) -> int:
    """torchrun (in this process) running ``--world-size`` ranks of ``reloop train``. A SIGTERM reaches
    its agent, which hands it to the ranks: they stop together with one final checkpoint."""
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    argv = [
        "--standalone", "--nnodes=1", f"--nproc-per-node={args.world_size}",
        f"--max-restarts={cfg.distributed.max_restarts}", "--monitor-interval=1",
        "-m", "reloop.engine.runtime.cli", "train", "--config", str(args.config),
    ]  # fmt: skip
    if args.log_level:
        argv += ["--log-level", args.log_level]
    if args.metrics_port is not None:
        argv += ["--metrics-port", str(args.metrics_port)]
    try:
        run(get_args_parser().parse_args(argv))
    except SignalException as exc:  # the agent stopped the ranks (they saved their final checkpoint)
        return 0 if exc.sigval in (signal.SIGTERM, signal.SIGINT) else 1
    except ChildFailedError as exc:
        print(f"reloop train: ranks failed beyond distributed.max_restarts: {exc}", file=sys.stderr)
        return 1
    return 0
