"""deploy/k8s (one `reloop run` processor) and deploy/k8s/scale-out (K joiners, M torchrun train ranks;
docs/scale-out.md), both over deploy/k8s/base, rendered by the real kustomize and validated offline against
the Kubernetes JSON schemas (kubernetes-validate ships them; strict: an unknown or misspelt field fails),
then the rules the schemas do not know: the restricted security profile, grace periods longer than the stop
timeout, the generated ConfigMap rolling the pods, ServiceMonitors that find their Services, and the
PrometheusRule holding exactly deploy/prometheus/alerts.yml; for the scale-out, torchrun's arguments read by
torchrun's own parser, the rendezvous, the metrics ports through the engine's config loader, the
PodDisruptionBudgets and the NetworkPolicies. The Prometheus Operator's CRDs (ServiceMonitor,
PrometheusRule) have no schema in that package: they are checked field by field here."""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from reloop.engine.runtime import cli
from reloop.engine.runtime.config import load_config_dict

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
SCALE_OUT = K8S / "scale-out"
#: The oldest Kubernetes minor still maintained upstream when this was written, and the newest schemas.
VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
CRDS = {"ServiceMonitor", "PrometheusRule"}


def build(tool, folder: Path = K8S) -> list[dict]:
    kustomize = tool("kustomize", "bash deploy/tools.sh builds it with Go (scripts/setup.sh runs it)")
    done = subprocess.run(
        [kustomize, "build", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tool) -> list[dict]:
    return build(tool)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


WORKLOADS = ("Deployment", "StatefulSet")
#: The pods that write the snapshot volume (checkpoints, snapshots, join task checkpoints).
WRITERS = {"reloop-processor", "reloop-joiner", "reloop-trainer"}


@pytest.fixture(scope="module")
def scaled(tool) -> list[dict]:
    return build(tool, SCALE_OUT)


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def pods(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in workloads(docs)]


def named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def run_config(docs: list[dict], env: dict[str, str] | None = None):
    """The mounted run.yaml through the engine's own loader, with a container's RELOOP__* env applied."""
    (cm,) = of_kind(docs, "ConfigMap")
    return load_config_dict(yaml.safe_load(cm["data"]["run.yaml"]), env=env or {})


def container_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def validate_all(docs: list[dict]) -> list[str]:
    """Every non-CRD resource against the strict schemas of VERSIONS; their kinds, sorted."""
    for doc in docs:
        if doc["kind"] in CRDS:
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc.message} at "
                            f"{'.'.join(map(str, exc.path))}")  # fmt: skip
    return sorted(d["kind"] for d in docs if d["kind"] not in CRDS)


def test_every_resource_matches_the_kubernetes_schema(rendered: list[dict]) -> None:
    kinds = validate_all(rendered)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy",
                     "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "Service"], kinds  # fmt: skip


def test_the_schema_check_is_not_vacuous(rendered: list[dict]) -> None:
    deployment = copy.deepcopy(of_kind(rendered, "Deployment")[0])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True  # misspelt: silently ignored by a cluster
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    container["securityContext"].pop("readOnlyRootFileSystem")
    container["ports"][0]["containerPort"] = "8000"  # a string where an integer belongs
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_containers_run_under_the_restricted_profile(rendered: list[dict]) -> None:
    assert len(pods(rendered)) == 2
    check_restricted(rendered)


def check_restricted(docs: list[dict]) -> None:
    uid = int(re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    for name, pod in pods(docs):
        assert pod["automountServiceAccountToken"] is False, name
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid and ctx["fsGroup"] == uid, name
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert all("hostPath" not in v for v in pod["volumes"]), name
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod.get("initContainers", []) + pod["containers"]:
            init = container in pod.get("initContainers", [])
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert not sc.get("privileged"), name
            # The only writable places: /tmp (an emptyDir) and, for the processes that save state, the
            # snapshot volume.
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/tmp"]["name"] in empty_dirs, name
            writable = {p for p, m in mounts.items() if not m.get("readOnly")}
            saves_state = name in WRITERS and not init
            assert writable == ({"/tmp", "/var/lib/reloop"} if saves_state else {"/tmp"}), name


@pytest.mark.parametrize("folder", [K8S, SCALE_OUT], ids=["base", "scale-out"])
def test_grace_period_outlasts_the_stop_timeout(tool, folder: Path) -> None:
    docs = build(tool, folder)
    run = run_config(docs)
    for name, pod in pods(docs):
        assert pod["terminationGracePeriodSeconds"] > run.recovery.stop_timeout_s, name


def reloop_argv(container: dict) -> list[str]:
    """The reloop command line a container runs: its args after the image's entrypoint `reloop`, or,
    under torchrun (`python -m torch.distributed.run ... -m reloop.engine.runtime.cli ...`), what it runs."""
    if "command" not in container:
        return container["args"]
    assert container["command"] == ["python", "-m", "torch.distributed.run"], container["command"]
    from torch.distributed.run import get_args_parser

    torchrun = get_args_parser().parse_args(container["args"])
    assert torchrun.module and torchrun.training_script == "reloop.engine.runtime.cli", container["args"]
    assert importlib.util.find_spec(torchrun.training_script) is not None
    return torchrun.training_script_args


def check_args(docs: list[dict]) -> None:
    (cm,) = of_kind(docs, "ConfigMap")
    for name, pod in pods(docs):
        (container,) = pod["containers"]
        args = reloop_argv(container)
        assert args[0] in cli.COMMANDS and args[0] != "reloop", (name, args)  # ENTRYPOINT is `reloop`
        config = Path(args[args.index("--config") + 1])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config.parent))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == cm["metadata"]["name"], name
        assert config.name in cm["data"], name
        # The subcommand's own parser accepts them.
        parser = argparse.ArgumentParser(prog=f"reloop {args[0]}", exit_on_error=False)
        importlib.import_module(cli.COMMANDS[args[0]][0]).configure(parser)
        parser.parse_args(args[1:])


def test_args_are_reloop_subcommands_reading_the_mounted_configs(rendered: list[dict]) -> None:
    check_args(rendered)


@pytest.mark.parametrize("folder", [K8S, SCALE_OUT], ids=["base", "scale-out"])
def test_config_edits_roll_the_pods(tool, folder: Path, tmp_path: Path) -> None:
    docs = build(tool, folder)
    (cm,) = of_kind(docs, "ConfigMap")
    assert re.fullmatch(r"reloop-config-[a-z0-9]{10}", cm["metadata"]["name"])
    for name in ("run.yaml", "serve.yaml"):
        assert cm["data"][name] == (BASE / "config" / name).read_text()
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    run = copy_dir / "base" / "config" / "run.yaml"
    run.write_text(run.read_text().replace("batch_size: 512", "batch_size: 256"))
    edited = build(tool, copy_dir / folder.relative_to(K8S))
    (new_cm,) = of_kind(edited, "ConfigMap")
    assert new_cm["metadata"]["name"] != cm["metadata"]["name"]
    assert len(pods(edited)) == len(pods(docs))
    for _, pod in pods(edited):  # the pod templates change with it: a rollout
        assert new_cm["metadata"]["name"] in {
            v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v
        }


def check_service_monitors(docs: list[dict]) -> dict[str, set[str]]:
    """Each ServiceMonitor finds one Service and its ports; {Prometheus job: {scraped Service:port}}."""
    services = of_kind(docs, "Service")
    jobs: dict[str, set[str]] = {}
    for mon in of_kind(docs, "ServiceMonitor"):
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(mon["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        wanted = mon["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services if s["metadata"]["labels"].items() >= wanted.items()]
        svc_ports = {p["name"] for p in svc["spec"]["ports"]}
        # The operator names the job after the Service's jobLabel label (else after the Service).
        job = svc["metadata"]["labels"].get(mon["spec"].get("jobLabel", ""), svc["metadata"]["name"])
        for endpoint in mon["spec"]["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "authorization"}
            assert endpoint["port"] in svc_ports and endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
            jobs.setdefault(job, set()).add(f"{svc['metadata']['name']}:{endpoint['port']}")
    return jobs


def alert_expr(name: str) -> str:
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]
    return next(r["expr"] for g in groups for r in g["rules"] if r.get("alert") == name)


def test_service_monitors_find_their_services_and_ports(rendered: list[dict]) -> None:
    assert {m["metadata"]["name"] for m in of_kind(rendered, "ServiceMonitor")} == {
        "reloop-processor", "reloop-serve"
    }  # fmt: skip
    # Every port that serves /metrics is scraped: the train and join stages and the service, under the
    # job names of deploy/prometheus (prometheus.yml, alerts.yml).
    assert check_service_monitors(rendered) == {
        "reloop-processor": {"reloop-processor-metrics:metrics", "reloop-processor-metrics:join-metrics"},
        "reloop-serve": {"reloop-serve:http"},
    }
    assert '"reloop-processor' in alert_expr("ReloopNoSnapshot")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", K8S / "gen_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_rule_is_alerts_yml(rendered: list[dict]) -> None:
    gen = _generator()
    alerts_text = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    expected = gen.render(alerts_text)
    assert (BASE / "prometheusrule.yaml").read_text() == expected, (
        "deploy/k8s/base/prometheusrule.yaml is out of date: run python deploy/k8s/gen_prometheusrule.py"
    )
    (rule,) = of_kind(rendered, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(alerts_text)["groups"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert r["expr"].strip()


def test_the_generator_follows_alerts_yml_and_refuses_other_keys(tmp_path: Path) -> None:
    gen = _generator()
    text = "# comment kept\ngroups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n"
    out = gen.render(text)
    assert "    - name: g\n" in out and yaml.safe_load(out)["spec"]["groups"][0]["rules"][0]["alert"] == "A"
    with pytest.raises(ValueError, match="one top-level key, groups"):
        gen.render("groups: []\nextra: 1\n")


# ---------------------------------------------------------------------------------------- scale-out
# deploy/k8s/scale-out: K joiners (a Deployment), M train ranks (a StatefulSet, torchrun per pod).


def trainer_parts(docs: list[dict]) -> tuple[dict, dict, argparse.Namespace]:
    """The trainer StatefulSet, its container, and its torchrun arguments (torchrun's own parser)."""
    from torch.distributed.run import get_args_parser

    sts = named(docs, "StatefulSet", "reloop-trainer")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return sts, container, get_args_parser().parse_args(container["args"])


def test_scale_out_resources_match_the_schemas_and_replace_the_processor(scaled: list[dict]) -> None:
    kinds = validate_all(scaled)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy",
                     "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget",
                     "PodDisruptionBudget", "PodDisruptionBudget", "Service", "Service", "Service",
                     "StatefulSet"], kinds  # fmt: skip
    names = {(d["kind"], d["metadata"]["name"]) for d in scaled}
    assert not [n for n in names if "processor" in n[1]], names  # no `reloop run` beside the stages
    assert {("Deployment", "reloop-joiner"), ("StatefulSet", "reloop-trainer"),
            ("Deployment", "reloop-serve"), ("PrometheusRule", "reloop-alerts")} <= names  # fmt: skip
    assert named(scaled, "Deployment", "reloop-joiner")["spec"]["replicas"] == 3  # K
    assert named(scaled, "StatefulSet", "reloop-trainer")["spec"]["replicas"] == 2  # M
    check_restricted(scaled)
    check_args(scaled)


def test_scale_out_stages_run_join_and_train_from_the_mounted_config(scaled: list[dict]) -> None:
    joiner = named(scaled, "Deployment", "reloop-joiner")
    (container,) = joiner["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["join", "--config", "/etc/reloop/run.yaml"]
    _, trainer, torchrun = trainer_parts(scaled)
    assert torchrun.training_script_args == ["train", "--config", "/etc/reloop/run.yaml"]
    # Under torchrun a process runs as one rank: --world-size would launch a torchrun of its own.
    assert "--world-size" not in torchrun.training_script_args


def test_trainers_meet_at_a_c10d_rendezvous_on_their_headless_service(scaled: list[dict]) -> None:
    sts, container, torchrun = trainer_parts(scaled)
    svc = named(scaled, "Service", sts["spec"]["serviceName"])
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["clusterIP"] == "None"  # headless: a DNS name per pod
    # The rendezvous host is a pod that is not ready before the rendezvous: its name must resolve anyway.
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert pod_labels.items() >= svc["spec"]["selector"].items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # Ordered start would wait for pod 0 to be ready, which it is only once every rank joined.
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    # One spec per group: never a rolling update that mixes two specs in one rank group.
    assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}

    assert torchrun.rdzv_backend == "c10d" and torchrun.rdzv_id and not torchrun.standalone
    assert torchrun.nnodes == str(sts["spec"]["replicas"])  # a fixed group of M agents
    assert torchrun.nproc_per_node == "1"  # one rank per pod
    host, port = torchrun.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{sts['metadata']['name']}-0.{svc['metadata']['name']}"  # pod 0's stable DNS name
    assert int(port) == ports(container)["rdzv"]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["rdzv"] == int(port)
    # torchrun restarts the group as often as `reloop train --world-size` would.
    env = container_env(container)
    run = run_config(scaled, env)
    assert torchrun.max_restarts == run.distributed.max_restarts


def test_the_trainer_replicas_set_the_rendezvous_size(tool, tmp_path: Path) -> None:
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    kustomization = copy_dir / "scale-out" / "kustomization.yaml"
    text, m2 = kustomization.read_text(), "{name: reloop-trainer, count: 2}"
    assert m2 in text
    kustomization.write_text(text.replace(m2, m2.replace("2", "4")))
    sts, _, torchrun = trainer_parts(build(tool, copy_dir / "scale-out"))
    assert sts["spec"]["replicas"] == 4 and torchrun.nnodes == "4"


def test_trainer_stop_outlasts_the_ranks_final_checkpoint(scaled: list[dict]) -> None:
    sts, container, _ = trainer_parts(scaled)
    run = run_config(scaled, container_env(container))
    # The rank exits within stop_timeout_s; torchrun's agent kills it only after its shutdown timeout,
    # and the kubelet kills the agent only after the grace period.
    agent = int(container_env(container)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert run.recovery.stop_timeout_s < agent < grace


def test_metrics_ports_are_where_the_processes_serve_and_the_probes_look(scaled: list[dict]) -> None:
    _, trainer, torchrun = trainer_parts(scaled)
    joiner = named(scaled, "Deployment", "reloop-joiner")["spec"]["template"]["spec"]["containers"][0]
    # The effective config of each process: the mounted run.yaml plus the container's RELOOP__* env.
    train_cfg = run_config(scaled, container_env(trainer))
    join_cfg = run_config(scaled, container_env(joiner))
    # A rank serves on metrics.prometheus_port + LOCAL_RANK; one rank per pod: LOCAL_RANK 0.
    assert torchrun.nproc_per_node == "1"
    assert ports(trainer)["metrics"] == train_cfg.metrics.prometheus_port
    # `reloop join` serves on metrics.join_prometheus_port (no default of its own).
    assert ports(joiner)["join-metrics"] == join_cfg.metrics.join_prometheus_port
    for container, port_name, cfg in ((trainer, "metrics", train_cfg), (joiner, "join-metrics", join_cfg)):
        assert cfg.metrics.prometheus_host == "0.0.0.0"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/metrics", "port": port_name}, probe
    # The trainer's probes wait out a rendezvous (torchrun's join timeout, 600 s) and a group restart.
    startup = trainer["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > 600
    live = trainer["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > 600 > train_cfg.distributed.timeout_s


def test_every_stage_keeps_its_state_on_the_shared_volume(scaled: list[dict]) -> None:
    (pvc,) = of_kind(scaled, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # K + M writers and the scoring replicas
    checkpoint_dirs = set()
    for name, pod in pods(scaled):
        (container,) = pod["containers"]
        claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")
                  == pvc["metadata"]["name"]}  # fmt: skip
        if name == "reloop-serve":
            continue
        run = run_config(scaled, container_env(container))
        under = run.checkpoint.dir.startswith
        mount = next(m for m in container["volumeMounts"] if under(m["mountPath"] + "/"))
        assert mount["name"] in claims and not mount.get("readOnly"), name
        checkpoint_dirs.add(run.checkpoint.dir)
    # One checkpoint.dir for every joiner and rank: join/task-p checkpoints move with their task, and
    # every rank must restore the save rank 0 wrote.
    assert len(checkpoint_dirs) == 1


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}
    return labels.items() >= selector["matchLabels"].items()


def test_disruption_budgets_cover_the_joiners_the_trainers_and_the_service(scaled: list[dict]) -> None:
    budgets = of_kind(scaled, "PodDisruptionBudget")
    covered = {}
    for pdb in budgets:
        (work,) = [w for w in workloads(scaled) if _selects(pdb["spec"]["selector"], pod_labels(w))]
        # One pod at a time: a drain never takes every joiner, and never blocks for good (minAvailable:
        # M would, since any rank leaving stops the group anyway).
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
        assert work["spec"]["replicas"] > 1
        covered[work["metadata"]["name"]] = pdb["metadata"]["name"]
    assert set(covered) == {"reloop-joiner", "reloop-trainer", "reloop-serve"}


def test_network_policies_let_the_ranks_talk_and_prometheus_scrape(scaled: list[dict]) -> None:
    policies = {p["metadata"]["name"]: p for p in of_kind(scaled, "NetworkPolicy")}
    for work in workloads(scaled):
        name = work["metadata"]["name"]
        mine = [p for p in policies.values() if _selects(p["spec"]["podSelector"], pod_labels(work))]
        assert len(mine) == 1, name
        # Prometheus (the monitoring namespace) reaches every port that serves /metrics.
        (container,) = work["spec"]["template"]["spec"]["containers"]
        scraped = {n: port for n, port in ports(container).items() if n in {"metrics", "join-metrics"}}
        from_monitoring = {
            p["port"]
            for rule in mine[0]["spec"]["ingress"]
            if any("namespaceSelector" in peer for peer in rule["from"])
            for p in rule.get("ports", [])
        }
        assert set(scraped.values()) <= from_monitoring, name
    ranks = pod_labels(named(scaled, "StatefulSet", "reloop-trainer"))
    peers = [
        rule
        for rule in policies["reloop-trainer"]["spec"]["ingress"]
        if any("podSelector" in peer and _selects(peer["podSelector"], ranks) for peer in rule["from"])
    ]
    # Rank to rank: the rendezvous store and gloo, whose pair connections use ephemeral ports: all ports.
    assert peers and all("ports" not in rule for rule in peers)
    # Nobody else may reach the ranks: every other rule names its ports, and those are metrics ports.
    for rule in policies["reloop-trainer"]["spec"]["ingress"]:
        if rule not in peers:
            assert {p["port"] for p in rule["ports"]} == {ports(trainer_parts(scaled)[1])["metrics"]}


def test_scale_out_monitors_scrape_joiners_and_ranks_under_the_alerts_job_names(scaled: list[dict]) -> None:
    jobs = check_service_monitors(scaled)
    assert jobs == {
        "reloop-joiner": {"reloop-joiner-metrics:join-metrics"},
        "reloop-trainer": {"reloop-trainer:metrics"},
        "reloop-serve": {"reloop-serve:http"},
    }
    # The alert that needs the train stage's job by name knows this one.
    assert "reloop-trainer" in alert_expr("ReloopNoSnapshot")


# ------------------------------------------------------------------------- metrics ports, every shape
# Where each process serves /metrics, from the engine's own parsers and config loaders (never from the
# manifests' comments), against what the ServiceMonitors, the prometheus.io/* annotations and the
# NetworkPolicies send Prometheus to.


def served_metrics_ports(docs: list[dict], container: dict) -> set[int]:
    """The ports the container's processes serve /metrics on: its reloop subcommand's arguments, the
    mounted config with the container's RELOOP__* env, and the rules of engine/runtime/*_cmd.py."""
    from reloop.engine.runtime.run_cmd import join_metrics_port
    from reloop.engine.serve.config import serve_config_from_dict

    argv = reloop_argv(container)
    parser = argparse.ArgumentParser(prog=f"reloop {argv[0]}", exit_on_error=False)
    importlib.import_module(cli.COMMANDS[argv[0]][0]).configure(parser)
    args = parser.parse_args(argv[1:])
    env = container_env(container)
    (cm,) = of_kind(docs, "ConfigMap")
    if argv[0] == "serve":
        serve = serve_config_from_dict(yaml.safe_load(cm["data"]["serve.yaml"]), env=env)
        assert serve.workers == 1  # more workers: one /metrics port each (serve.worker_metrics_port)
        return {args.port if args.port is not None else serve.port}  # /metrics on the service's port
    cfg = run_config(docs, env)
    if argv[0] == "run":  # the train stage on prometheus_port, with 2 processes the join stage beside it
        ports = {cfg.metrics.prometheus_port}
        if cfg.stages.processes == 2:
            ports.add(join_metrics_port(cfg))
    elif argv[0] == "join":
        ports = {args.metrics_port if args.metrics_port is not None else cfg.metrics.join_prometheus_port}
    elif argv[0] == "train":  # rank r of the ranks this container runs serves on the port + r
        from torch.distributed.run import get_args_parser

        base = args.metrics_port if args.metrics_port is not None else cfg.metrics.prometheus_port
        local = args.world_size
        if "command" in container:  # under torchrun: its --nproc-per-node ranks here
            local = int(get_args_parser().parse_args(container["args"]).nproc_per_node)
        ports = {base + r for r in range(local)} if base is not None else {None}
    else:
        pytest.fail(f"no metrics rule for reloop {argv[0]}")
    assert None not in ports, (argv, "a process without a /metrics port")
    return ports


def annotation_scraped_ports(pod_template: dict) -> set[int]:
    """What the conventional annotation-based scrape job (Prometheus's kubernetes-pods example, the
    prometheus-community Helm chart) scrapes: one target per declared container port, each moved to
    the prometheus.io/port annotation's port when the pod has one (so they collapse into one target)."""
    annotations = pod_template["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true":
        return set()
    declared = {p["containerPort"] for c in pod_template["spec"]["containers"] for p in c.get("ports", [])}
    if "prometheus.io/port" in annotations:
        return {int(annotations["prometheus.io/port"])}
    return declared


def monitored_ports(docs: list[dict], workload: dict) -> set[int]:
    """The container ports the ServiceMonitors scrape on this workload's pods (Service port -> targetPort)."""
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    by_name = ports(container)
    found = set()
    for mon in of_kind(docs, "ServiceMonitor"):
        for svc in of_kind(docs, "Service"):
            if not svc["metadata"]["labels"].items() >= mon["spec"]["selector"]["matchLabels"].items():
                continue
            if not pod_labels(workload).items() >= svc["spec"]["selector"].items():
                continue
            svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
            for endpoint in mon["spec"]["endpoints"]:
                target = svc_ports[endpoint["port"]]["targetPort"]
                found.add(by_name[target] if isinstance(target, str) else target)
    return found


@pytest.mark.parametrize("folder", [K8S, SCALE_OUT], ids=["base", "scale-out"])
def test_prometheus_finds_every_metrics_port_each_process_serves(tool, folder: Path) -> None:
    docs = build(tool, folder)
    policies = of_kind(docs, "NetworkPolicy")
    for work in workloads(docs):
        name = work["metadata"]["name"]
        (container,) = work["spec"]["template"]["spec"]["containers"]
        served = served_metrics_ports(docs, container)
        # Declared, so that the Services, the probes and the scrape jobs can name them.
        assert served <= set(ports(container).values()), (name, served)
        # The Prometheus Operator's ServiceMonitors scrape each of them, and nothing else.
        assert monitored_ports(docs, work) == served, name
        # Without the operator the pods' prometheus.io/* annotations decide (kustomization.yaml): a
        # prometheus.io/port annotation narrows a pod to that one port, so a pod serving /metrics on
        # two (`reloop run`: the train and the join stage) must not carry one; the pods that also
        # declare a port that is not /metrics (the trainer's rendezvous) must.
        assert annotation_scraped_ports(work["spec"]["template"]) == served, name
        # Prometheus (the monitoring namespace) may reach them.
        (policy,) = [p for p in policies if _selects(p["spec"]["podSelector"], pod_labels(work))]
        from_monitoring = {
            p["port"]
            for rule in policy["spec"]["ingress"]
            if any("namespaceSelector" in peer for peer in rule["from"])
            for p in rule.get("ports", [])
        }
        assert served <= from_monitoring, name


def test_the_annotation_rule_reads_the_scrape_job_right() -> None:
    pod = {"metadata": {"annotations": {"prometheus.io/scrape": "true"}},
           "spec": {"containers": [{"ports": [{"containerPort": 1}, {"containerPort": 2}]}]}}  # fmt: skip
    assert annotation_scraped_ports(pod) == {1, 2}
    pod["metadata"]["annotations"]["prometheus.io/port"] = "2"
    assert annotation_scraped_ports(pod) == {2}
    pod["metadata"]["annotations"]["prometheus.io/scrape"] = "false"
    assert annotation_scraped_ports(pod) == set()


@pytest.mark.parametrize("folder", [K8S, SCALE_OUT], ids=["base", "scale-out"])
def test_every_trainer_pod_pins_its_torch_threads_to_the_cpus_it_requests(tool, folder: Path) -> None:
    # No CPU limit means no cgroup quota to cap torch's default (a thread per node core): 63 threads on a
    # 64-core node for a pod that requested 2. reloop run's train process leaves one to its join process.
    docs = build(tool, folder)
    trainers = 0
    for name, pod in pods(docs):
        for container in pod["containers"]:
            argv = reloop_argv(container)
            if argv[0] not in ("run", "train"):
                continue
            trainers += 1
            threads = run_config(docs, container_env(container)).train.threads
            cpus = int(container["resources"]["requests"]["cpu"])
            assert threads == (cpus - 1 if argv[0] == "run" else cpus), name
    assert trainers == 1


@pytest.mark.parametrize("folder", [K8S, SCALE_OUT], ids=["base", "scale-out"])
def test_the_topics_exist_with_p_partitions_before_any_pod_uses_them(tool, folder: Path) -> None:
    # The manifests created no topics: a broker with auto-create off never got them, and one with it on
    # gave the impressions topic its default partitions at the first impression (too few scaled out).
    docs = build(tool, folder)
    (cm,) = of_kind(docs, "ConfigMap")
    partitions = int(cm["data"]["topic_partitions"])
    users = 0
    for name, pod in pods(docs):
        (init,) = [c for c in pod.get("initContainers", []) if c["name"] == "topics"] or [None]
        if name in ("reloop-trainer", "reloop-serve"):
            # The trainer reads the samples topic, which the join stage creates. The service scores whatever
            # Kafka does: an init container waiting for a broker would keep a restarted pod from serving.
            assert init is None, name
            continue
        users += 1
        assert init is not None, name
        (env,) = init["env"]
        ref = env["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": cm["metadata"]["name"], "key": "topic_partitions"}, name
        args = [a.replace(f"$({env['name']})", str(partitions)) for a in init["args"]]
        parser = argparse.ArgumentParser(prog="reloop kafka", exit_on_error=False)
        importlib.import_module(cli.COMMANDS["kafka"][0]).configure(parser)
        parsed = parser.parse_args(args[1:])
        assert args[0] == "kafka" and parsed.action == "topics" and parsed.partitions == partitions, name
        assert parsed.config == "/etc/reloop/run.yaml", name
    assert users == 1  # the processor (scaled out: the joiners)
    if folder == SCALE_OUT:  # P >= K and >= M, and a multiple of M (docs/scale-out.md)
        k = named(docs, "Deployment", "reloop-joiner")["spec"]["replicas"]
        m = named(docs, "StatefulSet", "reloop-trainer")["spec"]["replicas"]
        assert partitions >= k and partitions >= m and partitions % m == 0
