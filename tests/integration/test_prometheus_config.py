"""promtool accepts deploy/prometheus (config, rules) and the alert rules' own unit tests pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from reloop.connectors.metrics.local_prometheus import find_binary

pytestmark = pytest.mark.prometheus

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


@pytest.fixture(scope="session")
def promtool(unavailable) -> Path:
    return find_binary("promtool") or unavailable("promtool not found: run deploy/prometheus/fetch.sh")


def run(promtool: Path, *args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_check_config(promtool):
    r = run(promtool, "check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.scale-out.yml"])
def test_check_config_of_each_shape(promtool, config):
    """prometheus.scale-out.yml: deploy/compose.scale-out.yaml's joiners (DNS discovery) and train ranks."""
    r = run(promtool, "check", "config", config)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_rules(promtool):
    r = run(promtool, "check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rule_unit_tests(promtool):
    r = run(promtool, "test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_a_broken_threshold_fails_the_rule_tests(promtool, tmp_path):
    """The rule tests can fail: raising the stale-snapshot threshold must break them."""
    shutil.copy(PROM_DIR / "alerts_test.yml", tmp_path)
    text = (PROM_DIR / "alerts.yml").read_text()
    broken = text.replace("> 2 * reloop_snapshot_period_seconds", "> 5 * reloop_snapshot_period_seconds")
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    r = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert r.returncode != 0
    assert "ReloopSnapshotStale" in r.stdout + r.stderr
