"""``reloop run --config FILE``: the whole stream processor on one machine, from one config.

Two stages over the samples topic (docs/data-plane.md): the join stage (``reloop join``: impressions and
clicks in, labelled samples out) and the train stage (``reloop train``: samples in, model versions out).
``stages.processes: 2`` (the default) runs them as two child processes, so joining and training use two
cores; ``1`` runs both in this process. The children die with this process (a SIGKILL here is a SIGKILL
of both); SIGTERM/SIGINT are passed on to them, each writes its final checkpoint and the command exits
with the worst of their exit codes. When one child ends on its own (it gave up, or a bad config), the
other is stopped too and its exit code is returned, so an orchestrator restarts the pair.

Exit codes: 0 stopped cleanly, 1 gave up or forced out, 2 bad config or unusable snapshots.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from typing import Any

from reloop.engine.runtime.config import ConfigError, RunConfig, load_config
from reloop.engine.runtime.jsonlog import setup_json_logging
from reloop.engine.runtime.lifeline import die_with_parent

log = logging.getLogger("reloop.run")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML or TOML run config (RELOOP__* env overrides)")
    parser.add_argument("--log-level", default=None, help="override log.level")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"reloop run: {exc}", file=sys.stderr, flush=True)
        return 2
    setup_json_logging(args.log_level or cfg.log.level)
    if cfg.stages.processes == 2:
        port = cfg.metrics.prometheus_port
        if port and join_metrics_port(cfg) == port:  # one stage would start, the other fail to bind
            print(
                f"reloop run: invalid config: metrics.join_prometheus_port: {port} is "
                "metrics.prometheus_port too (with stages.processes 2 both processes serve /metrics here)",
                file=sys.stderr,
                flush=True,
            )
            return 2
        return _two_processes(args, cfg)  # each stage checks the model section as it starts
    from reloop.engine.runtime.build import check_model

    try:
        check_model(cfg)
    except ConfigError as exc:
        print(f"reloop run: {exc}", file=sys.stderr, flush=True)
        return 2
    return _one_process(cfg)


# ---------------------------------------------------------------------------- two processes
def join_metrics_port(cfg: RunConfig) -> int | None:
    """Where the join process serves /metrics: ``metrics.join_prometheus_port``, else the train
    process's port + 1 (none when the train process has none)."""
    m = cfg.metrics
    if m.join_prometheus_port is not None:
        return m.join_prometheus_port
    if not m.prometheus_port:
        return None
    return m.prometheus_port + 1


def _two_processes(args: argparse.Namespace, cfg: RunConfig) -> int:
    base = [sys.executable, "-m", "reloop.engine.runtime.cli"]
    extra = ["--log-level", args.log_level] if args.log_level else []
    ports = {"train": cfg.metrics.prometheus_port, "join": join_metrics_port(cfg)}
    children: dict[str, subprocess.Popen] = {}
    for stage in ("train", "join"):
        port = [] if ports[stage] is None else ["--metrics-port", str(ports[stage])]
        children[stage] = subprocess.Popen(
            [*base, stage, "--config", args.config, *extra, *port], preexec_fn=die_with_parent
        )
    log.info("started", extra={"fields": {"processes": {k: p.pid for k, p in children.items()}}})
    stopping = [False]

    def forward(signum: int, _frame: object) -> None:
        first = not stopping[0]
        stopping[0] = True
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signum)
        if first:
            log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes: dict[str, int] = {}
    while len(codes) < len(children):
        for stage, proc in children.items():
            if stage in codes or proc.poll() is None:
                continue
            codes[stage] = proc.returncode
            if not stopping[0]:
                log.error(
                    "a stage ended on its own; stopping the other",
                    extra={"fields": {"stage": stage, "exit_code": proc.returncode}},
                )
                stopping[0] = True
                for other in children.values():
                    if other.poll() is None:
                        other.send_signal(signal.SIGTERM)
        time.sleep(0.1)
    # A child the forwarded signal ended before it could install its handler stopped all the same.
    forwarded = {-signal.SIGTERM, -signal.SIGINT} if stopping[0] else set()
    code = max((0 if c in forwarded else c if c >= 0 else 1) for c in codes.values())
    log.info("stopped", extra={"fields": {"exit_codes": codes, "exit_code": code}})
    return code


# ---------------------------------------------------------------------------- one process
class BothStages:
    """The join stage and the train stage stepped in turn in one process (``stages.processes: 1``)."""

    def __init__(self, join: Any, train: Any) -> None:
        self.join = join
        self.train = train

    @property
    def snapshots_written(self) -> int:
        return self.join.snapshots_written + self.train.snapshots_written

    @property
    def final_saved(self) -> int | None:
        """The train stage's final checkpoint, once both stages have made theirs."""
        return None if self.join.final_saved is None else self.train.final_saved

    @property
    def restored_from(self) -> str | None:
        return self.train.restored_from

    @property
    def served_metrics(self) -> Any:
        return self.train.served_metrics

    def run(self, stop: Any, on_step: Any = None) -> None:
        self.train.open()
        while not stop.is_set():
            self.join.step()
            self.train.step()
            if on_step is not None:
                on_step(self)

    def abort(self) -> None:
        self.join.abort()
        self.train.abort()

    def close(self) -> int | None:
        self.join.close(checkpoint=True)
        return self.train.close(final="checkpoint")


def _one_process(cfg: RunConfig) -> int:
    from reloop.engine.runtime.kafka_stages import (
        describe_join,
        describe_train,
        join_stage_factory,
        train_stage_factory,
    )
    from reloop.engine.runtime.stage_runner import run_supervised

    make_join, make_train = join_stage_factory(cfg), train_stage_factory(cfg)

    def build() -> BothStages:
        join = make_join()
        try:
            return BothStages(join, make_train())
        except BaseException:
            join.abort()
            raise

    return run_supervised(
        "run",
        cfg,
        build,
        close=lambda both: both.close(),
        describe=lambda both: {"join": describe_join(both.join), "train": describe_train(both.train)},
        metrics_port=cfg.metrics.prometheus_port,
    )
