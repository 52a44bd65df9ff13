"""The alert rules and the Grafana dashboard use only label names the series they query carry: the
labels of connectors/metrics/prometheus.py's SERIES (the only place metric names and labels are
written), plus what Prometheus adds to every target (job, instance) and a histogram's le. A label the
code does not export matches nothing: a selector on it selects nothing, a `by` on it sums everything
into one series and a template on it renders empty, and none of that fails promtool."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from reloop.connectors.metrics.prometheus import BUILD_INFO, SERIES, build_info

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
#: What Prometheus adds to every scraped series (and all `up` carries).
TARGET_LABELS = frozenset({"job", "instance"})
METRIC = re.compile(r"\b(reloop_[a-z0-9_]+|up)\b(?!\s*\()")
SELECTOR = re.compile(r"\b(reloop_[a-z0-9_]+|up)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def series_labels() -> dict[str, frozenset[str]]:
    """Every series a scrape can hold -> its label names (as the collector exports them)."""
    out = {BUILD_INFO: frozenset(build_info()), "up": frozenset()}
    for s in SERIES:
        labels = frozenset(s.labels)
        if s.kind == "histogram":
            out |= {s.name + "_bucket": labels | {"le"}, s.name + "_sum": labels, s.name + "_count": labels}
        else:
            out[s.name] = labels
    return {name: labels | TARGET_LABELS for name, labels in out.items()}


def label_problems(
    expr: str, templates: str = "", known: dict[str, frozenset[str]] | None = None
) -> list[str]:
    """What in ``expr`` (and the ``templates`` rendered from its result: legends, annotations) names a
    label the series it queries do not carry."""
    known = series_labels() if known is None else known
    problems = []
    metrics = set(METRIC.findall(expr))
    unknown = metrics - set(known)
    if unknown:
        return [f"unknown series {sorted(unknown)}"]
    for name, matchers in SELECTOR.findall(expr):
        for label in MATCHER.findall(matchers):
            if label not in known[name]:
                problems.append(f"{name}{{{label}=...}}: {name} has no label {label!r}")
    anywhere = frozenset().union(*(known[m] for m in metrics)) if metrics else TARGET_LABELS
    for group in GROUPING.findall(expr):
        for label in (x.strip() for x in group.split(",") if x.strip()):
            if label not in anywhere:
                problems.append(f"({group}): no queried series has a label {label!r}")
    for label in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", templates) + re.findall(
        r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", templates
    ):
        if label not in anywhere and label not in ("end", "else"):  # Go template actions, not labels
            problems.append(f"template names {label!r}, which no queried series carries")
    return problems


def test_the_label_check_finds_what_it_is_for() -> None:
    assert (
        label_problems('sum by (topic) (rate(reloop_events_consumed_total{topic="a"}[5m]))', "{{topic}}")
        == []
    )
    assert (
        label_problems(
            "histogram_quantile(0.9, sum by (le, arm) (rate(reloop_serve_latency_seconds_bucket[5m])))"
        )
        == []
    )
    assert label_problems('up{job="x"} == 0', "{{ $labels.instance }}") == []
    # A label of another series, a misspelt one, a template of a label the result lacks, an unknown name.
    assert label_problems('reloop_dead_letters_total{topic="a"}')
    assert label_problems("sum by (reasons) (reloop_dead_letters_total)")
    assert label_problems("reloop_train_loss", "{{ $labels.arm }}")
    assert label_problems("reloop_train_loss", "{{part}}")
    assert label_problems("reloop_no_such_series > 0")
    assert label_problems("sum by (le) (reloop_serve_latency_seconds_sum)")


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_alert_rules_use_only_exported_labels(rule: dict) -> None:
    templates = json.dumps(rule.get("annotations", {})) + json.dumps(rule.get("labels", {}))
    assert label_problems(rule["expr"], templates) == []


def test_dashboard_queries_use_only_exported_labels() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "reloop.json").read_text())
    checked = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            problems = label_problems(target["expr"], target.get("legendFormat", ""))
            assert problems == [], (panel["title"], target["expr"], problems)
            checked += 1
    assert checked
    for variable in dashboard["templating"]["list"]:
        for metric, label in re.findall(r"label_values\((\w+),\s*(\w+)\)", variable.get("definition", "")):
            assert label in series_labels()[metric], (variable["name"], metric, label)
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert label_problems(annotation["expr"], annotation.get("titleFormat", "")) == []
