"""Deploy files can't run here (no Docker, no cluster, no Grafana): check they parse, agree with each
other, embed configs the engine's own loaders accept, and only query metrics the engine exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from reloop.connectors.metrics.prometheus import exported_series_names
from reloop.engine.runtime.config import load_config_dict
from reloop.engine.serve.config import serve_config_from_dict

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
METRIC_RE = re.compile(r"\breloop_[a-z0-9_]+")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def names_in(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(DEPLOY / "compose.yaml")


def test_compose_services_and_images(compose):
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    # The image's entrypoint is `reloop` (Dockerfile): the commands are its subcommands.
    assert services["processor"]["command"][0] == "run"
    assert services["serve"]["command"][0] == "serve"
    assert services["processor"]["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert (DEPLOY.parent / services["processor"]["build"]["dockerfile"]).is_file()


def test_compose_publishes_on_loopback_only_and_mounts_existing_files(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), (name, source)


def test_compose_embedded_configs_pass_the_engines_loaders(compose):
    run = yaml.safe_load(compose["configs"]["run-config"]["content"])
    cfg = load_config_dict(run, env={})
    assert cfg.metrics.prometheus_port == 9464
    assert cfg.metrics.prometheus_host == "0.0.0.0"
    serve = serve_config_from_dict(yaml.safe_load(compose["configs"]["serve-config"]["content"]))
    assert serve.host == "0.0.0.0"
    # The snapshots the processor writes are where the service looks.
    assert str(serve.arms[0].registry) == cfg.checkpoint.dir


def test_prometheus_targets_match_the_ports_the_services_listen_on(compose):
    prom = load(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    run = yaml.safe_load(compose["configs"]["run-config"]["content"])
    serve = yaml.safe_load(compose["configs"]["serve-config"]["content"])
    train_port = run["metrics"]["prometheus_port"]
    # reloop run: the train stage on the port, the join stage on the port after it.
    assert targets["reloop-processor"] == [f"processor:{train_port}", f"processor:{train_port + 1}"]
    assert targets["reloop-serve"] == [f"serve:{serve['serve']['port']}"]
    assert prom["rule_files"] == ["alerts.yml"]


def test_alert_rules_only_use_exported_metrics():
    rules = [r for g in load(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]]
    assert len(rules) >= 6
    for rule in rules:
        assert names_in(rule["expr"]) <= exported_series_names(), rule["alert"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "reloop.json").read_text())


def test_dashboard_queries_name_only_metrics_the_engine_exports(dashboard):
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    queried: set[str] = set()
    for panel in panels:
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, panel["title"]
        for expr in exprs:
            found = names_in(expr)
            assert found, (panel["title"], expr)
            unknown = found - exported_series_names()
            assert not unknown, (panel["title"], unknown)
            queried |= found
    arm = next(v for v in dashboard["templating"]["list"] if v["name"] == "arm")
    extras = (arm["definition"], dashboard["annotations"]["list"][0]["expr"])
    for extra in extras:
        assert names_in(extra) <= exported_series_names()
    # The views the dashboard exists for.
    assert {
        "reloop_rolling_auc",
        "reloop_events_consumed_total",
        "reloop_consumer_lag_records",
        "reloop_joiner_pending",
        "reloop_train_loss",
        "reloop_train_loss_part",
        "reloop_snapshot_timestamp_seconds",
    } <= queried


def test_dashboard_series_of_several_processes_are_told_apart(dashboard):
    # With K joiners, M ranks or several serving replicas, a query that keeps one series per process
    # drew lines with one legend each ("pending", "pending", ...): the legend must name the instance,
    # or the query aggregate (a group's snapshot series, repeated by every rank, by job).
    unnamed = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr, legend = target["expr"], target.get("legendFormat", "")
            per_process = "by (" not in expr and not re.match(r"\s*(sum|max|min|avg|count)\b", expr)
            told_apart = "{{instance}}" in legend or "{{partition}}" in legend
            if per_process and not told_apart:
                unnamed.append((panel["title"], expr, legend))
    assert not unnamed


def test_dashboard_layout_and_datasource_agree_with_provisioning(dashboard, compose):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
    ds = load(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")["datasources"][0]
    # Every query goes to the data source the `datasource` variable picks, the provisioned one by default.
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    uids |= {t["datasource"]["uid"] for t in targets if "datasource" in t}
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"] if "datasource" in v}
    assert uids == {"${datasource}"}
    (var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert var["name"] == "datasource" and var["query"] == ds["type"] == "prometheus"
    assert var["current"]["value"] == ds["uid"]
    assert ds["url"] == "http://prometheus:9090"
    provider = load(DEPLOY / "grafana" / "provisioning" / "dashboards" / "reloop.yaml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]


K8S = DEPLOY / "k8s"


def kustomizations(folder: Path = K8S) -> list[tuple[Path, dict]]:
    """``folder``'s kustomization.yaml and those of the folders it lists as resources (deploy/k8s and
    deploy/k8s/scale-out both build on deploy/k8s/base)."""
    kust = load(folder / "kustomization.yaml")
    found = [(folder, kust)]
    for res in kust.get("resources", []):
        if (folder / res).is_dir():
            found.extend(kustomizations((folder / res).resolve()))
    return found


def k8s_docs(folder: Path = K8S) -> list[dict]:
    """The resources the kustomizations list (the generated ConfigMap is read from its files below)."""
    docs = []
    for here, kust in kustomizations(folder):
        for res in kust.get("resources", []):
            if (here / res).is_file():
                docs.extend(d for d in yaml.safe_load_all((here / res).read_text()) if d)
    return docs


def k8s_configs(folder: Path = K8S) -> dict[str, str]:
    """What the configMapGenerator puts in the reloop-config ConfigMap: file name -> content (the base's
    generator; an overlay's merges literals into it, scale-out's topic_partitions)."""
    (gen,) = [
        (here, g)
        for here, kust in kustomizations(folder)
        for g in kust.get("configMapGenerator", [])
        if g["name"] == "reloop-config" and "files" in g
    ]
    here, g = gen
    return {Path(f).name: (here / f).read_text() for f in g["files"]}


@pytest.mark.parametrize("folder", [K8S, K8S / "scale-out"], ids=["single", "scale-out"])
def test_k8s_manifests_parse_and_kustomization_lists_them(folder: Path):
    for here, kust in kustomizations(folder):
        listed = {
            *kust.get("resources", []),
            *(f for g in kust.get("configMapGenerator", []) for f in g.get("files", [])),
        }
        for res in listed:
            assert (here / res).exists(), (here, res)
        # Every manifest in the folder is used (a forgotten file would silently not be applied).
        manifests = {p.name for p in here.glob("*.yaml")} - {"kustomization.yaml"}
        assert manifests == {r for r in kust.get("resources", []) if (here / r).is_file()}, here
    kinds = sorted(d["kind"] for d in k8s_docs(folder))
    assert kinds.count("Deployment") == 2 and "PersistentVolumeClaim" in kinds
    assert "ConfigMap" not in kinds  # generated, never static
    assert set(k8s_configs(folder)) == {"run.yaml", "serve.yaml"}


@pytest.mark.parametrize("folder", [K8S, K8S / "scale-out"], ids=["single", "scale-out"])
def test_k8s_configmap_holds_valid_configs_and_probes_use_declared_ports(folder: Path):
    docs = k8s_docs(folder)
    configs = k8s_configs(folder)
    run = load_config_dict(yaml.safe_load(configs["run.yaml"]), env={})
    serve_config_from_dict(yaml.safe_load(configs["serve.yaml"]))
    for dep in (d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}):
        pod = dep["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] in ports, (dep["metadata"]["name"], probe)
        annotated = pod["metadata"]["annotations"].get("prometheus.io/port")
        assert annotated is None or int(annotated) in ports.values()
        assert pod["metadata"]["labels"].items() >= dep["spec"]["selector"]["matchLabels"].items()
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        config_volumes = [v for v in pod["spec"]["volumes"] if "configMap" in v]
        assert [v["configMap"]["name"] for v in config_volumes] == ["reloop-config"]
    if folder != K8S:
        return
    processor = next(d for d in docs if d["kind"] == "Deployment" and "processor" in d["metadata"]["name"])
    assert processor["spec"]["replicas"] == 1
    # Two /metrics ports (train and join stage): no prometheus.io/port narrowing the scrape to one
    # (tests/unit/deploy/test_k8s.py checks every pod's scraped ports against the engine's).
    assert "prometheus.io/port" not in processor["spec"]["template"]["metadata"]["annotations"]
    (container,) = processor["spec"]["template"]["spec"]["containers"]
    assert run.metrics.prometheus_port in {p["containerPort"] for p in container["ports"]}


def test_the_snapshot_age_panel_plots_what_the_stale_alert_reads(dashboard):
    # The alert moved to the period boundary (a quiet stream passes boundaries without a version); the
    # panel's "alert threshold" line stayed against the snapshot's age, and a quiet stream looked stale.
    groups = load(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "ReloopSnapshotStale")
    aged = re.search(r"time\(\) - (reloop_\w+)", rule["expr"]).group(1)
    panel = next(
        p for p in dashboard["panels"]
        if any("reloop_snapshot_period_seconds" in t["expr"] for t in p.get("targets", []))
    )  # fmt: skip
    plotted = rf"time\(\) - (max by \(job\) \()?{aged}\)?"
    assert any(re.fullmatch(plotted, t["expr"]) for t in panel["targets"])


def test_a_panel_that_mixes_rates_and_counts_puts_them_on_two_axes(dashboard):
    # "Joiner state" drew impressions pending (thousands) and expired per second on one axis, in one unit.
    def per_second(expr: str) -> bool:
        return "rate(" in expr and "increase(" not in expr

    for panel in (p for p in dashboard["panels"] if p["type"] == "timeseries"):
        kinds = {t["refId"]: per_second(t["expr"]) for t in panel["targets"]}
        if len(set(kinds.values())) < 2:
            continue
        on_right = {
            o["matcher"]["options"]
            for o in panel["fieldConfig"]["overrides"]
            if o["matcher"]["id"] == "byFrameRefID"
            and {"id": "custom.axisPlacement", "value": "right"} in o["properties"]
        }
        assert on_right, panel["title"]
        assert len({kinds[r] for r in on_right}) == 1, panel["title"]  # one kind on the right
        assert {r for r, k in kinds.items() if k == kinds[next(iter(on_right))]} == on_right, panel["title"]
