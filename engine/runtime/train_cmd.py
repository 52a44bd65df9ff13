"""``reloop train --config FILE``: the train stage as a process: the samples topic in, model versions
(snapshots) out. See engine/runtime/train_stage.py.

``--world-size M`` (M > 1) runs M data-parallel ranks on this machine under torchrun (torch's elastic
launcher: rendezvous, and a restart of every rank when one fails, up to ``distributed.max_restarts``);
in a cluster, start ``reloop train`` under torchrun yourself (one process per pod, c10d rendezvous):
a process that finds torchrun's WORLD_SIZE > 1 in its environment runs as one rank
(engine/runtime/train_ranks.py).

torchrun restarts the whole group when any rank exits non-zero. A rank that refuses to go on (exit 2: a
model that diverged, a setting or a snapshot it cannot use) would refuse again after each restart, so
under the launcher it marks its refusal and exits 0 instead: the group ends without restarts and the
launcher exits 2. Under a torchrun of your own (no launcher) such a rank exits 2, and that torchrun
restarts the group ``--max-restarts`` times before it gives up.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from reloop.engine.checkpoint.folder_lock import FolderInUse, FolderLock
from reloop.engine.runtime import start_gate
from reloop.engine.runtime.config import LOG_LEVELS, ConfigError, RunConfig, load_config
from reloop.engine.runtime.config_pipe import remove_dead_owners_folders, reopenable
from reloop.engine.runtime.jsonlog import setup_json_logging
from reloop.engine.runtime.state_layout import refuse_one_process_state

log = logging.getLogger("reloop.run")

# Set by the launcher for its ranks: its pid (a rank dies with it) and the folder where each rank marks
# that it stopped owing nothing: its final checkpoint saved, or stopped while its stage was still being
# built (nothing read yet). The launcher's exit code says whether a stop left every rank so.
LAUNCHER_PID = "RELOOP_TRAIN_LAUNCHER_PID"
STOPPED_MARKS = "RELOOP_TRAIN_STOPPED_MARKS"
# ... and the folder where each rank that refused to go on (exit 2) marks it before it exits 0.
REFUSED_MARKS = "RELOOP_TRAIN_REFUSED_MARKS"
# Set ("1") by ``reloop run`` for its train process: a join process shares this machine's cores.
BESIDE_JOIN = "RELOOP_TRAIN_BESIDE_JOIN"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML or TOML run config (RELOOP__* env overrides)")
    parser.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default=None, help="override log.level"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics here (default: metrics.prometheus_port; rank r of several: this + r; "
        "0: a free port, named in the log)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="data-parallel ranks on this machine, launched with torchrun (default 1: one process)",
    )


def main(args: argparse.Namespace) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank
        return _rank_exit(_main(args))
    with reopenable(args.config) as config:  # the ranks open it again: a pipe they could not
        return _main(argparse.Namespace(**{**vars(args), "config": config}))


def _rank_exit(code: int) -> int:
    """A rank's exit code for torchrun: 0 after marking a refusal (2) where the launcher collects them
    (torchrun would restart every rank into the same refusal), else ``code``."""
    marks = os.environ.get(REFUSED_MARKS)
    if code != 2 or not marks:
        return code
    _mark(marks)
    return 0


def _mark(folder: str) -> None:
    """This rank's mark in the launcher's ``folder``, made again if a /tmp cleaner took it (a launcher
    that ran for days: nothing touches the empty folder, and the rank's final checkpoint ended in
    FileNotFoundError, reported as not saved)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, f"rank-{os.environ.get('RANK', '0')}").touch()


def _marked(folder: Path) -> set[str]:
    """The ranks marked in ``folder`` (none when it is gone)."""
    return {p.name for p in folder.glob("rank-*")}


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        if args.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1 (got {args.world_size})")
        cores = len(os.sched_getaffinity(0))
        if args.world_size > cores and "TORCHELASTIC_RUN_ID" not in os.environ:
            # Each rank is a training process with its own torch threads: more ranks than cores only
            # wait for each other at every step (1,000 here took the machine, and 67 outlived a stop).
            raise ConfigError(
                f"--world-size {args.world_size} is more ranks than this machine's {cores} cores; "
                "run at most one rank per core (more ranks: more machines, with torchrun's rendezvous)"
            )
        from reloop.engine.runtime.build import check_model

        if start_gate.gated():  # backbone plugins' warnings at the check, as JSON lines like the rest
            setup_json_logging(args.log_level or cfg.log.level)
        check_model(cfg)
        refuse_one_process_state(cfg)
        if start_gate.gated():  # started by `reloop run`: it says the verdict, then opens the gate
            import reloop.engine.runtime.kafka_stages  # noqa: F401  # imported while the join process waits

            start_gate.report(None)
            if not start_gate.wait_for_go():
                return 0  # `reloop run` refused to go on (and said why)
        lock = hold_the_folder(cfg, "train") if _holds_the_folder() else None
    except (ConfigError, FolderInUse) as exc:
        if start_gate.gated():
            start_gate.report(str(exc))  # `reloop run` prints it as its own refusal
            return 2
        print(f"reloop train: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        return _train(args, cfg)
    finally:  # the process ending drops it too; called in-process (tests), a second call must get it
        if lock is not None:
            lock.release()


def _train(args: argparse.Namespace, cfg: RunConfig) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if LAUNCHER_PID in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        from reloop.engine.runtime.lifeline import die_with

        # torchrun starts its workers in sessions of their own: a SIGKILLed launcher left them training
        # next to the group a restart starts (samples trained twice, two writers of one registry).
        die_with(int(os.environ[LAUNCHER_PID]))
    if args.world_size > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        setup_json_logging(args.log_level or cfg.log.level)
        return _launch(args, cfg)
    setup_json_logging(args.log_level or cfg.log.level)
    if os.environ.get(BESIDE_JOIN) == "1" and world == 1:
        from reloop.engine.runtime.build import leave_a_core_to_join

        leave_a_core_to_join(cfg)
    from reloop.engine.runtime.kafka_stages import describe_train, train_stage_factory
    from reloop.engine.runtime.stage_runner import StopRequest, run_supervised

    port = args.metrics_port if args.metrics_port is not None else cfg.metrics.prometheus_port
    stop = StopRequest(cfg.recovery.stop_timeout_s)
    stop.stage = "train"
    stop.starting = lambda: True  # until run_supervised asks its supervisor: joining the group owes nothing
    stop.nothing_owed = _mark_stopped
    stop.install()
    group = None
    if world > 1:
        from reloop.engine.train.data_parallel import RankGroup

        group = RankGroup.start(timeout_s=cfg.distributed.timeout_s)
        port = rank_metrics_port(port, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        return run_supervised(
            "train",
            cfg,
            train_stage_factory(cfg, group),
            close=_close_and_mark,
            describe=describe_train,
            metrics_port=port,
            stop=stop,
        )
    finally:
        if group is not None:
            group.close()


def hold_the_folder(cfg: RunConfig, command: str) -> FolderLock:
    """The checkpoint folder's lock, waiting for a process that holds it to end its stop (the process of
    a restart's previous run, stopping within recovery.stop_timeout_s)."""

    def waiting(holder: str) -> None:
        print(
            f"reloop {command}: waiting for the train stage that holds checkpoint.dir {cfg.checkpoint.dir} "
            f"(pid {holder}) to end",
            file=sys.stderr,
            flush=True,
        )

    return FolderLock(Path(cfg.checkpoint.dir)).acquire(
        wait_s=cfg.recovery.stop_timeout_s + 5, on_wait=waiting
    )


def _holds_the_folder() -> bool:
    """Whether this process holds the checkpoint folder's lock (engine/checkpoint/folder_lock.py): one
    process, or the launcher of ``--world-size`` ranks; of ranks torchrun started otherwise, rank 0."""
    return LAUNCHER_PID not in os.environ and os.environ.get("RANK", "0") == "0"


def rank_metrics_port(port: int | None, local_rank: int) -> int | None:
    """Where rank ``local_rank`` of this machine serves /metrics: ``port`` + its rank; 0 (a free port,
    logged) for every rank when ``port`` is 0 (rank r bound port r: refused, or someone else's)."""
    return port + local_rank if port else port


def _close_and_mark(stage: Any) -> int | None:
    number = stage.close(final="checkpoint")
    if number is not None:
        _mark_stopped()
    return number


def stopped_before_start() -> None:
    """A SIGTERM before this process installed its stop handling (engine/runtime/cli.py): a rank owes
    nothing."""
    _mark_stopped()


def _mark_stopped() -> None:
    """This rank owes nothing (see STOPPED_MARKS); a process not started by the launcher has no folder."""
    marks = os.environ.get(STOPPED_MARKS)
    if marks:
        _mark(marks)


def _refuse_split(args: argparse.Namespace, cfg: RunConfig) -> str | None:
    """The ranks' own start-up check (engine/runtime/train_ranks.check_partition_split), made before
    torchrun starts them: refused there, torchrun would restart the group ``max_restarts`` times."""
    from reloop.engine.runtime.kafka_stages import samples_partition_count
    from reloop.engine.runtime.train_ranks import check_partition_split

    partitions = samples_partition_count(cfg)
    if partitions is None:  # no topic yet (the join stage creates it): the ranks check when it exists
        return None
    owned = [len(range(r, partitions, args.world_size)) for r in range(args.world_size)]
    try:
        check_partition_split(owned, deterministic=cfg.train.deterministic, topic=cfg.stages.samples_topic)
    except ConfigError as exc:
        return str(exc)
    return None


def _launch(args: argparse.Namespace, cfg: RunConfig) -> int:
    """torchrun (in this process) running ``--world-size`` ranks of ``reloop train``. A SIGTERM reaches
    its agent, which hands it to the ranks: they stop together with one final checkpoint."""
    refused = _refuse_split(args, cfg)
    if refused:
        print(f"reloop train: {refused}", file=sys.stderr, flush=True)
        return 2
    remove_dead_owners_folders(Path(tempfile.gettempdir()), "reloop-train")
    with tempfile.TemporaryDirectory(prefix=f"reloop-train-{os.getpid()}-") as scratch:
        os.environ[LAUNCHER_PID] = str(os.getpid())
        marks, refused = Path(scratch, "stopped"), Path(scratch, "refused")
        marks.mkdir()
        refused.mkdir()
        os.environ[STOPPED_MARKS] = str(marks)
        os.environ[REFUSED_MARKS] = str(refused)
        # The ranks' gloo sockets on loopback (they listened on every interface): all ranks are on this
        # machine. torchrun's stores are kept there by run_local.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        return _torchrun(args, cfg, Path(scratch), marks, refused)


def _torchrun(args: argparse.Namespace, cfg: RunConfig, scratch: Path, marks: Path, refused: Path) -> int:
    import signal

    from reloop.engine.runtime.local_rendezvous import NoLoopbackStore, run_local
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = [
        f"--nproc-per-node={args.world_size}",
        f"--max-restarts={cfg.distributed.max_restarts}", "--monitor-interval=1",
        "-m", "reloop.engine.runtime.cli", "train", "--config", str(args.config),
    ]  # fmt: skip
    if args.log_level:
        argv += ["--log-level", args.log_level]
    if args.metrics_port is not None:
        argv += ["--metrics-port", str(args.metrics_port)]
    try:
        run_local(scratch, argv)
    except SignalException as exc:  # the agent stopped the ranks
        owing = {f"rank-{r}" for r in range(args.world_size)} - _marked(marks)
        code = _stopped(exc.sigval in (signal.SIGTERM, signal.SIGINT), not owing)
        # The launcher's own last line, as `reloop run`'s and `serve --workers`' (the ranks' were last);
        # not "stopped", which is each rank's line with its own counts (log queries select those).
        fields = {
            "stage": "train launcher",
            "pid": os.getpid(),
            "signal": signal.Signals(exc.sigval).name,
            "ranks": args.world_size,
            "ranks_owing_a_final_checkpoint": sorted(owing),
            "exit_code": code,
        }
        log.info("launcher stopped", extra={"fields": fields})
        return code
    except NoLoopbackStore as exc:
        print(f"reloop train: {exc}", file=sys.stderr, flush=True)
        return 2
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        print(f"reloop train: ranks failed beyond distributed.max_restarts: {exc}", file=sys.stderr)
        return 2 if codes == {2} else 1  # 2: every rank refused its configuration
    return _refused(refused)


def _refused(marks: Path) -> int:
    """The launcher's exit code once every rank exited 0: 2 when some refused to go on (each marked it in
    ``marks`` and said why in its log and on stderr), else 0."""
    ranks = sorted(int(name.removeprefix("rank-")) for name in _marked(marks))
    if not ranks:
        return 0
    print(
        f"reloop train: ranks {ranks} refused to go on (exit 2; each said why above); the group was not "
        "restarted: it would refuse again",
        file=sys.stderr,
        flush=True,
    )
    return 2


def _stopped(asked: bool, final_saved: bool) -> int:
    """Exit code after torchrun's agent stopped the ranks on a signal: 0 only for a SIGTERM/SIGINT after
    which every rank owed nothing (its final checkpoint saved, or stopped before its stage started: a stop
    during start-up exited 1). A rank stuck in a collective is SIGKILLed by the agent after its shutdown
    timeout: nothing was saved since the last checkpoint, and exit 0 hid that."""
    if asked and not final_saved:
        print(
            "reloop train: the ranks were stopped before their final checkpoint (a rank did not stop within "
            "torchrun's shutdown timeout); a restart resumes from the last save",
            file=sys.stderr,
            flush=True,
        )
    return 0 if asked and final_saved else 1
