"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yml (the one source of the alerts).

    python deploy/k8s/gen_prometheusrule.py           # rewrite it
    python deploy/k8s/gen_prometheusrule.py --check   # exit 1 if it is out of date

The rules are copied as text (comments kept) under ``spec.groups`` of a Prometheus Operator
PrometheusRule; tests/unit/deploy/test_k8s.py fails when the file is out of step with alerts.yml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
TARGET = HERE / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/k8s/gen_prometheusrule.py: edit alerts.yml and
# run `python deploy/k8s/gen_prometheusrule.py` (a test fails while the two differ).
# The same alerts as the plain Prometheus setup, for the Prometheus Operator; your Prometheus must select
# this rule (its ruleSelector; many installs want a `release` label).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: reloop-alerts
  labels: {app.kubernetes.io/part-of: reloop}
spec:
"""


def render(alerts_text: str) -> str:
    """The PrometheusRule: alerts.yml's ``groups:`` block, indented under ``spec``."""
    doc = yaml.safe_load(alerts_text)
    if not isinstance(doc, dict) or set(doc) != {"groups"}:
        raise ValueError(f"{ALERTS}: expected one top-level key, groups (has {sorted(doc or {})})")
    lines = alerts_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "\n".join(("  " + line) if line.strip() else "" for line in lines[start:])
    text = HEADER + body.rstrip() + "\n"
    if yaml.safe_load(text)["spec"]["groups"] != doc["groups"]:
        raise AssertionError("the rendered PrometheusRule does not hold alerts.yml's groups")
    return text


def main(argv: list[str]) -> int:
    # argparse: any other argument (--help, a typo) must not rewrite the file, as it did
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the file is out of date; write nothing"
    )
    args = parser.parse_args(argv)
    text = render(ALERTS.read_text())
    if args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python {Path(__file__).relative_to(HERE.parents[1])}")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
