"""Run a real Prometheus server on loopback with its own config and a throwaway TSDB.

For integration tests and local demos; the binaries come from ``deploy/prometheus/fetch.sh``.

    with LocalPrometheus(targets={"reloop": ["127.0.0.1:9464"]}, workdir=tmp) as prom:
        prom.wait_for("reloop_rolling_auc", timeout=30)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from reloop.engine.netaddr import http_url

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_BIN = REPO_ROOT / ".state" / "prometheus" / "bin"


def find_binary(name: str) -> Path | None:
    """``$PROMETHEUS_BIN``/``$PROMTOOL_BIN``, then the fetch.sh cache, then PATH."""
    env = os.environ.get(f"{name.upper()}_BIN")
    if env:
        return Path(env) if Path(env).is_file() else None
    cached = CACHE_BIN / name
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    found = shutil.which(name)
    return Path(found) if found else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalPrometheus:
    """A Prometheus child process scraping ``targets`` (job name -> host:port list)."""

    def __init__(
        self,
        *,
        targets: dict[str, list[str]],
        workdir: Path,
        binary: Path | None = None,
        scrape_interval: str = "1s",
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        found = binary or find_binary("prometheus")
        if found is None:
            raise FileNotFoundError("prometheus binary not found: run deploy/prometheus/fetch.sh")
        self.binary = found
        self.targets = targets
        self.workdir = Path(workdir)
        self.scrape_interval = scrape_interval
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(addrs)}]}
                for job, addrs in self.targets.items()
            ],
        }

    def start(self, timeout: float = 30.0) -> LocalPrometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config()))
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address={self.host}:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the ``result`` list (each with ``metric`` labels and ``value``)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5.0)
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def targets_health(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=5.0)
        r.raise_for_status()
        return r.json()["data"]["activeTargets"]

    def wait_for(self, promql: str, *, timeout: float = 30.0, min_results: int = 1) -> list[dict[str, Any]]:
        """Poll until ``promql`` returns at least ``min_results`` series (a new target's series
        appears only after several scrapes)."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if len(result) >= min_results:
                return result
            time.sleep(0.5)
        raise TimeoutError(
            f"{promql!r} returned {len(result)} series after {timeout}s; targets: {self.targets_health()}"
        )

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
