"""``reloop run --config FILE``: the whole stream processor on one machine, from one config.

Two stages over the samples topic (docs/data-plane.md): the join stage (``reloop join``: impressions and
clicks in, labelled samples out) and the train stage (``reloop train``: samples in, model versions out).
``stages.processes: 2`` (the default) runs them as two child processes, so joining and training use two
cores; ``1`` runs both in this process. The children die with this process (a SIGKILL here is a SIGKILL
of both); SIGTERM/SIGINT are passed on to them, each writes its final checkpoint and the command exits
with the worst of their exit codes; one still running ``recovery.stop_timeout_s`` + KILL_GRACE_S after
its stop is SIGKILLed. When one child ends on its own (it gave up, or a bad config), the other is stopped
too and its exit code is returned, so an orchestrator restarts the pair.

Exit codes: 0 stopped cleanly, 1 gave up, forced out or a stage's final save failed, 2 bad config or
unusable snapshots.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from reloop.engine.checkpoint.folder_lock import FolderInUse
from reloop.engine.runtime import early_stop
from reloop.engine.runtime.config import LOG_LEVELS, ConfigError, RunConfig, load_config
from reloop.engine.runtime.config_pipe import reopenable
from reloop.engine.runtime.cpu_limit import WAIT_SETTINGS, shared_cores_env
from reloop.engine.runtime.jsonlog import setup_json_logging
from reloop.engine.runtime.lifeline import die_with
from reloop.engine.runtime.stage_runner import StopRequest
from reloop.engine.runtime.start_gate import StartGate, refusal_of
from reloop.engine.runtime.state_layout import refuse_one_process_state
from reloop.engine.runtime.train_cmd import BESIDE_JOIN, hold_the_folder

log = logging.getLogger("reloop.run")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML or TOML run config (RELOOP__* env overrides)")
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default=None, help="override log.level"
    )


def main(args: argparse.Namespace) -> int:
    with reopenable(args.config) as config:  # the stage processes open it again: a pipe they could not
        return _main(argparse.Namespace(**{**vars(args), "config": config}))


def _main(args: argparse.Namespace) -> int:
    # JSON lines from the start: the model check loads backbone plugins, whose warnings (one that
    # failed to import) came out as plain text before the stages' JSON lines.
    setup_json_logging(args.log_level or "INFO")
    try:
        cfg = load_config(args.config)
        refuse_one_process_state(cfg)
        if cfg.stages.processes == 1:
            from reloop.engine.runtime.build import check_model

            check_model(cfg)
            # One train stage per checkpoint folder: held here with one process, else by the train
            # process (checked by this one first: _start_stages).
            lock = hold_the_folder(cfg, "run")
    except (ConfigError, FolderInUse) as exc:
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
        return _two_processes(args, cfg)
    try:
        return _one_process(cfg)
    finally:
        lock.release()


# ---------------------------------------------------------------------------- two processes
def join_metrics_port(cfg: RunConfig) -> int | None:
    """Where the join process serves /metrics: ``metrics.join_prometheus_port``, else the train
    process's port + 1 (none when the train process has none; a free port, as the train process's,
    when that is 0: 0 had served the train stage on a free port and the join stage on none)."""
    m = cfg.metrics
    if m.join_prometheus_port is not None:
        return m.join_prometheus_port
    if m.prometheus_port is None or m.prometheus_port == 0:
        return m.prometheus_port
    return m.prometheus_port + 1


def _two_processes(args: argparse.Namespace, cfg: RunConfig) -> int:
    base = [sys.executable, "-m", "reloop.engine.runtime.cli"]
    extra = ["--log-level", args.log_level] if args.log_level else []
    ports = {"train": cfg.metrics.prometheus_port, "join": join_metrics_port(cfg)}
    children: dict[str, subprocess.Popen] = {}
    # die_with(this pid), not die_with_parent: a SIGKILL here between the fork and the child's prctl left
    # the child running.
    lifeline = functools.partial(die_with, os.getpid())
    # The train process leaves a core to the join process where train.threads is unset (build.py), and
    # its OpenMP threads do not spin on the cores they share with it (cpu_limit.shared_cores_env).
    train_env = {**shared_cores_env(os.environ), BESIDE_JOIN: "1"}
    envs = {"train": train_env, "join": None}
    gate = StartGate()
    try:
        for stage in ("train", "join"):
            port = [] if ports[stage] is None else ["--metrics-port", str(ports[stage])]
            gate_env, fds = gate.child_env(stage, reports=stage == "train")
            children[stage] = subprocess.Popen(
                [*base, stage, "--config", args.config, *extra, *port],
                preexec_fn=lifeline,
                env={**(envs[stage] or os.environ), **gate_env},
                pass_fds=fds,
            )
        gate.spawned()
        refused = _start_stages(gate, children, cfg)
    except BaseException:  # a stop before the stages started (early_stop), a bug: they did nothing yet
        gate.close()
        _end_gated(children, wait_s=0.0)
        raise
    if refused is not None:
        gate.close()
        _end_gated(children, wait_s=30.0)
        code, why = refused
        print(f"reloop run: {why}", file=sys.stderr, flush=True)  # last: after what the stages printed
        return code
    waits = {name: train_env[name] for name in WAIT_SETTINGS if name in train_env}
    fields = {"processes": {k: p.pid for k, p in children.items()}, "train_openmp_wait": waits}
    log.info("started", extra={"fields": fields})
    return _supervise(children, cfg.recovery.stop_timeout_s)


def _start_stages(
    gate: StartGate, children: dict[str, subprocess.Popen], cfg: RunConfig
) -> tuple[int, str] | None:
    """Open the gate of the started stage processes once the train process found the model buildable and
    the checkpoint folder is free (None); else the exit code and why not."""
    train = children["train"]
    verdict = gate.verdict()
    refusal = refusal_of(verdict)
    if refusal is not None:
        return 2, refusal
    if verdict is None:  # its end closed the pipe: its traceback or message is on stderr above
        try:
            code = train.wait(timeout=30)
        except subprocess.TimeoutExpired:  # (it closed the pipe some other way)
            train.kill()
            code = train.wait()
        # 2: it refused to start and said why (a missing extra: ``reloop`` names it), as a stage would.
        return (2 if code == 2 else 1), f"the train process ended (exit code {code}) before it could start"
    try:  # checked here before the join process joins the other pipeline's group; the train process holds it
        hold_the_folder(cfg, "run").release()
    except FolderInUse as exc:
        return 2, str(exc)
    gate.open()
    return None


def _end_gated(children: dict[str, subprocess.Popen], wait_s: float) -> None:
    """Stage processes whose gate was closed: they exit 0 at it; ones that do not within ``wait_s`` (still
    importing, or a stop under way) are killed, having read nothing and written nothing."""
    deadline = time.monotonic() + wait_s
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# How long past recovery.stop_timeout_s a stopping child may take before it is SIGKILLed. Its own watchdog
# ends it at stop_timeout_s, but only once its signal handler ran: a child stuck in a C call that never
# returns to the interpreter runs neither, and `reloop run` waited for it forever.
KILL_GRACE_S = 5.0


def _supervise(children: dict[str, subprocess.Popen], stop_timeout_s: float) -> int:
    """Wait for the stage processes; stop the others when one ends on its own; forward SIGTERM/SIGINT."""
    signalled: set[str] = set()  # the children sent a stop
    requests = [0]  # the SIGTERM/SIGINTs this process received
    kill_at: list[float | None] = [None]

    def stop_children(signum: int, again: bool) -> None:
        for stage, proc in children.items():
            if proc.poll() is None and (again or stage not in signalled):
                proc.send_signal(signum)
                signalled.add(stage)
        if kill_at[0] is None:
            kill_at[0] = time.monotonic() + stop_timeout_s + KILL_GRACE_S

    first_at: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        requests[0] += 1
        now = time.monotonic()
        if requests[0] == 1:
            first_at.append(now)
            log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        # The first request goes only to children not stopped yet: one this process already stopped (its
        # sibling ended) took it for a second signal and exited without its final checkpoint. A later
        # request is the second signal that ends them at once (a stage takes one within a second of
        # its first for the same stop).
        stop_children(signum, again=requests[0] > 1)
        running = any(proc.poll() is None for proc in children.values())
        if running and requests[0] > 1 and now - first_at[0] >= StopRequest.SAME_STOP_S:
            # A stage that cannot take it (stuck in a C call, stopped) is killed KILL_GRACE_S from now,
            # not at the first stop's deadline (a second signal waited out stop_timeout_s + 5 s). With
            # every stage already ended there is nothing to kill, and no warning that there is.
            deadline = now + KILL_GRACE_S
            if kill_at[0] is None or deadline < kill_at[0]:
                kill_at[0] = deadline
                log.warning("a second signal: stages still running then are killed", extra={"fields": {
                    "signal": signal.Signals(signum).name, "kill_in_s": KILL_GRACE_S}})  # fmt: skip

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    early = early_stop.take()  # a SIGTERM recorded during the imports (early_stop.py)
    if early is not None:
        forward(early, None)
    codes: dict[str, int] = {}
    killed: list[str] = []
    while len(codes) < len(children):
        for stage, proc in children.items():
            if stage in codes or proc.poll() is None:
                continue
            codes[stage] = proc.returncode
            if not (signalled or requests[0]):
                log.error(
                    "a stage ended on its own; stopping the other",
                    extra={"fields": {"stage": stage, "exit_code": proc.returncode}},
                )
                stop_children(signal.SIGTERM, again=False)
        if kill_at[0] is not None and time.monotonic() >= kill_at[0]:
            for stage, proc in children.items():
                if stage not in codes and proc.poll() is None and stage not in killed:
                    log.critical(
                        "a stage did not exit in time after the stop; killing it (a final checkpoint it did "
                        "not write leaves its last snapshot the restart point)",
                        extra={"fields": {"stage": stage, "pid": proc.pid, "stop_timeout_s": stop_timeout_s}},
                    )
                    proc.kill()
                    killed.append(stage)
        time.sleep(0.1)
    # A child the stop reached before it installed its handler stopped all the same: killed by the
    # signal, or (SIGINT) exited 130 from the command line's KeyboardInterrupt.
    clean = {-signal.SIGTERM, -signal.SIGINT, 130} if signalled or requests[0] else set()
    code = max((0 if c in clean else c if c >= 0 else 1) for c in codes.values())
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
        try:
            self.join.close(checkpoint=True)
        finally:  # a join stage whose close raised must not cost the train stage its final checkpoint
            number = self.train.close(final="checkpoint")
        return number


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
