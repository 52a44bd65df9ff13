"""``reloop demo``: the whole loop, live, on a simulated world.

    reloop demo --duration 120

starts (1) a local Kafka broker (unless ``--bootstrap``), (2) one ``reloop run`` trainer process per arm,
each reading its arm's impressions and clicks topics and publishing snapshots to its own registry,
(3) the scoring service (HTTP on loopback) that hot-reloads each arm's newest snapshot and logs what it
shows, and (4) the simulator that sends page views to the service and clicks to Kafka. A rich table shows
events/s, the rolling AUC and CTR per arm and the model versions until Ctrl-C or ``--duration``; then
everything stops in order (simulator, service, trainers, broker) and a per-arm summary is printed. A
second Ctrl-C (a second or more after the first) kills the trainers still writing their final snapshots.

Before the first snapshot each arm serves an untrained model as version 0 (``cold_start``), built with the
trainer's own seed: without it the loop could not start (no snapshot without samples, no samples
without served impressions).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from reloop.engine.config_common import describe_errors, folder_arg
from reloop.engine.netaddr import bootstrap_arg
from reloop.engine.resources import ResourceError, deploy_file, in_checkout
from reloop.engine.runtime.jsonlog import setup_text_logging
from reloop.engine.runtime.signal_event import SignalSafeEvent
from reloop.engine.serve.config import SERVE_KAFKA_CLIENT, ConfigError, ServeConfig, read_yaml
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_config() -> Path:
    """deploy/config/demo.yaml of the checkout, or the copy an installed wheel ships (engine/resources.py)."""
    try:
        return deploy_file("config/demo.yaml")
    except ResourceError:
        return REPO_ROOT / "deploy" / "config" / "demo.yaml"  # reading it then fails, naming this path


DEFAULT_CONFIG = _default_config()
log = logging.getLogger(__name__)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DemoArm(_Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    weight: float = Field(default=1.0, gt=0)
    train: dict[str, Any] = Field(default_factory=dict, description="merged over `run` for this arm")
    memory: dict[str, Any] | None = Field(
        default=None,
        description="ReLoop2's error memory at serving time (serve's arms[].memory; the demo fills in "
        "samples_topic and state_file)",
    )


class DemoSection(_Frozen):
    refresh_s: float = Field(default=1.0, gt=0)
    trainer_stop_timeout_s: float = Field(default=30.0, gt=0)


class DemoConfig(_Frozen):
    salt: str = "reloop-demo"
    serve: dict[str, Any] = Field(default_factory=dict)
    arms: tuple[DemoArm, ...] = Field(min_length=1)
    run: dict[str, Any]
    simulate: dict[str, Any] = Field(default_factory=dict)
    kafka: dict[str, Any] = Field(
        default_factory=dict, description="the kafka section of reloop run and serve (config_common.py)"
    )
    demo: DemoSection = DemoSection()

    @field_validator("arms")
    @classmethod
    def _distinct_names(cls, value: tuple[DemoArm, ...]) -> tuple[DemoArm, ...]:
        names = [a.name for a in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # one folder, one set of topics and one /stats entry per name
            raise ValueError(f"arm names must differ; given more than once: {', '.join(twice)}")
        return value

    @field_validator("kafka")
    @classmethod
    def _kafka_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        from reloop.engine.config_common import KafkaSection, check_moved
        from reloop.engine.serve.config import MOVED

        check_moved({"kafka": value}, MOVED)
        # The demo's own clients are kafka-python's: settings they cannot take fail here, not after the
        # broker and the trainers started (exit 1).
        KafkaSection.model_validate(value).connection("kafka-python")
        return value

    def kafka_settings(self) -> dict[str, Any]:
        """The connection settings of the demo's own kafka-python clients (topics, clicks, read-back)."""
        from reloop.engine.config_common import KafkaSection

        return KafkaSection.model_validate(self.kafka).connection("kafka-python")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` wins; nested mappings merge key by key (lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class ArmPlan:
    """Everything one arm needs, derived from the demo config and this run's folder and broker."""

    name: str
    weight: float
    impressions_topic: str
    clicks_topic: str
    registry: Path
    run_config: dict[str, Any]
    run_config_path: Path
    log_path: Path
    memory: dict[str, Any] | None = None  # serve's arms[].memory, complete
    counters: dict[str, Any] | None = None  # serve's arms[].counters, from the arm's model.counters

    @property
    def samples_topic(self) -> str:
        return str(self.run_config["stages"]["samples_topic"])


def _fed_section(
    arm: str, section: dict[str, Any] | None, kind: type[BaseModel], what: str, topic: str, state: Path
) -> dict[str, Any] | None:
    """Serve's arms[].memory / arms[].counters: ``section`` with the arm's samples topic and a state file
    in its folder, validated here (a bad key names the arm before anything starts)."""
    if section is None:
        return None
    full = {**section, "samples_topic": topic, "state_file": str(state)}
    try:
        kind.model_validate(full)
    except ValidationError as exc:
        raise ConfigError(f"arm {arm}: bad {what}: {describe_errors(exc, model=kind)}") from exc
    return full


def trainer_env() -> dict[str, str]:
    """The environment every arm's `reloop run` gets: its ``RELOOP__`` overrides apply to the arms' run
    configs (checked before the start with these), but not a ``RELOOP__KAFKA__BOOTSTRAP``: the broker is
    the demo's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("RELOOP__KAFKA__BOOTSTRAP", None)
    return env


# What the demo sets for each arm (its own topics, consumer groups and folder). A RELOOP__ variable
# setting one reached every arm's trainer over the demo's value: two trainers on one folder or one
# samples topic.
_ARM_KEYS = (
    ("source", "impressions_topic"),
    ("source", "clicks_topic"),
    ("consumer", "group_id"),
    ("sink", "dead_letter_topic"),
    ("stages", "samples_topic"),
    ("stages", "join_group_id"),
    ("stages", "processes"),
    ("checkpoint", "dir"),
)


def _env_over_arm_keys(env: dict[str, str]) -> None:
    from reloop.engine.config_common import SERVE_ONLY_SECTIONS, env_values
    from reloop.engine.runtime.config import ConfigError as RunConfigError
    from reloop.engine.runtime.config import RunConfig

    try:
        over = env_values(RunConfig, env, others=SERVE_ONLY_SECTIONS)
    except RunConfigError as exc:
        raise ConfigError(str(exc)) from exc
    for section, key in _ARM_KEYS:
        if key in (over.get(section) or {}):
            raise ConfigError(
                f"environment variable RELOOP__{section.upper()}__{key.upper()} (or RELOOP__"
                f"{section.upper()}) sets {section}.{key}, which the demo sets for each arm: unset it"
            )


def _metrics_ports_shared(plans: list[ArmPlan], env: dict[str, str]) -> None:
    """Two arms whose trainers would serve /metrics on one port: the second exited at its start."""
    from reloop.engine.runtime.config import load_config_dict

    arms_on: dict[int, list[str]] = {}
    for plan in plans:
        port = load_config_dict(plan.run_config, env=env).metrics.prometheus_port
        if port:  # None: no /metrics; 0: a free port
            arms_on.setdefault(port, []).append(plan.name)
    for port, arms in arms_on.items():
        if len(arms) > 1:
            raise ConfigError(
                f"arms {', '.join(arms)} would all serve /metrics on port {port} "
                "(metrics.prometheus_port): give each arm its own in arms[].train.metrics, or 0 for a "
                "free one"
            )


def _plans_problem(config: DemoConfig, workdir: Path, run_id: str) -> str | None:
    """Why an arm could not be planned or its trainer's model built (as ``reloop run`` checks it), or
    None: the arms' run configs, planned with a stand-in broker address (only the address differs)."""
    from reloop.engine.runtime.build import check_model
    from reloop.engine.runtime.config import ConfigError as RunConfigError
    from reloop.engine.runtime.config import load_config_dict

    try:
        plans = plan_arms(config, workdir=workdir, bootstrap="127.0.0.1:9092", run_id=run_id)
        for plan in plans:
            try:
                check_model(load_config_dict(plan.run_config, env=trainer_env()))
            except RunConfigError as exc:
                raise ConfigError(f"arm {plan.name}: bad run config: {exc}") from exc
        serve_config_for(config, plans, "127.0.0.1:9092")
    except ConfigError as exc:
        return str(exc)
    return None


def plan_arms(config: DemoConfig, *, workdir: Path, bootstrap: str, run_id: str) -> list[ArmPlan]:
    """Per-arm topics, folders and validated `reloop run` configs (a bad key fails here, before any start)."""
    from reloop.engine.runtime.config import ConfigError as RunConfigError
    from reloop.engine.runtime.config import load_config_dict, load_feature_spec

    env = trainer_env()
    _env_over_arm_keys(env)
    plans = []
    for arm in config.arms:
        folder = workdir / arm.name
        impressions, clicks = f"demo-{run_id}.impressions.{arm.name}", f"demo-{run_id}.clicks.{arm.name}"
        run = deep_merge(config.run, arm.train)
        run = deep_merge(
            run,
            {
                "kafka": {**config.kafka, "bootstrap": bootstrap},
                "source": {"impressions_topic": impressions, "clicks_topic": clicks},
                "consumer": {"group_id": f"reloop-demo-{run_id}-{arm.name}"},
                "sink": {"dead_letter_topic": f"demo-{run_id}.deadletter.{arm.name}"},
                # One process per arm (both stages in it): three arms, a service, a simulator and a
                # broker already share this machine's cores.
                "stages": {
                    "samples_topic": f"demo-{run_id}.samples.{arm.name}",
                    "join_group_id": f"reloop-demo-{run_id}-{arm.name}-join",
                    "processes": 1,
                },
                "checkpoint": {"dir": str(folder / "snapshots")},
            },
        )
        try:
            # The spec too: counters of a field it lacks fail here, not in a trainer after the start.
            load_feature_spec(load_config_dict(run, env=env).model)
        except RunConfigError as exc:
            raise ConfigError(f"arm {arm.name}: bad run config: {exc}") from exc
        from reloop.engine.serve.config import ArmCountersConfig, ArmMemoryConfig

        topic = run["stages"]["samples_topic"]
        memory = _fed_section(
            arm.name, arm.memory, ArmMemoryConfig, "memory section", topic, folder / "memory.npz"
        )
        # The service counts what the trainer's model.counters says: one setting, in the run config.
        counted = (run.get("model") or {}).get("counters")
        counters = _fed_section(
            arm.name, counted, ArmCountersConfig, "model.counters", topic, folder / "counters.npz"
        )
        plans.append(
            ArmPlan(
                name=arm.name,
                weight=arm.weight,
                impressions_topic=impressions,
                clicks_topic=clicks,
                registry=folder / "snapshots",
                run_config=run,
                run_config_path=folder / "run.yaml",
                log_path=folder / "trainer.log",
                memory=memory,
                counters=counters,
            )
        )
    _metrics_ports_shared(plans, env)
    return plans


def serve_config_for(config: DemoConfig, plans: list[ArmPlan], bootstrap: str) -> ServeConfig:
    arms = []
    for plan in plans:
        model = plan.run_config["model"]
        arms.append(
            {
                "name": plan.name,
                "weight": plan.weight,
                "registry": str(plan.registry),
                "impressions_topic": plan.impressions_topic,
                "clicks_topic": plan.clicks_topic,
                "cold_start": {
                    "backbone": model["backbone"],
                    "spec": model["spec"],
                    "seed": model.get("seed", 0),
                    "params": model.get("params") or {},
                },
                **({"memory": plan.memory} if plan.memory is not None else {}),
                **({"counters": plan.counters} if plan.counters is not None else {}),
            }
        )
    data = {
        "port": 0,  # a free port, printed at the start, unless the serve section names one
        **config.serve,
        "salt": config.salt,
        "arms": arms,
        "kafka": {"client": SERVE_KAFKA_CLIENT, **config.kafka, "bootstrap": bootstrap},
    }
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"bad serve section: {describe_errors(exc, model=ServeConfig)}") from exc


class TrainerProcess:
    """One `reloop run` per arm, in its own session so a terminal Ctrl-C reaches only the demo, which
    then stops the trainers in order (SIGTERM: final snapshot, clean exit)."""

    def __init__(self, plan: ArmPlan) -> None:
        self.plan = plan
        plan.run_config_path.parent.mkdir(parents=True, exist_ok=True)
        plan.run_config_path.write_text(yaml.safe_dump(plan.run_config, sort_keys=False))
        self._log = open(plan.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self._asked = False
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reloop.engine.runtime.cli", "run", "--config", str(plan.run_config_path)],
            cwd=REPO_ROOT if in_checkout() else None,  # installed: the demo's own working folder
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=trainer_env(),
            start_new_session=True,
        )

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def ask_to_stop(self) -> None:
        """SIGTERM (its final snapshot), once: a second one is `reloop run`'s "exit at once" (-15, no final
        snapshot); ``stop`` waits for it."""
        if self.proc.poll() is None and not self._asked:
            self._asked = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float, hurry: threading.Event | None = None) -> int | None:
        """Stopped (SIGTERM, then SIGKILL after ``timeout_s`` or once ``hurry`` is set); its exit code."""
        self.ask_to_stop()
        deadline = time.monotonic() + timeout_s
        why = ""
        while self.proc.poll() is None and not why:
            if hurry is not None and hurry.is_set():
                why = "a second signal"
            elif time.monotonic() >= deadline:
                why = f"it did not stop in {timeout_s:.0f} s"
            else:
                time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
            if self.proc.returncode == -signal.SIGKILL:  # not one that ended on its own meanwhile
                log.warning("trainer %s killed (%s): no final snapshot", self.plan.name, why)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.plan.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_broker(broker, attempts: int = 3) -> str:
    """Start the local broker, retrying: a random cluster id that starts with '-' makes Kafka's
    storage tool misread it as an option (about 1 start in 64; connectors/kafka/local_broker.py)."""
    from reloop.connectors.kafka.local_broker import BrokerError

    for attempt in range(attempts):
        try:
            return broker.start().bootstrap
        except BrokerError as exc:
            if attempt == attempts - 1 or "formatting storage failed" not in str(exc):
                raise
            log.warning("broker start failed (%s); retrying with a new cluster id", str(exc).splitlines()[0])
    raise AssertionError("unreachable")


def _count_logged(
    console: Console, bootstrap: str | None, trainers: dict[str, TrainerProcess], settings: dict
):
    """Read each arm's impressions and clicks back from Kafka (what a real site could measure)."""
    from concurrent.futures import ThreadPoolExecutor

    from reloop.connectors.kafka.source import KafkaSource
    from reloop.engine.simulate.logged import count_logged

    if bootstrap is None:
        return {}
    console.print("reading the arms' impressions and clicks back from Kafka ...")

    def count(trainer: TrainerProcess) -> Any:
        topics = (trainer.plan.impressions_topic, trainer.plan.clicks_topic)
        return count_logged(
            *(KafkaSource(bootstrap=bootstrap, topics=[t], client_config=settings) for t in topics)
        )

    out = {}
    # The arms at once: one after another, each client's connection and metadata made it seconds each.
    with ThreadPoolExecutor(max_workers=len(trainers) or 1, thread_name_prefix="count-logged") as pool:
        counting = {name: pool.submit(count, trainer) for name, trainer in trainers.items()}
        for name, future in counting.items():
            try:
                out[name] = future.result()
            except Exception as exc:  # noqa: BLE001 - the summary goes on without this line
                console.print(f"[yellow]reading the logs of arm {name} back failed: {exc!r}[/]")
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    from reloop.engine.config_common import positive_float

    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo YAML (default: %(default)s)")
    parser.add_argument("--duration", type=positive_float, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument(
        "--bootstrap", type=bootstrap_arg, help="use this Kafka broker instead of starting a local one"
    )
    parser.add_argument(
        "--workdir",
        type=folder_arg,
        help="folder for snapshots, logs and the broker (default: a new temp folder); a folder another "
        "demo runs in, or a previous run used, is refused",
    )
    parser.add_argument("--rate", type=positive_float, help="override simulate.rate (requests/s)")
    parser.add_argument(
        "--no-live", action="store_true", help="print a status line every 10 s instead of a live table"
    )


def _json_default(x: object) -> object:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON: {type(x).__name__}")


def write_summary(path: Path, summary: dict) -> None:
    """``summary`` as JSON, an undefined value (an AUC without clicks: NaN) as null: json wrote NaN,
    which is not JSON, and strict readers (jq, JSON.parse, orjson) refused the whole file."""
    # NON_STR_KEYS: the versions are int keys, written as strings as json wrote them
    options = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    path.write_bytes(orjson.dumps(summary, default=_json_default, option=options))


def _fmt(x: float | int | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


class Dashboard:
    """The live view: rates from deltas between refreshes, per-arm quality from the simulator's truth."""

    def __init__(
        self, *, stack, sim, trainers: dict[str, TrainerProcess], registries, duration: float | None
    ):
        self.stack = stack
        self.sim = sim
        self.trainers = trainers
        self.registries = registries
        self.duration = duration
        self.start = time.monotonic()
        self._last = (self.start, 0, 0, 0)
        self.rates = (0.0, 0.0, 0.0)
        self.auc_history: dict[str, list[tuple[float, float]]] = {name: [] for name in trainers}

    def sample(self) -> None:
        now = time.monotonic()
        stats = self.sim.stats
        with stats.lock:
            requests = sum(a.requests for a in stats.arms.values())
            impressions = sum(a.impressions for a in stats.arms.values())
            clicks = stats.clicks_sent
            for name, arm in stats.arms.items():
                auc = arm.rolling_auc()
                if not math.isnan(auc):
                    self.auc_history.setdefault(name, []).append((now - self.start, auc))
        t0, r0, i0, c0 = self._last
        dt = max(now - t0, 1e-6)
        self.rates = ((requests - r0) / dt, (impressions - i0) / dt, (clicks - c0) / dt)
        self._last = (now, requests, impressions, clicks)

    def render(self) -> Group:
        elapsed = time.monotonic() - self.start
        req_s, imp_s, clk_s = self.rates
        until = f" / {self.duration:.0f} s" if self.duration else " (Ctrl-C to stop)"
        header = Text(
            f"reloop demo  {elapsed:5.0f} s{until}   requests/s {req_s:6.1f}   impressions/s {imp_s:7.1f}   "
            f"clicks/s {clk_s:6.1f}   not-ready {self.sim.stats.not_ready}   errors {self.sim.stats.errors}",
            style="bold",
        )
        table = Table(expand=False)
        for col in (
            "arm",
            "trainer",
            "snapshot",
            "serving v",
            "impressions",
            "logged",
            "dropped",
            "rolling AUC",
            "AUC 30 s ago",
            "rolling true CTR",
            "rolling click CTR",
        ):
            table.add_column(col, justify="left" if col in ("arm", "trainer") else "right")
        stats = self.sim.stats
        for name, trainer in self.trainers.items():
            rc = trainer.returncode
            state = "[green]running[/]" if rc is None else f"[red]exited {rc}[/]"
            runtime = self.stack.arms[name]
            logger = runtime.logger
            with stats.lock:
                arm = stats.arms.get(name)
                auc = arm.rolling_auc() if arm else math.nan
                true_ctr = arm.rolling_true_ctr() if arm else math.nan
                click_ctr = arm.rolling.calibration.observed_ctr if arm and len(arm.rolling) else math.nan
                impressions = arm.impressions if arm else 0
            past = [a for t, a in self.auc_history.get(name, []) if t <= elapsed - 30]
            table.add_row(
                name,
                state,
                _fmt(self.registries[name].latest_version()),
                _fmt(runtime.holder.version),
                _fmt(impressions),
                _fmt(logger.sent if logger else None),
                _fmt(logger.dropped if logger else None),
                _fmt(auc),
                _fmt(past[-1] if past else None),
                _fmt(true_ctr),
                _fmt(click_ctr),
            )
        return Group(header, table)

    def status_line(self) -> str:
        parts = []
        for name in self.trainers:
            with self.sim.stats.lock:
                arm = self.sim.stats.arms.get(name)
                auc = arm.rolling_auc() if arm else math.nan
            parts.append(f"{name}: v{self.stack.arms[name].holder.version} auc {_fmt(auc)}")
        return f"[{time.monotonic() - self.start:5.0f} s] req/s {self.rates[0]:.1f}  " + "  ".join(parts)


def _memory_written(stack: Any, name: str) -> int | None:
    """Joined samples written into the arm's error memory (None: the arm has none)."""
    memory = stack.arms[name].memory
    return None if memory is None else int(memory.written)


def _clicks_counted(stack: Any, name: str) -> int | None:
    """Clicks the arm's counters have read from its samples topic (None: the arm has none)."""
    counters = stack.arms[name].counters
    return None if counters is None else int(counters.written)


def summary_dict(
    *, sim, stack, trainers, registries, sim_config, trainer_rcs, logged, run_id
) -> dict[str, Any]:
    """The summary as data (written to <workdir>/summary.json for scripts and tests)."""
    from reloop.engine.simulate.stats import ab_minus_aa, ab_plan, ab_report

    arms = {}
    for name in trainers:
        with sim.stats.lock:
            arm = sim.stats.arms.get(name)
            truth = arm.summary() if arm else {}
        logger = stack.arms[name].logger
        arms[name] = {
            **truth,
            "snapshots_published": registries[name].latest_version() if name in registries else None,
            "serving_version": stack.arms[name].holder.version,
            "memory_written": _memory_written(stack, name),
            "counters_clicks": _clicks_counted(stack, name),
            "impressions_logged": logger.sent if logger else None,
            "impressions_dropped": logger.dropped if logger else None,
            "trainer_exit": trainer_rcs.get(name),
            "logged_impressions": logged[name].impressions if name in logged else None,
            "logged_clicked": logged[name].clicked if name in logged else None,
            "logged_ctr": logged[name].ctr if name in logged else None,
            "impressions_topic": trainers[name].plan.impressions_topic,
            "clicks_topic": trainers[name].plan.clicks_topic,
        }
    report = sim_config.report
    ab = {}
    if report.treatment and report.control:
        with sim.stats.lock:
            ab = ab_report(sim.stats, treatment=report.treatment, control=report.control, aa=report.aa)
            plan = ab_plan(sim.stats, treatment=report.treatment, control=report.control, aa=report.aa)
            ab.update({f"clicks_plan_{k}": v for k, v in plan.items()})  # how long to separate the arms
        logged_ctr = {name: c.ctr for name, c in logged.items()}
        for key, value in ab_minus_aa(
            logged_ctr, treatment=report.treatment, control=report.control, aa=report.aa
        ).items():
            ab[f"{key}_logged"] = value
    s = sim.stats
    return {
        "run_id": run_id,
        "arms": arms,
        "ab": ab,
        "clicks_sent": s.clicks_sent,
        "clicks_beyond_window": s.clicks_late,
        "clicks_pending_at_end": s.clicks_pending_at_end,
        "not_ready": s.not_ready,
        "failed_requests": s.errors,
    }


def print_summary(
    console: Console, *, sim, stack, trainers, registries, sim_config, trainer_rcs, logged
) -> None:
    from reloop.engine.simulate.report import ab_lines, arms_table, versions_table

    console.rule("reloop demo: summary")
    console.print(
        arms_table(sim.stats, title="per arm (truth from the simulator)", serving=stack.service.versions())
    )
    for name in trainers:
        if name in sim.stats.arms:
            console.print(versions_table(sim.stats, name))
    rows = Table(title="per arm: model versions and logging")
    for col in (
        "arm",
        "snapshots published",
        "served versions",
        "AUC first version",
        "AUC last 3 versions",
        "impressions logged",
        "dropped",
        "memory samples",
        "clicks counted",
        "trainer exit",
    ):
        rows.add_column(col, justify="left" if col == "arm" else "right")
    for name in trainers:
        with sim.stats.lock:
            arm = sim.stats.arms.get(name)
            summary = arm.summary() if arm else None
        logger = stack.arms[name].logger
        first_auc = last_auc = math.nan
        served = "-"
        if summary:
            versions = summary["versions"]
            keys = sorted(versions)
            served = f"{keys[0]}..{keys[-1]} ({len(keys)})"
            first_auc = versions[keys[0]]["auc"]
            # Versions without an AUC (no click, or no non-click, yet) stay out of the weights too: counted
            # in, they pulled the mean toward 0 (0.000 when none had one).
            tail = [versions[k] for k in keys[-3:] if not math.isnan(versions[k]["auc"])]
            n = sum(v["impressions"] for v in tail)
            last_auc = sum(v["auc"] * v["impressions"] for v in tail) / n if n else math.nan
        rows.add_row(
            name,
            _fmt(registries[name].latest_version()),
            served,
            _fmt(first_auc),
            _fmt(last_auc),
            _fmt(logger.sent if logger else None),
            _fmt(logger.dropped if logger else None),
            _fmt(_memory_written(stack, name)),
            _fmt(_clicks_counted(stack, name)),
            _fmt(trainer_rcs[name]),
        )
    console.print(rows)
    for line in ab_lines(sim.stats, sim_config.report):
        console.print(line)
    report = sim_config.report
    for name, runtime in stack.arms.items():
        served_with = runtime.memory is not None or runtime.counters is not None
        if served_with and report.control and name != report.control:
            # An arm served with ReLoop2's error memory or counters, read out against the same control.
            for line in ab_lines(sim.stats, report.model_copy(update={"treatment": name})):
                console.print(line)
    if logged and report.treatment and report.control:
        from reloop.engine.simulate.stats import ab_minus_aa

        ctr = {name: c.ctr for name, c in logged.items()}
        rep = ab_minus_aa(ctr, treatment=report.treatment, control=report.control, aa=report.aa)
        line = (
            "A/B lift from the Kafka logs (clicked / logged impressions): "
            + ", ".join(f"{n} {c.clicked}/{c.impressions} = {c.ctr:.4f}" for n, c in logged.items())
            + f"; A/B {rep.get('ab_lift', math.nan):+.2%}"
        )
        if "aa_lift" in rep:
            line += f", A/A {rep['aa_lift']:+.2%}, A/B minus A/A {rep['ab_minus_aa']:+.2%}"
        console.print(line)
    s = sim.stats
    console.print(
        f"clicks sent {s.clicks_sent} (beyond the attribution window: {s.clicks_late}, not yet due at stop: "
        f"{s.clicks_pending_at_end}); requests not ready {s.not_ready}, failed {s.errors}"
    )


#: The modules of optional extras that the demo's later steps import (engine/runtime/cli.py EXTRAS): rich
#: (the tables), httpx (the simulator's HTTP client), fastapi and uvicorn (the scoring service, [serve],
#: which [demo] brings). httptools and uvloop are left out: the service runs without them.
EXTRA_MODULES = ("rich", "httpx", "fastapi", "uvicorn")


def check_extras() -> None:
    """Import each of ``EXTRA_MODULES`` before any work: a missing one raises ModuleNotFoundError, which
    ``reloop`` (engine/runtime/cli.py) answers with the extra to install and exit 2. Found only when the
    service or the simulator was built, it came after the broker and the trainers had started, as
    "reloop demo failed: ModuleNotFoundError(...)" without the extra."""
    import importlib

    for name in EXTRA_MODULES:
        importlib.import_module(name)


def claim_workdir(workdir: Path, config: DemoConfig) -> int | str:
    """A lock on ``workdir`` held while the demo runs (an open file descriptor, closed at the end), or why
    the demo cannot run there: another demo runs in it (its trainers waited on the first's checkpoint
    folders and the service served its snapshots), or a previous run left its arms' folders (its
    snapshots name that run's topics: every trainer failed to resume them, in a loop, while the demo
    showed them running)."""
    import fcntl

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / ".demo.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        return f"--workdir {workdir} is in use by another demo (pid {holder}): give each demo its own folder"
    used = [a.name for a in config.arms if (workdir / a.name).exists()]
    if used or (workdir / "summary.json").exists():
        os.close(fd)
        what = f"its arm folder(s) {', '.join(used)}" if used else "its summary.json"
        return (
            f"--workdir {workdir} holds a previous demo run ({what}): a new run has new topics, so its "
            "trainers could not go on from those snapshots; give a new folder, or remove that one"
        )
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def main(args: argparse.Namespace) -> int:
    held: list[int] = []  # the workdir's lock, released at the end (also when called in-process)
    try:
        return _demo(args, held)
    finally:
        for fd in held:
            os.close(fd)


def _broker_problem(config: DemoConfig, bootstrap: str) -> str | None:
    """Why the ``--bootstrap`` broker cannot be used, said at once (it was 34 s of client errors, then a
    timeout's repr); None when it answers, or when a TCP probe would not tell (TLS, SASL)."""
    from reloop.connectors.kafka.client_start import unreachable

    if str(config.kafka.get("security_protocol", "PLAINTEXT")).upper() != "PLAINTEXT":
        return None
    why = unreachable(bootstrap, timeout_s=3.0)
    if why is None:
        return None
    return (
        f"no Kafka broker answers at {bootstrap} ({why}): start one (reloop kafka up), or leave out "
        "--bootstrap and the demo starts its own"
    )


def _demo(args: argparse.Namespace, held: list[int]) -> int:  # noqa: C901 - one linear start/stop sequence
    check_extras()
    setup_text_logging(logging.WARNING)
    # Piped output (CI logs) gets a wide console so the tables stay readable.
    console = Console() if Console().is_terminal else Console(width=160)
    try:
        doc = read_yaml(args.config)
        config = DemoConfig.model_validate(doc)
        from reloop.engine.simulate.config import simulate_config_from_dict

        sim_config = simulate_config_from_dict(doc)
    except (ConfigError, ValidationError) as exc:
        why = describe_errors(exc) if isinstance(exc, ValidationError) else exc
        print(f"reloop demo: bad config {args.config}: {why}", file=sys.stderr)
        return 2
    run_id = uuid.uuid4().hex[:8]
    stand_in = Path(tempfile.gettempdir()) / f"reloop-demo-{run_id}"  # the folder made below, if none given
    problem = _plans_problem(config, Path(args.workdir) if args.workdir else stand_in, run_id)
    if problem:  # before the broker: they failed 30 s later, as a Kafka timeout (exit 1)
        where = "" if problem.startswith("environment variable") else f"bad config {args.config}: "
        print(f"reloop demo: {where}{problem}", file=sys.stderr)
        return 2
    if args.bootstrap:
        problem = _broker_problem(config, args.bootstrap)
        if problem:
            print(f"reloop demo: {problem}", file=sys.stderr)
            return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="reloop-demo-"))
    claimed = claim_workdir(workdir, config)
    if isinstance(claimed, str):
        print(f"reloop demo: {claimed}", file=sys.stderr)
        return 2
    held.append(claimed)
    stop, hurry = SignalSafeEvent(), SignalSafeEvent()  # set by on_signal (signal_event.py)
    signalled: list[float] = []

    def on_signal(signum: int, _frame: object) -> None:
        # The first stops everything in order (trainers write their final snapshots); a second one, as
        # `reloop run` takes it, ends the wait: the trainers still running are killed. One within a
        # second of the first is the same stop (a double tap), as `reloop run` counts it.
        now = time.monotonic()
        if signalled and now - signalled[0] < 1.0:
            return
        if stop.is_set() and not hurry.is_set():
            hurry.set()
            print("reloop demo: second signal: killing what is still running", file=sys.stderr, flush=True)
        signalled.append(now)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    broker = None
    stack = None
    sim = None
    scorer = None
    sim_thread = None
    trainers: dict[str, TrainerProcess] = {}
    trainer_rcs: dict[str, int | None] = {}
    registries: dict = {}
    failed: list[str] = []
    logged: dict = {}
    bootstrap = None
    exit_code = 0
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            from reloop.connectors.kafka.local_broker import LocalBroker

            console.print(f"starting a local Kafka broker (state in {workdir / 'kafka'}) ...")
            broker = LocalBroker(workdir / "kafka")
            bootstrap = start_broker(broker)
        console.print(f"Kafka at {bootstrap}; run folder {workdir}")
        plans = plan_arms(config, workdir=workdir, bootstrap=bootstrap, run_id=run_id)
        from reloop.connectors.kafka.admin import create_topics

        topics = {
            t: 1
            for p in plans
            for t in (p.impressions_topic, p.clicks_topic, p.run_config["sink"]["dead_letter_topic"])
        }
        # The samples topic of an arm with a memory or counters exists before the service's feed reads it.
        topics.update({p.samples_topic: 1 for p in plans if (p.memory or p.counters) is not None})
        create_topics(bootstrap, topics, client_config=config.kafka_settings())
        if stop.is_set():  # Ctrl-C while the broker started: start no trainer only to stop it at once
            raise RuntimeError("stopped while starting")
        for plan in plans:
            trainers[plan.name] = TrainerProcess(plan)
        console.print(f"trainers started: {', '.join(trainers)} (logs: {workdir}/<arm>/trainer.log)")

        from reloop.engine.checkpoint.registry import SnapshotRegistry
        from reloop.engine.serve.stack import ServingStack
        from reloop.engine.simulate.cli import build_simulator, kafka_click_sinks, wait_ready
        from reloop.engine.simulate.http import HttpScorer

        stack = ServingStack(serve_config_for(config, plans, bootstrap)).start()
        url = stack.serve_in_thread()
        registries = {p.name: SnapshotRegistry(p.registry) for p in plans}
        console.print(f"scoring service at {url} (GET /stats, /metrics)")
        scorer = HttpScorer(url)
        if not wait_ready(scorer, 60, stop):  # Ctrl-C ends the wait (it sat out the 60 s)
            raise RuntimeError(
                "stopped while starting" if stop.is_set() else "the scoring service did not become ready"
            )
        sim = build_simulator(
            sim_config,
            score=scorer,
            click_sink=kafka_click_sinks(
                bootstrap, {p.name: p.clicks_topic for p in plans}, config.kafka_settings()
            ),
        )
        rate = args.rate or sim_config.rate
        sim_thread = threading.Thread(
            target=sim.run,
            kwargs={"rate": rate, "stop": stop, "concurrency": sim_config.concurrency},
            name="simulator",
            daemon=True,
        )
        sim_thread.start()

        dash = Dashboard(
            stack=stack, sim=sim, trainers=trainers, registries=registries, duration=args.duration
        )
        deadline = None if args.duration is None else time.monotonic() + args.duration
        refresh = config.demo.refresh_s

        def tick() -> bool:
            stop.wait(refresh)
            dash.sample()
            if not sim_thread.is_alive() and not stop.is_set():
                console.print("[red]the simulator stopped unexpectedly (see the traceback above)[/]")
                failed.append("simulator")
                return False
            dead = [n for n, t in trainers.items() if t.returncode is not None]
            if dead:
                console.print(f"[red]trainer(s) exited early: {dead}[/]")
                for n in dead:
                    console.print(f"--- {n} trainer log (tail) ---\n{trainers[n].log_tail()}")
                return False
            return not stop.is_set() and (deadline is None or time.monotonic() < deadline)

        if args.no_live or not console.is_terminal:
            last_line = 0.0
            while tick():
                if time.monotonic() - last_line >= 10:
                    console.print(dash.status_line())
                    last_line = time.monotonic()
            console.print(dash.render())
        else:
            with Live(dash.render(), console=console, refresh_per_second=4) as live:
                while tick():
                    live.update(dash.render())
        if failed or any(t.returncode is not None for t in trainers.values()):
            exit_code = 1
    except Exception as exc:  # noqa: BLE001 - report, then still stop everything below
        console.print(f"[red]reloop demo failed: {exc!r}[/]")
        exit_code = 1
    finally:
        stop.set()
        started = (("simulator", sim_thread), ("service", stack), ("trainers", trainers), ("broker", broker))
        again = " (Ctrl-C again to kill what is still running)" if trainers or broker is not None else ""
        running = ", ".join(n for n, part in started if part) or "nothing started"
        console.print(f"stopping: {running} ...{again}")
        if sim_thread is not None:
            deadline = time.monotonic() + 15
            while sim_thread.is_alive() and not hurry.is_set() and time.monotonic() < deadline:
                sim_thread.join(0.1)
        if sim is not None:
            try:
                sim.close()
            except Exception as exc:  # noqa: BLE001 - a broker problem at exit must not hide the summary
                console.print(f"[yellow]flushing clicks failed: {exc!r}[/]")
        if scorer is not None:
            scorer.close()
        if stack is not None:
            stack.close()
        for trainer in trainers.values():  # all at once: each writes its final snapshot meanwhile
            trainer.ask_to_stop()
        for name, trainer in trainers.items():
            trainer_rcs[name] = trainer.stop(config.demo.trainer_stop_timeout_s, hurry)
        if trainers and exit_code == 0 and not hurry.is_set():
            logged = _count_logged(console, bootstrap, trainers, config.kafka_settings())
        if broker is not None:
            broker.stop(timeout_s=1.0 if hurry.is_set() else 30.0)  # then SIGKILL
    if sim is not None and stack is not None:
        parts = {
            "sim": sim,
            "stack": stack,
            "trainers": trainers,
            "registries": registries,
            "sim_config": sim_config,
            "trainer_rcs": trainer_rcs,
            "logged": logged,
        }
        print_summary(console, **parts)
        summary = summary_dict(**parts, run_id=run_id)
        write_summary(workdir / "summary.json", summary)
    if sim is not None and exit_code == 0 and not any(a.impressions for a in sim.stats.arms.values()):
        console.print("[red]no impression was served: the loop did not run[/]")
        exit_code = 1
    bad = {n: rc for n, rc in trainer_rcs.items() if rc not in (0, None)}
    if bad:
        console.print(f"[red]trainers ended with errors: {bad}[/] (logs under {workdir})")
        exit_code = exit_code or 1
    summarised = sim is not None and stack is not None
    written = " (summary.json, <arm>/snapshots, <arm>/trainer.log)" if summarised else ""
    console.print(f"run folder: {workdir}{written}")
    return exit_code
