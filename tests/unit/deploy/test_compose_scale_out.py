"""deploy/compose.scale-out.yaml over deploy/compose.yaml (docs/scale-out.md), without a Docker engine:
both files are read with a YAML loader that knows Compose's ``!override`` / ``!reset`` tags and merged by
the Compose specification's rules (mappings key by key, ``command`` / ``entrypoint`` / ``healthcheck.test``
replaced, ``volumes`` / ``configs`` / ``secrets`` unique by target, ``environment`` and ``depends_on`` as
mappings, other sequences appended). The merged project is then held to what the processes do: the join
and train services run ``reloop join`` / ``reloop train --world-size M`` on the mounted config (parsed by
the subcommands' own parsers), with compose.yaml's hardening; the topics' partitions suit K joiners and M
ranks; the processor is off unless its profile is asked for; Prometheus scrapes the ports the processes
serve on (the engine's config loader with each service's RELOOP__* environment); stops outlast the final
checkpoint (torchrun's own launch config)."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from reloop.engine.runtime import cli
from reloop.engine.runtime.config import ConfigError, RunConfig, load_config_dict

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
SCALED = ("join", "train")


# ------------------------------------------------------------------------------ Compose's merge
class Override:
    """A value tagged ``!override``: it replaces the base file's value instead of merging with it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Reset:
    """A value tagged ``!reset``: the base file's value is removed."""


class ComposeLoader(yaml.SafeLoader):
    """yaml.SafeLoader plus Compose's merge tags (``<<`` merge keys and anchors are YAML's own)."""


def _override(loader: ComposeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!override", _override)
ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def _plain(value: Any) -> Any:
    """``value`` with the tags resolved (what a file that merges into nothing means)."""
    if isinstance(value, Override):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [_plain(v) for v in value if not isinstance(v, Reset)]
    return value


def _as_mapping(value: Any, default: Any) -> dict:
    """environment / depends_on / labels: the list form as the mapping Compose makes of it."""
    if isinstance(value, dict):
        return value
    out = {}
    for item in value or []:
        key, sep, val = str(item).partition("=")
        out[key] = val if sep else default
    return out


def _target(entry: Any) -> str:
    """The unique key of a volumes / configs / secrets entry: its target (short volume syntax
    ``source:target[:mode]``; a config or secret without a target is mounted at /<source>)."""
    if isinstance(entry, dict):
        return str(entry.get("target") or f"/{entry['source']}")
    parts = str(entry).split(":")
    return parts[1] if len(parts) > 1 else (parts[0] if parts[0].startswith("/") else f"/{parts[0]}")


REPLACED = {"command", "entrypoint"}
UNIQUE_BY_TARGET = {"volumes", "configs", "secrets"}
AS_MAPPING = {"environment": None, "labels": "", "depends_on": {"condition": "service_started"}}


def merge(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """``over`` (an override file's value at ``path``) merged into ``base`` the way Compose does."""
    if isinstance(over, Override):
        return _plain(over.value)
    in_service = len(path) == 3 and path[0] == "services"
    key = path[-1] if path else ""
    if (in_service and key in REPLACED) or (
        len(path) == 4 and path[0] == "services" and path[2:] == ("healthcheck", "test")
    ):
        return _plain(over)
    if in_service and key in AS_MAPPING:
        default = AS_MAPPING[key]
        return merge(_as_mapping(base, default), _as_mapping(over, default), (*path, "*"))
    if in_service and key in UNIQUE_BY_TARGET and isinstance(base, list) and isinstance(over, list):
        entries = {_target(e): e for e in base}
        for e in over:
            old = entries.get(_target(e))
            entries[_target(e)] = merge(old, e, (*path, "*")) if isinstance(old, dict) else _plain(e)
        return list(entries.values())
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, (*path, k))
            else:
                out[k] = _plain(v)
        return out
    if isinstance(base, list) and isinstance(over, list):
        return base + [v for v in _plain(over) if v not in base]
    return _plain(over)


def test_the_merge_follows_the_compose_rules() -> None:
    base = load_compose_text(
        """
        services:
          a:
            command: [x, y]
            dns: [1.1.1.1]
            environment: [A=1, B=2]
            depends_on: [b]
            volumes: ["v:/data", "./f:/etc/f:ro"]
            healthcheck: {test: [CMD, old], interval: 5s}
        """
    )
    over = load_compose_text(
        """
        services:
          a:
            command: [z]
            dns: [8.8.8.8]
            environment: {B: "3"}
            depends_on: !override [c]
            volumes: ["./g:/etc/f:ro"]
            healthcheck: {test: [CMD, new]}
            ports: !reset []
        """
    )
    (a,) = merge(base, over)["services"].values()
    assert a["command"] == ["z"] and a["dns"] == ["1.1.1.1", "8.8.8.8"]
    assert a["environment"] == {"A": "1", "B": "3"}
    assert a["depends_on"] == ["c"]  # replaced, not {b, c}
    assert a["volumes"] == ["v:/data", "./g:/etc/f:ro"]  # the same target: replaced
    assert a["healthcheck"] == {"test": ["CMD", "new"], "interval": "5s"}
    assert "ports" not in a
    plain = merge(base, yaml.safe_load("services: {a: {depends_on: [c]}}"))
    assert set(plain["services"]["a"]["depends_on"]) == {"b", "c"}  # without !override: both


def load_compose_text(text: str) -> dict:
    import textwrap

    return yaml.load(textwrap.dedent(text), Loader=ComposeLoader)  # noqa: S506


# ------------------------------------------------------------------------------ the merged project
@pytest.fixture(scope="module")
def base() -> dict:
    return load_compose(DEPLOY / "compose.yaml")


@pytest.fixture(scope="module")
def override() -> dict:
    return load_compose(DEPLOY / "compose.scale-out.yaml")


@pytest.fixture(scope="module")
def project(base: dict, override: dict) -> dict:
    return merge(base, override)


def services(project: dict) -> dict[str, dict]:
    return project["services"]


def env_of(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in _as_mapping(service.get("environment"), "").items()}


def run_config(project: dict, service: dict) -> RunConfig:
    """The config a service's process runs with: the mounted run-config through the engine's own loader,
    with the service's RELOOP__* environment (an unknown key or bad value raises ConfigError)."""
    (mount,) = [c for c in service["configs"] if _target(c) == config_path(service)]
    source = mount["source"] if isinstance(mount, dict) else mount
    data = yaml.safe_load(project["configs"][source]["content"])
    return load_config_dict(data, env={k: v for k, v in env_of(service).items() if k.startswith("RELOOP__")})


def config_path(service: dict) -> str:
    args = service["command"]
    return args[args.index("--config") + 1]


def parse_args(service: dict) -> tuple[str, argparse.Namespace]:
    """The service's command after the image's entrypoint (`reloop`), read by the subcommand's parser."""
    name, *rest = service["command"]
    assert name in cli.COMMANDS, service["command"]
    parser = argparse.ArgumentParser(prog=f"reloop {name}", exit_on_error=False)
    importlib.import_module(cli.COMMANDS[name][0]).configure(parser)
    return name, parser.parse_args(rest)


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", duration)
    assert m, duration
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def world_size(project: dict) -> int:
    return parse_args(services(project)["train"])[1].world_size


def joiners(project: dict) -> int:
    return services(project)["join"]["deploy"]["replicas"]


def test_join_and_train_replace_the_processor_which_needs_its_profile(project: dict) -> None:
    svc = services(project)
    assert set(svc) == {"kafka", "kafka-topics", "processor", "serve", "prometheus", "grafana", *SCALED}
    # `docker compose up` starts what has no profile: the two stages, not `reloop run` beside them
    # (it would join the same consumer groups).
    assert svc["processor"].get("profiles")
    on = {name for name, s in svc.items() if not s.get("profiles")}
    assert set(SCALED) <= on and "processor" not in on
    # Compose refuses a service that depends on one its profiles leave off.
    for name in on:
        assert set(_as_mapping(svc[name].get("depends_on"), {})) <= on, name
    assert set(svc["prometheus"]["depends_on"]) >= set(SCALED)


def test_the_stages_run_join_and_train_on_the_mounted_config(project: dict) -> None:
    svc = services(project)
    name, join = parse_args(svc["join"])
    assert name == "join"
    name, train = parse_args(svc["train"])
    assert name == "train" and train.world_size > 1  # torchrun with M ranks in the container
    for stage in SCALED:
        service = svc[stage]
        path = config_path(service)
        assert path == svc["processor"]["command"][-1]  # the file `reloop run` reads
        (mount,) = [c for c in service["configs"] if _target(c) == path]
        assert mount["source"] in project["configs"]
        # Started after the topics exist.
        assert service["depends_on"]["kafka-topics"]["condition"] == "service_completed_successfully"
    assert joiners(project) > 1


def test_the_stages_have_the_hardening_of_compose_yaml(base: dict, override: dict, project: dict) -> None:
    hardening = base["x-reloop-image"]
    # The override's own copy (anchors do not cross files) is the same block.
    assert override["x-reloop-scaled"] == hardening
    for stage in SCALED:
        service = services(project)[stage]
        assert {k: service.get(k) for k in hardening} == hardening, stage
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]


def test_a_stop_outlasts_the_final_checkpoint(project: dict) -> None:
    from torch.distributed.run import config_from_args, get_args_parser

    for stage in SCALED:
        service = services(project)[stage]
        cfg = run_config(project, service)
        assert seconds(service["stop_grace_period"]) > cfg.recovery.stop_timeout_s, stage
    # `reloop train --world-size M` is torchrun's agent in the container: on SIGTERM it hands the signal to
    # the ranks and kills them after its shutdown timeout, which must leave them stop_timeout_s and end
    # before Docker's SIGKILL. Read through torchrun's own launch config, as engine/runtime/train_cmd.py
    # builds it, with the container's environment.
    train = services(project)["train"]
    cfg = run_config(project, train)
    argv = [
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={world_size(project)}",
        "-m",
        "reloop.engine.runtime.cli",
    ]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env_of(train).items():
            mp.setenv(k, v)
        launch, _, _ = config_from_args(get_args_parser().parse_args(argv))
    assert cfg.recovery.stop_timeout_s < launch.shutdown_timeout < seconds(train["stop_grace_period"])


def test_partitions_suit_the_joiners_and_the_ranks(base: dict, project: dict) -> None:
    svc = services(project)
    script = svc["kafka-topics"]["command"][0]
    created = set(re.findall(r"--partitions (\d+)", script))
    assert len(created) == 1, created
    p = int(created.pop())
    assert svc["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"] == str(p)
    assert script != base["services"]["kafka-topics"]["command"][0]  # replaced, not appended
    # The samples topic is created by the first joiner with the impressions topic's partitions (P).
    k, m = joiners(project), world_size(project)
    assert p >= k  # every joiner gets a task
    assert p % m == 0  # rank r reads p % M == r: equal shares


def test_prometheus_scrapes_the_ports_the_processes_serve_on(project: dict) -> None:
    svc = services(project)
    # Mounted where the prometheus command reads its config: the scale-out file replaces compose.yaml's.
    prom = svc["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    (mount,) = [v for v in prom["volumes"] if _target(v) == config_file]
    source = mount.split(":")[0]
    assert source == "./prometheus/prometheus.scale-out.yml" and (DEPLOY / source).is_file()
    scrape = yaml.safe_load((DEPLOY / source).read_text())
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    # Its rule files are mounted next to it.
    for rule_file in scrape["rule_files"]:
        assert any(_target(v) == str(Path(config_file).parent / rule_file) for v in prom["volumes"])

    join = svc["join"]
    join_port = run_config(project, join).metrics.join_prometheus_port
    assert join_port is not None  # `reloop join` alone serves /metrics only where this says
    (sd,) = jobs["reloop-joiner"]["dns_sd_configs"]
    # Every replica: Docker's DNS answers the service name with one A record per container.
    assert sd == {"names": ["join"], "type": "A", "port": join_port}

    train = svc["train"]
    train_cfg = run_config(project, train)
    assert parse_args(train)[1].metrics_port is None  # so metrics.prometheus_port decides
    # engine/runtime/train_cmd.py: rank r of several serves on the port + its LOCAL_RANK (here: r).
    served = {f"train:{train_cfg.metrics.prometheus_port + r}" for r in range(world_size(project))}
    (static,) = jobs["reloop-trainer"]["static_configs"]
    assert set(static["targets"]) == served
    for service, ports in ((join, {join_port}), (train, {int(t.rsplit(":", 1)[1]) for t in served})):
        cfg = run_config(project, service)
        assert cfg.metrics.prometheus_host == "0.0.0.0"  # reachable from the prometheus container
        assert {int(p) for p in service["expose"]} == ports
        # The image's HEALTHCHECK probes a port the process serves (rank 0's for the trainer).
        health = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/metrics", env_of(service)["RELOOP_HEALTH_URL"])
        assert health and int(health.group(1)) == min(ports)
    # The alert that names the train stage's job knows this one.
    assert "reloop-trainer" in (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert "reloop-processor" not in jobs  # not started in this variant


def test_env_overrides_are_config_keys_and_a_misspelt_one_fails(project: dict) -> None:
    for stage in SCALED:
        service = services(project)[stage]
        cfg = run_config(project, service)  # raises on an unknown key or a bad value
        assert cfg.kafka.bootstrap == env_of(service)["RELOOP__KAFKA__BOOTSTRAP"] == "kafka:9092"
    broken = dict(services(project)["join"])
    broken["environment"] = {**env_of(broken), "RELOOP__METRICS__JOIN_PROMETHEUS_PRT": "9465"}
    with pytest.raises(ConfigError, match="join_prometheus_prt: unknown key"):
        run_config(project, broken)


def test_every_stage_keeps_its_state_on_the_shared_volume(project: dict) -> None:
    svc = services(project)
    dirs = set()
    for stage in SCALED:
        service = svc[stage]
        cfg = run_config(project, service)
        # The join task checkpoints (<checkpoint.dir>/join/task-p) move with their task between joiners;
        # every rank restores the save rank 0 wrote; serving reads rank 0's snapshots.
        (mount,) = [v for v in service["volumes"] if cfg.checkpoint.dir.startswith(_target(v) + "/")]
        volume, _, *mode = mount.split(":")
        assert volume in project["volumes"] and mode != ["ro"], stage
        dirs.add((volume, cfg.checkpoint.dir))
    assert len(dirs) == 1
    ((volume, _),) = dirs
    assert any(v.startswith(f"{volume}:") and v.endswith(":ro") for v in svc["serve"]["volumes"])
