"""deploy/k8s rendered by the real kustomize and validated offline against the Kubernetes JSON schemas
(kubernetes-validate ships them; strict: an unknown or misspelt field fails), then the rules the schemas
do not know: the restricted security profile, grace periods longer than the stop timeout, the generated
ConfigMap rolling the pods, ServiceMonitors that find their Services, and the PrometheusRule holding
exactly deploy/prometheus/alerts.yml. The Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule) have
no schema in that package: they are checked field by field here."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from engine.runtime import cli
from engine.runtime.config import load_config_dict

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
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


def pods(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in of_kind(docs, "Deployment")]


def test_every_resource_matches_the_kubernetes_schema(rendered: list[dict]) -> None:
    checked = 0
    for doc in rendered:
        if doc["kind"] in CRDS:
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc.message} at "
                            f"{'.'.join(map(str, exc.path))}")  # fmt: skip
        checked += 1
    kinds = sorted(d["kind"] for d in rendered if d["kind"] not in CRDS)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy",
                     "PersistentVolumeClaim", "Service", "Service"], kinds  # fmt: skip
    assert checked == len(kinds)


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
    uid = int(re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    assert len(pods(rendered)) == 2
    for name, pod in pods(rendered):
        assert pod["automountServiceAccountToken"] is False, name
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid and ctx["fsGroup"] == uid, name
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert all("hostPath" not in v for v in pod["volumes"]), name
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert not sc.get("privileged"), name
            # The only writable places: /tmp (an emptyDir) and, for the processor, the snapshot volume.
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/tmp"]["name"] in empty_dirs, name
            writable = {p for p, m in mounts.items() if not m.get("readOnly")}
            assert writable == ({"/tmp", "/var/lib/reloop"} if "processor" in name else {"/tmp"}), name


def test_grace_period_outlasts_the_stop_timeout(rendered: list[dict]) -> None:
    (cm,) = of_kind(rendered, "ConfigMap")
    run = load_config_dict(yaml.safe_load(cm["data"]["run.yaml"]), env={})
    for name, pod in pods(rendered):
        assert pod["terminationGracePeriodSeconds"] > run.recovery.stop_timeout_s, name


def test_args_are_reloop_subcommands_reading_the_mounted_configs(rendered: list[dict]) -> None:
    (cm,) = of_kind(rendered, "ConfigMap")
    for name, pod in pods(rendered):
        (container,) = pod["containers"]
        args = container["args"]
        assert args[0] in cli.COMMANDS and args[0] != "reloop", (name, args)  # ENTRYPOINT is `reloop`
        config = Path(args[args.index("--config") + 1])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config.parent))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == cm["metadata"]["name"], name
        assert config.name in cm["data"], name


def test_config_edits_roll_the_pods(tool, rendered: list[dict], tmp_path: Path) -> None:
    (cm,) = of_kind(rendered, "ConfigMap")
    assert re.fullmatch(r"reloop-config-[a-z0-9]{10}", cm["metadata"]["name"])
    for name in ("run.yaml", "serve.yaml"):
        assert cm["data"][name] == (K8S / "config" / name).read_text()
    copy_dir = tmp_path / "k8s"
    shutil.copytree(K8S, copy_dir)
    run = copy_dir / "config" / "run.yaml"
    run.write_text(run.read_text().replace("batch_size: 1024", "batch_size: 512"))
    edited = build(tool, copy_dir)
    (new_cm,) = of_kind(edited, "ConfigMap")
    assert new_cm["metadata"]["name"] != cm["metadata"]["name"]
    for _, pod in pods(edited):  # the pod templates change with it: a rollout
        assert new_cm["metadata"]["name"] in {
            v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v
        }


def test_service_monitors_find_their_services_and_ports(rendered: list[dict]) -> None:
    services = of_kind(rendered, "Service")
    monitors = of_kind(rendered, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"reloop-processor", "reloop-serve"}
    scraped: set[tuple[str, str]] = set()
    for mon in monitors:
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(mon["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        wanted = mon["spec"]["selector"]["matchLabels"]
        (svc,) = [s for s in services if s["metadata"]["labels"].items() >= wanted.items()]
        ports = {p["name"] for p in svc["spec"]["ports"]}
        for endpoint in mon["spec"]["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "authorization"}
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
            scraped.add((svc["metadata"]["name"], endpoint["port"]))
    # Every port that serves /metrics is scraped: the train and join stages and the service.
    assert scraped == {("reloop-processor-metrics", "metrics"), ("reloop-processor-metrics", "join-metrics"),
                       ("reloop-serve", "http")}  # fmt: skip


def _generator():
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", K8S / "gen_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_rule_is_alerts_yml(rendered: list[dict]) -> None:
    gen = _generator()
    alerts_text = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    expected = gen.render(alerts_text)
    assert (K8S / "prometheusrule.yaml").read_text() == expected, (
        "deploy/k8s/prometheusrule.yaml is out of date: run python deploy/k8s/gen_prometheusrule.py"
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
